"""The wasm backend against real wasmtime, real worker processes and real cgroups.

The test process plays the shim, as in test_runc_backend: a child subreaper with
a started `Reaper` whose `on_exit` records every exit. Guests come from
`tests/wasm_guests/` (built before the reaper starts: clang runs through
subprocess). Each test gets a bundle whose rootfs holds every guest, a compile
cache of its own, and pipes for the worker's stdio, read here. Everything a
test creates is deleted afterwards, also when it fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import json
import os
import secrets
import select
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from backends.wasm import WasmBackend, cache, worker
from shim_framework import cgroups
from shim_framework._platform import set_child_subreaper
from shim_framework.backend import Cap, Container, ExecProcess, ProcessIO
from shim_framework.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unimplemented,
)
from shim_framework.host import Host
from shim_framework.oom import OomWatcher
from shim_framework.reaper import Exit, Reaper
from tests.harness import PrivateContainerd, require_root
from tests.harness.wasm import build_guest, guest_names

pytestmark = pytest.mark.integration

NAMESPACE = "polyshim-wasm-test"
TIMEOUT = 10.0  # seconds for anything a guest does here
KILL_WITHIN = 1.0  # the promise: a kill stops any guest within a second
PR_SET_CHILD_SUBREAPER = 36
MIB = 1 << 20


# -- the shim's part ------------------------------------------------------------------------------


class Exits:
    """Every exit the reaper hands to `on_exit`, waited for by pid."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._exits: list[Exit] = []

    def __call__(self, exit: Exit) -> None:
        with self._cond:
            self._exits.append(exit)
            self._cond.notify_all()

    def wait(self, pid: int, since: float, timeout: float = TIMEOUT) -> Exit:
        """*pid*'s exit after *since* (a recycled pid's old exit does not count)."""

        def found() -> Exit | None:
            return next((e for e in self._exits if e.pid == pid and e.exited_at >= since), None)

        with self._cond:
            exit = self._cond.wait_for(found, timeout)
        assert exit is not None, f"pid {pid} did not exit within {timeout} s"
        return exit

    def status(self, pid: int, since: float, timeout: float = TIMEOUT) -> int:
        return self.wait(pid, since, timeout).status


@pytest.fixture(scope="module")
def guests() -> dict[str, Path]:
    """Every test guest, built (or taken from the cache) before the reaper starts."""
    require_root()
    return {name: build_guest(name) for name in guest_names()}


@attrs.frozen
class Shim:
    reaper: Reaper
    exits: Exits


@pytest.fixture(scope="module")
def shim(guests: dict[str, Path]) -> Iterator[Shim]:
    """A subreaper test process with a started reaper, for the whole module."""
    set_child_subreaper()
    exits = Exits()
    reaper = Reaper(on_exit=exits)
    reaper.start()
    try:
        yield Shim(reaper, exits)
    finally:
        reaper.stop()
        ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        for directory in glob.glob(f"/sys/fs/cgroup/*/polyshim/{NAMESPACE}"):
            with contextlib.suppress(OSError):  # the namespace's group, once empty
                os.rmdir(directory)


# -- one test's containers ------------------------------------------------------------------------


@attrs.define
class Box:
    """One container made by a test, and our ends of its stdio."""

    id: str
    pid: int
    launched: float
    stdout: int
    stderr: int
    stdin: int | None = None


@attrs.frozen
class Result:
    status: int
    stdout: str
    stderr: str


