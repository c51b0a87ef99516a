"""Build and install the native launcher (launcher.c) as `containerd-shim-polyshim-v2`.

pip installs a Python launcher script under that name; it works, but costs a
new interpreter (~20 ms here before any import) at each of the two times
containerd runs the shim binary per container. The native launcher hands
those runs to the warm template instead and falls back to this installation's
interpreter when no template answers, so replacing the script changes speed,
not behaviour. Building needs a C compiler (`cc`, or $CC).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from shim_framework import bootstrap, template
from shim_framework.bootstrap import SHIM_BINARY
from shim_framework.errors import PolyshimError

SOURCE = Path(__file__).with_name("launcher.c")
ELF_MAGIC = b"\x7fELF"


def default_destination() -> Path:
    """Where pip put the Python launcher: this installation's scripts directory."""
    return Path(sysconfig.get_path("scripts")) / SHIM_BINARY


def build(output: Path, python: str | None = None, template_socket: str | None = None) -> None:
    """Compile the launcher for *python* (default: this interpreter) to *output*."""
    python = python or sys.executable
    template_socket = template_socket or template.socket_path()
    compiler = shlex.split(os.environ.get("CC", "cc"))
    if shutil.which(compiler[0]) is None:
        raise PolyshimError(
            f"no C compiler: {compiler[0]} not found (install gcc, or set CC); "
            f"the Python launcher stays in place"
        )
    command = [
        *compiler, "-O2", "-Wall", "-Werror", "-o", str(output), str(SOURCE),
        f"-DPOLYSHIM_PYTHON={_c_string(python)}",
        f"-DPOLYSHIM_TEMPLATE={_c_string(template_socket)}",
        f"-DPOLYSHIM_DELETED_FILE={_c_string(bootstrap.DELETED_FILE)}",
        f"-DPOLYSHIM_KILLED_STATUS={bootstrap.KILLED_STATUS}",
        f"-DPOLYSHIM_VALUE_FLAGS={', '.join(map(_c_string, bootstrap._VALUE_FLAGS))}",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise PolyshimError(f"building the launcher failed: {shlex.join(command)}\n{result.stderr}")


def install(destination: Path | None = None) -> Path:
    """Build the launcher and put it at *destination* atomically (a running shim binary
    cannot be overwritten in place, only replaced)."""
    destination = destination or default_destination()
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent) as work:
        built = Path(work) / SHIM_BINARY
        build(built)
        built.chmod(0o755)
        os.replace(built, destination)
    return destination


def is_native(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == ELF_MAGIC
    except OSError:
        return False


def _c_string(text: str) -> str:
    """A C string literal of *text*, for a -D definition."""
    if any(c in text for c in '"\\\n\0'):
        raise PolyshimError(f"cannot build the launcher for a path with quotes, newlines: {text!r}")
    return f'"{text}"'
