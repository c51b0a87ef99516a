"""The wasm backend: WebAssembly workloads run by wasmtime, one worker process each.

A container's `process.args[0]` names the module inside the rootfs, optionally
with the function to run: `/app.wasm` (a WASI preview 1 command: `_start`; a
preview 2 component: its `wasi:cli/run` export) or `/app.wasm#greet` (any
exported function without parameters). argv is `process.args` as given, the
environment is `process.env`, the rootfs is the guest's `/` (read-only when
`root.readonly`), and nothing else of the host is visible. `process.cwd` has
no meaning in WASI preview 1 (the guest's cwd is `/`, spec wasm.md §1.5);
`process.terminal` is refused, WASI has no tty. When args[0] names no file in
the rootfs and the container's image has a wasm layer (an OCI wasm artifact),
that layer runs instead, from the backend's own copy (`<cache_dir>/layers`,
never the rootfs): `backends.wasm.oci`.

Processes: `create` makes the container's cgroup (`linux.cgroupsPath`, else
`/polyshim/<namespace>/<id>`; one that already has processes is refused and
left alone) with the spec's limits, forks a worker from the shim server
(`Reaper.fork`), puts it in the cgroup and lets it prepare: load the module
(through the compile cache, `backends.wasm.cache`), check the entry point,
link WASI, build the store. Any problem — no such module, not WebAssembly, no
`_start`, imports we do not provide — fails the Create with InvalidArgument
naming the module, and leaves no worker and no cgroup. `start` then lets the
guest run. The worker's pid is the container's pid: the framework's reaper
reports its exit, its cgroup gives Stats, Pids and OOM events. What runs in a
worker, and the exit statuses: `backends.wasm.worker`.

Kill signals the worker (through a pidfd, so never a recycled pid); `all`
signals every process in the container's cgroup. Every worker keeps the
default signal dispositions, so SIGTERM, SIGINT and SIGKILL end it at once,
also inside a blocking WASI call, with status 128 + signal. Exec runs another
module (or `module#function`) of the same rootfs in another worker in the same
cgroup, so under the same limits, with the same seccomp profile; an exec dies
(137) when the init exits, as it would in a pid namespace. Update applies new
limits to the cgroup (a running guest's store keeps its memory limit: wasmtime
cannot change it; how that limit is chosen: `backends.wasm.worker`, "Memory").
Pause and Resume use the cgroup2 freezer (`cgroup.freeze`; on hybrid hosts the
unified hierarchy has it): FailedPrecondition where the host has no cgroup2.

Applied from the spec: process args, env, user (uid, gid, additionalGids,
umask), rlimits, root.readonly, linux.resources (memory, cpu, pids, hugetlb,
as `cgroups.update`), linux.seccomp (always with no_new_privs: a worker never
execs). Not applied: namespaces (the guest sees no host resources beyond its
rootfs anyway), mounts, capabilities, AppArmor/SELinux labels, process.cwd.

Start path, measured under containerd 1.6/2.1 on a 2-vCPU VM (shim log lines
"worker ... forked in ..., ready ... later"), for a 144 KB wasi-libc module:

    cgroups.create (7 hierarchies on a hybrid host)           ~2 ms
    Reaper.fork of the shim server                            2.5-6 ms
    child runs (after-fork work, fds, signals)                ~3 ms
    joining the cgroup, where memory is accounted in v1: the
      worker writes 0 to each v1 `tasks` file itself (a
      thread moving itself takes no global lock)              ~1 ms
    worker prepares, warm cache: read + sha256 0.2 ms,
      check + deserialize_file 1.2-1.9 ms, engine, store,
      WASI, linker ~2 ms                                      4-6 ms
    worker prepares, cold: + compile (serial) and store        42-73 ms (69 ms here)
    => Create in the backend: 16-19 ms warm, ~80 ms cold; Start: one byte on a pipe,
       once the cgroup2 move (begun during Create) is done.

The cgroup2 move (a `cgroup.procs` write) waits for an RCU grace period in
the kernel, 6-15 ms here, while holding the lock every other cgroup move
needs: it would cost Create that much, and a move of the worker made during
it would wait too. So it runs on a thread once the worker is in its v1
hierarchies, while it prepares, and Start waits for it. On a pure cgroup2
host the backend moves the worker before it prepares (memory must be charged
to the container from the start).

Skipped on purpose: compiling (cache), parsing the seccomp profile in every
worker (compiled to BPF once per distinct profile in the shim: ~20 ms for
containerd's default profile), instantiating before Start, any import in the
worker.

Configuration, `[backends.wasm]`:

    cache_dir = "/var/lib/polyshim/wasm-cache"  # precompiled artifacts, and image wasm
                                                # layers in layers/; made 0700
    cache_max_bytes = 1073741824  # artifacts beyond it are evicted, least recently used
                                  # first (backends.wasm.cache, "Eviction")
    setup_timeout = 120.0    # seconds a worker may take to prepare (compiling a big module)

Resource handling: the framework owns the stdio fds. The backend owns, per
worker, a pidfd (closed when the process is deleted) and the write end of
its control pipe (closed at start); a worker that never started is killed on
delete. The cgroup is removed on delete, after every process in it is gone.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import resource
import select
import signal as signals
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from backends.wasm import cache, oci, worker
from shim_framework import cgroups, errors, seccomp
from shim_framework.backend import (
    Backend,
    Cap,
    Container,
    Created,
    ExecProcess,
    Probe,
    ProcessIO,
    Started,
)
from shim_framework.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PolyshimError,
    Unimplemented,
)
from shim_framework.rootfs import resolve_in_root

try:
    import wasmtime  # noqa: F401 - the template imports it once for every shim it forks

    _WASMTIME_ERROR = ""
except Exception as e:  # "cannot run here", said by probe(), not a crash on import
    _WASMTIME_ERROR = f"wasmtime is not importable: {e!r}"

log = logging.getLogger("polyshim.backend.wasm")

CONFIG_KEYS = frozenset({"cache_dir", "cache_max_bytes", "setup_timeout"})
SETUP_TIMEOUT = 120.0
STOP_TIMEOUT = 5.0  # for a killed worker to exit before its cgroup is removed
FREEZE_TIMEOUT = 5.0
SECCOMP_PROGRAMS = 16  # compiled seccomp profiles kept (CRI gives most pods the same one)
TERMINAL_MESSAGE = (
    "backend wasm does not support terminals: WASI has no tty; run the container without one"
)


class _JoiningCgroup2:
    """`cgroups.add_process_v2(cgroup, pid)` on a thread of its own.

    Where memory is accounted in cgroup v1 the worker enters the v1 hierarchies itself
    (`worker.Plan.cgroup`); the cgroup2 move waits out an RCU grace period in the kernel
    (6-15 ms here), and the worker needs cgroup2 (freezer, hugetlb) only once it runs, so
    it runs while the worker prepares (started when the worker says it is in its v1
    hierarchies: the move holds the lock the worker's own move needs) and Create does not
    wait for it: Start does."""

    def __init__(self, cgroup: cgroups.Cgroup, pid: int) -> None:
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._move, args=(cgroup, pid),
                                        name=f"cgroup2-join-{pid}", daemon=True)  # fmt: skip
        self._thread.start()

    def _move(self, cgroup: cgroups.Cgroup, pid: int) -> None:
        try:
            cgroups.add_process_v2(cgroup, pid)
        except BaseException as e:
            self.error = e

    def wait(self, raise_error: bool) -> None:
        self._thread.join()
        if raise_error and self.error is not None:
            raise self.error


@attrs.define(eq=False)
class _Worker:
    """One worker process, from the backend's side.

    Kill may come from any thread, also while Delete closes the pidfd: `lock` keeps a
    signal from going to a closed fd number that something else has opened since."""

    pid: int
    pidfd: int | None  # None: no pidfds on this kernel (or closed)
    control: int  # write end of its control pipe; -1 once closed
    lock: threading.Lock = attrs.field(factory=threading.Lock)
    joining: _JoiningCgroup2 | None = None  # its move into cgroup2, still under way

    def exited(self) -> bool:
        with self.lock:
            if self.pidfd is not None:
                return bool(select.select([self.pidfd], [], [], 0)[0])
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return True
            return False

    def signal(self, signum: int, what: str) -> None:
        if self.exited():
            raise NotFound(f"{what}: the process has exited")
        with self.lock:
            try:
                if self.pidfd is not None:
                    signals.pidfd_send_signal(self.pidfd, signum)
                else:
                    os.kill(self.pid, signum)
            except ProcessLookupError:
                raise NotFound(f"{what}: the process has exited") from None

    def wait(self, timeout: float) -> None:
        """Wait (at most *timeout* seconds) for the process to exit."""
        with self.lock:
            pidfd = None if self.pidfd is None else os.dup(self.pidfd)
        if pidfd is not None:  # a copy: select without holding the lock
            try:
                select.select([pidfd], [], [], timeout)
            finally:
                os.close(pidfd)
            return
        deadline = time.monotonic() + timeout
        while not self.exited() and time.monotonic() < deadline:
            time.sleep(0.01)

    def release(self, go: bytes | None) -> None:
        """Write *go* (if any) on the control pipe, then close it. Before START, the worker
        must be in all of its cgroup (errors from the cgroup2 move are raised here)."""
        if self.control < 0:
            return
        if self.joining is not None:
            joining, self.joining = self.joining, None
            joining.wait(raise_error=go == worker.START)
        if go is not None:
            with contextlib.suppress(BrokenPipeError):  # it died: its exit is on the way
                os.write(self.control, go)
        os.close(self.control)
        self.control = -1

    def close(self) -> None:
        self.release(None)
        with self.lock:
            if self.pidfd is not None:
                os.close(self.pidfd)
                self.pidfd = None


@attrs.define(eq=False)
class _Exec:
    plan: worker.Plan
    io: ProcessIO
    worker: _Worker | None = None


@attrs.define(eq=False)
class _Record:
    """What the backend keeps per container."""

    id: str
    spec: Mapping[str, Any]
    rootfs: str
    cgroup: cgroups.Cgroup
    init: _Worker | None = None
    execs: dict[str, _Exec] = attrs.field(factory=dict)
    layer: oci.Resolved | None = None  # the init's module is a wasm layer of the image (oci.py)


class WasmBackend(Backend):
    name = "wasm"
    capabilities = frozenset({Cap.EXEC, Cap.UPDATE, Cap.PAUSE})
    runs_sandbox_containers = False  # a pod's pause container is a Linux binary

    def __init__(self, host: Any) -> None:
        super().__init__(host)
        self.cache_dir = str(host.config.get("cache_dir", cache.DEFAULT_DIR))
        self.cache_max_bytes = int(host.config.get("cache_max_bytes", cache.DEFAULT_MAX_BYTES))
        self.setup_timeout = float(host.config.get("setup_timeout", SETUP_TIMEOUT))
        self._records: dict[str, _Record] = {}
        self._lock = threading.Lock()  # guards _records and each record's execs
        self._devnull = -1
        self._programs: dict[str, seccomp.Program | None] = {}  # seccomp profile -> BPF

    @classmethod
    def probe(cls, config: Mapping[str, Any]) -> Probe:
        if _WASMTIME_ERROR:
            return Probe.no(_WASMTIME_ERROR)
        unknown = sorted(set(config) - CONFIG_KEYS)
        if unknown:
            return Probe.no(
                f"backends.wasm: unknown key(s) {', '.join(unknown)} "
                f"(known: {', '.join(sorted(CONFIG_KEYS))})"
            )
        directory = config.get("cache_dir", cache.DEFAULT_DIR)
        if not isinstance(directory, str) or not directory.startswith("/"):
            return Probe.no(f"backends.wasm.cache_dir: {directory!r} is not an absolute path")
        limit = config.get("cache_max_bytes", cache.DEFAULT_MAX_BYTES)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            return Probe.no(
                f"backends.wasm.cache_max_bytes: {limit!r} is not a positive whole number of bytes"
            )
        timeout = config.get("setup_timeout", SETUP_TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            return Probe.no(f"backends.wasm.setup_timeout: {timeout!r} is not a positive number")
        problem = cache.directory_problem(directory)
        return Probe.no(problem) if problem else Probe.yes()

    @classmethod
    def unsupported(cls, cap: Cap) -> str:
        if cap is Cap.TERMINAL:
            return "WASI has no terminals; run the container without -t"
        if cap is Cap.CHECKPOINT:
            return "wasm guests cannot be checkpointed"
        return ""

    @classmethod
    def recognizes(cls, entrypoint: Path) -> bool:
        try:
            with open(entrypoint, "rb") as f:
                return f.read(4) == b"\0asm"
        except OSError:
            return False

    # -- init process ---------------------------------------------------------------------------

    def create(self, container: Container) -> Created:
        what = f'container "{container.id}"'
        if container.io.terminal or container.process.get("terminal"):
            raise Unimplemented(TERMINAL_MESSAGE)
        with self._lock:
            if container.id in self._records:
                raise AlreadyExists(f"{what}: already exists")
        problem = cache.directory_problem(self.cache_dir)
        if problem:
            raise FailedPrecondition(f"{what}: {problem}")
        rootfs = _rootfs(container)
        ns, cid = container.namespace, container.id
        plan, layer = self._plan(
            what, container.spec, container.process, rootfs, exec_of_init=False,
            layer_of=lambda args: oci.resolve(self.host, ns, cid, args, what, self.cache_dir),
        )  # fmt: skip
        linux = container.spec.get("linux") or {}
        path = _cgroup_path(linux.get("cgroupsPath"), container.namespace, container.id)
        cgroup = cgroups.create(path)
        try:
            busy = cgroup.procs()
        except NotFound:
            busy = []
        if busy:  # someone else's: never set its limits, kill its processes or remove it
            raise FailedPrecondition(
                f"{what}: its cgroup {path} already has processes ({len(busy)}, e.g. "
                f"{busy[0]}); give the container a cgroup of its own (linux.cgroupsPath)"
            )
        record = _Record(container.id, container.spec, rootfs, cgroup, layer=layer)
        try:
            cgroups.update(cgroup, linux.get("resources"))
            plan = _in_cgroup(plan, cgroup)
            record.init = self._launch(what, plan, container.io, cgroup)
        except BaseException:
            _remove_cgroup(cgroup, what)
            raise
        with self._lock:
            self._records[container.id] = record
        return Created(record.init.pid)

    def start(self, container_id: str) -> Started:
        record = self._record(container_id)
        assert record.init is not None
        record.init.release(worker.START)
        return Started(record.init.pid)

    def kill(self, container_id: str, exec_id: str, signal: int, all: bool) -> None:
        record = self._record(container_id)
        what = f'container "{container_id}"'
        if all and not exec_id:
            try:
                pids = record.cgroup.procs()
            except NotFound:
                pids = []
            sent = 0
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal)
                    sent += 1
            if not sent:
                raise NotFound(f"{what}: no process left to signal")
            return
        if exec_id:
            execution = self._exec(record, exec_id)
            if execution.worker is None:
                raise FailedPrecondition(f'exec "{exec_id}" in {what}: not started yet')
            execution.worker.signal(signal, f'exec "{exec_id}" in {what}')
            return
        assert record.init is not None
        record.init.signal(signal, what)

    def delete(self, container_id: str, exec_id: str = "") -> None:
        record = self._record(container_id)
        what = f'container "{container_id}"'
        if exec_id:
            with self._lock:
                execution = record.execs.pop(exec_id, None)
            if execution is None:
                raise NotFound(f'exec "{exec_id}" in {what}: not found')
            if execution.worker is not None:
                _stop(execution.worker)
                execution.worker.close()
            return
        with self._lock:
            execs = list(record.execs.values())
        workers = [w for w in [record.init, *(e.worker for e in execs)] if w is not None]
        for w in workers:
            _stop(w)
        _remove_cgroup(record.cgroup, what)
        for w in workers:
            w.close()
        with self._lock:
            self._records.pop(container_id, None)

    @classmethod
    def cleanup(
        cls, bundle: Path, container_id: str, namespace: str, config: Mapping[str, Any]
    ) -> None:
        """After a dead shim: kill what is left in the container's cgroup and remove it."""
        try:
            spec = json.loads((bundle / "config.json").read_text())
        except (OSError, ValueError):
            spec = {}
        linux = spec.get("linux") or {} if isinstance(spec, dict) else {}
        path = _cgroup_path(linux.get("cgroupsPath"), namespace, container_id)
        cgroup = cgroups.create(path)  # the existing one; made (and removed) if it was gone
        _remove_cgroup(cgroup, f'container "{container_id}"')

    # -- exec ------------------------------------------------------------------------------------

    def exec(self, process: ExecProcess) -> None:
        record = self._record(process.container_id)
        what = f'exec "{process.exec_id}" in container "{process.container_id}"'
        if process.io.terminal or process.process.get("terminal"):
            raise Unimplemented(TERMINAL_MESSAGE)
        ns = self.host.namespace
        plan, _ = self._plan(
            what, record.spec, process.process, record.rootfs, exec_of_init=True,
            layer_of=lambda args: oci.reuse(record.layer, self.host, ns, args, what),
        )  # fmt: skip
        plan = _in_cgroup(plan, record.cgroup)
        with self._lock:
            if process.exec_id in record.execs:
                raise AlreadyExists(f"{what}: already exists")
            record.execs[process.exec_id] = _Exec(plan, process.io)

    def start_exec(self, container_id: str, exec_id: str) -> Started:
        record = self._record(container_id)
        execution = self._exec(record, exec_id)
        what = f'exec "{exec_id}" in container "{container_id}"'
        if execution.worker is not None:
            raise FailedPrecondition(f"{what}: already started")
        assert record.init is not None
        if record.init.exited():
            raise FailedPrecondition(f"{what}: the container's init has exited")
        if _frozen(record.cgroup):
            raise FailedPrecondition(f"{what}: the container is paused; resume it first")
        plan = execution.plan
        init_pidfd = record.init.pidfd
        if init_pidfd is None:
            plan = attrs.evolve(plan, die_with_init=False)
        execution.worker = self._launch(what, plan, execution.io, record.cgroup, init_pidfd)
        execution.worker.release(worker.START)
        return Started(execution.worker.pid)

    # -- pause, update ---------------------------------------------------------------------------

    def pause(self, container_id: str) -> None:
        _freeze(self._record(container_id).cgroup, True, f'container "{container_id}"')

    def resume(self, container_id: str) -> None:
        _freeze(self._record(container_id).cgroup, False, f'container "{container_id}"')

    def update(self, container_id: str, resources: Mapping[str, Any]) -> None:
        cgroups.update(self._record(container_id).cgroup, resources)

    # -- helpers ---------------------------------------------------------------------------------

    def _record(self, container_id: str) -> _Record:
        with self._lock:
            record = self._records.get(container_id)
        if record is None:
            raise NotFound(f'container "{container_id}": not found')
        return record

    def _exec(self, record: _Record, exec_id: str) -> _Exec:
        with self._lock:
            execution = record.execs.get(exec_id)
        if execution is None:
            raise NotFound(f'exec "{exec_id}" in container "{record.id}": not found')
        return execution

    def _plan(
        self,
        what: str,
        spec: Mapping[str, Any],
        process: Mapping[str, Any],
        rootfs: str,
        *,
        exec_of_init: bool,
        layer_of: Callable[[list[str]], oci.Resolved | None],
    ) -> tuple[worker.Plan, oci.Resolved | None]:
        """The worker's job for OCI *process*, and the image's wasm layer it runs, if any:
        args[0]'s file in the rootfs, else what *layer_of* (`oci.resolve`, `oci.reuse`)
        finds for args. InvalidArgument for what cannot work."""
        args = [str(a) for a in process.get("args") or []]
        try:
            module, name, function = _module(what, rootfs, args)
        except InvalidArgument:  # no such file: the module may be a wasm layer of the image
            layer = layer_of(args)
            if layer is None:
                raise
            module, name, kind = layer.path, layer.name, layer.kind
            function, argv = layer.function, layer.argv
        else:
            layer = None
            argv = tuple(args)
            with open(module, "rb") as f:
                kind = cache.kind_of(f.read(8))
            if kind is None:
                raise InvalidArgument(
                    f"{what}: {name} is not a WebAssembly module or component (no wasm header)"
                )
        env = tuple(tuple(e.split("=", 1)) for e in process.get("env") or [] if "=" in e)
        user = process.get("user") or {}
        linux = spec.get("linux") or {}
        memory = ((linux.get("resources") or {}).get("memory") or {}).get("limit")
        try:
            program = self._seccomp(linux.get("seccomp"))
        except PolyshimError as e:
            raise type(e)(f"{what}: {e}") from e
        plan = worker.Plan(
            module=module,
            name=name,
            kind=kind,
            function=function,
            argv=argv,
            env=env,  # type: ignore[arg-type]
            rootfs=rootfs,
            readonly=bool((spec.get("root") or {}).get("readonly")),
            cache_dir=self.cache_dir,
            cache_max_bytes=self.cache_max_bytes,
            memory_limit=memory if isinstance(memory, int) and memory > 0 else None,
            seccomp=program,
            uid=_id(user.get("uid"), "process.user.uid", what) if os.geteuid() == 0 else None,
            gid=_id(user.get("gid"), "process.user.gid", what) if os.geteuid() == 0 else None,
            groups=tuple(
                _id(g, "process.user.additionalGids", what)
                for g in user.get("additionalGids") or ()
            ),
            umask=user.get("umask") if isinstance(user.get("umask"), int) else None,
            rlimits=_rlimits(process.get("rlimits") or (), what),
            die_with_init=exec_of_init,
            layer=layer is not None,
        )
        return plan, layer

    def _launch(
        self,
        what: str,
        plan: worker.Plan,
        io: ProcessIO,
        cgroup: cgroups.Cgroup,
        init_pidfd: int | None = None,
    ) -> _Worker:
        """Fork a worker for *plan* into *cgroup* and wait until it is ready to run."""
        devnull = self._null()
        status_r, status_w = os.pipe()
        control_r, control_w = os.pipe()
        fds = {
            worker.STDERR_FD: 2,
            worker.STDIO_FDS[0]: devnull if io.stdin is None else io.stdin,
            worker.STDIO_FDS[1]: devnull if io.stdout is None else io.stdout,
            worker.STDIO_FDS[2]: devnull if io.stderr is None else io.stderr,
            worker.STATUS_FD: status_w,
            worker.CONTROL_FD: control_r,
        }
        if init_pidfd is not None:
            fds[worker.INIT_PIDFD] = init_pidfd
        began = time.monotonic()
        try:
            pid = self.host.fork(functools.partial(worker.main, plan), fds=fds)
        except BaseException:
            for fd in (status_r, control_w):
                os.close(fd)
            raise
        finally:
            os.close(status_w)
            os.close(control_r)
        forked = time.monotonic()
        started = _Worker(pid, _pidfd(pid), control_w)
        try:
            if plan.cgroup is None:  # else the worker enters v1 itself (worker.Plan.cgroup)
                cgroups.add_process(cgroup, pid)
                os.write(control_w, worker.JOINED)

            def entered() -> None:  # in its v1 hierarchies: now cgroup2 (see _JoiningCgroup2)
                if cgroup.directory() is not None:  # else a v1-only host: nothing to join
                    started.joining = _JoiningCgroup2(cgroup, pid)

            message = _read_status(status_r, self.setup_timeout, f"{what}: {plan.name}", entered)
        except BaseException:
            _stop(started)
            started.close()
            raise
        finally:
            os.close(status_r)
        kind, _, detail = message.partition("\t")
        if kind != "ok":
            _stop(started)
            started.close()
            if not kind:
                raise PolyshimError(
                    f"{what}: the wasm worker for {plan.name} died while preparing (killed, or "
                    "out of memory?); see the shim's log"
                )
            cls = getattr(errors, kind, PolyshimError)
            if not (isinstance(cls, type) and issubclass(cls, PolyshimError)):
                cls = PolyshimError
            raise cls(f"{what}: {detail}")
        log.info(
            "%s: worker %d for %s: forked in %.1f ms, ready %.1f ms later (module %s)",
            what, pid, plan.name, (forked - began) * 1000,
            (time.monotonic() - forked) * 1000, detail,
        )  # fmt: skip
        return started

    def _seccomp(self, profile: Any) -> seccomp.Program | None:
        """The profile compiled to BPF; each distinct profile once per shim (~20 ms each for
        containerd's default profile, measured)."""
        if not profile:
            return None
        key = json.dumps(profile, sort_keys=True)
        with self._lock:
            if key in self._programs:
                return self._programs[key]
        program = seccomp.compile(profile)  # no_new_privs: a worker never execs anyway
        with self._lock:
            while len(self._programs) >= SECCOMP_PROGRAMS:
                del self._programs[next(iter(self._programs))]
            self._programs[key] = program
        return program

    def _null(self) -> int:
        with self._lock:
            if self._devnull < 0:
                self._devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            return self._devnull


# -- helpers --------------------------------------------------------------------------------------


def _rootfs(container: Container) -> str:
    """The rootfs directory, canonical: the spec's root.path (relative to the bundle) when it
    names one, else the one the framework mounted."""
    root = (container.spec.get("root") or {}).get("path")
    path = container.rootfs
    if isinstance(root, str) and root:
        path = Path(root) if root.startswith("/") else container.bundle / root
    return os.path.realpath(path)


def _module(what: str, rootfs: str, args: list[str]) -> tuple[str, str, str]:
    """(host path, name, function) of args[0] ("<name>#<function>"): the module's path
    resolved inside the rootfs (`..` and absolute symlinks stay in it), and the function
    ("" for the default entry); InvalidArgument when it is not a regular file there."""
    if not args or not args[0]:
        raise InvalidArgument(
            f"{what}: process.args is empty; args[0] must name the module to run "
            "(a .wasm file in the rootfs, optionally with #function)"
        )
    name, _, function = args[0].partition("#")
    try:
        path = resolve_in_root(Path(rootfs), name)
    except (NotFound, InvalidArgument) as e:
        reason = "no such file in the container's rootfs"
        if isinstance(e, InvalidArgument):
            reason = str(e).removeprefix(f"{name}: ")
        raise InvalidArgument(
            f"{what}: module {name}: {reason}; args[0] must name a .wasm file in the image "
            "(optionally with #function)"
        ) from None
    if not path.is_file():
        raise InvalidArgument(f"{what}: module {name}: not a regular file in the rootfs")
    return str(path), name, function


def _cgroup_path(configured: Any, namespace: str, container_id: str) -> str:
    """linux.cgroupsPath as a cgroupfs path; systemd's "slice:prefix:name" is expanded as
    runc's systemd driver names it (`<slice path>/<prefix>-<name>.scope`)."""
    if not configured:
        return f"/polyshim/{namespace}/{container_id}"
    if not isinstance(configured, str):
        raise InvalidArgument(f"linux.cgroupsPath: {configured!r} is not a string")
    if ":" in configured and not configured.startswith("/"):
        slice_, prefix, name = [*configured.split(":"), "", ""][:3]
        parts, path = [], ""
        for word in (slice_ or "system.slice").removesuffix(".slice").split("-"):
            path = f"{path}-{word}" if path else word
            parts.append(f"{path}.slice")
        unit = f"{prefix}-{name}.scope" if prefix else f"{name}.scope"
        return "/" + "/".join([*parts, unit])
    return "/" + configured.strip("/")


def _in_cgroup(plan: worker.Plan, cgroup: cgroups.Cgroup) -> worker.Plan:
    """*plan* for a worker of *cgroup*: where to read its memory use, and whether it enters
    the cgroup's v1 hierarchies itself (see `worker.Plan.cgroup`)."""
    mode = cgroup.mode()
    return attrs.evolve(
        plan,
        memory_usage_file=_memory_usage_file(cgroup, mode),
        cgroup=cgroup if mode == "v1" else None,
    )


def _memory_usage_file(cgroup: cgroups.Cgroup, mode: str) -> str | None:
    if mode == "v1":
        directory = cgroup.directory("memory")
        return None if directory is None else os.path.join(directory, "memory.usage_in_bytes")
    directory = cgroup.directory()
    return None if directory is None else os.path.join(directory, "memory.current")


def _id(value: Any, where: str, what: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(f"{what}: {where} {value!r} is not a user or group id")
    return value


def _rlimits(specs: Any, what: str) -> tuple[tuple[int, int, int], ...]:
    found = []
    for spec in specs:
        name = spec.get("type") if isinstance(spec, Mapping) else None
        which = getattr(resource, name, None) if isinstance(name, str) else None
        soft, hard = (spec.get("soft"), spec.get("hard")) if isinstance(spec, Mapping) else (0, 0)
        if not (isinstance(name, str) and name.startswith("RLIMIT_") and isinstance(which, int)):
            raise InvalidArgument(f"{what}: process.rlimits: {spec!r} is not a known rlimit")
        if not all(isinstance(v, int) and v >= 0 for v in (soft, hard)):
            raise InvalidArgument(f"{what}: process.rlimits: {spec!r} needs soft and hard values")
        infinite = (1 << 64) - 1
        found.append(
            (
                which,
                resource.RLIM_INFINITY if soft >= infinite else soft,
                resource.RLIM_INFINITY if hard >= infinite else hard,
            )
        )
    return tuple(found)


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (OSError, AttributeError):  # gone already, or no pidfds here: signal by pid
        return None


def _read_status(fd: int, timeout: float, what: str, entered: Callable[[], None]) -> str:
    """The worker's status message: everything until it closes its end. A leading
    `worker.ENTERED` is not part of it: *entered* is called when it arrives."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(
                f"{what}: the wasm worker was not ready within {timeout:.0f} s; raise "
                "backends.wasm.setup_timeout for very large modules"
            )
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                return data.decode(errors="replace")
            if not data and chunk.startswith(worker.ENTERED):
                entered()
                chunk = chunk[len(worker.ENTERED) :]
            data += chunk


def _stop(w: _Worker) -> None:
    """Make sure *w* is gone: SIGKILL if it still runs, then wait (bounded) for its exit.

    The kill comes before the control pipe closes: a worker that reads EOF there exits 0,
    and a container deleted before its start must end as killed (137), as with runc."""
    if not w.exited():
        with contextlib.suppress(NotFound):
            w.signal(signals.SIGKILL, f"worker {w.pid}")
    w.release(None)
    w.wait(STOP_TIMEOUT)


def _remove_cgroup(cgroup: cgroups.Cgroup, what: str) -> None:
    """Kill whatever is left in *cgroup*, wait for it to empty, remove it."""
    with contextlib.suppress(FailedPrecondition, PolyshimError):
        if _frozen(cgroup):
            _freeze(cgroup, False, what)  # killed processes must run to exit
    deadline = time.monotonic() + STOP_TIMEOUT
    while True:
        try:
            pids = cgroup.procs()
        except NotFound:
            pids = []
        if not pids or time.monotonic() > deadline:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signals.SIGKILL)
        time.sleep(0.01)
    try:
        cgroups.remove(cgroup)
    except PolyshimError as e:
        raise FailedPrecondition(f"{what}: cannot remove its cgroup: {e}") from e


def _frozen(cgroup: cgroups.Cgroup) -> bool:
    directory = cgroup.directory()
    if directory is None:
        return False
    try:
        with open(os.path.join(directory, "cgroup.freeze")) as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def _freeze(cgroup: cgroups.Cgroup, frozen: bool, what: str) -> None:
    """Freeze or thaw *cgroup* with the cgroup2 freezer and wait until it is so."""
    directory = cgroup.directory()
    control = os.path.join(directory, "cgroup.freeze") if directory else ""
    if not control or not os.path.exists(control):
        raise FailedPrecondition(
            f"{what}: pausing needs the cgroup2 freezer (cgroup.freeze), which this host "
            "does not offer"
        )
    with open(control, "w") as f:
        f.write("1" if frozen else "0")
    deadline = time.monotonic() + FREEZE_TIMEOUT
    want = f"frozen {int(frozen)}"
    while True:
        with open(os.path.join(directory, "cgroup.events")) as f:  # type: ignore[arg-type]
            if want in f.read().splitlines():
                return
        if time.monotonic() > deadline:
            raise FailedPrecondition(
                f"{what}: the cgroup did not become {'frozen' if frozen else 'thawed'} within "
                f"{FREEZE_TIMEOUT:.0f} s"
            )
        time.sleep(0.002)