class Lab:
    """Makes containers through the backend; deletes every one of them afterwards."""

    def __init__(self, tmp: Path, shim: Shim, guests: dict[str, Path]) -> None:
        self.tmp = tmp
        self.bundle = tmp / "bundle"
        self.rootfs = self.bundle / "rootfs"
        self.rootfs.mkdir(parents=True)
        for name, path in guests.items():
            shutil.copyfile(path, self.rootfs / f"{name}.wasm")
        (self.rootfs / "etc").mkdir()
        (self.rootfs / "etc" / "hostname").write_text("inside\n")
        self.cache_dir = tmp / "cache"
        self.exits = shim.exits
        self.host = Host(
            namespace=NAMESPACE,
            config={"cache_dir": str(self.cache_dir)},
            reaper=shim.reaper,
            state_dir=tmp / "state",
            process_exited=lambda *a: None,
            oom=lambda cid: None,
        )
        self.backend = WasmBackend(self.host)
        self.ids: list[str] = []
        self._fds: list[int] = []

    def spec(
        self,
        args: list[str],
        *,
        env: list[str] | None = None,
        readonly: bool = False,
        resources: dict[str, Any] | None = None,
        seccomp: dict[str, Any] | None = None,
        user: dict[str, Any] | None = None,
        cgroups_path: str | None = None,
    ) -> dict[str, Any]:
        linux: dict[str, Any] = {"resources": resources or {}}
        if seccomp is not None:
            linux["seccomp"] = seccomp
        if cgroups_path is not None:
            linux["cgroupsPath"] = cgroups_path
        return {
            "ociVersion": "1.0.2",
            "process": {
                "args": args,
                "env": env or ["PATH=/", "GREETING=hello there"],
                "cwd": "/",
                "user": user or {"uid": 0, "gid": 0},
            },
            "root": {"path": "rootfs", "readonly": readonly},
            "linux": linux,
        }

    def pipes(self, stdin: bool = False) -> tuple[ProcessIO, int, int, int | None, list[int]]:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        in_r = in_w = None
        if stdin:
            in_r, in_w = os.pipe()
        ours = [out_r, err_r] + ([in_w] if in_w is not None else [])
        self._fds += ours
        child_ends = [out_w, err_w] + ([in_r] if in_r is not None else [])
        return ProcessIO(in_r, out_w, err_w), out_r, err_r, in_w, child_ends

    def create(self, args: list[str], *, stdin: bool = False, **spec: Any) -> Box:
        cid = f"pws-{secrets.token_hex(4)}"
        io, out_r, err_r, in_w, child_ends = self.pipes(stdin)
        launched = time.time()
        try:
            created = self.backend.create(
                Container(cid, NAMESPACE, self.bundle, self.spec(args, **spec), self.rootfs, io)
            )
        finally:
            for fd in child_ends:  # the worker has its copies
                os.close(fd)
        self.ids.append(cid)
        return Box(cid, created.pid, launched, out_r, err_r, in_w)

    def start(self, args: list[str], **kwargs: Any) -> Box:
        box = self.create(args, **kwargs)
        assert self.backend.start(box.id).pid == box.pid
        return box

    def run(self, args: list[str], **kwargs: Any) -> Result:
        """Create, start, wait for the exit, read all output, delete."""
        box = self.start(args, **kwargs)
        status = self.exits.status(box.pid, box.launched)
        result = Result(status, read_all(box.stdout), read_all(box.stderr))
        self.backend.delete(box.id)
        return result

    def exec(
        self, box: Box, exec_id: str, args: list[str], *, stdin: bool = False
    ) -> tuple[int, int, int, float]:
        """Exec and start *args* in *box*: (pid, stdout, stderr, launch time)."""
        io, out_r, err_r, _, child_ends = self.pipes(stdin)
        process = {"args": args, "env": ["GREETING=from exec"], "cwd": "/"}
        try:
            self.backend.exec(ExecProcess(box.id, exec_id, process, io))
            launched = time.time()
            started = self.backend.start_exec(box.id, exec_id)
        finally:
            for fd in child_ends:
                os.close(fd)
        return started.pid, out_r, err_r, launched

    def cleanup(self) -> None:
        for cid in self.ids:
            with contextlib.suppress(NotFound):
                self.backend.delete(cid)
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)


@pytest.fixture
def lab(request: pytest.FixtureRequest, tmp_path: Path, shim: Shim, guests: dict[str, Path]) -> Lab:
    made = Lab(tmp_path, shim, guests)
    request.addfinalizer(made.cleanup)
    return made


def read_all(fd: int, timeout: float = TIMEOUT) -> str:
    """Everything until EOF (all writers closed), within *timeout*."""
    data = b""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                return data.decode()
            data += chunk
    raise AssertionError(f"no EOF within {timeout} s; read so far: {data!r}")


def read_until(fd: int, needle: str, timeout: float = TIMEOUT) -> str:
    data = b""
    deadline = time.monotonic() + timeout
    while needle.encode() not in data:
        left = deadline - time.monotonic()
        assert left > 0, f"{needle!r} did not arrive within {timeout} s; got {data!r}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 4096)
            assert chunk, f"EOF before {needle!r}; got {data!r}"
            data += chunk
    return data.decode()


def cgroup_dirs(cid: str) -> list[str]:
    """The container's cgroup directories that exist, in any mounted hierarchy."""
    return glob.glob(f"/sys/fs/cgroup/*/polyshim/{NAMESPACE}/{cid}")


def live_children() -> set[int]:
    """Our child processes that are not zombies."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            found.add(int(entry))
    return found


def read_number(directory: str | None, name: str) -> int:
    assert directory is not None
    text = Path(directory, name).read_text().strip()
    return -1 if text == "max" else int(text.split()[0])


# -- running guests ---------------------------------------------------------------------------


def test_hello_gets_argv_and_env_and_exits_with_its_code(lab: Lab) -> None:
    """argv is process.args as given, env comes from the spec, stdout and stderr are wired."""
    result = lab.run(["/hello.wasm", "7", "two words"])
    assert result.status == 7
    assert result.stdout == (
        "argv[0]=/hello.wasm\nargv[1]=7\nargv[2]=two words\nGREETING=hello there\n"
    )
    assert result.stderr == "hello on stderr\n"


def test_returning_from_main_is_status_zero(lab: Lab) -> None:
    assert lab.run(["/hello.wasm"], env=["A=1"]).status == 0


def test_named_entry_runs_that_function(lab: Lab) -> None:
    """`module#function` runs an export other than _start."""
    result = lab.run(["/entry.wasm#greet"])
    assert (result.status, result.stdout) == (0, "hi from greet\n")


def test_component_runs_its_wasi_cli_run_export(lab: Lab) -> None:
    """A WASIp2 component's run prints through wasi:cli/stdout; ok is 0, err is 1."""
    result = lab.run(["/component_hello.wasm"])
    assert (result.status, result.stdout) == (0, "hello from a component\n")
    assert lab.run(["/component_fail.wasm"]).status == 1
    assert lab.run(["/component_fail.wasm#thunk"]).status == 0


