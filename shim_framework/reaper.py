"""The single owner of child exits in the shim.

Theory of operation
-------------------
The shim server is a child subreaper (`_platform.set_child_subreaper`), so
every container process ends up as its child: a container's init is
re-parented to it when `runc create` exits, exec processes when `runc exec
--detach` does. A child's exit status can be collected exactly once, by
whoever calls wait first. So ONE reaper collects all of them:

- `start()` (main thread) points `signal.set_wakeup_fd` at a pipe and installs
  a do-nothing Python handler for SIGCHLD, so the C-level handler writes a
  byte for every signal. One reaper thread reads the pipe and, on every
  wake-up, calls `os.wait4(-1, WNOHANG)` until it returns 0 or ECHILD:
  signals coalesce, one byte may stand for many exits. It also reaps once at
  start, for children that exited before the handler was installed.
- Each exit goes to exactly one owner. A process started with
  `spawn(..., own=True)` (and every `run()` command) has a waiter slot, and
  its exit goes to that slot, for `wait(pid)`. Every other exit (containers,
  exec processes, orphaned grandchildren) goes to `on_exit`, in the order
  reaped; pids it does not know are its business.
- Race-free ownership: `spawn` holds the reaper's lock across posix_spawn and
  the registration of the slot, and the reaper thread holds the same lock
  while it reaps and matches exits to slots. So an owned child that exits
  at once is reaped no earlier than its slot exists. Because reaping and
  matching share one critical section, a freed pid cannot be handed to a new
  child and its slot before the old exit has been matched either; and a
  slot's process is killed (on timeout) under the lock, so the kill cannot
  hit a pid that was reaped and reused meanwhile.
- Callbacks never run on the reaping thread: unowned exits and shutdown
  signals go, in the order they came, through a queue to one delivery
  thread that calls `on_exit` and `on_signal`. So a callback may run helper
  commands (the task service runs `runc kill --all` when an init exits):
  their exits are still reaped meanwhile. While a callback blocks, later
  callbacks wait, owned exits do not.
- The lock is not held while callbacks run. For an unowned pid this leaves a
  window between reaping and `on_exit` in which the pid could be reused;
  Linux hands out pids cyclically, so that needs a full wrap of the pid
  space within it. `on_exit` can also run before the `spawn` that started the
  process has returned its pid to the caller: buffer exits of pids you do
  not know yet (see the spec, section 6.4 "Early-exit race").

Nothing else in the shim may wait for children. `subprocess.Popen` must never
be used: its `wait()` and `__del__` poll with waitpid, which can steal an
exit, and on ECHILD CPython reports exit status 0, so a failed `runc create`
would look successful. Processes start with `os.posix_spawn` instead: no
Python code runs in the child, the child gets exactly the fds it is given,
default SIGPIPE and SIGXFSZ (Python ignores both, and ignored signals
survive exec into runc and containers) and an empty signal mask.
A backend whose workload is Python code (the wasm backend) uses `fork`
instead: the same fds, signals and mask, and the same exit path; its
docstring lists what the child must not do in a copy of a threaded process.

Only one reaper can be started per process (the wakeup fd is process-wide;
an asyncio loop in the main thread would take it over). `stop()` restores the
previous handlers and wakeup fd, so tests start and stop reapers freely.
"""

from __future__ import annotations

import _signal  # signal's wrappers make an enum of every number, ~60 per mask: on fork's path
import contextlib
import errno
import fcntl
import gc
import logging
import os
import queue
import selectors
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from shim_framework.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    PolyshimError,
    ResourceExhausted,
    Unavailable,
)

if TYPE_CHECKING:
    from pathlib import Path

log = logging.getLogger("polyshim.reaper")

DRAIN_AFTER_EXIT = 1.0  # run(): seconds to keep reading once the command has exited
KILL_GRACE = 5.0  # run(): seconds to wait for the exit of a command killed on timeout
STOP_GRACE = 10.0  # stop(): seconds to wait for a busy callback
_CHUNK = 64 * 1024
_CHILD_SIGDEF = (signal.SIGPIPE, signal.SIGXFSZ)  # ignored by Python; default in children
_SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_STOP = b"\0"  # not a signal number: wakes the reaper thread to stop
_MAX_FD = 1 << 20  # fork(): fds below this (or the fd limit) the child is not given are closed


@attrs.frozen
class Exit:
    """One child's exit, as the reaper collected it."""

    pid: int
    status: int  # exit code, or 128 + signal number when killed by a signal
    exited_at: float  # time.time() when reaped


