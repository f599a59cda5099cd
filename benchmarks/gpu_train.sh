#!/usr/bin/env bash
# Trains the shipped model on a lent GPU (device tool). Carry .devdata (the two CIFAR-10 zips).
# Three recipes run side by side on the one GPU (each is launch-bound, the GPU mostly idle);
# the longest schedule that finishes is the one shipped, the others are ablations for MODEL_CARD.md.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
mkdir -p /tmp/pkg/cifar_serve && ln -sfn "$PWD/export" /tmp/pkg/cifar_serve/export
export PYTHONPATH=/tmp/pkg PYTHONUNBUFFERED=1 CIFAR_SERVE_CACHE=/tmp/cache
nvidia-smi -L; python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())'
T=${TRAIN_SECONDS:-380}
python3 -c 'from cifar_serve.export.data import load_cifar10; import time; t=time.time(); s=load_cifar10(".devdata"); print({k: len(v) for k, v in s.items()}, round(time.time()-t,1), "s decode")'
run() { name=$1; shift
  timeout "$T" python3 -c 'import sys; from cifar_serve.export.train import main; sys.exit(main())' \
    --data .devdata --out "/tmp/$name" "$@" > "$OUT/$name.log" 2>&1; echo "$name rc=$?" >> "$OUT/$name.log"; }
run A --epochs ${EPOCHS_A:-200} &
run B --epochs ${EPOCHS_B:-120} &
run C --epochs ${EPOCHS_C:-120} --batch-size 512 --lr 0.4 &
wait
for n in A B C; do tail -n 3 "$OUT/$n.log"; done
for n in A B C; do if [ -f /tmp/$n/model.pt ]; then echo "shipping $n" | tee "$OUT/shipped.txt"; split -b 14M /tmp/$n/model.pt "$OUT/model.pt.part-"; break; fi; done
ls -la "$OUT"
