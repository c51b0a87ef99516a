"""Test guests for the wasm backend, built from `tests/wasm_guests/` on demand.

`build_guest("hello")` compiles `hello.c` with clang for wasm32-wasi (wasi-libc,
`scripts/setup` installs both) or converts `hello.wat` with wasmtime's
`wat2wasm`, and returns the `.wasm` path. Results are cached under
`$POLYSHIM_CACHE/wasm-guests/<key>/`, where the key hashes the source, the
compiler command line and the compiler's version (or the wasmtime build for
WAT), so an edited source, other flags or another compiler never meets a stale
binary.

clang runs through `subprocess`: build guests before a `Reaper` starts in the
test process (a reaper would collect clang's exit status before subprocess
could), e.g. in a fixture the reaper's fixture depends on.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

from .containerd import CACHE_DIR
from .requirements import require_binary

GUESTS = Path(__file__).resolve().parent.parent / "wasm_guests"
CLANG_FLAGS = (
    "--target=wasm32-wasi",
    "--sysroot=/usr",
    "-I/usr/include/wasm32-wasi",
    "-L/usr/lib/wasm32-wasi",
    "-O2",
)
_versions: dict[str, str] = {}


def guest_names() -> list[str]:
    """Every guest in tests/wasm_guests, by name."""
    return sorted({p.stem for p in GUESTS.iterdir() if p.suffix in (".c", ".wat")})


def build_guest(name: str) -> Path:
    """The `.wasm` of guest *name* (`<name>.c` or `<name>.wat`), built unless cached."""
    c_source, wat_source = GUESTS / f"{name}.c", GUESTS / f"{name}.wat"
    if c_source.exists():
        clang = str(require_binary("clang"))
        command = (clang, *CLANG_FLAGS)
        source, tool = c_source, f"{command!r} {_version(clang)}"
    elif wat_source.exists():
        source, tool = wat_source, f"wat2wasm {_wasmtime_build()}"
    else:
        raise FileNotFoundError(f"no guest {name!r}: neither {c_source} nor {wat_source} exists")
    key = hashlib.sha256(source.read_bytes() + b"\0" + tool.encode()).hexdigest()[:32]
    target = CACHE_DIR / "wasm-guests" / key / f"{name}.wasm"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{name}.", suffix=".wasm")
    os.close(fd)
    try:
        if c_source.exists():
            result = subprocess.run(
                [*command, "-o", temporary, str(c_source)], capture_output=True, text=True
            )
            if result.returncode != 0:
                raise RuntimeError(f"clang failed on {c_source}:\n{result.stderr}")
        else:
            import wasmtime

            Path(temporary).write_bytes(bytes(wasmtime.wat2wasm(wat_source.read_text())))
        os.replace(temporary, target)  # whole or not at all, for concurrent test runs
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return target


def _version(clang: str) -> str:
    if clang not in _versions:
        result = subprocess.run([clang, "--version"], capture_output=True, text=True, check=True)
        _versions[clang] = result.stdout.splitlines()[0] if result.stdout else ""
    return _versions[clang]


def _wasmtime_build() -> str:
    from backends.wasm.cache import WASMTIME_BUILD

    return WASMTIME_BUILD
