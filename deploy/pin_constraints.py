"""Write deploy/constraints.txt: the exact versions of cifar-serve's runtime dependencies.

The image installs with ``pip install -c deploy/constraints.txt`` so every build resolves the
same versions the project was tested with. Run it from a venv holding a tested install::

    .venv/bin/python deploy/pin_constraints.py > deploy/constraints.txt

It walks ``cifar-serve``'s requirements (no extras) through the installed distributions'
metadata, evaluating environment markers for this interpreter (the image's Python and
platform should match: CPython 3.11 on linux x86_64).
"""

from __future__ import annotations

import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def runtime_closure(root: str = "cifar-serve") -> dict[str, str]:
    pins: dict[str, str] = {}
    seen: set[tuple[str, str]] = set()
    todo = [Requirement(root)]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        extras = ["", *sorted(req.extras)]
        if all((name, e) in seen for e in extras):
            continue
        seen.update((name, e) for e in extras)
        dist = metadata.distribution(req.name)
        pins[name] = dist.version
        for text in dist.requires or []:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras):
                todo.append(sub)
    pins.pop(canonicalize_name(root))
    return pins


def main() -> int:
    pins = runtime_closure()
    lines = [
        "# Exact versions of cifar-serve's runtime dependencies (CPython 3.11, linux x86_64),",
        "# written by deploy/pin_constraints.py; the Dockerfile installs with -c this file.",
        *(f"{name}=={version.split('+')[0]}" for name, version in sorted(pins.items())),
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
