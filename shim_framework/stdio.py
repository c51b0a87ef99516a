"""A process's stdio: FIFOs, `file://`, `binary://` loggers and ptys, wired the way ctr expects.

Theory of operation. Without a terminal the shim copies no bytes: the process
gets fds to the client's FIFOs themselves (or to the log file, or to the
logging binary's pipes), and the shim keeps the extra FIFO ends of spec §5.2
so that what the client sees is exactly what containerd's runc shim gives it:

* stdout/stderr FIFO: the shim opens a keeper reader first (non-blocking, so
  it never blocks), then the writer (cannot block now: a reader exists). The
  writer is the process's fd. The keeper reader stays until `close()`, so the
  process's writes never fail with EPIPE while the client is detached
  (`ctr run -d`); the data waits in the FIFO, up to the pipe buffer, for the
  next reader. Once the process holds its copy (`after_start()`), the shim
  closes its own writer: the client sees EOF exactly when the process and its
  children have closed theirs.
* stdin FIFO: the shim opens the reader (non-blocking: a reader opened that
  way cannot block), then its keeper writer, then makes the reader blocking;
  the reader is the process's fd. The keeper writer means the process never
  sees EOF while the client detaches or re-attaches; it sees EOF once
  CloseIO made the shim close the keeper (`close_stdin()`) and the client has
  closed its end.
* an absolute path that is not a FIFO (a regular file, /dev/null): opened for
  appending, as the runc shim does; stdout and stderr naming it share one fd.
* `file:///path`: one append-mode fd shared by stdout and stderr (mode 0644,
  parent directories 0755, as the runc shim creates them).
* `binary:///path?k=v`: the logger runs through the reaper with fd 3 and 4 the
  read ends of the process's stdout and stderr pipes and fd 5 a readiness pipe
  (spec §5.4); the process gets the write ends. The logger sees EOF, and
  normally exits, when the process is gone.
* stdin is a FIFO path or "" in every mode (the runc shim drops it with
  `binary://`; connecting it costs nothing here).

With a terminal the backend makes the pty (runc: `ConsoleSocket`; others:
`open_pty`) and hands the master over with `attach_console()`. Two threads
then copy stdin FIFO -> master and master -> stdout (FIFO, file or logger
pipe). When every slave fd is closed the master reads EIO; the output thread
then closes the stdout writer so the client sees EOF. stderr is not used.
After stdin's EOF (CloseIO and the client closed its end) the input thread
stops but leaves the pty open: output still flows until the process exits.

Resource handling: a `ProcessStdio` owns every fd it opens, its copy threads
and its logger. `after_start()` closes its copies of the process's ends;
`close_stdin()` closes the stdin keeper; the output thread closes the stdout
writer on EIO; `close()` wakes the threads through a pipe (all their waits are
`poll`s on it), joins them, then closes every remaining fd and stops the
logger (SIGTERM, 12 s, SIGKILL, as the runc shim does). `open()` that fails
closes what it opened. `attach_console()` owns the master from the call on,
also when it raises. `ConsoleSocket` owns its listening socket and directory;
the fd `receive()` returns belongs to the caller.

Error handling: `open()` raises InvalidArgument for a value it cannot use
(naming the stream and the value) and DeadlineExceeded for a logger that never
gets ready. Once open, peers going away (EPIPE, EIO, a dead logger) are
logged at debug level and never raised: `close()` cannot fail.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import signal
import stat
import struct
import termios
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import attrs

from shim_framework.backend import ProcessIO
from shim_framework.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    PolyshimError,
)

if TYPE_CHECKING:
    from shim_framework.reaper import Reaper

log = logging.getLogger("polyshim.stdio")

LOGGER_READY_TIMEOUT = 10.0  # ref waits forever for fd 5; a stuck logger must not hang Create
LOGGER_TERM_TIMEOUT = 12.0  # ref binaryIOProcTermTimeout: the logger gets time to flush
THREAD_JOIN_TIMEOUT = 5.0  # copy threads only block in poll(), so they stop at once
COPY_CHUNK = 32 * 1024
FILE_MODE = 0o644  # ref pkg/process/io.go: os.OpenFile(..., 0644) after MkdirAll(dir, 0755)
CONSOLE_SOCKET_NAME = "pty.sock"
SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) on Linux, minus the terminating NUL


class ProcessStdio:
    """The stdio of one process (init or exec): what it gets as 0, 1, 2 and what the shim keeps.

    Build it with `open()`. Thread-safe: the task service calls it from its request threads.
    """

    io: ProcessIO

    def __init__(
        self,
        stdin: str,
        stdout: str,
        stderr: str,
        terminal: bool,
        process_id: str,
        namespace: str,
        reaper: Reaper,
    ) -> None:
        # Exactly as received: State returns them.
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.terminal = terminal
        self.process_id = process_id
        self.namespace = namespace
        self.io = ProcessIO(terminal=terminal)
        self._reaper = reaper
        self._lock = threading.Lock()
        self._closed = False
        self._process_ends: list[int] = []  # the process's fds; closed by after_start()
        self._keepers: list[int] = []  # stdout/stderr keeper readers; closed by close()
        self._stdin_keeper: int | None = None  # closed by close_stdin()
        # Terminal mode: the ends the copy threads use instead of the process.
        self._console_in: int | None = None  # stdin FIFO reader
        self._console_out: int | None = None  # stdout writer (FIFO, file or logger pipe)
        self._master: int | None = None
        self._winsize: tuple[int, int] | None = None  # a resize that came before the master
        self._wake_r: int | None = None  # closing _wake_w tells the copy threads to stop
        self._wake_w: int | None = None
        self._threads: list[threading.Thread] = []
        self._output_done = threading.Event()
        self._logger_pid: int | None = None
        self._logger_lock = threading.Lock()  # one waiter on the logger at a time
        self._logger_gone = False

    @classmethod
    def open(
        cls,
        *,
        stdin: str,
        stdout: str,
        stderr: str,
        terminal: bool,
        process_id: str,
        namespace: str,
        reaper: Reaper,
    ) -> ProcessStdio:
        """Open the client's stdio for a process about to be created (spec §5).

        InvalidArgument: a value that is not "", an absolute path, `file:///...` or
        `binary:///...`, or a path that cannot be opened. DeadlineExceeded: a logger
        that did not get ready in `LOGGER_READY_TIMEOUT` seconds.
        """
        self = cls(stdin, stdout, stderr, terminal, process_id, namespace, reaper)
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def after_start(self) -> None:
        """The process holds its fds now: drop the shim's copies so EOF can propagate."""
        with self._lock:
            fds, self._process_ends = self._process_ends, []
        _close_all(fds)

    def attach_console(self, master_fd: int) -> None:
        """Terminal mode: take ownership of the pty master and start copying.

        The fd is the shim's from now on, also when this raises FailedPrecondition
        (not a terminal process, a second master, or already closed).
        """
        with self._lock:
            problem = ""
            if not self.terminal:
                problem = "it has no terminal"
            elif self._master is not None:
                problem = "a console is already attached"
            elif self._closed:
                problem = "its stdio is closed"
            if problem:
                _close_quietly(master_fd)
                raise FailedPrecondition(
                    f'process "{self.process_id}": cannot attach a console, {problem}'
                )
            self._master = master_fd
            os.set_blocking(master_fd, False)  # both threads poll it, and close() must wake them
            if self._winsize is not None:
                with contextlib.suppress(OSError):  # as resize(): a gone pty is no error
                    _set_winsize(master_fd, *self._winsize)
            self._wake_r, self._wake_w = os.pipe()
            self._start_thread("out", self._copy_output)
            if self._console_in is not None:
                self._start_thread("in", self._copy_input)

    def resize(self, width: int, height: int) -> None:
        """Set the pty size (columns, rows); no-op for a process without a terminal."""
        with self._lock:
            if not self.terminal or self._closed:
                return
            if self._master is None:
                self._winsize = (width, height)  # applied by attach_console()
                return
            try:
                _set_winsize(self._master, width, height)
            except OSError as e:
                log.debug("resize pty of %s: %s", self.process_id, e)

    def close_stdin(self) -> None:
        """CloseIO(stdin): the process sees EOF once the client has closed its end too."""
        with self._lock:
            fd, self._stdin_keeper = self._stdin_keeper, None
        if fd is not None:
            _close_quietly(fd)

    def wait_drained(self, timeout: float) -> bool:
        """Wait until the output copy ended and the logger exited; False if *timeout* passed.

        For an exited process (Delete): it also drops the shim's copies of the process's
        ends, which a process that never started still has, or the logger never sees EOF.
        """
        self.after_start()
        deadline = time.monotonic() + timeout
        if self._master is not None and not self._output_done.wait(timeout):
            return False
        if self._logger_pid is None:
            return True
        return self._wait_logger(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        """Release everything: threads, fds, the logger. Idempotent; never raises."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            wake, self._wake_w = self._wake_w, None
        if wake is not None:
            _close_quietly(wake)  # every copy thread polls the other end: POLLHUP stops it
        stuck = False
        for thread in self._threads:
            thread.join(THREAD_JOIN_TIMEOUT)
            stuck = stuck or thread.is_alive()
        with self._lock:
            fds = [*self._process_ends, *self._keepers]
            self._process_ends, self._keepers = [], []
            if stuck:
                # Closing fds a live thread may still use could hit a reused number: leak them.
                log.warning(
                    "stdio of %s: a copy thread did not stop; leaking its fds", self.process_id
                )
            else:
                fds += [self._console_in, self._console_out, self._master, self._wake_r]
                self._console_in = self._console_out = self._master = self._wake_r = None
            fds.append(self._stdin_keeper)
            self._stdin_keeper = None
        _close_all(fd for fd in fds if fd is not None)
        self._stop_logger(LOGGER_TERM_TIMEOUT)

    # -- opening -----------------------------------------------------------------------

    def _open(self) -> None:
        stdin_fd = self._open_stdin() if self.stdin else None
        stderr = "" if self.terminal else self.stderr  # spec §5.1: unused with a terminal
        out_fd, err_fd = self._open_outputs(self.stdout, stderr)
        if self.terminal:
            # The copy threads own these; the process gets the pty instead.
            self._console_in, self._console_out = stdin_fd, out_fd
            self._process_ends = [fd for fd in self._process_ends if fd not in (stdin_fd, out_fd)]
        else:
            self.io = ProcessIO(stdin=stdin_fd, stdout=out_fd, stderr=err_fd)

    def _open_stdin(self) -> int:
        if _parse("stdin", self.stdin).kind != "path":
            raise InvalidArgument(
                f'stdin "{self.stdin}": not a FIFO path; stdin must be an absolute path or ""'
            )
        path = self.stdin
        # Non-blocking: a reader open never waits for a writer that way.
        reader = self._track(_open_path("stdin", path, os.O_RDONLY | os.O_NONBLOCK))
        if stat.S_ISFIFO(os.fstat(reader).st_mode):
            # Our reader exists, so a non-blocking writer open cannot fail with ENXIO.
            self._stdin_keeper = _open_path("stdin", path, os.O_WRONLY | os.O_NONBLOCK)
        if not self.terminal:
            os.set_blocking(reader, True)  # the process must not see EAGAIN
        return reader

    def _open_outputs(self, stdout: str, stderr: str) -> tuple[int | None, int | None]:
        """The writers for stdout and stderr; the mode comes from stdout (spec §5.1)."""
        out = _parse("stdout", stdout) if stdout else None
        err = _parse("stderr", stderr) if stderr else None
        lead = out or err
        if lead is not None and lead.kind != "path":
            # file:// and binary:// take both streams; the runc shim sends stderr where
            # stdout goes whatever it says, we refuse a stderr that names elsewhere.
            if stdout and stderr and stderr != stdout:
                raise InvalidArgument(
                    f'stderr "{stderr}": with stdout "{stdout}" it must be the same URI or ""; '
                    f"{lead.kind}:// takes both streams"
                )
            if lead.kind == "file":
                fd = self._track(_open_log_file(stdout or stderr, lead.path))
                return (fd if stdout else None), (fd if stderr else None)
            return self._start_logger(stdout or stderr, lead.path, lead.args)
        if err is not None and err.kind != "path":
            raise InvalidArgument(
                f'stderr "{stderr}": a {err.kind}:// URI needs stdout to name it too; '
                "the mode follows stdout"
            )
        out_fd = self._open_output_path("stdout", stdout) if stdout else None
        if stderr == stdout:
            return out_fd, out_fd  # one writer for both (and one keeper)
        err_fd = self._open_output_path("stderr", stderr) if stderr else None
        return out_fd, err_fd

    def _open_output_path(self, stream: str, path: str) -> int:
        # The keeper reader first: non-blocking, it never waits for a writer.
        keeper = _open_path(stream, path, os.O_RDONLY | os.O_NONBLOCK)
        if not stat.S_ISFIFO(os.fstat(keeper).st_mode):
            # A regular file or device: the runc shim appends to it, and so do we.
            os.close(keeper)
            return self._track(_open_path(stream, path, os.O_WRONLY | os.O_APPEND))
        self._keepers.append(keeper)
        # A reader exists (ours): this open neither blocks nor fails with ENXIO.
        writer = self._track(_open_path(stream, path, os.O_WRONLY | os.O_NONBLOCK))
        os.set_blocking(writer, True)  # the process's writes must block when the FIFO is full
        return writer

    def _start_logger(
        self, uri: str, path: str, args: tuple[str, ...]
    ) -> tuple[int | None, int | None]:
        """Start a `binary://` logger (spec §5.4); returns the process's stdout/stderr ends."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        ready_r, ready_w = os.pipe()
        self._process_ends += [out_w, err_w]
        logger_ends = [out_r, err_r, ready_w]
        try:
            try:
                self._logger_pid = self._reaper.spawn(
                    [path, *args],
                    fds={3: out_r, 4: err_r, 5: ready_w},
                    env={"CONTAINER_ID": self.process_id, "CONTAINER_NAMESPACE": self.namespace},
                    own=True,  # its exit is ours to wait for, not the task service's
                )
            except FailedPrecondition as e:  # the reaper's "cannot start it" (ENOENT, EACCES)
                raise InvalidArgument(
                    f'stdout "{uri}": cannot start the logging binary: {e}; '
                    "check the path in the log URI"
                ) from e
            _close_all(logger_ends)  # the logger has them; fd 5 must reach EOF if it dies
            logger_ends = []
            if not _readable(ready_r, LOGGER_READY_TIMEOUT):
                self._stop_logger(0)  # it is stuck: no grace period
                raise DeadlineExceeded(
                    f'stdout "{uri}": the logging binary was not ready after '
                    f"{LOGGER_READY_TIMEOUT:g} s; it must write a byte to fd 5 or close it "
                    "once it reads fd 3 and 4"
                )
            with contextlib.suppress(OSError):
                os.read(ready_r, 1)  # a byte or EOF: either means ready
        finally:
            _close_all([*logger_ends, ready_r])
        if self.terminal:
            # Only stdout carries the console; the logger just sees EOF on fd 4.
            self._process_ends.remove(err_w)
            os.close(err_w)
            return out_w, None
        return out_w, err_w

    def _track(self, fd: int) -> int:
        """Own *fd* as one of the process's ends (closed by after_start() or close())."""
        self._process_ends.append(fd)
        return fd

    # -- the logger --------------------------------------------------------------------

    def _wait_logger(self, timeout: float) -> bool:
        with self._logger_lock:
            if self._logger_gone or self._logger_pid is None:
                return True
            try:
                self._reaper.wait(self._logger_pid, timeout)
            except TimeoutError:
                return False
            except PolyshimError as e:  # the reaper stopped: nobody can wait for it now
                log.debug("logging binary of %s: %s", self.process_id, e)
            self._logger_gone = True
            return True

    def _stop_logger(self, grace: float) -> None:
        """SIGTERM, up to *grace* seconds to exit, then SIGKILL; reaps it either way."""
        if self._logger_pid is None or self._wait_logger(0):
            return
        pid = self._logger_pid
        if grace > 0:
            _signal_quietly(pid, signal.SIGTERM)
            if self._wait_logger(grace):
                return
            log.warning(
                "logging binary of %s (pid %d) ignored SIGTERM; killing it", self.process_id, pid
            )
        _signal_quietly(pid, signal.SIGKILL)
        if not self._wait_logger(LOGGER_TERM_TIMEOUT):
            log.warning(
                "logging binary of %s (pid %d) did not exit after SIGKILL", self.process_id, pid
            )

    # -- terminal copying --------------------------------------------------------------

    def _start_thread(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(
            target=target, name=f"stdio-{self.process_id}-{name}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def _copy_output(self) -> None:
        """master -> stdout until the last slave fd closes (EIO) or close()."""
        master, out, wake = self._master, self._console_out, self._wake_r
        assert master is not None and wake is not None
        if out is not None:
            os.set_blocking(out, False)  # ours alone in terminal mode; we poll it
        try:
            while _wait_for(master, select.POLLIN, wake):
                try:
                    data = os.read(master, COPY_CHUNK)
                except BlockingIOError:
                    continue
                except OSError as e:
                    if e.errno != errno.EIO:  # EIO: every slave fd is closed (Linux)
                        log.debug("reading the pty of %s: %s", self.process_id, e)
                    break
                if not data:  # how BSDs report the same
                    break
                if out is not None and not _write_all(out, data, wake, self.process_id):
                    if self._stopping():
                        break
                    # Nobody takes output any more (a dead logger); keep reading and
                    # dropping it, or the process would block on a full pty.
                    out = None
        finally:
            out = self._take_console_out()
            if out is not None:
                _close_quietly(out)  # the client sees EOF now
            self._output_done.set()

    def _copy_input(self) -> None:
        """stdin FIFO -> master until stdin's EOF or close()."""
        fifo, master, wake = self._console_in, self._master, self._wake_r
        assert fifo is not None and master is not None and wake is not None
        while _wait_for(fifo, select.POLLIN, wake):
            try:
                data = os.read(fifo, COPY_CHUNK)
            except BlockingIOError:
                continue
            except OSError as e:
                log.debug("reading stdin of %s: %s", self.process_id, e)
                return
            if not data:
                log.debug("stdin of %s reached EOF", self.process_id)
                return
            if not _write_all(master, data, wake, self.process_id):
                return

    def _take_console_out(self) -> int | None:
        with self._lock:
            fd, self._console_out = self._console_out, None
        return fd

    def _stopping(self) -> bool:
        with self._lock:
            return self._closed


class ConsoleSocket:
    """A unix socket that receives one pty master over SCM_RIGHTS (runc `--console-socket`).

    Resource handling: owns the listening socket and its private directory until
    `close()` (also a context manager). The fd `receive()` returns is the caller's.
    """

    def __init__(self) -> None:
        import socket
        import tempfile

        base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
        # mkdtemp adds 8 characters; AF_UNIX paths are short (sun_path).
        if len(base) + len("/pty") + 8 + len(CONSOLE_SOCKET_NAME) + 1 > SUN_PATH_MAX:
            base = "/tmp"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._dir = self._path = ""
        try:
            self._dir = tempfile.mkdtemp(prefix="pty", dir=base)
            self._path = os.path.join(self._dir, CONSOLE_SOCKET_NAME)
            self._sock.bind(self._path)
            self._sock.listen(1)
        except BaseException:
            self.close()
            raise

    @property
    def path(self) -> str:
        return self._path

    def receive(self, timeout: float) -> int:
        """Accept one connection and return the one fd it sends (non-inheritable).

        DeadlineExceeded: nothing within *timeout*. FailedPrecondition: the peer sent
        no fd, or more than one.
        """
        import socket

        deadline = time.monotonic() + timeout
        self._sock.settimeout(timeout)
        try:
            conn, _ = self._sock.accept()
        except TimeoutError:
            raise DeadlineExceeded(
                f"console socket {self._path}: no connection within {timeout:g} s; "
                "did the runtime get --console-socket and a terminal process?"
            ) from None
        with conn:
            conn.settimeout(max(0.0, deadline - time.monotonic()))
            try:
                # runc sends the pty's name as data (read into 4096 bytes) and one fd.
                _, fds, flags, _ = socket.recv_fds(
                    conn, 4096, 1, getattr(socket, "MSG_CMSG_CLOEXEC", 0)
                )
            except TimeoutError:
                raise DeadlineExceeded(
                    f"console socket {self._path}: a peer connected but sent no fd "
                    f"within {timeout:g} s"
                ) from None
            except OSError as e:
                raise FailedPrecondition(
                    f"console socket {self._path}: receiving the pty master failed: {e}"
                ) from e
        for fd in fds:
            os.set_inheritable(fd, False)  # MSG_CMSG_CLOEXEC is Linux-only
        if len(fds) != 1 or flags & socket.MSG_CTRUNC:
            _close_all(fds)
            raise FailedPrecondition(
                f"console socket {self._path}: expected exactly one fd, got "
                f"{'more than one' if flags & socket.MSG_CTRUNC else len(fds)}"
            )
        return fds[0]

    def close(self) -> None:
        """Close the socket and remove its directory; idempotent."""
        self._sock.close()
        if self._path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
        if self._dir:
            with contextlib.suppress(OSError):
                os.rmdir(self._dir)

    def __enter__(self) -> ConsoleSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_pty() -> tuple[int, int]:
    """A new pty for backends that make their own: (master, slave), both non-inheritable.

    Give the slave to the process as fds 0-2; it becomes the process's controlling
    terminal once the child calls setsid() and then ioctl(TIOCSCTTY) on it (the shim
    itself never acquires it: openpty opens the slave with O_NOCTTY). Give the master
    to `ProcessStdio.attach_console`; close your slave once the process has it.
    """
    return os.openpty()  # PEP 446: both non-inheritable


# -- helpers ---------------------------------------------------------------------------


@attrs.frozen
class _Target:
    """Where a non-empty stdio value points."""

    kind: str  # "path" (a FIFO, or a file to append to), "file" or "binary"
    path: str
    args: tuple[str, ...] = ()  # binary: the logger's arguments


def _parse(stream: str, value: str) -> _Target:
    if value.startswith("/"):
        return _Target("path", value)  # taken literally, as the runc shim does
    # Only URIs need this; CRI and ctr send FIFO paths (import cost on the start path).
    from urllib.parse import parse_qsl, unquote, urlsplit

    parts = urlsplit(value)
    if parts.scheme in ("file", "binary"):
        path = unquote(parts.path)
        if parts.netloc or not path.startswith("/"):
            raise InvalidArgument(
                f'{stream} "{value}": {parts.scheme}:// needs an absolute path and no host, '
                f"like {parts.scheme}:///var/log/app"
            )
        if parts.scheme == "file":
            return _Target("file", path)
        # Each key, then its first value, as separate arguments (ref NewBinaryCmd).
        args: list[str] = []
        seen: set[str] = set()
        for key, val in parse_qsl(parts.query, keep_blank_values=True):
            if key not in seen:
                seen.add(key)
                args += [key, val]
        return _Target("binary", path, tuple(args))
    raise InvalidArgument(
        f'{stream} "{value}": unsupported stdio value; use "" (not connected), an absolute '
        "FIFO path, file:///path or binary:///path?key=value"
    )


def _open_path(stream: str, path: str, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_NOCTTY)
    except OSError as e:
        raise InvalidArgument(
            f'{stream} "{path}": cannot open it: {e.strerror}; the client creates the FIFO '
            "before Create and keeps it until Delete"
        ) from e


def _open_log_file(uri: str, path: str) -> int:
    try:
        os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
    except OSError as e:
        raise InvalidArgument(f'stdout "{uri}": cannot open the log file: {e}') from e


def _set_winsize(fd: int, width: int, height: int) -> None:
    # struct winsize: rows, columns, x pixels, y pixels.
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


def _readable(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def _wait_for(fd: int, events: int, wake: int) -> bool:
    """Block until *fd* has *events* (or an error/hangup): True; or *wake* fired: False."""
    poller = select.poll()
    poller.register(fd, events)
    poller.register(wake, select.POLLIN)
    while True:
        ready = dict(poller.poll())
        if wake in ready:
            return False
        if ready.get(fd):
            return True


def _write_all(fd: int, data: bytes, wake: int, process_id: str) -> bool:
    """Write all of *data* to non-blocking *fd*; False if the peer went away or close() ran."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            if not _wait_for(fd, select.POLLOUT, wake):
                return False
        except OSError as e:  # EPIPE: nobody reads; EIO: the pty is gone
            log.debug("stdio of %s: write failed: %s", process_id, e)
            return False
    return True


def _signal_quietly(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.kill(pid, sig)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError as e:
        log.debug("close fd %d: %s", fd, e)


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        _close_quietly(fd)
