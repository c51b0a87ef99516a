"""Stdio as a client sees it: real FIFOs, files, loggers and ptys, real processes, no mocks.

Each test plays the client the way ctr does (FIFOs created first, output ends
opened non-blocking, the stdin end opened in the background) and runs a real
process through a started `Reaper` with the fds `ProcessStdio` hands out.
Every test also checks that the shim's fds are all released by `close()`.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import stat
import struct
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shim_framework import stdio as stdio_module
from shim_framework.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from shim_framework.reaper import Reaper
from shim_framework.stdio import ConsoleSocket, ProcessStdio, open_pty

SH = "/bin/sh"
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
TIMEOUT = 10.0  # generous upper bound for things that should happen at once
QUIET = 0.3  # how long "nothing happens" is watched for


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reaper() -> Iterator[Reaper]:
    r = Reaper()
    r.start()
    yield r
    r.stop()


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def no_leaks(reaper: Reaper) -> Iterator[None]:
    """Every fd the test's stdio and client opened is closed again; no copy thread is left."""
    before = _open_fds()
    yield
    leaked = {fd: _describe(fd) for fd in _open_fds() - before}
    leaked = {fd: what for fd, what in leaked.items() if what is not None}  # listdir's own
    assert not leaked, f"fds left open: {leaked}"
    threads = [t.name for t in threading.enumerate() if t.name.startswith("stdio-")]
    assert not threads, f"copy threads still running: {threads}"


def _describe(fd: str) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:
        return None


@pytest.fixture
def open_stdio(reaper: Reaper) -> Iterator[Callable[..., ProcessStdio]]:
    """`ProcessStdio.open` with test defaults; everything opened is closed after the test."""
    opened: list[ProcessStdio] = []

    def open_(**kwargs: object) -> ProcessStdio:
        args: dict[str, object] = dict(
            stdin="", stdout="", stderr="", terminal=False, process_id="c1", namespace="ns1"
        )
        args.update(kwargs)
        s = ProcessStdio.open(reaper=reaper, **args)  # type: ignore[arg-type]
        opened.append(s)
        return s

    yield open_
    for s in opened:
        s.close()


class Client:
    """The client end of one process's stdio FIFOs, opened the way ctr opens them."""

    def __init__(self, root: Path, *, stdin: bool = True, stderr: bool = True) -> None:
        self.dir = root / "fifo"
        self.dir.mkdir()
        self.stdin = str(self.dir / "c1-stdin") if stdin else ""
        self.stdout = str(self.dir / "c1-stdout")
        self.stderr = str(self.dir / "c1-stderr") if stderr else ""
        for path in (self.stdin, self.stdout, self.stderr):
            if path:
                os.mkfifo(path, 0o700)
        # Output ends: non-blocking, before Create (they never block that way).
        self.out: int | None = os.open(self.stdout, os.O_RDONLY | os.O_NONBLOCK)
        self.err: int | None = (
            os.open(self.stderr, os.O_RDONLY | os.O_NONBLOCK) if self.stderr else None
        )
        # The stdin end completes in the background once the shim opens its reader.
        self._in: int | None = None
        self._in_opener: threading.Thread | None = None
        if self.stdin:
            self._in_opener = threading.Thread(target=self._open_stdin, daemon=True)
            self._in_opener.start()

    def _open_stdin(self) -> None:
        self._in = os.open(self.stdin, os.O_WRONLY)

    @property
    def paths(self) -> dict[str, str]:
        return {"stdin": self.stdin, "stdout": self.stdout, "stderr": self.stderr}

    def write_stdin(self, data: bytes) -> None:
        assert self._in_opener is not None
        self._in_opener.join(TIMEOUT)
        assert self._in is not None, "the shim never opened stdin's reader"
        os.write(self._in, data)

    def close_stdin(self) -> None:
        if self._in_opener is not None and self._in_opener.is_alive():
            # Nobody opened the reader: open one so the blocked open returns.
            unblock = os.open(self.stdin, os.O_RDONLY | os.O_NONBLOCK)
            self._in_opener.join(TIMEOUT)
            os.close(unblock)
        if self._in is not None:
            os.close(self._in)
            self._in = None

    def detach_stdout(self) -> None:
        assert self.out is not None
        os.close(self.out)
        self.out = None

    def reattach_stdout(self) -> None:
        self.out = os.open(self.stdout, os.O_RDONLY | os.O_NONBLOCK)

    def close(self) -> None:
        self.close_stdin()
        for fd in (self.out, self.err):
            if fd is not None:
                os.close(fd)
        self.out = self.err = None


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Client]:
    c = Client(tmp_path)
    yield c
    c.close()