@attrs.frozen
class CommandResult:
    """How a helper command run by `Reaper.run` ended, with its captured output."""

    argv: tuple[str, ...]
    status: int
    stdout: bytes
    stderr: bytes

    def check(self) -> CommandResult:
        """Return self if the command succeeded; else raise `CommandFailed`."""
        if self.status != 0:
            raise CommandFailed(self)
        return self


class CommandFailed(PolyshimError):
    """A helper command exited with a non-zero status; `result` has its output."""

    def __init__(self, result: CommandResult) -> None:
        message = f"command {_show(result.argv)}: exit status {result.status}"
        detail = _tail(result.stderr)
        super().__init__(f"{message}: {detail}" if detail else message)
        self.result = result


class CommandTimeout(DeadlineExceeded):
    """A command did not exit in time (`run` has killed it by then)."""

    def __init__(self, argv: Sequence[str], timeout: float | None, what: str = "") -> None:
        super().__init__(
            f"command {_show(argv)}: no exit within {timeout}s{what}; "
            "if it is just slow, give it a longer timeout"
        )
        self.argv = tuple(argv)
        self.timeout = timeout


class _Waiter:
    """The slot of an owned process; the reaper fills it in under the lock."""

    def __init__(self, argv: Sequence[str], notify_fd: int) -> None:
        self.argv = argv
        self.exit: Exit | None = None  # still None when done: the reaper stopped first
        self.done = threading.Event()
        self.notify_fd = notify_fd  # written to on exit, so a selector wakes up; -1: none
        self.abandoned = False  # nobody will wait: drop the exit when it comes


