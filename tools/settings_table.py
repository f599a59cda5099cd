"""Print the README's configuration table from the Settings dataclass (the one source of truth)."""

from __future__ import annotations

import sys
from dataclasses import MISSING, fields

from cifar_serve.server.settings import ENV_PREFIX, Settings


def table() -> str:
    rows = ["| flag | environment variable | default | meaning |", "| --- | --- | --- | --- |"]
    for f in fields(Settings):
        default = "" if f.default is MISSING else repr(f.default)
        flag = "--" + f.name.replace("_", "-")
        rows.append(f"| `{flag}` | `{ENV_PREFIX}{f.name.upper()}` | `{default}` | {f.metadata['help']} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.stdout.write(table())
