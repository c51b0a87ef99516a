"""Precompiled wasm artifacts on disk, so a container's start skips compiling.

Theory of operation
-------------------
One file per (module bytes, wasmtime build, engine settings, module or
component): `<dir>/<key>.cwasm`, where `key` is the sha256 of

    FORMAT, the wasmtime version and the size and mtime of its shared library,
    every engine setting in ENGINE_SETTINGS, "module" or "component",
    the sha256 of the module's bytes

so another wasmtime, another setting or other bytes never meet this artifact
(wasmtime refuses artifacts from other versions and codegen-affecting settings,
spec wasm.md §1.3; a refusal here would only cost a recompile). The file is
wasmtime's serialized artifact (an ELF image) followed by a trailer: TRAILER
magic and the sha256 of the artifact. wasmtime ignores bytes after the ELF
image; the trailer catches what wasmtime's own checks do not (a flipped bit in
machine code deserializes fine, measured).

Loading (in a worker): open the file without following symlinks, check it is
a regular file of ours that nobody else may write, read it, check the trailer,
then `deserialize_file` through `/proc/self/fd/N`: the very file just checked
is mapped, not whatever the path names by then, and its pages are shared by
every worker running the same module. Anything wrong — short file, bad
trailer, refused by wasmtime — deletes the entry (if it is still the file we
read), recompiles and rewrites it; a note goes to the worker's fd 2 (the
shim's log). Deserializing is unsafe for bytes we did not produce (wasmtime's
contract), so only this 0700 directory is ever read, and the backend refuses a
directory other users can reach.

Writing (`store`, also for the image wasm layers of `backends.wasm.oci`): to
`.<key>.<pid>.<thread>.tmp` in the same directory (O_EXCL, 0600), fsync, then
`os.replace`: readers see the old file or the whole new one, concurrent
writers of one key each replace it with an identical artifact, a crash leaves
a temp file at worst (never read; the next writer with that pid and thread
removes it).
A failed write (disk full, read-only) only costs the next start a compile.

Eviction: after a worker stores an artifact (`Loaded.stored`) and has
reported ready, it trims the directory to `max_bytes` (the backend's
`cache_max_bytes`), off the create path: artifacts go least recently used
first, never the one just stored, and temporaries older than STALE_TEMPORARY
(their writer died) go too, also those in layers/. A hit refreshes the
entry's mtime when it is older than REFRESH_AFTER, so recency is exact to a
day at the cost of one write per entry per day, not one per start. Removing
an entry never disturbs a worker that has it open (its pages stay mapped);
two shims trimming at once only find each other's victims gone. The stored
image layers (`backends.wasm.oci`, in layers/) are not evicted: a running
container's exec may need its layer again.

Engines compile with `parallel_compilation=False`: a worker is short-lived and
single-purpose, and no compiler thread pool then exists in any process
(spec §1.11).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from shim_framework.errors import InvalidArgument

try:
    import wasmtime
    import wasmtime.component
except Exception:  # the backend's probe reports it; nothing here runs without it
    wasmtime = None  # type: ignore[assignment]

FORMAT = b"polyshim-wasm-cache-1"
TRAILER = b"\0PSWASM1"  # + 32 bytes of sha256(artifact)
SUFFIX = ".cwasm"
DEFAULT_DIR = "/var/lib/polyshim/wasm-cache"
DEFAULT_MAX_BYTES = 1 << 30
REFRESH_AFTER = 24 * 3600.0  # seconds
STALE_TEMPORARY = 3600.0  # seconds; a writer compiles within setup_timeout (2 min by default)
LAYER_DIR = "layers"  # in the cache directory: backends.wasm.oci's stored image layers
# Every Config setting the backend makes; all of them are part of the key.
ENGINE_SETTINGS: tuple[tuple[str, object], ...] = (
    ("strategy", "cranelift"),
    ("cranelift_opt_level", "speed"),
    ("parallel_compilation", False),
)
MODULE, COMPONENT = "module", "component"
_HEADERS = {MODULE: b"\0asm\x01\x00\x00\x00", COMPONENT: b"\0asm\x0d\x00\x01\x00"}
_DIGEST = 32


def _wasmtime_build() -> str:
    """The installed wasmtime's version and the identity of its shared library."""
    if wasmtime is None:
        return "none"
    package = Path(wasmtime.__file__).parent
    version = "unknown"
    try:
        for name in os.listdir(package.parent):
            if name.startswith("wasmtime-") and name.endswith(".dist-info"):
                version = name.removeprefix("wasmtime-").removesuffix(".dist-info")
    except OSError:
        pass
    libraries = []
    for library in sorted(package.glob("*/_libwasmtime.*")):
        st = library.stat()
        libraries.append(f"{library.name}:{st.st_size}:{st.st_mtime_ns}")
    return f"{version};{','.join(libraries)}"


