"""The reaper with real processes: statuses, output, ownership of exits, spawn hygiene."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim_framework.errors import DeadlineExceeded, FailedPrecondition, PolyshimError, Unavailable
from shim_framework.reaper import (
    DRAIN_AFTER_EXIT,
    CommandFailed,
    CommandTimeout,
    Exit,
    Reaper,
)

ROOT = Path(__file__).resolve().parent.parent


class Exits:
    """An `on_exit` that records every exit and lets a test wait for one."""

    def __init__(self) -> None:
        self.seen: list[Exit] = []
        self._cond = threading.Condition()

    def __call__(self, exited: Exit) -> None:
        with self._cond:
            self.seen.append(exited)
            self._cond.notify_all()

    def wait_for(self, pid: int, timeout: float = 10.0) -> Exit:
        with self._cond:
            found = self._cond.wait_for(lambda: self.of(pid), timeout)
            assert found, f"no exit of pid {pid} reached on_exit within {timeout}s"
            return found[0]

    def of(self, pid: int) -> list[Exit]:
        return [e for e in self.seen if e.pid == pid]


@pytest.fixture
def exits() -> Exits:
    return Exits()


@pytest.fixture
def reaper(exits: Exits) -> Iterator[Reaper]:
    r = Reaper(on_exit=exits)
    r.start()
    yield r
    r.stop()


def test_run_reports_status_and_output(reaper: Reaper) -> None:
    """true, false and a shell that writes both streams give their own status and output."""
    assert reaper.run(["true"]).status == 0
    assert reaper.run(["false"]).status == 1
    result = reaper.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (result.status, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
    assert result.argv == ("sh", "-c", "echo out; echo err >&2; exit 3")


def test_run_pipes_input_larger_than_a_pipe(reaper: Reaper) -> None:
    """input reaches stdin whole, even when it cannot be written in one go."""
    data = os.urandom(1 << 20)
    assert reaper.run(["cat"], input=data).stdout == data


def test_run_without_input_reads_dev_null(reaper: Reaper) -> None:
    """Without input, stdin is /dev/null: a reader sees EOF at once."""
    assert reaper.run(["cat"], timeout=10).stdout == b""


def test_check_raises_command_failed_with_stderr(reaper: Reaper) -> None:
    """check() turns a non-zero status into CommandFailed naming command, status and stderr."""
    result = reaper.run(["sh", "-c", "echo boom >&2; exit 4"])
    with pytest.raises(CommandFailed) as info:
        result.check()
    assert info.value.result is result
    assert isinstance(info.value, PolyshimError)
    assert "exit status 4" in str(info.value) and "boom" in str(info.value)
    assert reaper.run(["true"]).check().status == 0


def test_killed_command_reports_128_plus_signal(reaper: Reaper) -> None:
    """A command killed by a signal has status 128 + signal number."""
    assert reaper.run(["sh", "-c", "kill -KILL $$"]).status == 128 + signal.SIGKILL


def test_timeout_kills_the_command_and_raises(reaper: Reaper) -> None:
    """A command past its timeout is killed and run() raises CommandTimeout promptly."""
    r, w = os.pipe()
    try:
        started = time.monotonic()
        with pytest.raises(CommandTimeout) as info:
            reaper.run(["sh", "-c", "echo $$ >&3; exec sleep 30"], timeout=0.3, fds={3: w})
        assert time.monotonic() - started < 5
        os.close(w)
        w = -1
        pid = int(os.read(r, 100))
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    assert isinstance(info.value, DeadlineExceeded)
    assert info.value.argv[0] == "sh"
    assert not Path(f"/proc/{pid}").exists(), "the timed-out command is still there"


def test_concurrent_runs_each_get_their_own_exit(reaper: Reaper, exits: Exits) -> None:
    """200 run() calls from 20 threads: every status and output lands with its own caller."""
    failures: list[str] = []

    def worker(t: int) -> None:
        for i in range(10):
            n = (t * 10 + i) % 256
            result = reaper.run(["sh", "-c", 'echo "$0"; exit "$0"', str(n)], timeout=60)
            if (result.status, result.stdout) != (n, f"{n}\n".encode()):
                failures.append(f"expected {n}, got {result}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert exits.seen == [], "exits of run() commands must not reach on_exit"


def test_spawned_exit_reaches_on_exit_exactly_once(reaper: Reaper, exits: Exits) -> None:
    """A spawned child's exit is reported to on_exit once, with its status."""
    pid = reaper.spawn(["sh", "-c", "exit 5"])
    assert exits.wait_for(pid).status == 5
    # More SIGCHLDs and reaping rounds must not report it again.
    others = [reaper.spawn(["true"]) for _ in range(5)]
    for other in others:
        exits.wait_for(other)
    reaper.run(["true"])
    assert len(exits.of(pid)) == 1
    assert exits.of(pid)[0].exited_at <= time.time()


