"""Run mypy on the ``cifar_serve`` package as it is installed (folders mapped by package-dir).

mypy cannot follow setuptools' editable finder, so this builds a temporary tree of symlinks
laid out as the import namespace and checks that.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = {"export": "export", "server": "server", "client": "client", "v1": "proto/cifar_serve/v1"}


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "cifar_serve"
        pkg.mkdir()
        for name, src in LAYOUT.items():
            (pkg / name).symlink_to(ROOT / src, target_is_directory=True)
        cmd = [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--explicit-package-bases",
            "-p",
            "cifar_serve",
        ]
        return subprocess.run(cmd, cwd=tmp).returncode


if __name__ == "__main__":
    sys.exit(main())
