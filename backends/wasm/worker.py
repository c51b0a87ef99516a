"""What runs in a wasm worker: one container process, from fork to exit.

Theory of operation
-------------------
The backend forks a worker from the shim server (`Reaper.fork`) for the
container's init and for each exec process, and keeps the worker's pid (that
is the pid containerd sees), a pidfd and two pipes. Nothing in a worker
imports a module, logs, or takes a lock of the server (see `Reaper.fork`);
everything it calls was imported by the server, which itself never makes an
Engine, compiles or runs wasm, so no wasmtime thread pool exists in it to be
missing in the fork (spec wasm.md §1.11).

Fds, as `Reaper.fork` installs them:

    2        the shim's stderr (its log): notes until the guest runs
    3, 4, 5  the process's stdin, stdout, stderr (the framework's; /dev/null if none)
    6        status, worker -> backend: one message, then closed:
             "ok\\t<how the module was loaded>" or "<error class>\\t<message>"
    7        control, backend -> worker: b"J" once the worker is in the
             container's cgroup, b"S" to run the guest; EOF: exit quietly
    8        exec workers only: a pidfd of the container's init

Steps: wait for J (so everything from here is charged to the container's
cgroup); prepare — read the module (a file of the rootfs, or an image's wasm
layer the backend stored and checked in its own directory: `Plan.layer`),
load it through the compile cache, check the entry point, link WASI, build
the store with its limits; report ok or the error (the backend's `create`
raises it); trim the compile cache if the module was just stored there (after
the report: not on the create path); wait for S; make 3-5 the guest's
stdio 0-2; apply rlimits and user; load the seccomp program (the backend
compiled the profile to BPF); instantiate and run; exit with the status below.
Instantiation waits for S, because it may run guest code (a start function).

Exit statuses (what containerd records and `ctr` prints):

    guest returns from `_start` (or the `#function`)   0
    component's `wasi:cli/run` returns ok / err         0 / 1 (as the wasmtime CLI)
    guest calls proc_exit(n) (C `exit(n)`)              n & 0xFF, as a native exit(n)
    trap: unreachable (C abort(), Rust panic),          134
      stack overflow, out-of-bounds, ... and any
      other wasmtime error while the guest runs
    killed by signal s (kill, OOM kill)                 128 + s: SIGTERM 143, SIGINT 130,
                                                        SIGKILL 137
    exec whose container's init exited                  137 (killed, as in a pid namespace)

Exit codes >= 126: WASI preview 1's proc_exit takes a u32, but wasmtime
rejects codes outside [0, 126) with an error instead of an exit (spec §1.7);
the worker defines proc_exit itself, so `exit(200)` is 200 and `exit(-1)` is
255, exactly what the same C program reports natively. (A WASIp2 component
exits through `wasi:cli/exit`, which carries only ok/err: 0 or 1.)

Traps are 134, the status of a native process that aborts (SIGABRT): wasi-libc's
`abort()` and a Rust panic (panic=abort) both compile to `unreachable`, so a
guest that aborts looks like the same program aborting natively. runwasi
reports 137 for every error instead, which cannot be told apart from
`kill -9` or an OOM kill; 134 can. The trap's message and wasm backtrace go to
the guest's stderr first.

Signals: every disposition is the default (`Reaper.fork`), so SIGTERM, SIGINT
and SIGKILL end a worker at once, also a guest blocked inside a WASI call
(sleep, a stdin read), which no epoch or fuel mechanism could interrupt
(spec §2). There is no graceful-shutdown hook for guests: WASI preview 1 has
no signals.

Memory: the store's `memory_size` limit (per linear memory) is the
container's memory limit minus what the container's cgroup already uses when
the worker is ready (this worker's own Python and wasmtime pages, and any
other process of the container) and RUN_SLACK for the runtime's growth while
running. So a guest that allocates too much sees `memory.grow` fail (C malloc
returns NULL) instead of being OOM-killed; the cgroup limit stays the hard
limit. A later Update of the memory limit does not change a running store's
limit (wasmtime has no way to), only the cgroup's.
"""

from __future__ import annotations

import os
import resource
import select
import signal
import threading
import time
from typing import Any

import attrs

from backends.wasm import cache
from shim_framework import cgroups, seccomp
from shim_framework.errors import InvalidArgument, PolyshimError

try:
    import wasmtime
    import wasmtime.component
except Exception:  # the backend's probe reports it
    wasmtime = None  # type: ignore[assignment]