# -- reading the client's ends -----------------------------------------------------------


def _poll(fd: int, timeout: float) -> int:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    events = poller.poll(timeout * 1000)
    return events[0][1] if events else 0


def read_until_eof(fd: int | None, timeout: float = TIMEOUT) -> bytes:
    """Everything up to EOF (every writer closed); fails if EOF does not come in time."""
    assert fd is not None
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not _poll(fd, left):
            continue
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            continue
        if not data:
            return b"".join(chunks)
        chunks.append(data)
    raise AssertionError(f"no EOF within {timeout} s; got {b''.join(chunks)!r}")


def read_until(fd: int | None, needle: bytes, timeout: float = TIMEOUT) -> bytes:
    """Read until *needle* has been seen; fails at EOF or timeout."""
    assert fd is not None
    got = b""
    deadline = time.monotonic() + timeout
    while needle not in got:
        left = deadline - time.monotonic()
        assert left > 0, f"{needle!r} not seen within {timeout} s; got {got!r}"
        if not _poll(fd, left):
            continue
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            continue
        assert data, f"EOF before {needle!r}; got {got!r}"
        got += data
    return got


def at_eof(fd: int | None, within: float = QUIET) -> bool:
    """Whether the reader sees EOF (POLLHUP: every writer closed) within *within* seconds."""
    assert fd is not None
    return bool(_poll(fd, within) & select.POLLHUP)


def still_running(reaper: Reaper, pid: int) -> bool:
    try:
        reaper.wait(pid, QUIET)
    except TimeoutError:
        return True
    return False


def spawn(reaper: Reaper, s: ProcessStdio, script: str, *, setsid: bool = False) -> int:
    """Run `sh -c script` with the process's fds from *s* (None: not connected)."""
    fds = {n: fd for n, fd in enumerate((s.io.stdin, s.io.stdout, s.io.stderr)) if fd is not None}
    return reaper.spawn([SH, "-c", script], fds=fds, env=ENV, setsid=setsid, own=True)


def exit_status(reaper: Reaper, pid: int) -> int:
    return reaper.wait(pid, TIMEOUT).status


# -- FIFOs -------------------------------------------------------------------------------


def test_output_reaches_the_client_and_eof_follows_exit(
    reaper: Reaper, open_stdio: Callable[..., ProcessStdio], client: Client
) -> None:
    """stdout and stderr reach their FIFOs; EOF comes when the process exits, not before."""
    s = open_stdio(**client.paths)
    pid = spawn(reaper, s, "echo out; echo err >&2; read x; echo bye $x")
    s.after_start()

    assert read_until(client.out, b"out\n") == b"out\n"
    assert read_until(client.err, b"err\n") == b"err\n"
    assert not at_eof(client.out), "EOF while the process still runs"

    client.write_stdin(b"now\n")
    assert exit_status(reaper, pid) == 0
    assert read_until_eof(client.out) == b"bye now\n"
    assert read_until_eof(client.err) == b""


def test_eof_waits_for_after_start(
    reaper: Reaper, open_stdio: Callable[..., ProcessStdio], client: Client
) -> None:
    """Until the shim drops its copy of the writer (after_start), the client sees no EOF."""
    s = open_stdio(**client.paths)
    pid = spawn(reaper, s, "echo done")
    assert exit_status(reaper, pid) == 0
    assert not at_eof(client.out)

    s.after_start()
    assert read_until_eof(client.out) == b"done\n"


