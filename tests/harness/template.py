"""polyshim's warm template as a test or bench sees it from outside."""

from __future__ import annotations

import subprocess
from pathlib import Path


def template_pids(path: Path) -> list[int]:
    """Pids of the template listening at *path* (it names itself after its socket once its
    imports are done)."""
    found = subprocess.run(["pgrep", "-f", f"^polyshim-template {path}"],
                           capture_output=True, text=True)  # fmt: skip
    return [int(pid) for pid in found.stdout.split()]
