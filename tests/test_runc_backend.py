"""The runc backend against the real runc and crun: busybox containers, no containerd.

Each behaviour runs once per OCI runtime (`binary` = runc, crun). The test
process plays the shim: it is a child subreaper with a started `Reaper`, so a
container's init and exec processes are re-parented to it and their exit
statuses reach `on_exit`, as in the shim. Stdio is plain pipes, read here.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import select
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from backends.runc import RuncBackend, criu
from backends.runc.runtime import last_error
from shim_framework._platform import set_child_subreaper
from shim_framework.backend import Container, ExecProcess, PidInfo, ProcessIO
from shim_framework.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    PolyshimError,
    Unimplemented,
)
from shim_framework.host import Host
from shim_framework.reaper import Exit, Reaper
from tests.harness import make_bundle, missing, require_binary, require_root

pytestmark = pytest.mark.integration

NAMESPACE = "polyshim-test"
BINARIES = ("runc", "crun")
TIMEOUT = 10.0  # seconds for anything a container does here
PR_SET_CHILD_SUBREAPER = 36
MIB_64 = 64 << 20


# -- the shim's part: subreaper, reaper, exits ----------------------------------------------------


class Exits:
    """Every exit the reaper hands to `on_exit`, waited for by pid."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._exits: list[Exit] = []

    def __call__(self, exit: Exit) -> None:
        with self._cond:
            self._exits.append(exit)
            self._cond.notify_all()

    def wait(self, pid: int, since: float, timeout: float = TIMEOUT) -> int:
        """The status of *pid*'s exit after *since* (a recycled pid's old exit does not count)."""

        def found() -> Exit | None:
            return next((e for e in self._exits if e.pid == pid and e.exited_at >= since), None)

        with self._cond:
            exit = self._cond.wait_for(found, timeout)
        assert exit is not None, f"pid {pid} did not exit within {timeout} s"
        return exit.status


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One busybox bundle; made before the reaper starts (make_bundle runs `runc spec`)."""
    require_root()
    require_binary("runc")
    return make_bundle(tmp_path_factory.mktemp("template"), ["true"])


@attrs.frozen
class Shim:
    """What the test process does as the shim: reap, and record every exit."""

    reaper: Reaper
    exits: Exits


@pytest.fixture(scope="module")
def shim(template: Path) -> Iterator[Shim]:
    """A subreaper test process with a started reaper, for the whole module."""
    set_child_subreaper()
    exits = Exits()
    reaper = Reaper(on_exit=exits)
    reaper.start()
    try:
        yield Shim(reaper, exits)
    finally:
        reaper.stop()
        # The rest of the session must not collect orphans it never reaps.
        ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


# -- one test's containers ------------------------------------------------------------------------


@attrs.define
class Ends:
    """A process's stdio as given to the backend, and our read ends of it."""

    io: ProcessIO
    stdout: int = -1
    stderr: int = -1
    console: int | None = None


@attrs.define
class Box:
    """One container made by a test: its id, bundle, init pid and the read ends of its output."""

    id: str
    bundle: Path
    pid: int
    launched: float
    stdout: int = -1
    stderr: int = -1
    console: int | None = None