WASMTIME_BUILD = _wasmtime_build()  # computed on import: workers must not do it (no imports)


def kind_of(header: bytes) -> str | None:
    """MODULE or COMPONENT from the first 8 bytes of a file; None if it is neither."""
    for kind, magic in _HEADERS.items():
        if header[:8] == magic:
            return kind
    return None


def engine() -> Any:
    """A new Engine with ENGINE_SETTINGS."""
    config = wasmtime.Config()
    for name, value in ENGINE_SETTINGS:
        setattr(config, name, value)
    return wasmtime.Engine(config)


def key(kind: str, wasm: bytes) -> str:
    digest = hashlib.sha256(FORMAT)
    for part in (WASMTIME_BUILD, repr(ENGINE_SETTINGS), kind, hashlib.sha256(wasm).hexdigest()):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()


@attrs.frozen
class Loaded:
    """A compiled module or component, and how it was obtained."""

    compiled: Any  # wasmtime.Module or wasmtime.component.Component
    how: str  # "cached", "compiled", "recompiled" (the entry was bad), "uncached" (no write)
    seconds: float
    path: str

    @property
    def stored(self) -> bool:
        """Whether *path* was just written: the directory may now be over its limit (`trim`)."""
        return self.how in ("compiled", "recompiled")


def load(
    eng: Any, kind: str, wasm: bytes, directory: str, name: str, note: Callable[[str], None]
) -> Loaded:
    """The compiled *wasm* from the cache in *directory*, else compiled and stored there;
    the caller trims the directory when `Loaded.stored` (module docstring, "Eviction").

    *note* gets one line per problem with the cache (never fatal). InvalidArgument:
    *wasm* is not valid WebAssembly for this engine (*name* is the module's name)."""
    began = time.monotonic()
    cls = wasmtime.Module if kind == MODULE else wasmtime.component.Component
    path = os.path.join(directory, key(kind, wasm) + SUFFIX)
    bad = False
    try:
        compiled = _deserialize(eng, cls, path)
        if compiled is not None:
            return Loaded(compiled, "cached", time.monotonic() - began, path)
    except _Corrupt as e:
        note(f"wasm cache: {path}: {e}; compiling again")
        bad = True
    try:
        compiled = cls(eng, wasm)
    except wasmtime.WasmtimeError as e:
        raise InvalidArgument(f"{name}: not a valid WebAssembly {kind}: {cause(e)}") from None
    how = "recompiled" if bad else "compiled"
    try:
        artifact = bytes(compiled.serialize())
        store(path, artifact + TRAILER + hashlib.sha256(artifact).digest())
    except OSError as e:
        note(f"wasm cache: cannot write {path}: {e.strerror}; the next start compiles again")
        how = "uncached"
    return Loaded(compiled, how, time.monotonic() - began, path)


def trim(directory: str, max_bytes: int, keep: str = "") -> list[str]:
    """Remove artifacts, least recently used first, until the rest take at most *max_bytes*
    (never *keep*), and stale temporaries, also those in LAYER_DIR; the names removed,
    relative to *directory*."""
    artifacts = []
    stale = []
    now = time.time()
    for where in (directory, os.path.join(directory, LAYER_DIR)):
        for entry in _listing(where):
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # gone meanwhile
            if not stat.S_ISREG(st.st_mode):
                continue
            if where == directory and entry.name.endswith(SUFFIX):
                artifacts.append((st.st_mtime, entry.path, st.st_size))
            elif entry.name.endswith(".tmp") and now - st.st_mtime > STALE_TEMPORARY:
                stale.append(entry.path)
    removed = []
    for path in stale:
        if _unlink(path):
            removed.append(os.path.relpath(path, directory))
    total = sum(size for _, _, size in artifacts)
    for _, path, size in sorted(artifacts):
        if total <= max_bytes:
            break
        if path != keep:
            if _unlink(path):
                removed.append(os.path.basename(path))
            total -= size
    return removed