def test_guest_reads_its_rootfs_and_cannot_leave_it(lab: Lab) -> None:
    """Files of the rootfs are at /; `..` and an absolute symlink to a host file fail."""
    secret = lab.tmp / "secret.txt"
    secret.write_text("host secret\n")
    (lab.rootfs / "abs-link").symlink_to(secret)
    (lab.rootfs / "rel-link").symlink_to("etc/hostname")
    paths = ["/etc/hostname", "/rel-link", "/../secret.txt", "../../secret.txt", "/abs-link"]
    result = lab.run(["/readfile.wasm", *paths])
    lines = result.stdout.splitlines()
    assert lines[0] == "/etc/hostname: inside"
    assert lines[1] == "/rel-link: inside"
    for line in lines[2:]:
        assert ": error: " in line, line
    assert "host secret" not in result.stdout


def test_readonly_rootfs_refuses_writes(lab: Lab) -> None:
    result = lab.run(["/writefile.wasm", "/new.txt", "data"], readonly=True)
    assert result.status == 1 and "/new.txt: error:" in result.stdout
    assert not (lab.rootfs / "new.txt").exists()
    result = lab.run(["/writefile.wasm", "/new.txt", "data"])
    assert (result.status, result.stdout) == (0, "wrote /new.txt\n")
    assert (lab.rootfs / "new.txt").read_text() == "data"


def test_stdin_line_is_echoed(lab: Lab) -> None:
    box = lab.start(["/cat_line.wasm"], stdin=True)
    assert box.stdin is not None
    os.write(box.stdin, b"a line for the guest\n")
    assert lab.exits.status(box.pid, box.launched) == 0
    assert read_all(box.stdout) == "got: a line for the guest\n"


def test_no_stdin_reads_eof(lab: Lab) -> None:
    result = lab.run(["/cat_line.wasm"])
    assert (result.status, result.stdout) == (1, "got EOF\n")


# -- exit statuses ----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["unreachable", "overflow", "oob"])
def test_trap_is_status_134_with_the_trap_on_stderr(lab: Lab, how: str) -> None:
    """unreachable (what abort() is), C stack overflow, out of bounds: as a native abort."""
    result = lab.run(["/trap.wasm", how])
    assert result.status == worker.TRAP_STATUS == 134
    assert result.stdout == f"trapping: {how}\n"
    assert result.stderr.startswith("/trap.wasm: wasm trap: "), result.stderr
    assert "wasm backtrace" in result.stderr


def test_wasm_stack_overflow_is_status_134(lab: Lab) -> None:
    result = lab.run(["/recurse.wasm"])
    assert result.status == 134
    assert result.stderr.startswith("/recurse.wasm: wasm trap: call stack exhausted")


@pytest.mark.parametrize(("code", "status"), [(200, 200), (126, 126), (255, 255), (-1, 255)])
def test_exit_codes_at_or_above_126_are_kept(lab: Lab, code: int, status: int) -> None:
    """exit(n) is n & 0xFF, as natively; wasmtime alone would refuse n >= 126."""
    result = lab.run(["/exit_big.wasm", str(code)])
    assert (result.status, result.stdout) == (status, "exiting\n")


# -- kill -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=str)
@pytest.mark.parametrize(("guest", "ready"), [("spin", "spinning"), ("sleeper", "sleeping")])
def test_kill_stops_a_guest_within_a_second(lab: Lab, guest: str, ready: str, sig: int) -> None:
    """Spinning in wasm or blocked in a WASI call: the signal ends it, status 128 + signal."""
    box = lab.start([f"/{guest}.wasm"])
    read_until(box.stdout, ready)
    sent = time.time()
    lab.backend.kill(box.id, "", sig, False)
    exit = lab.exits.wait(box.pid, box.launched)
    assert exit.status == 128 + sig
    assert exit.exited_at - sent < KILL_WITHIN


def test_kill_all_signals_every_process(lab: Lab) -> None:
    box = lab.start(["/spin.wasm"])
    exec_pid, _, _, launched = lab.exec(box, "sleeps", ["/sleeper.wasm"])
    read_until(box.stdout, "spinning")
    lab.backend.kill(box.id, "", signal.SIGTERM, True)
    assert lab.exits.status(exec_pid, launched) == 128 + signal.SIGTERM
    assert lab.exits.status(box.pid, box.launched) == 128 + signal.SIGTERM
    with pytest.raises(NotFound):
        lab.backend.kill(box.id, "", signal.SIGTERM, True)