class Lab:
    """Makes containers through the backend and removes every one of them afterwards."""

    def __init__(self, binary: str, template: Path, tmp: Path, shim: Shim) -> None:
        self.binary = binary
        self.template = json.loads((template / "config.json").read_text())
        self.rootfs = template / "rootfs"
        self.tmp = tmp
        self.exits = shim.exits
        self.config = {"binary": binary, "root": str(tmp / "state")}
        self.host = Host(
            namespace=NAMESPACE,
            config=self.config,
            reaper=shim.reaper,
            state_dir=tmp / "scratch",
            process_exited=lambda *a: None,  # for backends without host pids
            oom=lambda cid: None,
        )
        self.backend = RuncBackend(self.host)
        self.boxes: list[Box] = []
        self._fds: list[int] = []

    def configure(self, **config: Any) -> None:
        """A backend with more `[backends.runc]` keys (the containers so far stay ours)."""
        self.config = {**self.config, **config}
        self.host = attrs.evolve(self.host, config=self.config)
        self.backend = RuncBackend(self.host)

    @property
    def root(self) -> Path:
        return self.tmp / "state" / NAMESPACE

    def bundle(self, args: list[str], *, terminal: bool = False) -> tuple[str, Path]:
        """A fresh id and bundle: the template's config.json with *args*, its rootfs shared."""
        cid = f"pst-{secrets.token_hex(4)}"
        bundle = self.tmp / cid
        bundle.mkdir()
        spec = json.loads(json.dumps(self.template))
        spec["process"].update(args=args, terminal=terminal)
        spec["root"] = {"path": str(self.rootfs), "readonly": False}  # no test writes to it
        (bundle / "config.json").write_text(json.dumps(spec))
        return cid, bundle

    def create(self, args: list[str], *, terminal: bool = False) -> Box:
        cid, bundle = self.bundle(args, terminal=terminal)
        return self.create_in(cid, bundle, terminal=terminal)

    def create_in(
        self, cid: str, bundle: Path, *, terminal: bool = False, checkpoint: str = ""
    ) -> Box:
        spec = json.loads((bundle / "config.json").read_text())
        box = Box(cid, bundle, 0, time.time())
        self.boxes.append(box)
        ends = self.stdio(terminal)
        created = self.backend.create(
            Container(
                cid, NAMESPACE, bundle, spec, bundle / "rootfs", ends.io, checkpoint=checkpoint
            )
        )
        if not checkpoint:  # a restore hands them to the runtime only on start
            self.close_child_ends(ends)
        box.pid, box.console = created.pid, created.console_fd
        box.stdout, box.stderr = ends.stdout, ends.stderr
        if box.console is not None:
            self._fds.append(box.console)
        return box

    def stdio(self, terminal: bool) -> Ends:
        """Pipes for stdout and stderr (none for a terminal)."""
        if terminal:
            return Ends(ProcessIO(terminal=True))
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        self._fds += [out_r, err_r, out_w, err_w]
        return Ends(ProcessIO(stdin=None, stdout=out_w, stderr=err_w), out_r, err_r)

    def close_child_ends(self, ends: Ends) -> None:
        """Ours to close once the runtime has handed them on, so we see EOF at the exit."""
        for fd in (ends.io.stdout, ends.io.stderr):
            if fd is not None:
                self.close(fd)

    def close(self, fd: int) -> None:
        if fd in self._fds:
            self._fds.remove(fd)
            os.close(fd)

    def exec_process(self, args: list[str], terminal: bool = False) -> dict[str, Any]:
        return {**self.template["process"], "args": args, "terminal": terminal}

    def exec(
        self, box: Box, exec_id: str, args: list[str], terminal: bool = False
    ) -> tuple[int, Ends, float]:
        """Exec and start *args* in *box*: (pid, output ends, launch time)."""
        ends = self.stdio(terminal)
        process = self.exec_process(args, terminal)
        self.backend.exec(ExecProcess(box.id, exec_id, process, ends.io))
        launched = time.time()
        started = self.backend.start_exec(box.id, exec_id)
        self.close_child_ends(ends)
        if started.console_fd is not None:
            self._fds.append(started.console_fd)
            ends.console = started.console_fd
        return started.pid, ends, launched

    def runtime(self, *args: str) -> Any:
        """The OCI runtime itself, beside the backend, to look at what it did."""
        return self.host.run([self.binary, "--root", str(self.root), *args], timeout=TIMEOUT)

    def state(self, box: Box) -> str:
        result = self.runtime("state", box.id)
        assert result.status == 0, result.stderr
        return json.loads(result.stdout)["status"]

    def listed(self) -> list[str]:
        result = self.runtime("list", "--format", "json")
        assert result.status == 0, result.stderr
        return [c["id"] for c in json.loads(result.stdout or b"null") or []]

    def cleanup(self) -> None:
        for box in self.boxes:
            self.runtime("delete", "--force", box.id)  # whatever state the test left it in
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


@pytest.fixture(params=BINARIES)
def lab(request: pytest.FixtureRequest, template: Path, tmp_path: Path, shim: Shim) -> Lab:
    """Containers of one test, run by the parametrized runtime; all removed afterwards."""
    binary = request.param
    require_binary(binary)
    probe = RuncBackend.probe({"binary": binary})
    if not probe.ok and binary == "crun" and "hybrid" in probe.reason:
        # crun refuses hybrid hosts whose cgroup2 holds a controller (these test VMs);
        # run it where it can see only the v1 hierarchies, so crun itself is exercised.
        binary = str(crun_without_cgroup2(tmp_path))
    elif not probe.ok:
        missing(probe.reason)
    made = Lab(binary, template, tmp_path, shim)
    request.addfinalizer(made.cleanup)
    return made