class Reaper:
    """Collects every child exit of the process and hands each to one owner.

    Resource handling: `start()` owns the wakeup pipe, the signal handlers, the
    reaper thread and the delivery thread; `stop()` gives all of them back,
    after the callbacks for what was reaped before it have run. `run()` owns the pipes
    it creates and closes them before returning. `spawn()` closes nothing of
    the caller's: the fds in `fds` stay open in the caller too.
    Error handling: an exception from `on_exit` or `on_signal` is logged and
    the reaper carries on; a reaper that stops fails pending `wait`s with
    Unavailable.
    """

    _started: ClassVar[Reaper | None] = None

    def __init__(
        self,
        on_exit: Callable[[Exit], None] | None = None,
        *,
        on_signal: Callable[[int], None] | None = None,
    ) -> None:
        self.on_exit = on_exit
        # Called (on the delivery thread) for SIGTERM/SIGINT; handled only if set at start().
        self.on_signal = on_signal
        self._lock = threading.Lock()
        self._waiters: dict[int, _Waiter] = {}
        self._running = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._delivery: threading.Thread | None = None
        self._queue: queue.SimpleQueue[Exit | int | None] = queue.SimpleQueue()
        self._wake_r = self._wake_w = -1
        self._old_handlers: dict[int, Any] = {}
        self._old_wakeup_fd = -1

    # -- lifecycle --

    def start(self) -> None:
        """Install the signal handling and start the reaper thread. Main thread only."""
        if threading.current_thread() is not threading.main_thread():
            raise FailedPrecondition(
                "reaper: start() called outside the main thread; signal handlers "
                "can only be installed there"
            )
        if Reaper._started is not None:
            raise FailedPrecondition(
                "reaper: another reaper is running in this process; stop it first "
                "(an exit can only have one owner)"
            )
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)  # set_wakeup_fd requires it
        self._old_wakeup_fd = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signals = [signal.SIGCHLD]
        if self.on_signal is not None:
            signals += _SHUTDOWN_SIGNALS
        for signum in signals:
            self._old_handlers[signum] = signal.signal(signum, _ignore)
        signal.siginterrupt(signal.SIGCHLD, False)  # SA_RESTART: spare C code the EINTRs
        self._stopping = False
        self._running = True
        self._waiters.clear()  # slots of a previous run, failed by its stop()
        Reaper._started = self
        self._queue = queue.SimpleQueue()
        self._delivery = threading.Thread(
            target=self._deliver, name="polyshim-reaper-callbacks", daemon=True
        )
        self._delivery.start()
        self._thread = threading.Thread(target=self._loop, name="polyshim-reaper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop reaping; restore the previous handlers and wakeup fd. Main thread only."""
        if Reaper._started is not self:
            return
        assert self._thread is not None and self._delivery is not None
        # Callbacks first, while exits are still reaped: they may be running commands.
        self._queue.put(None)
        self._delivery.join(STOP_GRACE)
        if self._delivery.is_alive():
            log.warning(
                "reaper: a callback is still busy after %ss; not waiting for it", STOP_GRACE
            )
        signal.set_wakeup_fd(self._old_wakeup_fd)
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._old_handlers.clear()
        self._stopping = True
        os.write(self._wake_w, _STOP)
        self._thread.join()
        with self._lock:
            self._running = False
            for waiter in self._waiters.values():
                waiter.done.set()  # exit None: wait() raises Unavailable (until a restart)
                _poke(waiter.notify_fd)
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._wake_r = self._wake_w = -1
        Reaper._started = None

    def _loop(self) -> None:
        while True:
            self._reap()
            if self._stopping:
                return
            data = os.read(self._wake_r, 512)
            for signum in data:
                if signum in _SHUTDOWN_SIGNALS:
                    self._queue.put(signum)

    def _deliver(self) -> None:
        while (item := self._queue.get()) is not None:
            if isinstance(item, Exit):
                if self.on_exit is not None:
                    self._call(self.on_exit, item)
            elif self.on_signal is not None:
                self._call(self.on_signal, item)

    def _reap(self) -> None:
        with self._lock:
            while True:
                try:
                    pid, status, _ = os.wait4(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                if not (os.WIFEXITED(status) or os.WIFSIGNALED(status)):
                    continue  # stopped/continued under a tracer: not an exit
                code = os.waitstatus_to_exitcode(status)
                exited = Exit(pid, 128 - code if code < 0 else code, time.time())
                waiter = self._waiters.get(pid)
                if waiter is None:
                    self._queue.put(exited)
                elif waiter.abandoned:
                    del self._waiters[pid]
                else:
                    waiter.exit = exited
                    waiter.done.set()
                    _poke(waiter.notify_fd)

    @staticmethod
    def _call(callback: Callable[[Any], None], arg: Any) -> None:
        try:
            callback(arg)
        except Exception:
            log.exception("reaper: callback %r failed for %r; carrying on", callback, arg)

    # -- processes --

    def spawn(
        self,
        argv: Sequence[str | Path],
        *,
        fds: Mapping[int, int] | None = None,
        cwd: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        setsid: bool = False,
        own: bool = False,
    ) -> int:
        """Start a process and return its pid.

        *fds* maps child fd -> our fd; child fds 0-2 not given get /dev/null, no
        other fd is inherited. Its exit goes to `on_exit`, unless *own*: then
        the caller must collect it with `wait(pid)` (exactly once)."""
        return self._spawn(argv, fds, cwd, env, setsid, own, notify_fd=-1)

    def fork(
        self,
        child: Callable[[], int],
        *,
        fds: Mapping[int, int] | None = None,
        setsid: bool = False,
    ) -> int:
        """Fork, run *child()* in the new process and exit with its int; return the pid.

        For backends that run their workload in Python (the wasm backend), where
        there is no program to spawn. The child gets exactly the fds in *fds*
        (child fd -> our fd, as for `spawn`; 0-2 not given get /dev/null; every
        other fd is closed), default dispositions for every signal, no wakeup fd,
        an empty signal mask and no cyclic garbage collection (see below); then
        `child()` runs and the process leaves with `os._exit(child() & 0xFF)`. An
        exception in the child writes its traceback to the child's fd 2 and exits
        1. The exit reaches `on_exit` like that of any spawned process.

        The caller is usually multi-threaded (the shim server), and only the
        forking thread exists in the child: locks other threads held stay held
        there forever. So *child* must not log, import modules, or take any lock
        shared with the parent (write diagnostics to fd 2 with `os.write`).
        Objects of the parent that own fds (sockets, files) remain in the child's
        heap after their fds were closed; if the garbage collector finalized one,
        it would close whatever the child has opened under that number since.
        Hence no cyclic GC in the child: it is short-lived or frees by refcount.
        The fork holds the reaper's lock, like `spawn`, so the child is not
        reaped before the pid is returned to the caller."""
        wanted = dict(fds or {})
        with self._lock:
            if not self._running:
                raise FailedPrecondition(
                    "fork: the reaper is not running; start it before starting "
                    "processes, or no one collects their exits"
                )
            # Signals stay blocked in the child until its handlers are the defaults: until
            # then a signal would run ours, which write to the wakeup fd (the reaper's pipe,
            # or after the fds are installed, whatever fd now has that number).
            mask = _signal.pthread_sigmask(_signal.SIG_BLOCK, _signal.valid_signals())
            try:
                pid = os.fork()
                if pid == 0:  # pragma: no cover - runs in the child, which never returns
                    _run_forked_child(child, wanted, setsid)
            finally:
                _signal.pthread_sigmask(_signal.SIG_SETMASK, mask)
        return pid

    def wait(self, pid: int, timeout: float | None = None) -> Exit:
        """The exit of *pid*, which must have been spawned with own=True.

        CommandTimeout if it has not exited within *timeout* seconds (the slot
        stays: wait again, or kill it and wait). Once an exit has been returned
        the slot is gone. Unavailable if the reaper stopped first."""
        with self._lock:
            waiter = self._waiters.get(pid)
        if waiter is None or waiter.abandoned:
            raise FailedPrecondition(
                f"reaper: pid {pid}: no exit to wait for; only processes spawned with "
                "own=True can be waited for, until their exit has been returned once"
            )
        if not waiter.done.wait(timeout):
            raise CommandTimeout(waiter.argv, timeout)
        with self._lock:
            self._waiters.pop(pid, None)
        if waiter.exit is None:
            raise Unavailable(f"reaper: pid {pid}: the reaper stopped before it exited")
        return waiter.exit

    def run(
        self,
        argv: Sequence[str | Path],
        *,
        input: bytes | None = None,
        timeout: float | None = None,
        cwd: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        fds: Mapping[int, int] | None = None,
    ) -> CommandResult:
        """Run a helper command to completion and capture its stdout and stderr.

        stdin is *input* through a pipe, else fds[0], else /dev/null; stdout and
        stderr are captured unless *fds* gives 1 or 2. A daemon the command
        leaves behind may hold the capture pipes open: once the command has
        exited, output is read for at most DRAIN_AFTER_EXIT more seconds. On
        *timeout* the command is killed (SIGKILL) and CommandTimeout raised."""
        argv = tuple(os.fspath(a) for a in argv)
        child = dict(fds or {})
        if input is not None and 0 in child:
            raise InvalidArgument(f"command {_show(argv)}: give stdin as input or fds[0], not both")
        deadline = None if timeout is None else time.monotonic() + timeout
        capture = _Capture()
        pid = None
        try:
            if input is not None:
                child[0], capture.stdin = capture.pipe(child_end=0)
            for n in (1, 2):
                if n not in child:
                    capture.outputs[n], child[n] = capture.pipe(child_end=1)
            wake_r, wake_w = capture.pipe(child_end=None)
            os.set_blocking(wake_w, False)
            pid = self._spawn(argv, child, cwd, env, False, True, notify_fd=wake_w)
            capture.close_child_ends()
            if not capture.pump(input or b"", wake_r, deadline):
                raise self._kill_timed_out(pid, argv, timeout)
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                exited = self.wait(pid, remaining)
            except CommandTimeout:
                raise self._kill_timed_out(pid, argv, timeout) from None
            return CommandResult(argv, exited.status, capture.output(1), capture.output(2))
        finally:
            if pid is not None:
                self._release(pid)
            capture.close_all()

    def _spawn(
        self,
        argv: Sequence[str | Path],
        fds: Mapping[int, int] | None,
        cwd: str | Path | None,
        env: Mapping[str, str] | None,
        setsid: bool,
        own: bool,
        notify_fd: int,
    ) -> int:
        args = [os.fspath(a) for a in argv]
        if not args:
            raise InvalidArgument("reaper: spawn of an empty argv; give at least the program")
        env = os.environ if env is None else env
        program = _find_program(args[0], env)
        if cwd is not None:
            # posix_spawn has no chdir here (glibc's addchdir_np is not exposed, and a
            # chdir in the parent would move every thread): a shell does it, then execs.
            if not os.path.isdir(cwd):
                raise FailedPrecondition(
                    f"command {_show(args)}: working directory {os.fspath(cwd)!r} does not exist"
                )
            script = 'cd -- "$0" && exec "$@"'
            program, args = "/bin/sh", ["/bin/sh", "-c", script, os.fspath(cwd), program, *args[1:]]
        fds = dict(fds or {})
        actions: list[tuple[Any, ...]] = [
            (os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_fds() if fd > 2 and fd not in fds
        ]
        # dup2 from copies above every target fd, so no dup2 overwrites the
        # source of a later one ({3: 4, 4: 3}) and none is a no-op that keeps CLOEXEC.
        above = max([2, *fds]) + 1
        copies: list[int] = []
        try:
            for child_fd, our_fd in fds.items():
                copies.append(fcntl.fcntl(our_fd, fcntl.F_DUPFD_CLOEXEC, above))
                actions.append((os.POSIX_SPAWN_DUP2, copies[-1], child_fd))
            for n in (0, 1, 2):
                if n not in fds:
                    mode = os.O_RDONLY if n == 0 else os.O_WRONLY
                    actions.append((os.POSIX_SPAWN_OPEN, n, os.devnull, mode, 0))
            with self._lock:
                if not self._running:
                    raise FailedPrecondition(
                        f"command {_show(args)}: the reaper is not running; start it "
                        "before starting processes, or no one collects their exits"
                    )
                try:
                    pid = os.posix_spawn(
                        program,
                        args,
                        env,
                        file_actions=actions,
                        setsid=setsid,
                        setsigmask=(),
                        setsigdef=_CHILD_SIGDEF,
                    )
                except OSError as exc:
                    raise _spawn_error(args, exc) from exc
                if own:
                    self._waiters[pid] = _Waiter(tuple(args), notify_fd)
            return pid
        finally:
            for fd in copies:
                os.close(fd)

    def _kill_timed_out(self, pid: int, argv: Sequence[str], timeout: float | None) -> Exception:
        with self._lock:
            waiter = self._waiters.get(pid)
            killed = waiter is not None and not waiter.done.is_set()
            if killed:
                # Under the lock the reaper cannot reap it, so the pid is still ours.
                os.kill(pid, signal.SIGKILL)
        if not killed:
            return CommandTimeout(argv, timeout, " (it exited just then)")
        assert waiter is not None
        if not waiter.done.wait(KILL_GRACE):
            return CommandTimeout(
                argv, timeout, f"; killed it, but it is still there {KILL_GRACE}s on"
            )
        return CommandTimeout(argv, timeout, "; killed it")

    def _release(self, pid: int) -> None:
        """Forget *pid*'s slot; an exit still to come is dropped."""
        with self._lock:
            waiter = self._waiters.get(pid)
            if waiter is None:
                return
            if waiter.done.is_set():
                del self._waiters[pid]
            else:
                waiter.abandoned = True
                waiter.notify_fd = -1  # its owner closes it now


class _Capture:
    """The pipes of one `run()`, and the loop that feeds and drains them."""

    def __init__(self) -> None:
        self.stdin = -1
        self.outputs: dict[int, int] = {}  # 1/2 -> read end
        self.data: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}
        self._ours: set[int] = set()
        self._childs: set[int] = set()

    def pipe(self, child_end: int | None) -> tuple[int, int]:
        """A pipe; *child_end* (0: read, 1: write) is the child's, closed after spawn."""
        r, w = os.pipe()
        self._ours.update((r, w))
        if child_end is not None:
            end = (r, w)[child_end]
            self._ours.discard(end)
            self._childs.add(end)
        return r, w

    def close(self, fd: int) -> None:
        self._ours.discard(fd)
        os.close(fd)

    def close_child_ends(self) -> None:
        for fd in self._childs:
            os.close(fd)
        self._childs.clear()

    def close_all(self) -> None:
        self.close_child_ends()
        for fd in self._ours:
            os.close(fd)
        self._ours.clear()

    def output(self, n: int) -> bytes:
        return bytes(self.data[n])

    def pump(self, input: bytes, exit_fd: int, deadline: float | None) -> bool:
        """Write *input*, read output until EOF; False if *deadline* passed first.

        *exit_fd* turns readable when the command exits; from then on we
        read for at most DRAIN_AFTER_EXIT seconds more."""
        sel = selectors.DefaultSelector()
        try:
            streams = 0
            for n, fd in self.outputs.items():
                sel.register(fd, selectors.EVENT_READ, n)
                streams += 1
            pending = memoryview(input)
            if self.stdin >= 0 and pending:
                os.set_blocking(self.stdin, False)
                sel.register(self.stdin, selectors.EVENT_WRITE, 0)
                streams += 1
            elif self.stdin >= 0:
                self.close(self.stdin)
            sel.register(exit_fd, selectors.EVENT_READ, "exit")
            exited_at: float | None = None
            while streams:
                now = time.monotonic()
                limits = [t - now for t in (deadline,) if t is not None]
                if exited_at is not None:
                    limits.append(exited_at + DRAIN_AFTER_EXIT - now)
                wait = min(limits) if limits else None
                if wait is not None and wait <= 0:
                    return exited_at is not None  # exited: a descendant holds the pipes
                for key, _ in sel.select(wait):
                    fd, what = key.fd, key.data
                    if what == "exit":
                        exited_at = time.monotonic()
                        sel.unregister(fd)
                        continue
                    if what == 0:
                        pending = self._feed(fd, pending)
                        done = not pending
                    else:
                        chunk = os.read(fd, _CHUNK)
                        self.data[what] += chunk
                        done = not chunk
                    if done:
                        sel.unregister(fd)
                        self.close(fd)
                        streams -= 1
            return True
        finally:
            sel.close()

    @staticmethod
    def _feed(fd: int, pending: memoryview) -> memoryview:
        try:
            return pending[os.write(fd, pending[:_CHUNK]) :]
        except BlockingIOError:
            return pending
        except BrokenPipeError:
            return pending[:0]  # the command closed its stdin; the rest is not wanted


def _run_forked_child(child: Callable[[], int], fds: dict[int, int], setsid: bool) -> None:
    """The child side of `Reaper.fork`; never returns."""
    code = 1
    try:
        gc.disable()
        signal.set_wakeup_fd(-1)
        for signum in _signal.valid_signals():
            if signum not in (signal.SIGKILL, signal.SIGSTOP):
                try:
                    _signal.signal(signum, _signal.SIG_DFL)
                except (OSError, ValueError, RuntimeError):
                    pass  # a signal the C library reserves for itself
        _install_child_fds(fds)
        if setsid:
            os.setsid()
        _signal.pthread_sigmask(_signal.SIG_SETMASK, ())  # blocked since the fork
        code = child() & 0xFF
    except BaseException:
        try:
            os.write(2, traceback.format_exc().encode(errors="replace"))
        except BaseException:
            pass
        code = 1
    finally:
        os._exit(code)


def _install_child_fds(fds: Mapping[int, int]) -> None:
    """In a forked child: make *fds* (child fd -> our fd) the only open fds."""
    above = max([2, *fds]) + 1
    # copies above every target first, so no dup2 overwrites the source of a later one
    copies = {target: fcntl.fcntl(ours, fcntl.F_DUPFD, above) for target, ours in fds.items()}
    for target, copy in copies.items():
        os.dup2(copy, target)
    for n in (0, 1, 2):
        if n not in fds:
            null = os.open(os.devnull, os.O_RDONLY if n == 0 else os.O_WRONLY)
            if null != n:
                os.dup2(null, n)
                os.close(null)
    keep = sorted({0, 1, 2, *fds})
    low = 0
    for fd in keep:
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, max(_MAX_FD, os.sysconf("SC_OPEN_MAX")))


def _ignore(signum: int, frame: object) -> None:
    """The Python-level handler: the C-level one has already woken the reaper."""


def _poke(fd: int) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):  # full: it is awake anyway
            os.write(fd, b"\0")