STDERR_FD = 2
STDIO_FDS = (3, 4, 5)
STATUS_FD = 6
CONTROL_FD = 7
INIT_PIDFD = 8
JOINED, START = b"J", b"S"
ENTERED = b"+"  # on STATUS_FD, before the status: in the v1 hierarchies (Plan.cgroup)
TRAP_STATUS = 134  # 128 + SIGABRT
RUN_SLACK = 4 << 20  # memory the runtime may still take once the guest runs (measured ~1 MiB)
MIN_GUEST_MEMORY = 1 << 20
DEFAULT_ENTRY = "_start"
INITIALIZE = "_initialize"  # WASI reactors: call before any other export
RUN_INTERFACE = "wasi:cli/run@"
BACKTRACE_LINES = 30  # of a trap's message on the guest's stderr
# wasmtime's WASI runs on a multi-threaded tokio runtime that starts one thread per CPU
# unless this says otherwise; one guest in blocking calls needs one (spawn_blocking has
# its own pool), and 64 threads per container on a 64-CPU node cost CPU and memory.
TOKIO_THREADS = ("TOKIO_WORKER_THREADS", "1")


@attrs.frozen
class Plan:
    """One worker's job, decided by the backend before the fork."""

    module: str  # host path of the module: inside the rootfs, or (layer) the shim's own copy
    name: str  # the module as the spec names it (args[0] without "#function")
    kind: str  # cache.MODULE or cache.COMPONENT
    function: str  # "" for the default entry
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    rootfs: str  # canonical host path, preopened as "/"
    readonly: bool
    cache_dir: str
    cache_max_bytes: int
    memory_limit: int | None = None  # bytes, the container's memory limit
    memory_usage_file: str | None = None  # the cgroup file with the container's memory use
    seccomp: seccomp.Program | None = None  # compiled by the backend, loaded here
    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] = ()
    umask: int | None = None
    rlimits: tuple[tuple[int, int, int], ...] = ()  # (RLIMIT_*, soft, hard)
    die_with_init: bool = False  # exec workers: INIT_PIDFD is the init's pidfd
    # module is an image's wasm layer the backend stored and checked in its own directory
    # (backends.wasm.oci), not a file of the rootfs
    layer: bool = False
    # Set where memory is accounted in cgroup v1: the worker enters these v1 hierarchies
    # itself, at once (cgroups.enter_v1: no RCU wait), says so (ENTERED) and prepares while
    # the backend adds it to cgroup2. Otherwise the backend moves it before it prepares.
    cgroup: cgroups.Cgroup | None = None