def crun_without_cgroup2(directory: Path) -> Path:
    """A `crun` that runs in a private mount namespace without /sys/fs/cgroup/unified."""
    wrapper = directory / "crun"
    wrapper.write_text(
        "#!/bin/sh\n"
        'exec unshare -m sh -c \'umount /sys/fs/cgroup/unified; exec crun "$@"\' crun "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


def test_crun_on_a_hybrid_host_is_refused_with_the_reason() -> None:
    """Where crun cannot work, the backend says why instead of failing at create."""
    require_binary("crun")
    try:
        controllers = Path("/sys/fs/cgroup/unified/cgroup.controllers").read_text().split()
    except OSError:
        controllers = []
    probe = RuncBackend.probe({"binary": "crun"})
    if controllers:
        assert not probe.ok and "hybrid" in probe.reason and "use runc" in probe.reason
    else:
        assert probe.ok, probe.reason


def read_all(fd: int, timeout: float = TIMEOUT) -> bytes:
    """Everything until EOF (all writers closed), within *timeout*."""
    data = b""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: a pty whose slave side is gone
                return data
            if not chunk:
                return data
            data += chunk
    raise AssertionError(f"no EOF within {timeout} s; read so far: {data!r}")


def read_until(fd: int, needle: bytes, timeout: float = TIMEOUT) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while needle not in data:
        left = deadline - time.monotonic()
        assert left > 0, f"{needle!r} did not arrive within {timeout} s; got {data!r}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 4096)
            assert chunk, f"EOF before {needle!r}; got {data!r}"
            data += chunk
    return data


COUNTER = ["sh", "-c", "i=0; while :; do echo $i; i=$((i+1)); sleep 0.1; done"]
SLEEPER = ["sleep", "1000"]  # pid 1 of its namespace: only SIGKILL ends it from outside
# pid 1 gets a signal from outside its namespace only if it handles it: this init does.
TERMINABLE = ["sh", "-c", "trap 'exit 7' TERM; while :; do sleep 0.1; done"]


# -- tests ----------------------------------------------------------------------------------------


def test_container_runs_and_its_exit_code_reaches_the_reaper(lab: Lab) -> None:
    """create, start, exit code through the reaper, output through the pipes, delete."""
    box = lab.create(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert box.pid > 0
    assert lab.state(box) == "created"
    assert (box.bundle / "init.pid").read_text().strip() == str(box.pid)
    started = lab.backend.start(box.id)
    assert started.pid == box.pid
    assert lab.exits.wait(box.pid, box.launched) == 3
    assert read_all(box.stdout) == b"out\n"
    assert read_all(box.stderr) == b"err\n"
    assert lab.backend.pids(box.id) == []
    lab.backend.delete(box.id)
    assert box.id not in lab.listed()
    assert not (box.bundle / "init.pid").exists()


def test_kill_sigterm_stops_the_init(lab: Lab) -> None:
    """SIGTERM reaches an init that handles it; its exit code comes back."""
    box = lab.create(TERMINABLE)
    lab.backend.start(box.id)
    lab.backend.kill(box.id, "", signal.SIGTERM, False)
    assert lab.exits.wait(box.pid, box.launched) == 7


def test_kill_all_signals_every_process(lab: Lab) -> None:
    """With all, an exec process gets the signal too (143), not the SIGKILL of pid 1's end."""
    box = lab.create(TERMINABLE)
    lab.backend.start(box.id)
    exec_pid, _, launched = lab.exec(box, "sleeper", SLEEPER)
    lab.backend.kill(box.id, "", signal.SIGTERM, True)
    assert lab.exits.wait(exec_pid, launched) == 128 + signal.SIGTERM
    assert lab.exits.wait(box.pid, box.launched) == 7


def test_kill_after_exit_is_not_found(lab: Lab) -> None:
    """Killing a finished init or exec is NotFound, which containerd and CRI ignore."""
    box = lab.create(SLEEPER)
    lab.backend.start(box.id)
    exec_pid, _, launched = lab.exec(box, "quick", ["true"])
    assert lab.exits.wait(exec_pid, launched) == 0
    with pytest.raises(NotFound):
        lab.backend.kill(box.id, "quick", signal.SIGTERM, False)
    lab.backend.kill(box.id, "", signal.SIGKILL, False)
    assert lab.exits.wait(box.pid, box.launched) == 128 + signal.SIGKILL
    with pytest.raises(NotFound):
        lab.backend.kill(box.id, "", signal.SIGTERM, False)
    # (`kill --all` of a stopped container succeeds in runc; the framework answers NotFound
    # for an exited process before it asks the backend.)


def test_exec_runs_in_the_container(lab: Lab) -> None:
    """An exec prints through its own pipes, exits with its own code, in the init's pid ns."""
    box = lab.create(SLEEPER)
    lab.backend.start(box.id)
    exec_pid, ends, launched = lab.exec(box, "e1", ["sh", "-c", 'echo "$0"; exit 4', "hello"])
    assert exec_pid > 0 and exec_pid != box.pid
    assert lab.exits.wait(exec_pid, launched) == 4
    assert read_all(ends.stdout) == b"hello\n"
    assert (box.bundle / "e1.pid").read_text().strip() == str(exec_pid)
    assert not (box.bundle / "e1.process.json").exists()
    with pytest.raises(AlreadyExists):
        lab.backend.exec(ExecProcess(box.id, "e1", lab.exec_process(["true"]), ProcessIO()))
    lab.backend.delete(box.id, "e1")
    assert not (box.bundle / "e1.pid").exists()

    long_pid, _, _ = lab.exec(box, "e2", SLEEPER)
    assert os.readlink(f"/proc/{long_pid}/ns/pid") == os.readlink(f"/proc/{box.pid}/ns/pid")
    assert os.readlink(f"/proc/{long_pid}/ns/pid") != os.readlink("/proc/self/ns/pid")


def test_exec_in_a_stopped_container_fails_precondition(lab: Lab) -> None:
    """The runtime's refusal becomes FailedPrecondition, as containerd expects."""
    box = lab.create(["true"])
    lab.backend.start(box.id)
    assert lab.exits.wait(box.pid, box.launched) == 0
    ends = lab.stdio(False)
    lab.backend.exec(ExecProcess(box.id, "late", lab.exec_process(["true"]), ends.io))
    with pytest.raises(FailedPrecondition):
        lab.backend.start_exec(box.id, "late")


def test_terminal_container_gets_a_pty_through_the_console_socket(lab: Lab) -> None:
    """The pty master comes back from create; a shell on it answers."""
    box = lab.create(["sh"], terminal=True)
    assert box.console is not None and os.isatty(box.console)
    lab.backend.start(box.id)
    os.write(box.console, b"echo hi\n")
    # the pty echoes the line, then sh prints the answer on a line of its own
    assert b"\nhi\r\n" in read_until(box.console, b"\nhi\r\n")
    os.write(box.console, b"exit 5\n")
    assert lab.exits.wait(box.pid, box.launched) == 5


def test_terminal_exec_gets_its_own_pty(lab: Lab) -> None:
    """A terminal exec's master comes back from start_exec."""
    box = lab.create(SLEEPER)
    lab.backend.start(box.id)
    exec_pid, ends, launched = lab.exec(box, "tty", ["sh", "-c", "tty"], terminal=True)
    assert ends.console is not None and os.isatty(ends.console)
    assert read_until(ends.console, b"/dev/pts/").startswith(b"/dev/pts/")
    assert lab.exits.wait(exec_pid, launched) == 0


def test_pause_and_resume(lab: Lab) -> None:
    """The runtime reports paused, then running; an exec into the paused one is refused."""
    box = lab.create(SLEEPER)
    lab.backend.start(box.id)
    lab.backend.pause(box.id)
    assert lab.state(box) == "paused"
    ends = lab.stdio(False)
    lab.backend.exec(ExecProcess(box.id, "frozen", lab.exec_process(["true"]), ends.io))
    with pytest.raises(FailedPrecondition):
        lab.backend.start_exec(box.id, "frozen")
    lab.backend.resume(box.id)
    assert lab.state(box) == "running"


def test_update_sets_the_memory_limit(lab: Lab) -> None:
    """The container's memory cgroup takes the new limit."""
    box = lab.create(SLEEPER)
    lab.backend.start(box.id)
    lab.backend.update(box.id, {"memory": {"limit": MIB_64}})
    assert memory_limit(box.pid) == MIB_64


def memory_limit(pid: int) -> int:
    """The memory limit of *pid*'s cgroup: v1 memory controller, else the v2 one."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return int(Path(f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes").read_text())
    unified = next(line.split(":", 2)[2] for line in lines if line.startswith("0::"))
    return int(Path(f"/sys/fs/cgroup{unified}/memory.max").read_text())


def test_pids_lists_init_and_execs_with_their_exec_id(lab: Lab) -> None:
    """The runtime's pid list, each exec pid named by its exec id."""
    box = lab.create(SLEEPER)
    lab.backend.start(box.id)
    exec_pid, _, _ = lab.exec(box, "e1", SLEEPER)
    assert sorted(lab.backend.pids(box.id), key=lambda p: p.pid) == sorted(
        [PidInfo(box.pid, ""), PidInfo(exec_pid, "e1")], key=lambda p: p.pid
    )


def criu_problem(lab: Lab) -> str:
    """What `criu check` objects to on this host; empty when criu can work here."""
    result = lab.host.run(["criu", "check"], timeout=30)
    return "" if result.status == 0 else (result.stdout + result.stderr).decode(errors="replace")


def test_checkpoint_and_restore_or_a_clear_unimplemented(lab: Lab) -> None:
    """With a working criu: checkpoint, then restore into a new container that goes on counting.
    Where criu cannot work (criu 3.17 on Linux >= 6.13) or the runtime has no checkpoint
    (Debian's crun 1.8), Checkpoint is Unimplemented and says why."""
    require_binary("criu")
    box = lab.create(COUNTER)
    lab.backend.start(box.id)
    read_until(box.stdout, b"3\n")
    image = lab.tmp / "image"
    broken = criu_problem(lab)
    has_checkpoint = lab.host.run([lab.binary, "checkpoint", "--help"]).status == 0
    if broken or not has_checkpoint:
        with pytest.raises(Unimplemented) as caught:
            lab.backend.checkpoint(box.id, str(image), {"exit": True})
        message = str(caught.value)
        assert message.startswith("backend runc: ")
        if not has_checkpoint:
            assert f"{Path(lab.binary).name} cannot checkpoint" in message, message
        else:
            assert "`criu check` fails" in message, message
        assert lab.state(box) == "running"  # nothing happened to it
        # A restore (from what the failed dump left) is refused the same way, leaving nothing.
        cid, bundle = lab.bundle(COUNTER)
        if not has_checkpoint:
            with pytest.raises(Unimplemented, match="cannot restore"):
                lab.create_in(cid, bundle, checkpoint=str(image))
            return
        lab.create_in(cid, bundle, checkpoint=str(image))
        with pytest.raises(Unimplemented, match="restore needs a working criu"):
            lab.backend.start(cid)
        assert cid not in lab.listed()
        return
    lab.backend.checkpoint(box.id, str(image), {"exit": True})
    assert lab.exits.wait(box.pid, box.launched) == 128 + signal.SIGKILL  # criu ends it
    lab.backend.delete(box.id)
    cid, bundle = lab.bundle(COUNTER)
    restored = lab.create_in(cid, bundle, checkpoint=str(image))
    assert restored.pid == 0  # the restore waits for start
    started = lab.backend.start(restored.id)
    assert started.pid > 0
    counted = read_until(restored.stdout, b"\n", timeout=TIMEOUT)
    assert int(counted.split()[0]) > 3  # it goes on counting where it stopped
    lab.backend.kill(restored.id, "", signal.SIGKILL, False)
    assert lab.exits.wait(started.pid, restored.launched) == 128 + signal.SIGKILL


def test_broken_config_is_a_clear_error_and_leaves_nothing(lab: Lab) -> None:
    """A bind mount of a missing source: create fails with the runtime's own message."""
    cid, bundle = lab.bundle(SLEEPER)
    spec = json.loads((bundle / "config.json").read_text())
    spec["mounts"].append(
        {
            "destination": "/x",
            "type": "bind",
            "source": "/nonexistent/polyshim",
            "options": ["bind"],
        }
    )
    (bundle / "config.json").write_text(json.dumps(spec))
    with pytest.raises(PolyshimError) as caught:
        lab.create_in(cid, bundle)
    logged = last_error(bundle / "log.json")  # the ref shim's error text: the last logged error
    assert logged
    assert logged.removeprefix(f"{Path(lab.binary).name} create failed: ") in str(caught.value)
    assert f'container "{cid}"' in str(caught.value)
    assert cid not in lab.listed()
    assert not (bundle / "init.pid").exists()
    with pytest.raises(NotFound):
        lab.backend.start(cid)  # forgotten: a retry may use the id again


def test_cleanup_removes_a_running_container(lab: Lab) -> None:
    """The `delete` action after a dead shim: a fresh process, no reaper, well within 5 s."""
    box = lab.create(SLEEPER)
    lab.backend.start(box.id)
    code = (
        "import sys; from pathlib import Path; from backends.runc import RuncBackend; "
        "RuncBackend.cleanup(Path(sys.argv[1]), sys.argv[2], sys.argv[3], "
        "{'binary': sys.argv[4], 'root': sys.argv[5]})"
    )
    argv = [sys.executable, "-c", code, str(box.bundle), box.id, NAMESPACE, lab.binary]
    began = time.monotonic()
    result = lab.host.run([*argv, lab.config["root"]], timeout=5, cwd=box.bundle, env=_env())
    took = time.monotonic() - began
    assert result.status == 0, result.stderr.decode()
    assert took < 5
    assert lab.exits.wait(box.pid, box.launched) == 128 + signal.SIGKILL
    assert box.id not in lab.listed()
    # and once more: idempotent
    again = lab.host.run([*argv, lab.config["root"]], timeout=5, cwd=box.bundle, env=_env())
    assert again.status == 0, again.stderr.decode()


def _env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parent.parent)
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }


# -- without containers ---------------------------------------------------------------------------


def test_probe_says_why_a_missing_binary_cannot_run() -> None:
    probe = RuncBackend.probe({"binary": "no-such-runc"})
    assert not probe.ok
    assert "no-such-runc not found on PATH" in probe.reason
    assert "backends.runc.binary" in probe.reason


def test_probe_rejects_a_config_of_the_wrong_type() -> None:
    probe = RuncBackend.probe({"systemd_cgroup": "yes"})
    assert not probe.ok and "systemd_cgroup" in probe.reason


def test_create_options_reach_the_runtime(lab: Lab) -> None:
    """no_pivot_root and no_new_keyring are flags the runtime accepts; the container runs."""
    lab.configure(no_pivot_root=True, no_new_keyring=True)
    box = lab.create(["sh", "-c", "echo fine"])
    lab.backend.start(box.id)
    assert lab.exits.wait(box.pid, box.launched) == 0
    assert read_all(box.stdout) == b"fine\n"


def test_checkpoint_options_become_flags_runc_accepts(shim: Shim, tmp_path: Path) -> None:
    """Every CheckpointOptions field maps to a runc checkpoint flag runc knows (checked against
    runc itself: a container that does not exist, not an unknown flag, is what it objects to)."""
    options = {
        "open_tcp": True,
        "external_unix_sockets": True,
        "terminal": True,
        "file_locks": True,
        "empty_namespaces": ["network", "ipc"],
        "cgroups_mode": "soft",
    }
    flags = criu.checkpoint_flags(options)
    assert flags == [
        "--leave-running",
        "--tcp-established",
        "--ext-unix-sk",
        "--shell-job",
        "--file-locks",
        "--manage-cgroups-mode",
        "soft",
        "--empty-ns",
        "network",
        "--empty-ns",
        "ipc",
    ]
    assert "--leave-running" not in criu.checkpoint_flags({"exit": True})
    root = str(tmp_path / "state")
    argv = ["runc", "--root", root, "checkpoint", "--image-path", str(tmp_path / "i"), *flags]
    result = shim.reaper.run([*argv, "no-such-container"], timeout=TIMEOUT)
    assert result.status != 0
    assert b"does not exist" in result.stderr, result.stderr


def test_last_error_reads_only_what_the_command_appended(tmp_path: Path) -> None:
    """An earlier command's error in the shared log.json is never blamed on a later one."""
    log = tmp_path / "log.json"
    log.write_text('{"level":"error","msg":"old failure","time":"t"}\n')
    offset = log.stat().st_size
    assert last_error(log, offset) == ""
    with log.open("a") as f:
        f.write('{"level":"warning","msg":"just a warning"}\nnot json\n')
        f.write('{"msg":"crun puts msg first","level":"error"}\n')
    assert last_error(log, offset) == "crun puts msg first"
    assert last_error(tmp_path / "missing.json") == ""