def test_kill_after_exit_is_not_found(lab: Lab) -> None:
    box = lab.start(["/hello.wasm"])
    assert lab.exits.status(box.pid, box.launched) == 0
    with pytest.raises(NotFound):
        lab.backend.kill(box.id, "", signal.SIGTERM, False)


def test_kill_of_a_created_container_ends_its_worker(lab: Lab) -> None:
    box = lab.create(["/hello.wasm"])
    lab.backend.kill(box.id, "", signal.SIGKILL, False)
    assert lab.exits.status(box.pid, box.launched) == 137
    assert read_all(box.stdout) == ""  # the guest never ran


# -- resources ------------------------------------------------------------------------------------


def test_memory_limit_fails_the_allocation_not_the_process(lab: Lab) -> None:
    """Under a 32 MiB limit malloc fails (the guest exits 3); no OOM kill."""
    result = lab.run(["/hog.wasm"], resources={"memory": {"limit": 32 * MIB}})
    assert result.status == 3, result
    assert result.stdout.startswith("malloc failed after ")
    assert int(result.stdout.split()[3]) >= 16  # most of the limit was the guest's


def test_oom_kill_is_137_and_an_oom_event(lab: Lab) -> None:
    """Lowering the cgroup limit below what the store still allows makes the kernel OOM-kill
    the worker: 137, and the framework's OOM watcher sees it (/tasks/oom)."""
    box = lab.start(
        ["/hog.wasm", "8", "64"],
        stdin=True,
        resources={"memory": {"limit": 96 * MIB, "swap": 96 * MIB}},
    )
    read_until(box.stdout, "ready")
    lab.backend.update(box.id, {"memory": {"limit": 40 * MIB, "swap": 40 * MIB}})
    seen = threading.Event()
    watcher = OomWatcher(lambda cid: seen.set() if cid == box.id else None)
    try:
        watcher.watch(box.id, cgroups.Cgroup.of_pid(box.pid))
        assert box.stdin is not None
        os.write(box.stdin, b"go\n")
        assert lab.exits.status(box.pid, box.launched) == 137
        assert seen.wait(TIMEOUT), "no OOM event"
    finally:
        watcher.close()


def test_worker_is_in_its_cgroup_with_the_limits(lab: Lab) -> None:
    """memory, CPU quota and pids limits of the spec are on the worker's cgroup."""
    resources = {
        "memory": {"limit": 64 * MIB},
        "cpu": {"quota": 20000, "period": 100000, "shares": 512},
        "pids": {"limit": 32},
    }
    box = lab.start(["/sleeper.wasm"], resources=resources)
    cg = cgroups.Cgroup.of_pid(box.pid)
    path = f"/polyshim/{NAMESPACE}/{box.id}"
    assert cg.v1_paths["memory"] == cg.v1_paths["cpu"] == cg.v1_paths["pids"] == path
    assert read_number(cg.directory("memory"), "memory.limit_in_bytes") == 64 * MIB
    assert read_number(cg.directory("cpu"), "cpu.cfs_quota_us") == 20000
    assert read_number(cg.directory("cpu"), "cpu.shares") == 512
    assert read_number(cg.directory("pids"), "pids.max") == 32
    if cg.v2_path is not None:
        assert cg.v2_path == path  # hybrid: the unified group too
    assert cg.procs() == [box.pid]
    metrics = cg.metrics()  # what Stats returns
    assert metrics.type_url.endswith("Metrics") and metrics.value


def test_a_worker_runs_one_runtime_thread_whatever_the_cpu_count(lab: Lab) -> None:
    """wasmtime's WASI starts one tokio thread per CPU by default; a worker needs one."""
    box = lab.start(["/sleeper.wasm"])
    read_until(box.stdout, "sleeping")  # its WASI calls have built the runtime
    threads = list(Path(f"/proc/{box.pid}/task").iterdir())
    assert len(threads) == 2, [(t / "comm").read_text().strip() for t in threads]  # + main


def test_cpu_quota_slows_a_spinning_guest(lab: Lab) -> None:
    """10% of a CPU: a spinning guest gets about 0.1 s of CPU per second."""
    box = lab.start(["/spin.wasm"], resources={"cpu": {"quota": 10000, "period": 100000}})
    read_until(box.stdout, "spinning")
    cpuacct = cgroups.Cgroup.of_pid(box.pid).directory("cpuacct")
    before = read_number(cpuacct, "cpuacct.usage")
    time.sleep(1.0)
    used = (read_number(cpuacct, "cpuacct.usage") - before) / 1e9
    assert 0.02 < used < 0.25, f"{used:.3f} s of CPU in 1 s under a 10% quota"