def _listing(directory: str) -> list[os.DirEntry[str]]:
    """The entries of *directory*; none when it does not exist (yet)."""
    try:
        with os.scandir(directory) as entries:
            return list(entries)
    except FileNotFoundError:
        return []


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:  # another shim trimmed it first
        return False
    return True


class _Corrupt(Exception):
    pass


def _deserialize(eng: Any, cls: Any, path: str) -> Any:
    """The artifact at *path*, None when there is none; _Corrupt (entry removed) if bad."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:  # ELOOP: a symlink, which we never write
        _remove(path, None)
        raise _Corrupt(f"cannot open it ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        problem = check(fd, st)
        if problem is None:
            try:
                # the file just checked, not whatever *path* names by now
                checked = f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else path
                compiled = cls.deserialize_file(eng, checked)
                _refresh(fd, st)
                return compiled
            except wasmtime.WasmtimeError as e:
                problem = f"wasmtime refused it ({cause(e)})"
        _remove(path, st)
        raise _Corrupt(problem)
    finally:
        os.close(fd)


def _refresh(fd: int, st: os.stat_result) -> None:
    """Mark a hit for eviction (module docstring): a new mtime once it is a day old."""
    if time.time() - st.st_mtime > REFRESH_AFTER:
        try:
            os.utime(fd)
        except OSError:
            pass  # a read-only cache still serves; it only evicts less well


def check(fd: int, st: os.stat_result | None = None) -> str | None:
    """What is wrong with the cache file open at *fd*; None when it is intact and ours."""
    if not ours(st or os.fstat(fd)):
        return "not a regular file of ours, or writable by others"
    data = bytearray()
    while chunk := os.pread(fd, 1 << 20, len(data)):
        data += chunk
    artifact, trailer = data[: -len(TRAILER) - _DIGEST], data[-len(TRAILER) - _DIGEST :]
    if len(data) < len(TRAILER) + _DIGEST or not trailer.startswith(TRAILER):
        return "truncated or not written by polyshim (no trailer)"
    if hashlib.sha256(artifact).digest() != trailer[len(TRAILER) :]:
        return "checksum mismatch (corrupted)"
    return None


def ours(st: os.stat_result) -> bool:
    """Whether *st* is a regular file of ours that nobody else may write."""
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def store(path: str, data: bytes) -> None:
    """Write *data* to *path* atomically (module docstring, "Writing")."""
    directory, name = os.path.split(path)
    temporary = os.path.join(directory, f".{name}.{os.getpid()}.{threading.get_ident()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        fd = os.open(temporary, flags, 0o600)
    except FileExistsError:  # left by a writer that died as our thread: nobody else's now
        os.unlink(temporary)
        fd = os.open(temporary, flags, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(temporary)
        raise
    os.close(fd)
    try:
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _remove(path: str, read: os.stat_result | None) -> None:
    """Remove a bad entry, unless a writer has replaced it meanwhile."""
    try:
        now = os.lstat(path)
        if read is None or (now.st_ino, now.st_dev) == (read.st_ino, read.st_dev):
            os.unlink(path)
    except OSError:
        pass


def directory_problem(directory: str) -> str | None:
    """Why *directory* cannot hold the cache (made 0700 if missing); None when it can."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        st = os.lstat(directory)
    except OSError as e:
        return f"cannot make the cache directory {directory}: {e.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"cache directory {directory} is not a directory (a symlink?)"
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        return (
            f"cache directory {directory} must be owned by uid {os.geteuid()} with mode 0700 "
            f"(it has uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}): what is in it is "
            "run as machine code or WebAssembly; fix it, or point backends.wasm.cache_dir elsewhere"
        )
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"cache directory {directory} is not writable"
    return None


def cause(error: BaseException) -> str:
    """The cause of a wasmtime error on one line: its "Caused by" part, without backtrace."""
    head, caused_by, tail = str(error).partition("Caused by:")
    lines = tail.splitlines() if caused_by else head.splitlines()[:1]
    found = [_NUMBERED.sub("", line.strip()) for line in lines if line.strip()]
    return "; ".join(found) or type(error).__name__


_NUMBERED = re.compile(r"^\d+:\s*")