def test_output_survives_client_detach_and_reattach(
    reaper: Reaper, open_stdio: Callable[..., ProcessStdio], client: Client
) -> None:
    """With no reader attached, writes do not fail; a new reader gets what was written."""
    s = open_stdio(**client.paths)
    script = "echo one; read x; head -c 60000 /dev/zero && echo && echo two"
    pid = spawn(reaper, s, script)
    s.after_start()
    assert read_until(client.out, b"one\n") == b"one\n"

    client.detach_stdout()  # ctr run -d
    client.write_stdin(b"go\n")
    assert exit_status(reaper, pid) == 0, "a write failed while the client was detached"

    client.reattach_stdout()  # ctr task attach
    data = read_until(client.out, b"two\n")
    assert data == b"\0" * 60000 + b"\ntwo\n"


def test_one_fifo_for_stdout_and_stderr_shares_the_writer(
    reaper: Reaper, open_stdio: Callable[..., ProcessStdio], client: Client
) -> None:
    """stdout and stderr naming the same FIFO get one writer; EOF comes after exit."""
    s = open_stdio(stdin="", stdout=client.stdout, stderr=client.stdout)
    assert s.io.stdout is not None and s.io.stdout == s.io.stderr
    pid = spawn(reaper, s, "echo out; echo err >&2")
    s.after_start()
    assert exit_status(reaper, pid) == 0
    assert read_until_eof(client.out) == b"out\nerr\n"


def test_a_plain_file_path_is_appended_to(
    reaper: Reaper, open_stdio: Callable[..., ProcessStdio], tmp_path: Path
) -> None:
    """An absolute path that is a regular file (not a FIFO) is appended to, as the ref does."""
    log = tmp_path / "plain.log"
    log.write_bytes(b"before\n")
    s = open_stdio(stdout=str(log), stderr=str(log))
    assert s.io.stdout is not None and s.io.stdout == s.io.stderr
    pid = spawn(reaper, s, "echo out; echo err >&2")
    s.after_start()
    assert exit_status(reaper, pid) == 0
    assert log.read_bytes() == b"before\nout\nerr\n"


def test_not_connected_streams_get_no_fds(open_stdio: Callable[..., ProcessStdio]) -> None:
    """Empty values (ctr run --null-io) mean no fds; the backend gives /dev/null."""
    s = open_stdio()
    assert (s.io.stdin, s.io.stdout, s.io.stderr, s.io.terminal) == (None, None, None, False)
    assert (s.stdin, s.stdout, s.stderr, s.terminal) == ("", "", "", False)


def test_values_are_kept_as_received(
    open_stdio: Callable[..., ProcessStdio], client: Client
) -> None:
    """State reports stdio exactly as Create sent it."""
    s = open_stdio(**client.paths)
    assert (s.stdin, s.stdout, s.stderr, s.terminal) == (
        client.stdin,
        client.stdout,
        client.stderr,
        False,
    )


# -- stdin -------------------------------------------------------------------------------


def test_stdin_line_reaches_the_process(
    reaper: Reaper, open_stdio: Callable[..., ProcessStdio], client: Client
) -> None:
    """A line the client writes is what the process reads."""
    s = open_stdio(**client.paths)
    pid = spawn(reaper, s, "head -n1")
    s.after_start()
    client.write_stdin(b"hello\n")
    assert read_until_eof(client.out) == b"hello\n"
    assert exit_status(reaper, pid) == 0


def test_stdin_eof_needs_close_io_and_the_client_closing(
    reaper: Reaper, open_stdio: Callable[..., ProcessStdio], client: Client
) -> None:
    """The client closing its end is not EOF; CloseIO afterwards is."""
    s = open_stdio(**client.paths)
    pid = spawn(reaper, s, "cat")
    s.after_start()
    client.write_stdin(b"x\n")
    assert read_until(client.out, b"x\n") == b"x\n"

    client.close_stdin()  # ctr detaching, or re-attaching later
    assert still_running(reaper, pid)

    s.close_stdin()
    s.close_stdin()  # idempotent
    assert exit_status(reaper, pid) == 0
    assert read_until_eof(client.out) == b""