def test_update_changes_the_cgroup_limits(lab: Lab) -> None:
    box = lab.start(["/sleeper.wasm"], resources={"memory": {"limit": 64 * MIB}})
    lab.backend.update(box.id, {"memory": {"limit": 48 * MIB}, "pids": {"limit": 7}})
    cg = cgroups.Cgroup.of_pid(box.pid)
    assert read_number(cg.directory("memory"), "memory.limit_in_bytes") == 48 * MIB
    assert read_number(cg.directory("pids"), "pids.max") == 7


def test_pause_and_resume_freeze_the_guest(lab: Lab) -> None:
    box = lab.start(["/spin.wasm"])
    read_until(box.stdout, "spinning")
    lab.backend.pause(box.id)
    cg = cgroups.Cgroup.of_pid(box.pid)
    cpuacct = cg.directory("cpuacct")
    before = read_number(cpuacct, "cpuacct.usage")
    time.sleep(0.3)
    assert read_number(cpuacct, "cpuacct.usage") - before < 5_000_000  # < 5 ms: frozen
    ends = lab.pipes()
    lab.backend.exec(ExecProcess(box.id, "frozen", {"args": ["/hello.wasm"]}, ends[0]))
    with pytest.raises(FailedPrecondition, match="paused"):
        lab.backend.start_exec(box.id, "frozen")
    lab.backend.resume(box.id)
    before = read_number(cpuacct, "cpuacct.usage")
    time.sleep(0.3)
    assert read_number(cpuacct, "cpuacct.usage") - before > 50_000_000  # it runs again


def test_spec_user_runs_the_worker_as_that_user(lab: Lab) -> None:
    box = lab.start(["/sleeper.wasm"], user={"uid": 1234, "gid": 2345, "additionalGids": [7]})
    read_until(box.stdout, "sleeping")
    status = Path(f"/proc/{box.pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines())
    assert fields["Uid"].split() == ["1234"] * 4
    assert fields["Gid"].split() == ["2345"] * 4
    assert fields["Groups"].split() == ["7"]


def test_seccomp_profile_applies_to_the_guest(lab: Lab) -> None:
    """A profile that makes mkdir fail with EPERM: the guest's mkdir fails, other calls work."""
    profile = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}],
    }
    result = lab.run(["/mkdir.wasm", "/made"], seccomp=profile)
    assert result.status == 1
    assert result.stdout == "/made: error: Operation not permitted\n"
    assert not (lab.rootfs / "made").exists()
    assert lab.run(["/mkdir.wasm", "/made"]).stdout == "made /made\n"


def test_unsupported_seccomp_action_fails_create(lab: Lab) -> None:
    profile = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}],
    }
    before = live_children()
    with pytest.raises(InvalidArgument, match="SCMP_ACT_NOTIFY"):
        lab.create(["/hello.wasm"], seccomp=profile)
    assert live_children() <= before


def test_cgroups_path_from_the_spec_is_used(lab: Lab) -> None:
    path = f"/polyshim-test-path/{secrets.token_hex(4)}"
    box = lab.start(["/sleeper.wasm"], cgroups_path=path)
    assert cgroups.Cgroup.of_pid(box.pid).v1_paths["memory"] == path
    lab.backend.kill(box.id, "", signal.SIGKILL, False)
    lab.exits.wait(box.pid, box.launched)
    lab.backend.delete(box.id)
    assert not glob.glob(f"/sys/fs/cgroup/*{path}")
    for directory in glob.glob("/sys/fs/cgroup/*/polyshim-test-path"):
        with contextlib.suppress(OSError):
            os.rmdir(directory)


# -- exec -----------------------------------------------------------------------------------------


def test_exec_runs_another_module_in_the_same_cgroup(lab: Lab) -> None:
    box = lab.start(["/sleeper.wasm"], resources={"pids": {"limit": 16}})
    pid, stdout, _, launched = lab.exec(box, "e1", ["/hello.wasm", "5"])
    assert pid not in (0, box.pid)
    assert lab.exits.status(pid, launched) == 5
    assert read_all(stdout).endswith("GREETING=from exec\n")
    lab.backend.delete(box.id, "e1")

    pid, stdout, _, launched = lab.exec(box, "e2", ["/entry.wasm#greet"])
    assert lab.exits.status(pid, launched) == 0
    assert read_all(stdout) == "hi from greet\n"

    pid, stdout, _, _ = lab.exec(box, "e3", ["/spin.wasm"])
    read_until(stdout, "spinning")
    init_cgroup = cgroups.Cgroup.of_pid(box.pid)
    assert cgroups.Cgroup.of_pid(pid).is_same_as(init_cgroup)
    assert sorted(init_cgroup.procs()) == sorted([box.pid, pid])  # what Pids lists
    lab.backend.kill(box.id, "e3", signal.SIGTERM, False)
    with pytest.raises(AlreadyExists):
        lab.backend.exec(ExecProcess(box.id, "e3", {"args": ["/hello.wasm"]}, ProcessIO()))


