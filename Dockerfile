# cifar-serve: the gRPC inference server for the CIFAR-10 ResNet18, as a container image.
#
#   docker build -t cifar-serve:cpu .                                  # CPU-only torch (small)
#   docker build -t cifar-serve:cuda --build-arg TORCH_VARIANT=cuda .  # CUDA torch from PyPI
#   docker run --rm -p 127.0.0.1:50051:50051 -p 127.0.0.1:8000:8000 -p 127.0.0.1:9090:9090 cifar-serve:cpu
#   docker run --rm -p 127.0.0.1:50061:50061 cifar-serve:cpu --port 50061   # stays healthy
#
# TORCH_VARIANT: cpu (the CPU wheel index, download.pytorch.org), cuda (PyPI's Linux wheels,
# which bundle CUDA and also run on CPU), or a PyTorch wheel index tag such as cu126.
# PYTHON_IMAGE: the base image, for a mirror where Docker Hub is out of reach. Versions come from pyproject.toml (torch, torchvision)
# and deploy/constraints.txt (everything else), so every build resolves the tested versions.
# tests/test_deploy.py checks this file against docker-compose.yml and the project.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtual environment holding cifar-serve and its pinned dependencies ----
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml ./
COPY deploy/constraints.txt deploy/constraints.txt
# Dependencies first (a layer that survives source edits): torch and torchvision at the
# versions pyproject.toml pins, from the wheel index of the chosen variant, then the rest.
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep=chr(10))" \
        > /tmp/requirements.txt \
 && grep -E '^(torch|torchvision)==' /tmp/requirements.txt > /tmp/torch.txt \
 && case "$TORCH_VARIANT" in \
      cuda) ;; \
      *) pip install --no-deps --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" -r /tmp/torch.txt ;; \
    esac \
 && pip install -c deploy/constraints.txt -r /tmp/requirements.txt
COPY proto/ proto/
COPY export/ export/
COPY server/ server/
COPY client/ client/
RUN pip install --no-deps . && pip check

# ---- artifacts: export the shipped weights (TorchScript + ONNX + manifest, parity-checked) ----
FROM build AS artifacts
COPY models/resnet18_cifar10.pt /src/models/resnet18_cifar10.pt
COPY tests/fixtures/cifar10-test-sample.zip /src/data/cifar10-test-sample.zip
COPY tests/fixtures/cifar10-train-calibration.zip /src/data/cifar10-train-calibration.zip
RUN cifar-export --checkpoint models/resnet18_cifar10.pt --out /app/artifacts \
        --parity-data data/cifar10-test-sample.zip \
        --calibration-data data/cifar10-train-calibration.zip --quiet \
 && test -f /app/artifacts/manifest.json

# ---- runtime: the venv, the artifacts, a non-root user ----
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="cifar-serve" \
      org.opencontainers.image.description="gRPC inference server for a CIFAR-10 ResNet18 (dynamic batching, Open Inference Protocol)" \
      org.opencontainers.image.licenses="Apache-2.0"
# A regular (not --system) account: uid 10001 lies in useradd's UID_MIN..UID_MAX, so no
# "above SYS_UID_MAX" warning; --no-log-init keeps a huge sparse lastlog out of the layer.
RUN groupadd --gid 10001 app \
 && useradd --no-log-init --uid 10001 --gid app --create-home --home-dir /home/app \
        --shell /usr/sbin/nologin app \
 && mkdir -p /artifacts /runs /data \
 && chown app:app /artifacts /runs /data
COPY --from=build /opt/venv /opt/venv
COPY --from=artifacts --chown=app:app /app/artifacts /app/artifacts
# The checkpoint and the parity sample stay in the image so that compose's `export` service
# (or `docker run --entrypoint cifar-export ...`) can export again into a volume.
COPY models/resnet18_cifar10.pt /app/models/resnet18_cifar10.pt
COPY tests/fixtures/cifar10-test-sample.zip /app/data/cifar10-test-sample.zip
# The int8 model's calibration sample (training images), for exports run from the image.
COPY tests/fixtures/cifar10-train-calibration.zip /app/data/cifar10-train-calibration.zip
COPY deploy/healthcheck.py /app/deploy/healthcheck.py
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CIFAR_SERVE_HOST=0.0.0.0 \
    CIFAR_SERVE_MODEL_DIR=/app/artifacts \
    CIFAR_SERVE_GRACE_PERIOD_S=8
WORKDIR /app
USER app:app
# gRPC, the v2 HTTP/REST API (on CIFAR_SERVE_HOST like gRPC), Prometheus metrics.
EXPOSE 50051 8000 9090
# Asks the server's own grpc.health.v1 service (no grpc_health_probe binary needed).
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/app/deploy/healthcheck.py"]
# SIGTERM starts the server's drain. The image drains for 8 s (CIFAR_SERVE_GRACE_PERIOD_S), less
# than `docker stop`'s default 10 s before SIGKILL, so a plain `docker stop` ends in exit 0; a
# longer --grace-period-s needs `docker stop -t` (or `docker run --stop-timeout`) above it.
STOPSIGNAL SIGTERM
ENTRYPOINT ["cifar-serve"]
CMD []