def test_close_io_alone_keeps_stdin_open(
    reaper: Reaper, open_stdio: Callable[..., ProcessStdio], client: Client
) -> None:
    """After CloseIO the client can still write; EOF comes when it closes its end."""
    s = open_stdio(**client.paths)
    pid = spawn(reaper, s, "cat")
    s.after_start()
    client.write_stdin(b"early\n")  # also waits until the client's end is open
    s.close_stdin()
    assert still_running(reaper, pid)

    client.write_stdin(b"late\n")
    assert read_until(client.out, b"late\n") == b"early\nlate\n"
    client.close_stdin()
    assert exit_status(reaper, pid) == 0


# -- file:// -----------------------------------------------------------------------------


def test_file_uri_appends_both_streams_to_one_file(
    reaper: Reaper, open_stdio: Callable[..., ProcessStdio], tmp_path: Path
) -> None:
    """file:// creates the file (and its directory) and appends stdout and stderr to it."""
    log = tmp_path / "new" / "dir" / "app.log"
    uri = f"file://{log}"
    for round_ in ("1", "2"):
        s = open_stdio(stdout=uri, stderr=uri)
        assert s.io.stdout is not None and s.io.stdout == s.io.stderr and s.io.stdin is None
        pid = spawn(reaper, s, f"echo out{round_}; echo err{round_} >&2")
        s.after_start()
        assert exit_status(reaper, pid) == 0
        s.close()
    assert log.read_bytes() == b"out1\nerr1\nout2\nerr2\n"
    assert stat.S_IMODE(log.stat().st_mode) == 0o644 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- binary:// ---------------------------------------------------------------------------

