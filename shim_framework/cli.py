"""`polyshim`: the umbrella command (backends, containerd-config, doctor)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print(
        "polyshim: no subcommands are available yet (backends, containerd-config and doctor "
        "arrive with the shim)",
        file=sys.stderr,
    )
    return 2