def test_owned_spawn_is_waited_for_not_reported(reaper: Reaper, exits: Exits) -> None:
    """spawn(own=True) + wait(pid) gets the exit; on_exit never sees it; a second wait fails."""
    pid = reaper.spawn(["sh", "-c", "exit 9"], own=True)
    assert reaper.wait(pid, timeout=10).status == 9
    with pytest.raises(FailedPrecondition):
        reaper.wait(pid, timeout=1)
    sentinel = reaper.spawn(["true"])
    exits.wait_for(sentinel)  # on_exit has caught up
    assert exits.of(pid) == []


def test_forked_child_runs_with_default_signals_and_exits_with_its_int(
    reaper: Reaper, exits: Exits
) -> None:
    """Reaper.fork: child() runs unblocked, with default dispositions (the parent's
    handlers must not run in it), and its return value is the exit status."""

    def child() -> int:
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        handler = signal.getsignal(signal.SIGTERM)
        return 7 if not blocked and handler == signal.SIG_DFL else 1

    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        pid = reaper.fork(child)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert exits.wait_for(pid).status == 7


def test_wait_timeout_leaves_the_process_waitable(reaper: Reaper) -> None:
    """wait() past its timeout raises CommandTimeout; the exit can still be waited for."""
    pid = reaper.spawn(["sleep", "30"], own=True)
    with pytest.raises(CommandTimeout):
        reaper.wait(pid, timeout=0.1)
    os.kill(pid, signal.SIGTERM)
    assert reaper.wait(pid, timeout=10).status == 128 + signal.SIGTERM


def test_on_exit_may_run_commands(exits: Exits) -> None:
    """A callback that runs a helper (runc kill --all on an init's exit) does not deadlock."""
    results: list[int] = []
    done = threading.Event()

    def on_exit(exited: Exit) -> None:
        results.append(reaper.run(["sh", "-c", "exit 6"], timeout=10).status)
        done.set()

    reaper = Reaper(on_exit)
    reaper.start()
    try:
        reaper.spawn(["true"])
        assert done.wait(15)
    finally:
        reaper.stop()
    assert results == [6]


def test_stop_fails_pending_waits(exits: Exits) -> None:
    """A wait for an owned process ends with Unavailable when the reaper stops first."""
    reaper = Reaper(exits)
    reaper.start()
    pid = reaper.spawn(["sleep", "30"], own=True)
    later = reaper.spawn(["sleep", "30"], own=True)
    outcome: list[BaseException] = []

    def waiter() -> None:
        try:
            reaper.wait(pid, timeout=30)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    try:
        reaper.stop()
        thread.join(10)
        assert len(outcome) == 1 and isinstance(outcome[0], Unavailable)
        with pytest.raises(Unavailable):  # and so does a wait that comes after the stop
            reaper.wait(later, timeout=1)
    finally:
        for child in (pid, later):
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)  # no reaper runs now: collect them ourselves


def test_children_get_default_sigpipe_and_no_blocked_signals(reaper: Reaper) -> None:
    """Python ignores SIGPIPE and SIGXFSZ; spawned children must not inherit that."""
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN  # what we must not leak
    out = reaper.run(["grep", "-E", "^Sig(Ign|Blk):", "/proc/self/status"]).check().stdout
    fields = dict(line.split(":\t") for line in out.decode().splitlines())
    ignored, blocked = int(fields["SigIgn"], 16), int(fields["SigBlk"], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1))
    assert not ignored & (1 << (signal.SIGXFSZ - 1))
    assert blocked == 0


def test_daemon_holding_the_output_pipe_does_not_hang_run(reaper: Reaper) -> None:
    """A background process keeping stdout open delays run() at most ~1 s past the exit."""
    started = time.monotonic()
    result = reaper.run(["sh", "-c", "sleep 30 & echo $!"], timeout=20)
    elapsed = time.monotonic() - started
    os.kill(int(result.stdout), signal.SIGKILL)
    assert result.status == 0
    assert elapsed < DRAIN_AFTER_EXIT + 2


def test_fds_mapping_installs_fds_3_and_4(reaper: Reaper) -> None:
    """fds={3: a, 4: b} gives the child those pipes as fds 3 and 4."""
    r3, w3 = os.pipe()
    r4, w4 = os.pipe()
    try:
        reaper.run(["sh", "-c", "echo three >&3; echo four >&4"], fds={3: w3, 4: w4}).check()
        os.close(w3)
        os.close(w4)
        assert os.read(r3, 100) == b"three\n"
        assert os.read(r4, 100) == b"four\n"
    finally:
        os.close(r3)
        os.close(r4)