LOGGER = """\
#!{python}
# A logger as spec section 5.4 describes one: fd 3 and 4 in, fd 5 says ready.
import json, os, sys, threading
out = sys.argv[sys.argv.index("dir") + 1]
with open(os.path.join(out, "argv"), "w") as f:
    json.dump(sys.argv[1:], f)
with open("/proc/self/environ", "rb") as src, open(os.path.join(out, "environ"), "wb") as f:
    f.write(src.read())  # the environment exec gave us, before Python adds to it
os.write(5, b"r")
os.close(5)

def pump(fd, name):
    with open(os.path.join(out, name), "wb") as f:
        while data := os.read(fd, 65536):
            f.write(data)

threads = [threading.Thread(target=pump, args=a) for a in ((3, "stdout"), (4, "stderr"))]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""

LINGERING_LOGGER = """\
#!{python}
# Ready at once, then ignores EOF (and SIGTERM when told to) and stays.
import os, signal, sys, time
if sys.argv[2] == "1":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
os.close(5)
time.sleep(120)
"""

STUCK_LOGGER = """\
#!{python}
# Holds fd 5 open and never says it is ready.
import time
time.sleep(120)
"""


def _script(path: Path, text: str) -> Path:
    path.write_text(text.format(python=sys.executable))
    path.chmod(0o755)
    return path


def test_binary_logger_gets_output_args_and_only_its_env(
    reaper: Reaper, open_stdio: Callable[..., ProcessStdio], tmp_path: Path
) -> None:
    """The logger reads fd 3/4, gets the query as argv and only CONTAINER_ID/NAMESPACE."""
    logger = _script(tmp_path / "logger", LOGGER)
    uri = f"binary://{logger}?dir={tmp_path}&flag"
    s = open_stdio(stdout=uri, stderr=uri, process_id="c7", namespace="k8s.io")
    pid = spawn(reaper, s, "echo out; echo err >&2")
    s.after_start()
    assert exit_status(reaper, pid) == 0
    assert s.wait_drained(TIMEOUT), "the logger did not finish after the process exited"

    assert (tmp_path / "stdout").read_bytes() == b"out\n"
    assert (tmp_path / "stderr").read_bytes() == b"err\n"
    assert json.loads((tmp_path / "argv").read_text()) == ["dir", str(tmp_path), "flag", ""]
    environ = (tmp_path / "environ").read_bytes().split(b"\0")
    assert sorted(e for e in environ if e) == [b"CONTAINER_ID=c7", b"CONTAINER_NAMESPACE=k8s.io"]


def test_binary_logger_finishes_when_the_process_never_started(
    open_stdio: Callable[..., ProcessStdio], tmp_path: Path
) -> None:
    """Delete of a created-only process: wait_drained lets the logger see EOF and exit."""
    logger = _script(tmp_path / "logger", LOGGER)
    s = open_stdio(stdout=f"binary://{logger}?dir={tmp_path}")
    assert s.wait_drained(TIMEOUT)
    assert (tmp_path / "stdout").read_bytes() == b""


@pytest.mark.parametrize("ignores_sigterm", [False, True], ids=["sigterm", "sigkill"])
def test_close_stops_a_logger_that_does_not_exit_by_itself(
    ignores_sigterm: bool,
    open_stdio: Callable[..., ProcessStdio],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """close() ends a lingering logger: SIGTERM, and SIGKILL if it ignores that."""
    monkeypatch.setattr(stdio_module, "LOGGER_TERM_TIMEOUT", 0.5)
    logger = _script(tmp_path / "logger", LINGERING_LOGGER)
    s = open_stdio(stdout=f"binary://{logger}?ignore-sigterm={int(ignores_sigterm)}")
    assert not s.wait_drained(QUIET)
    started = time.monotonic()
    s.close()
    assert time.monotonic() - started < 5
    assert _processes_running(str(logger)) == []


def test_binary_logger_that_never_gets_ready_fails_cleanly(
    open_stdio: Callable[..., ProcessStdio], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A logger that never signals fd 5: DeadlineExceeded in time, logger gone, no fds left."""
    monkeypatch.setattr(stdio_module, "LOGGER_READY_TIMEOUT", 0.5)
    logger = _script(tmp_path / "stuck-logger", STUCK_LOGGER)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        open_stdio(stdout=f"binary://{logger}", stderr=f"binary://{logger}")
    assert time.monotonic() - started < 5
    assert _processes_running(str(logger)) == []


def test_binary_logger_that_cannot_start_is_invalid(
    open_stdio: Callable[..., ProcessStdio], tmp_path: Path
) -> None:
    """A logger path that does not exist is the client's mistake."""
    with pytest.raises(InvalidArgument):
        open_stdio(stdout=f"binary://{tmp_path}/no-such-logger")