def _inheritable_fds() -> Iterable[int]:
    """Our fds a child would inherit; fds Python opens are never among them."""
    for listing in ("/proc/self/fd", "/dev/fd"):
        try:
            names = os.listdir(listing)
        except OSError:
            continue
        for name in names:
            try:
                if os.get_inheritable(int(name)):
                    yield int(name)
            except OSError:
                pass  # closed meanwhile, or the listing's own fd
        return


def _find_program(name: str, env: Mapping[str, str]) -> str:
    if "/" in name:
        return name
    path = os.get_exec_path(env)
    for directory in path:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise FailedPrecondition(
        f"command {name!r}: not found in PATH ({os.pathsep.join(path)}); "
        "install it or give its full path"
    )


def _spawn_error(argv: Sequence[str], exc: OSError) -> PolyshimError:
    message = f"command {_show(argv)}: cannot start it: {exc.strerror}"
    if isinstance(exc, BlockingIOError) or exc.errno == errno.ENOMEM:
        return ResourceExhausted(message)
    return FailedPrecondition(message)


def _show(argv: Sequence[str]) -> str:
    text = " ".join(argv)
    return repr(text if len(text) <= 200 else text[:197] + "...")


def _tail(output: bytes, limit: int = 1000) -> str:
    text = output.decode(errors="replace").strip()
    return text if len(text) <= limit else "..." + text[-limit:]