def test_exec_dies_with_the_init(lab: Lab) -> None:
    """As in a pid namespace: once the init exits, a running exec is killed (137)."""
    box = lab.start(["/spin.wasm"])
    pid, stdout, _, launched = lab.exec(box, "sleeps", ["/sleeper.wasm"])
    read_until(stdout, "sleeping")
    lab.backend.kill(box.id, "", signal.SIGTERM, False)
    assert lab.exits.status(box.pid, box.launched) == 143
    exit = lab.exits.wait(pid, launched)
    assert exit.status == 137


def test_exec_of_a_missing_module_fails_at_exec(lab: Lab) -> None:
    box = lab.start(["/sleeper.wasm"])
    with pytest.raises(InvalidArgument, match=r"nope\.wasm"):
        lab.backend.exec(ExecProcess(box.id, "bad", {"args": ["/nope.wasm"]}, ProcessIO()))
    before = live_children()
    with pytest.raises(InvalidArgument, match='no "_start"'):
        lab.exec(box, "nostart", ["/entry.wasm"])
    assert live_children() <= before


# -- create errors leave nothing ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "setup", "message"),
    [
        (["/missing.wasm"], None, "no such file"),
        (["/garbage.wasm"], b"not wasm at all", "not a WebAssembly module or component"),
        (["/broken.wasm"], b"\0asm\x01\0\0\0\x01\xff\xff", "not a valid WebAssembly module"),
        (["/entry.wasm"], None, 'exports no "_start"'),
        (["/entry.wasm#nope"], None, 'exports no "nope"'),
        (["/entry.wasm#needs_arg"], None, "without parameters"),
        (["/escape.wasm"], "symlink", "no such file"),
        ([], None, "process.args is empty"),
    ],
    ids=["missing", "garbage", "invalid", "no-start", "no-function", "params", "escape", "no-args"],
)
def test_bad_module_fails_create_and_leaves_nothing(
    lab: Lab, guests: dict[str, Path], args: list[str], setup: Any, message: str
) -> None:
    """A clear InvalidArgument at Create; no worker, no cgroup remains."""
    if isinstance(setup, bytes):
        (lab.rootfs / args[0].lstrip("/")).write_bytes(setup)
    elif setup == "symlink":  # an absolute symlink to a real module on the host
        (lab.rootfs / "escape.wasm").symlink_to(guests["hello"])
    before = live_children()
    with pytest.raises(InvalidArgument, match=message) as caught:
        lab.create(args)
    assert "container" in str(caught.value)
    assert live_children() <= before
    assert lab.backend._records == {}
    assert not glob.glob(f"/sys/fs/cgroup/*/polyshim/{NAMESPACE}/pws-*")


def test_delete_before_start_kills_the_worker_and_removes_the_cgroup(lab: Lab) -> None:
    box = lab.create(["/hello.wasm"])
    assert cgroup_dirs(box.id)
    lab.backend.delete(box.id)
    assert lab.exits.status(box.pid, box.launched) == 137
    assert read_all(box.stdout) == ""
    assert not cgroup_dirs(box.id)
    with pytest.raises(NotFound):
        lab.backend.start(box.id)


def test_delete_after_exit_removes_the_cgroup(lab: Lab) -> None:
    box = lab.start(["/hello.wasm"])
    lab.exits.wait(box.pid, box.launched)
    lab.backend.delete(box.id)
    assert not cgroup_dirs(box.id)


def test_terminal_is_refused_clearly(lab: Lab) -> None:
    """The backend does not declare TERMINAL (the framework answers Unimplemented); called
    anyway, it says why."""
    assert Cap.TERMINAL not in WasmBackend.capabilities
    with pytest.raises(Unimplemented, match="WASI has no tty"):
        lab.backend.create(
            Container(
                "tty", NAMESPACE, lab.bundle, lab.spec(["/hello.wasm"]), lab.rootfs,
                ProcessIO(terminal=True),
            )
        )  # fmt: skip


def test_cleanup_kills_what_a_dead_shim_left(lab: Lab) -> None:
    """The `delete` action: kill the container's processes, remove its cgroup; idempotent."""
    box = lab.start(["/sleeper.wasm"])
    (lab.bundle / "config.json").write_text("{}")
    WasmBackend.cleanup(lab.bundle, box.id, NAMESPACE, {})
    assert lab.exits.status(box.pid, box.launched) == 137
    assert not cgroup_dirs(box.id)
    WasmBackend.cleanup(lab.bundle, box.id, NAMESPACE, {})
    assert not cgroup_dirs(box.id)


# -- the compile cache --------------------------------------------------------------------------


def artifacts(lab: Lab) -> list[Path]:
    return sorted(lab.cache_dir.glob(f"*{cache.SUFFIX}"))