def _processes_running(needle: str) -> list[int]:
    """Live (not zombie) processes whose command line contains *needle*."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle.encode() in cmdline and state != "Z":
            found.append(int(entry))
    return found


# -- terminal ----------------------------------------------------------------------------


@pytest.fixture
def tty_client(tmp_path: Path) -> Iterator[Client]:
    """ctr run -t: stdin and stdout FIFOs, stderr empty."""
    c = Client(tmp_path, stderr=False)
    yield c
    c.close()


def _spawn_on_pty(reaper: Reaper, script: str) -> tuple[int, int]:
    """(master, pid): *script* runs in a new session with a pty slave as fds 0-2."""
    master, slave = open_pty()
    try:
        pid = reaper.spawn(
            [SH, "-c", script], fds={0: slave, 1: slave, 2: slave}, env=ENV, setsid=True, own=True
        )
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    return master, pid


def test_terminal_round_trip(
    reaper: Reaper, open_stdio: Callable[..., ProcessStdio], tty_client: Client
) -> None:
    """Size, output and a stdin line go through the pty; stdout gets EOF after exit."""
    s = open_stdio(**tty_client.paths, terminal=True)
    assert (s.io.stdin, s.io.stdout, s.io.stderr, s.io.terminal) == (None, None, None, True)
    master, slave = open_pty()
    s.attach_console(master)
    s.resize(100, 40)  # columns, rows
    try:
        pid = reaper.spawn(
            [SH, "-c", "stty size; echo hi; read x; echo got $x"],
            fds={0: slave, 1: slave, 2: slave},
            env=ENV,
            setsid=True,
            own=True,
        )
    finally:
        os.close(slave)
    s.after_start()

    assert b"40 100" in read_until(tty_client.out, b"hi")
    tty_client.write_stdin(b"abc\n")
    rest = read_until_eof(tty_client.out)
    assert b"got abc" in rest
    assert exit_status(reaper, pid) == 0
    assert s.wait_drained(TIMEOUT)


def test_terminal_output_can_go_to_a_file(
    reaper: Reaper, open_stdio: Callable[..., ProcessStdio], tmp_path: Path
) -> None:
    """file:// works for a terminal's output too; a stderr path that is missing is ignored."""
    log = tmp_path / "tty.log"
    s = open_stdio(stdout=f"file://{log}", stderr=str(tmp_path / "never-created"), terminal=True)
    master, pid = _spawn_on_pty(reaper, "echo on-the-tty")
    s.attach_console(master)
    s.after_start()
    assert exit_status(reaper, pid) == 0
    assert s.wait_drained(TIMEOUT)
    assert log.read_bytes() == b"on-the-tty\r\n"


def test_terminal_output_can_go_to_a_logger(
    reaper: Reaper, open_stdio: Callable[..., ProcessStdio], tmp_path: Path
) -> None:
    """binary:// with a terminal: the console output is the logger's fd 3; fd 4 is empty."""
    logger = _script(tmp_path / "logger", LOGGER)
    uri = f"binary://{logger}?dir={tmp_path}"
    s = open_stdio(stdout=uri, stderr=uri, terminal=True)
    master, pid = _spawn_on_pty(reaper, "echo logged")
    s.attach_console(master)
    s.after_start()
    assert exit_status(reaper, pid) == 0
    assert s.wait_drained(TIMEOUT)
    assert (tmp_path / "stdout").read_bytes() == b"logged\r\n"
    assert (tmp_path / "stderr").read_bytes() == b""