class GuestExit(BaseException):
    """Raised by our proc_exit; unwinds the guest (wasmtime turns it into a trap and back)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@attrs.define
class _Prepared:
    run: Any  # () -> int: instantiate and call the entry; the exit status
    loaded: str  # how the module was loaded, for the backend's log
    stored: str | None  # the cache entry just written (then the cache is trimmed), else None


def main(plan: Plan) -> int:
    """The worker, from fork to exit status (Reaper.fork's child)."""
    os.environ.setdefault(*TOKIO_THREADS)  # one thread here, so setenv is safe
    if plan.cgroup is None and _read_control() != JOINED:
        return 0  # the backend gave up on us
    try:
        if plan.cgroup is not None:
            cgroups.enter_v1(plan.cgroup)
            _write(STATUS_FD, ENTERED.decode())
        prepared = _prepare(plan)
    except PolyshimError as e:
        _report(f"{type(e).__name__}\t{e}")
        _read_control()  # the backend closes it once it has read the error
        return 1
    except Exception as e:
        _note(f"wasm worker: preparing {plan.name} failed: {e!r}")
        _report(f"PolyshimError\t{plan.name}: the wasm worker failed: {e!r}")
        _read_control()
        return 1
    _report(f"ok\t{prepared.loaded}")
    if prepared.stored is not None:  # ready first: trimming is not on the create path
        _trim(plan, prepared.stored)
    if _read_control() != START:
        return 0  # deleted before it was started
    os.close(CONTROL_FD)
    _become_the_process(plan)
    if plan.die_with_init:
        _die_with(INIT_PIDFD)
    if plan.seccomp is not None:
        plan.seccomp.load()
    return int(prepared.run())


def _prepare(plan: Plan) -> _Prepared:
    began = time.monotonic()
    wasm = _read_module(plan)
    engine = cache.engine()
    loaded = cache.load(engine, plan.kind, wasm, plan.cache_dir, plan.name, _note)
    store = wasmtime.Store(engine)
    wasi = wasmtime.WasiConfig()
    wasi.argv = list(plan.argv)
    wasi.env = [list(pair) for pair in plan.env]
    wasi.inherit_stdin()
    wasi.inherit_stdout()
    wasi.inherit_stderr()
    wasi.preopen_dir(plan.rootfs, "/", not plan.readonly)
    store.set_wasi(wasi)  # always before running: a linked module without it aborts (§1.5)
    if plan.kind == cache.MODULE:
        run = _prepare_module(plan, engine, store, loaded.compiled)
    else:
        run = _prepare_component(plan, engine, store, loaded.compiled)
    limit = _guest_memory(plan)
    if limit is not None:
        store.set_limits(memory_size=limit)
    took = (time.monotonic() - began) * 1000
    how = f"{loaded.how} in {loaded.seconds * 1000:.1f} ms, ready in {took:.1f} ms"
    if limit is not None:
        how += f", guest memory limit {limit >> 20} MiB"
    return _Prepared(run, how, loaded.path if loaded.stored else None)


def _trim(plan: Plan, stored: str) -> None:
    """Trim the compile cache after *stored* was added to it (cache module, "Eviction")."""
    try:
        removed = cache.trim(plan.cache_dir, plan.cache_max_bytes, keep=stored)
    except OSError as e:
        _note(f"wasm cache: cannot trim {plan.cache_dir}: {e.strerror}")
    else:
        if removed:
            _note(f"wasm cache: removed {', '.join(removed)} (limit {plan.cache_max_bytes} bytes)")


def _read_module(plan: Plan) -> bytes:
    """The module's bytes. A file of the rootfs is never read from outside it, even if the
    rootfs changed since the backend resolved the path (a running guest can make symlinks in
    it); an image's wasm layer (`plan.layer`) only from a file of the shim's own that nobody
    else may write (the backend checked its digest)."""
    try:
        fd = os.open(plan.module, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise InvalidArgument(f"{plan.name}: cannot open the module: {e.strerror}") from None
    try:
        if plan.layer:
            if not cache.ours(os.fstat(fd)):
                raise InvalidArgument(
                    f"{plan.name}: the stored wasm layer {plan.module} is not a file of the "
                    "shim's own"
                )
        elif not os.readlink(f"/proc/self/fd/{fd}").startswith(plan.rootfs.rstrip("/") + "/"):
            raise InvalidArgument(f"{plan.name}: the module is outside the container's rootfs")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _prepare_module(plan: Plan, engine: Any, store: Any, module: Any) -> Any:
    entry = plan.function or DEFAULT_ENTRY
    exports = {e.name: e.type for e in module.exports}
    kind = exports.get(entry)
    if kind is None:
        functions = sorted(n for n, t in exports.items() if isinstance(t, wasmtime.FuncType))
        if plan.function:
            hint = f"exported functions: {', '.join(functions) or 'none'}"
        else:
            hint = (
                "it is not a WASI command; name the function to run as "
                f"{plan.name}#<function> (exported functions: {', '.join(functions) or 'none'})"
            )
        raise InvalidArgument(f'{plan.name}: the module exports no "{entry}"; {hint}')
    if not isinstance(kind, wasmtime.FuncType) or kind.params:
        raise InvalidArgument(
            f'{plan.name}: export "{entry}" is not a function without parameters; '
            "only such a function can be an entry point"
        )
    linker = wasmtime.Linker(engine)
    linker.allow_shadowing = True
    linker.define_wasi()
    exit_type = wasmtime.FuncType([wasmtime.ValType.i32()], [])
    linker.define_func("wasi_snapshot_preview1", "proc_exit", exit_type, _proc_exit)
    try:
        pre = linker.instantiate_pre(module)
    except wasmtime.WasmtimeError as e:
        raise InvalidArgument(
            f"{plan.name}: cannot be linked: {cache.cause(e)} (only WASI preview 1 imports "
            "are provided)"
        ) from None
    initialize = plan.function != "" and entry != DEFAULT_ENTRY and INITIALIZE in exports

    def run() -> int:
        def call() -> object:
            instance = pre.instantiate(store)
            found = instance.exports(store)
            if initialize:
                found[INITIALIZE](store)
            return found[entry](store)

        return _status(plan, call, lambda result: 0)

    return run


def _prepare_component(plan: Plan, engine: Any, store: Any, component: Any) -> Any:
    exports = component.type.exports(engine)
    if plan.function:
        if plan.function not in exports:
            raise InvalidArgument(
                f'{plan.name}: the component exports no "{plan.function}" '
                f"(exports: {', '.join(sorted(exports)) or 'none'})"
            )
        interface, function = None, plan.function
    else:
        interface = next((n for n in sorted(exports) if n.startswith(RUN_INTERFACE)), None)
        if interface is None:
            raise InvalidArgument(
                f"{plan.name}: the component exports no {RUN_INTERFACE}* interface; name a "
                f"function to run as {plan.name}#<function> "
                f"(exports: {', '.join(sorted(exports)) or 'none'})"
            )
        function = "run"
    linker = wasmtime.component.Linker(engine)
    linker.add_wasip2()

    def run() -> int:
        def call() -> object:
            instance = linker.instantiate(store, component)
            parent = None
            if interface is not None:
                parent = instance.get_export_index(store, interface)
            index = instance.get_export_index(store, function, parent)
            func = instance.get_func(store, index) if index is not None else None
            if func is None:
                raise wasmtime.WasmtimeError(f'export "{function}" is not a function')
            return func(store)

        return _status(plan, call, lambda result: 1 if getattr(result, "tag", "") == "err" else 0)

    return run


def _status(plan: Plan, call: Any, of_result: Any) -> int:
    """Run *call* (the guest) and turn how it ended into the exit status (module docstring)."""
    try:
        return of_result(call())
    except GuestExit as e:
        return e.code & 0xFF
    except wasmtime.ExitTrap as e:
        return e.code & 0xFF
    except (wasmtime.Trap, wasmtime.WasmtimeError) as e:
        parts = cache.cause(e).split("; ")
        traps = [part for part in parts if part.startswith("wasm trap:")]
        summary = "; ".join([*traps, *(part for part in parts if part not in traps)])
        if not traps:
            label = "wasm trap" if isinstance(e, wasmtime.Trap) else "wasmtime error"
            summary = f"{label}: {summary}"
        lines = str(e).strip().splitlines()
        if len(lines) > BACKTRACE_LINES:
            lines = [*lines[: BACKTRACE_LINES - 1], "    ...", *lines[-3:]]
        text = "\n".join(lines)
        _write(STDERR_FD, f"{plan.name}: {summary} (exit status {TRAP_STATUS})\n{text}\n")
        return TRAP_STATUS


def _proc_exit(code: int) -> None:
    raise GuestExit(code)


def _guest_memory(plan: Plan) -> int | None:
    """The store's memory_size limit (module docstring), None for no limit."""
    if plan.memory_limit is None or plan.memory_limit <= 0:
        return None
    used = 0
    if plan.memory_usage_file:
        try:
            with open(plan.memory_usage_file) as f:
                used = int(f.read().strip() or 0)
        except (OSError, ValueError):
            used = 0
    limit = plan.memory_limit - used - RUN_SLACK
    if limit < MIN_GUEST_MEMORY:
        raise InvalidArgument(
            f"{plan.name}: memory limit {plan.memory_limit >> 20} MiB leaves the guest "
            f"{max(limit, 0) >> 20} MiB: the worker itself and the container's other processes "
            f"use {(used + RUN_SLACK) >> 20} MiB of it; raise linux.resources.memory.limit"
        )
    return limit


def _become_the_process(plan: Plan) -> None:
    """Give the guest its stdio, and the worker the spec's rlimits, umask and user."""
    for target, fd in enumerate(STDIO_FDS):
        os.dup2(fd, target)
    for fd in STDIO_FDS:
        os.close(fd)
    for which, soft, hard in plan.rlimits:
        resource.setrlimit(which, (soft, hard))
    if plan.umask is not None:
        os.umask(plan.umask)
    if plan.uid is not None and plan.gid is not None:
        os.setgroups(list(plan.groups))
        os.setresgid(plan.gid, plan.gid, plan.gid)
        os.setresuid(plan.uid, plan.uid, plan.uid)


def _die_with(pidfd: int) -> None:
    """SIGKILL ourselves when the container's init exits (what a pid namespace does)."""

    def watch() -> None:
        select.select([pidfd], [], [])
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="die-with-init", daemon=True).start()


def _read_control() -> bytes:
    try:
        return os.read(CONTROL_FD, 1)
    except OSError:
        return b""


def _report(message: str) -> None:
    _write(STATUS_FD, message)
    os.close(STATUS_FD)


def _note(message: str) -> None:
    _write(STDERR_FD, f"polyshim wasm worker {os.getpid()}: {message}\n")


def _write(fd: int, text: str) -> None:
    data = memoryview(text.encode(errors="replace"))
    try:
        while data:
            data = data[os.write(fd, data) :]
    except OSError:
        pass  # nobody reads it any more
