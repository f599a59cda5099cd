"""Regenerate (or with --check, verify) the checked-in gRPC stubs under proto/cifar_serve/v1/.

protoc runs with ``-Iproto`` so generated modules import each other as ``cifar_serve.v1.*``.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"
PKG = PROTO_ROOT / "cifar_serve" / "v1"


def generate(out: Path) -> list[Path]:
    protos = sorted(PKG.glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *[str(p.relative_to(PROTO_ROOT)) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out / "cifar_serve" / "v1").glob("*_pb2*.py*"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="fail if the checked-in stubs are stale")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        generated = generate(Path(tmp))
        names = {p.name for p in generated}
        existing = {p.name for p in PKG.glob("*_pb2*.py*")}
        if args.check:
            stale = sorted(
                n
                for n in names | existing
                if n not in names
                or n not in existing
                or not filecmp.cmp(PKG / n, Path(tmp) / "cifar_serve" / "v1" / n, shallow=False)
            )
            if stale:
                sys.stderr.write(f"stale generated stubs (run `make gen`): {', '.join(stale)}\n")
                return 1
            return 0
        for n in existing - names:
            (PKG / n).unlink()
        for p in generated:
            shutil.copyfile(p, PKG / p.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