def _winsize(fd: int) -> tuple[int, int]:
    """(columns, rows) of a pty."""
    packed = fcntl.ioctl(fd, termios.TIOCGWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
    rows, cols, _, _ = struct.unpack("HHHH", packed)
    return cols, rows


def test_resize_before_the_console_applies_on_attach(
    open_stdio: Callable[..., ProcessStdio], tty_client: Client
) -> None:
    """A ResizePty that comes before the master is there is not lost."""
    s = open_stdio(**tty_client.paths, terminal=True)
    s.resize(120, 50)
    master, slave = open_pty()
    try:
        s.attach_console(master)
        assert _winsize(slave) == (120, 50)
        s.resize(0, 0)  # ctr sends 0x0 when its own terminal has no size
        assert _winsize(slave) == (0, 0)
    finally:
        os.close(slave)


def test_resize_without_terminal_is_a_no_op(
    open_stdio: Callable[..., ProcessStdio], client: Client
) -> None:
    """ResizePty on a process without a pty succeeds and does nothing."""
    s = open_stdio(**client.paths)
    s.resize(80, 24)


def test_console_for_a_process_without_terminal_is_refused(
    open_stdio: Callable[..., ProcessStdio], client: Client
) -> None:
    """attach_console on a non-terminal process fails, and the master is not leaked."""
    s = open_stdio(**client.paths)
    master, slave = open_pty()
    os.close(slave)
    with pytest.raises(FailedPrecondition):
        s.attach_console(master)


def test_close_stops_the_copy_threads_of_a_running_terminal(
    reaper: Reaper, open_stdio: Callable[..., ProcessStdio], tty_client: Client
) -> None:
    """close() with the process still running ends the copying and releases the pty."""
    s = open_stdio(**tty_client.paths, terminal=True)
    master, pid = _spawn_on_pty(reaper, "echo ready; read x")
    s.attach_console(master)
    s.after_start()
    read_until(tty_client.out, b"ready")
    started = time.monotonic()
    s.close()
    s.close()
    assert time.monotonic() - started < 2
    assert exit_status(reaper, pid) != 0  # the pty hung up: SIGHUP or EOF on read


# -- ConsoleSocket -----------------------------------------------------------------------

SEND_MASTER = """\
import os, socket, sys
master, slave = os.openpty()
with socket.socket(socket.AF_UNIX) as conn:
    conn.connect(sys.argv[1])
    socket.send_fds(conn, [b"/dev/pts/x"], [master])  # what runc sends
os.close(master)
os.write(slave, b"ping\\n")
line = os.read(slave, 100)
sys.exit(0 if line == b"pong\\n" else 1)
"""


def test_console_socket_receives_a_working_pty_master(reaper: Reaper) -> None:
    """A child sends a pty master over the socket (as runc does); it works both ways."""
    with ConsoleSocket() as sock:
        assert len(sock.path.encode()) < 108 and os.path.exists(sock.path)
        pid = reaper.spawn([sys.executable, "-c", SEND_MASTER, sock.path], own=True)
        master = sock.receive(TIMEOUT)
        try:
            assert not os.get_inheritable(master)
            assert b"ping" in read_until(master, b"ping")
            os.write(master, b"pong\n")
            assert exit_status(reaper, pid) == 0
        finally:
            os.close(master)
        path = sock.path
    assert not os.path.exists(path) and not os.path.exists(os.path.dirname(path))


def test_console_socket_times_out_without_a_peer() -> None:
    """No runtime connects: a clear DeadlineExceeded, not a hang."""
    with ConsoleSocket() as sock, pytest.raises(DeadlineExceeded):
        sock.receive(0.2)


def test_open_pty_gives_a_terminal_pair() -> None:
    """open_pty returns a master and a slave that is a tty, both non-inheritable."""
    master, slave = open_pty()
    try:
        assert os.isatty(slave) and not os.get_inheritable(master)
        assert not os.get_inheritable(slave)
    finally:
        os.close(master)
        os.close(slave)


# -- values that cannot be used ----------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        {"stdout": "fifo:///run/x"},
        {"stdout": "npipe://./pipe/x"},
        {"stdout": "garbage"},
        {"stdout": "relative/path"},
        {"stdout": "file://host/var/log/x"},
        {"stdout": "file:relative"},
        {"stdout": "binary://logger?x=1"},
        {"stdin": "file:///tmp/in"},
        {"stdin": "relative"},
        {"stdout": "/nonexistent/fifo"},
        {"stdin": "/nonexistent/fifo"},
        {"stderr": "binary:///bin/true", "stdout": "{fifo}"},
        {"stdout": "file:///tmp/a.log", "stderr": "file:///tmp/b.log"},
    ],
    ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()),
)
def test_unusable_values_are_invalid_argument(
    values: dict[str, str], open_stdio: Callable[..., ProcessStdio], client: Client
) -> None:
    """Unknown schemes, relative paths and missing FIFOs fail Create with InvalidArgument."""
    values = {k: v.format(fifo=client.stdout) for k, v in values.items()}
    with pytest.raises(InvalidArgument) as info:
        open_stdio(**values)
    stream = next(iter(values)) if len(values) == 1 else None
    if stream is not None:
        assert stream in str(info.value) and values[stream] in str(info.value)


def test_close_is_idempotent(open_stdio: Callable[..., ProcessStdio], client: Client) -> None:
    """close() twice is fine, and so are the other calls after it."""
    s = open_stdio(**client.paths)
    s.close()
    s.close()
    s.close_stdin()
    s.after_start()
    s.resize(80, 24)
    assert s.wait_drained(0)