def test_second_run_reuses_the_cached_artifact(lab: Lab, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="polyshim.backend.wasm")
    assert lab.run(["/hello.wasm"]).status == 0
    assert "module compiled" in caplog.text
    [artifact] = artifacts(lab)
    assert stat_mode(lab.cache_dir) == 0o700
    first = artifact.stat()
    caplog.clear()
    assert lab.run(["/hello.wasm"]).status == 0
    assert "module cached" in caplog.text
    again = artifact.stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    # another engine setting, another module: other keys
    assert lab.run(["/entry.wasm#greet"]).status == 0
    assert len(artifacts(lab)) == 2


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_corrupt_cache_entry_is_recompiled(
    lab: Lab, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    caplog.set_level("INFO", logger="polyshim.backend.wasm")
    assert lab.run(["/hello.wasm"]).status == 0
    [artifact] = artifacts(lab)
    data = bytearray(artifact.read_bytes())
    if damage == "flip":  # inside the machine code: wasmtime itself would not notice
        data[len(data) // 2] ^= 0xFF
    elif damage == "truncate":
        del data[len(data) // 3 :]
    else:
        data[:] = b"\x7fELF" + b"\0" * 100
    artifact.write_bytes(bytes(data))
    caplog.clear()
    result = lab.run(["/hello.wasm", "3"])
    assert result.status == 3 and "argv[1]=3" in result.stdout
    assert "module recompiled" in caplog.text
    fd = os.open(artifact, os.O_RDONLY)
    try:
        assert cache.check(fd) is None  # whole and valid again
    finally:
        os.close(fd)


def test_a_compile_over_the_limit_evicts_the_least_recently_used(lab: Lab) -> None:
    """A hit a day after the last use counts as a use; the entry used longest ago goes."""
    sizes = {}
    for name in ("trap", "hello", "entry"):
        before = set(artifacts(lab))
        lab.run([f"/{name}.wasm#greet" if name == "entry" else f"/{name}.wasm"])
        [sizes[name]] = [(p, p.stat().st_size) for p in set(artifacts(lab)) - before]
    (trap, trap_size), (hello, hello_size), (entry, entry_size) = sizes.values()
    trap.unlink()  # its next run compiles and stores it again
    day = 24 * 3600
    os.utime(hello, (time.time() - 3 * day,) * 2)
    os.utime(entry, (time.time() - 2 * day,) * 2)
    assert lab.run(["/hello.wasm"]).status == 0  # a hit: hello is now the most recent
    assert hello.stat().st_mtime > time.time() - 60
    lab.backend.cache_max_bytes = hello_size + entry_size + trap_size - 1
    assert lab.run(["/trap.wasm"]).status == 134
    assert set(artifacts(lab)) == {hello, trap}


def test_trim_removes_oldest_first_never_the_new_one_and_stale_temporaries(
    tmp_path: Path,
) -> None:
    now = time.time()

    def entry(name: str, size: int, age: float) -> Path:
        path = tmp_path / name
        path.write_bytes(b"x" * size)
        os.utime(path, (now - age,) * 2)
        return path

    old = entry(f"a{cache.SUFFIX}", 100, 300)
    newer = entry(f"b{cache.SUFFIX}", 100, 200)
    new = entry(f"c{cache.SUFFIX}", 100, 100)
    stale = entry(f".c{cache.SUFFIX}.1.2.tmp", 10, 2 * cache.STALE_TEMPORARY)
    writing = entry(f".d{cache.SUFFIX}.3.4.tmp", 10, 1)
    removed = cache.trim(str(tmp_path), 250, keep=str(new))
    assert sorted(removed) == sorted([stale.name, old.name])  # 300 bytes left, then 200
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [newer.name, new.name, writing.name]
    )
    assert cache.trim(str(tmp_path), 1, keep=str(new)) == [newer.name]
    assert new.exists()  # kept even alone over the limit: it was just stored for a worker


def test_cache_dir_open_to_others_is_refused(tmp_path: Path) -> None:
    """Artifacts are loaded as machine code: only a private directory will do."""
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    probe = WasmBackend.probe({"cache_dir": str(shared)})
    assert not probe.ok and "mode 0700" in probe.reason
    assert WasmBackend.probe({"cache_dir": str(tmp_path / "new")}).ok
    assert stat_mode(tmp_path / "new") == 0o700
    assert not WasmBackend.probe({"cache_dir": "relative"}).ok
    assert not WasmBackend.probe({"no_such_key": 1}).ok
    for limit in (0, -1, True, "1G"):
        probe = WasmBackend.probe({"cache_dir": str(tmp_path / "new"), "cache_max_bytes": limit})
        assert not probe.ok and "cache_max_bytes" in probe.reason


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


# -- selection --------------------------------------------------------------------------------


def test_recognizes_wasm_files_by_their_magic(lab: Lab) -> None:
    assert WasmBackend.recognizes(lab.rootfs / "hello.wasm")
    assert WasmBackend.recognizes(lab.rootfs / "component_hello.wasm")
    assert not WasmBackend.recognizes(lab.rootfs / "etc" / "hostname")
    assert not WasmBackend.recognizes(lab.rootfs / "absent")
    assert not WasmBackend.runs_sandbox_containers


# -- Reaper.fork ----------------------------------------------------------------------------------


def test_fork_runs_the_child_with_only_its_fds_and_default_signals(shim: Shim) -> None:
    """fds as given (others closed), default dispositions, empty mask; exit with its int."""
    report_r, report_w = os.pipe()
    leaked_r, leaked_w = os.pipe()

    def child() -> int:
        lines = [
            " ".join(sorted(os.listdir("/proc/self/fd"))),
            str(signal.getsignal(signal.SIGTERM) == signal.SIG_DFL),
            str(signal.getsignal(signal.SIGPIPE) == signal.SIG_DFL),
            str(signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL),
            str(signal.pthread_sigmask(signal.SIG_BLOCK, ())),
        ]
        os.write(5, "\n".join(lines).encode())
        return 300  # & 0xFF: 44

    try:
        launched = time.time()
        pid = shim.reaper.fork(child, fds={5: report_w})
        os.close(report_w)
        assert shim.exits.status(pid, launched) == 300 & 0xFF
        fds, term, pipe, chld, mask = read_all(report_r).splitlines()
        listed = {int(fd) for fd in fds.split()}
        assert {0, 1, 2, 5} <= listed and len(listed) == 5  # and the listing's own fd
        assert (term, pipe, chld, mask) == ("True", "True", "True", "set()")
    finally:
        for fd in (report_r, leaked_r, leaked_w):
            os.close(fd)


def test_fork_child_exception_is_status_1_with_a_traceback(shim: Shim) -> None:
    err_r, err_w = os.pipe()

    def child() -> int:
        raise RuntimeError("boom in the child")

    try:
        launched = time.time()
        pid = shim.reaper.fork(child, fds={2: err_w})
        os.close(err_w)
        assert shim.exits.status(pid, launched) == 1
        assert "RuntimeError: boom in the child" in read_all(err_r)
    finally:
        os.close(err_r)


def test_fork_needs_a_running_reaper() -> None:
    with pytest.raises(FailedPrecondition, match="not running"):
        Reaper().fork(lambda: 0)


def test_guests_run_under_containerds_default_seccomp_profile(
    lab: Lab, containerd: PrivateContainerd, busybox: str
) -> None:
    """The profile `ctr run --seccomp` (and CRI's RuntimeDefault) puts in the spec, as each
    containerd version makes it: default-deny, so wasmtime's and the worker's syscalls must
    be in it."""
    containerd.ctr("container", "create", "--seccomp", busybox, "seccomp-probe")
    info = json.loads(containerd.ctr("container", "info", "seccomp-probe").stdout)
    profile = info["Spec"]["linux"]["seccomp"]
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    result = lab.run(["/hello.wasm", "6"], seccomp=profile)
    assert (result.status, result.stderr) == (6, "hello on stderr\n")
    assert lab.run(["/component_hello.wasm"], seccomp=profile).status == 0
    box = lab.start(["/sleeper.wasm"], seccomp=profile)
    read_until(box.stdout, "sleeping")
    lab.backend.kill(box.id, "", signal.SIGTERM, False)
    assert lab.exits.status(box.pid, box.launched) == 143
    status = Path(f"/proc/{os.getpid()}/status").read_text()
    assert "Seccomp:\t0" in status  # the shim itself is not filtered
    assert len(lab.backend._programs) == 1  # compiled once for the three


def test_concurrent_creates_share_one_cache_entry(lab: Lab) -> None:
    """Creates on several threads at once (as the shim server runs them) with a cold cache:
    every worker compiles and writes the same entry; all run, one valid artifact remains."""
    boxes: list[Box] = []
    errors: list[BaseException] = []

    def create(n: int) -> None:
        try:
            boxes.append(lab.create(["/hello.wasm", str(n)]))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=create, args=(n,)) for n in range(1, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert not errors and len(boxes) == 4
    for box in boxes:
        lab.backend.start(box.id)
    statuses = sorted(lab.exits.status(box.pid, box.launched) for box in boxes)
    assert statuses == [1, 2, 3, 4]
    [artifact] = artifacts(lab)
    assert sorted(p.name for p in lab.cache_dir.iterdir()) == [artifact.name]  # no temp files
    fd = os.open(artifact, os.O_RDONLY)
    try:
        assert cache.check(fd) is None
    finally:
        os.close(fd)


def test_a_cgroup_with_processes_is_refused_and_left_alone(lab: Lab) -> None:
    """linux.cgroupsPath naming a busy cgroup (here: another container's) fails the Create
    without touching that cgroup's limits or processes."""
    box = lab.start(["/sleeper.wasm"], resources={"memory": {"limit": 64 * MIB}})
    path = f"/polyshim/{NAMESPACE}/{box.id}"
    with pytest.raises(FailedPrecondition, match="already has processes"):
        lab.create(["/hello.wasm"], cgroups_path=path, resources={"memory": {"limit": 32 * MIB}})
    cg = cgroups.Cgroup.of_pid(box.pid)
    assert read_number(cg.directory("memory"), "memory.limit_in_bytes") == 64 * MIB
    assert cg.procs() == [box.pid]
