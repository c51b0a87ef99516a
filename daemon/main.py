"""`polyshim-snapshotd` entry point."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("polyshim-snapshotd: not yet available", file=sys.stderr)
    return 2