def test_fds_mapping_may_cross_fd_numbers(reaper: Reaper) -> None:
    """Child fd a <- our b and child fd b <- our a: neither overwrites the other."""
    ra, wa = os.pipe()
    rb, wb = os.pipe()
    code = f"import os; os.write({wa}, b'to-a'); os.write({wb}, b'to-b')"
    try:
        reaper.run([sys.executable, "-c", code], fds={wa: wb, wb: wa}).check()
        os.close(wa)
        os.close(wb)
        assert os.read(rb, 100) == b"to-a"
        assert os.read(ra, 100) == b"to-b"
    finally:
        os.close(ra)
        os.close(rb)


def test_children_inherit_no_other_fds(reaper: Reaper) -> None:
    """An inheritable fd of ours that is not in `fds` is closed in the child."""
    opened = os.open(os.devnull, os.O_RDONLY)
    leaky = fcntl.fcntl(opened, fcntl.F_DUPFD, 50)  # F_DUPFD: inheritable, as C code may leave it
    os.close(opened)
    try:
        assert os.get_inheritable(leaky)
        code = "import os; print(sorted(int(fd) for fd in os.listdir('/proc/self/fd')))"
        fds = json.loads(reaper.run([sys.executable, "-c", code]).check().stdout)
    finally:
        os.close(leaky)
    assert set(fds) <= {0, 1, 2, 3}  # 3: the listing's own fd


def test_run_in_cwd(reaper: Reaper, tmp_path: Path) -> None:
    """cwd sets the command's working directory without moving ours."""
    here = os.getcwd()
    assert reaper.run(["pwd"], cwd=tmp_path).stdout.decode().strip() == str(tmp_path)
    assert os.getcwd() == here
    with pytest.raises(FailedPrecondition):
        reaper.run(["pwd"], cwd=tmp_path / "missing")


def test_missing_program_is_a_clear_error(reaper: Reaper) -> None:
    """A program that is not installed fails before anything starts."""
    with pytest.raises(FailedPrecondition, match="not found in PATH"):
        reaper.run(["polyshim-no-such-program"])
    with pytest.raises(FailedPrecondition, match="cannot start"):
        reaper.run(["/nonexistent/polyshim-no-such-program"])


def test_grandchild_is_reaped_by_a_subreaper(reaper: Reaper) -> None:
    """An orphaned grandchild is re-parented to a subreaper and reported to its on_exit.

    The subreaper is a separate Python process: made a subreaper, pytest would
    collect every orphan of every other test and leave them as zombies."""
    script = """
import json, threading
from shim_framework._platform import set_child_subreaper
from shim_framework.reaper import Reaper

set_child_subreaper()
seen, cond = {}, threading.Condition()
def on_exit(e):
    with cond:
        seen[e.pid] = e.status
        cond.notify_all()
reaper = Reaper(on_exit)
reaper.start()
# The subshell outlives its parent shell, so it is orphaned and re-parented to us.
out = reaper.run(["sh", "-c", "(sleep 0.2; exit 42) >/dev/null 2>&1 & echo $!"]).check()
pid = int(out.stdout)
with cond:
    cond.wait_for(lambda: pid in seen, 10)
reaper.stop()
print(json.dumps({"pid": pid, "status": seen.get(pid)}))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = reaper.run([sys.executable, "-c", script], env=env, timeout=60)
    assert result.status == 0, result.stderr.decode()
    report = json.loads(result.stdout)
    assert report["status"] == 42


def test_on_signal_gets_sigterm_and_stop_restores_handlers(exits: Exits) -> None:
    """With on_signal, SIGTERM reaches it; stop() puts back the handlers and wakeup fd."""
    got: list[int] = []
    arrived = threading.Event()

    def safety(signum: int, frame: object) -> None:
        """Keeps a broken reaper from killing pytest with SIGTERM."""

    previous = signal.signal(signal.SIGTERM, safety)
    try:
        chld_before = signal.getsignal(signal.SIGCHLD)
        wakeup_before = signal.set_wakeup_fd(-1)
        signal.set_wakeup_fd(wakeup_before)

        r = Reaper(exits, on_signal=lambda s: (got.append(s), arrived.set()))
        r.start()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            assert arrived.wait(10)
        finally:
            r.stop()
        assert got == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is safety
        assert signal.getsignal(signal.SIGCHLD) == chld_before
        assert signal.set_wakeup_fd(wakeup_before) == wakeup_before
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_reaper_restarts_in_one_process(exits: Exits) -> None:
    """A reaper can be started and stopped again and again."""
    for _ in range(5):
        r = Reaper(exits)
        r.start()
        try:
            assert r.run(["sh", "-c", "exit 2"]).status == 2
        finally:
            r.stop()


def test_only_one_reaper_runs_at_a_time(reaper: Reaper) -> None:
    """A second reaper cannot start while one owns the process's exits."""
    with pytest.raises(FailedPrecondition, match="another reaper"):
        Reaper().start()


def test_spawn_needs_a_started_reaper() -> None:
    """Starting a process without a reaper would leave its exit to no one."""
    with pytest.raises(FailedPrecondition, match="not running"):
        Reaper().spawn(["true"])
