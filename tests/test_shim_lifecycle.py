"""The life of a polyshim task under real containerd (1.6 and 2.1), as a user drives it.

Exec, signals, pause, metrics, resource updates and OOM kills through ctr; what survives a
containerd restart; what a killed shim leaves behind (nothing); several tasks in one shim;
broken specs; parallel runs. ctr has no `task update`, and creating a task from a spec ctr
would refuse needs the raw API, so those go through containerd's gRPC Tasks API.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from shim_framework import template
from shim_framework.api.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
from shim_framework.mounts import points_below
from tests.harness import PrivateContainerd
from tests.harness.events import EventWatcher, Seen
from tests.test_shim_ctr import run_with_tty, task_status, wait_for_status

pytestmark = pytest.mark.integration

RUNTIME = "io.containerd.polyshim.v2"
SHIM = "containerd-shim-polyshim-v2"
SNAPSHOTTER = "overlayfs"  # ctr's default
RESOURCES_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
# pid 1 of a pid namespace ignores signals it has no handler for, so a container that should
# stop on SIGTERM handles it, as every well-behaved daemon does.
TERM_HANDLER = 'trap "exit 143" TERM; sleep 600 & wait'

T = TypeVar("T")


# -- polling ----------------------------------------------------------------------------------


def eventually(
    probe: Callable[[], T], what: str, until: Callable[[T], object] = bool, timeout: float = 30
) -> T:
    """Poll *probe* until *until* accepts its result; return it, or fail naming *what*."""
    deadline = time.monotonic() + timeout
    while not until(result := probe()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f}s (last: {result!r})"
        time.sleep(0.05)
    return result


# -- ctr --------------------------------------------------------------------------------------


def run_detached(ctrd: PrivateContainerd, image: str, cid: str, *args: str, opts=()) -> int:
    """`ctr run -d` a polyshim container; return its init pid once it is RUNNING."""
    ctrd.ctr("run", "-d", "--runtime", RUNTIME, *opts, image, cid, *args)
    wait_for_status(ctrd, cid, "RUNNING")
    return task_pid(ctrd, cid)


def ctr_run_rm(ctrd: PrivateContainerd, image: str, cid: str, *args: str):
    """`ctr run --rm`, failing (not hanging) when the task does not finish within 30 s."""
    return ctrd.ctr("run", "--rm", "--runtime", RUNTIME, image, cid, *args, timeout=30)


def task_pid(ctrd: PrivateContainerd, cid: str) -> int:
    for line in ctrd.ctr("task", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid:
            return int(fields[1])
    raise AssertionError(f"task {cid} is not listed by `ctr task ls`")


def task_ps(ctrd: PrivateContainerd, cid: str) -> dict[int, str]:
    """`ctr task ps`: pid -> exec id ("" for processes that are no exec)."""
    listed = {}
    for line in ctrd.ctr("task", "ps", cid).stdout.splitlines()[1:]:
        pid, _, info = line.strip().partition(" ")
        # 1.6 prints &ProcessDetails{ExecID:e1,...}, 2.1 prints exec_id:"e1"
        found = re.search(r'ExecID:([^,}]+)|exec_id:"([^"]*)"', info)
        listed[int(pid)] = next(g for g in found.groups() if g is not None) if found else ""
    return listed


def task_metrics(ctrd: PrivateContainerd, cid: str) -> dict[str, str]:
    """The METRIC/VALUE table `ctr task metrics` prints (1.6 and 2.1 print the same one)."""
    lines = ctrd.ctr("task", "metrics", cid).stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["METRIC", "VALUE"])
    table = {}
    for line in lines[start + 1 :]:
        if line.strip():
            name, value = line.split(None, 1)
            table[name] = value.strip()
    return table


def remove_container(ctrd: PrivateContainerd, cid: str) -> None:
    """Kill, delete the task and the container, as a user cleans up after `ctr run -d`."""
    if task_status(ctrd, cid) not in (None, "STOPPED"):
        ctrd.ctr("task", "kill", "-s", "SIGKILL", cid, check=False)
        wait_for_status(ctrd, cid, "STOPPED")
    if task_status(ctrd, cid) is not None:
        ctrd.ctr("task", "delete", cid)
    ctrd.ctr("container", "delete", cid)


# -- the host's view ---------------------------------------------------------------------------


def bundle_dir(ctrd: PrivateContainerd, cid: str) -> Path:
    return ctrd.state / "io.containerd.runtime.v2.task" / ctrd.namespace / cid


def cgroup_dir(pid: int, controller: str) -> Path:
    """The v1 *controller* hierarchy's directory of *pid* (the host is cgroup v1 hybrid)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return Path("/sys/fs/cgroup", controller) / path.lstrip("/")
    raise AssertionError(f"pid {pid} has no {controller} cgroup")


def alive(pid: int) -> bool:
    """Whether *pid* runs (a zombie waiting for a parent that never reaps is dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def listening_sockets() -> dict[str, set[int]]:
    """Every bound, listening unix socket path -> the pids holding it open."""
    __ACCEPTCON = 0x10000  # /proc/net/unix "Flags": a listening socket
    paths = {}
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) > 7 and int(fields[3], 16) & __ACCEPTCON:
            paths[f"socket:[{fields[6]}]"] = fields[7]
    holders: dict[str, set[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            links = {os.readlink(fd) for fd in (proc / "fd").iterdir()}
        except OSError:
            continue  # gone meanwhile
        for link in links:
            if link in paths:
                holders.setdefault(paths[link], set()).add(int(proc.name))
    return holders


def shim_pid_of(ctrd: PrivateContainerd, cid: str) -> int:
    """The polyshim server of task *cid*: the shim listening where its bundle's address says."""
    socket = (bundle_dir(ctrd, cid) / "address").read_text().removeprefix("unix://")
    servers = set(ctrd.shim_pids()) & listening_sockets().get(socket, set())
    assert len(servers) == 1, f"{SHIM} processes listening at {socket}: {servers}"
    return servers.pop()


# -- containerd's gRPC API, for what ctr cannot do ---------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def pb(*fields: tuple[int, str | bytes | int]) -> bytes:
    """Protobuf wire bytes of (field number, value) pairs: strings, bytes, messages, varints."""
    out = bytearray()
    for number, value in fields:
        if isinstance(value, int):
            out += _varint(number << 3) + _varint(value)
        else:
            data = value.encode() if isinstance(value, str) else value
            out += _varint(number << 3 | 2) + _varint(len(data)) + data
    return bytes(out)


class Api:
    """The few calls of containerd.services.{containers,tasks}.v1 these tests need."""

    def __init__(self, ctrd: PrivateContainerd) -> None:
        self.ctrd = ctrd
        self._channel = grpc.insecure_channel(f"unix://{ctrd.address}")
        self._metadata = [("containerd-namespace", ctrd.namespace)]

    def _call(self, method: str, request: bytes, timeout: float = 60) -> bytes:
        call = self._channel.unary_unary(method)  # bytes in, bytes out
        return call(request, metadata=self._metadata, timeout=timeout)

    def replace_spec(self, cid: str, spec: bytes) -> None:
        """Containers.Update of the spec alone, with bytes containerd stores as they are."""
        spec_any = pb((1, "types.containerd.io/opencontainers/runtime-spec/1/Spec"), (2, spec))
        request = pb((1, pb((1, cid), (5, spec_any))), (2, pb((1, "spec"))))
        self._call("/containerd.services.containers.v1.Containers/Update", request)

    def create_task(self, cid: str) -> None:
        """Tasks.Create with the container snapshot's mounts, as ctr does (no stdio)."""
        stub = snapshots_pb2_grpc.SnapshotsStub(self._channel)
        found = stub.Mounts(
            snapshots_pb2.MountsRequest(snapshotter=SNAPSHOTTER, key=cid),
            metadata=self._metadata,
            timeout=30,
        )
        rootfs = [(3, m.SerializeToString()) for m in found.mounts]
        self._call("/containerd.services.tasks.v1.Tasks/Create", pb((1, cid), *rootfs))

    def update_resources(self, cid: str, resources: dict[str, Any]) -> None:
        """Tasks.Update: what `ctr task update` did before ctr dropped it."""
        resources_any = pb((1, RESOURCES_TYPE), (2, json.dumps(resources).encode()))
        self._call("/containerd.services.tasks.v1.Tasks/Update", pb((1, cid), (2, resources_any)))

    def close(self) -> None:
        self._channel.close()


@pytest.fixture
def api(containerd: PrivateContainerd) -> Iterator[Api]:
    client = Api(containerd)
    yield client
    client.close()


def exited(cid: str, status: int | None = None) -> Callable[[Seen], bool]:
    """Matches the /tasks/exit of *cid*'s init (with *status*, when given)."""

    def match(seen: Seen) -> bool:
        event = seen.event
        return (
            seen.topic == "/tasks/exit"
            and getattr(event, "container_id", None) == cid
            and getattr(event, "id", None) == cid
            and (status is None or getattr(event, "exit_status", None) == status)
        )

    return match


def topic_for(topic: str, cid: str) -> Callable[[Seen], bool]:
    return lambda seen: seen.topic == topic and getattr(seen.event, "container_id", "") == cid


# -- 1. a running task: exec, signals, pause, metrics, limits ---------------------------------


def test_exec_output_and_exit_code_arrive(containerd: PrivateContainerd, busybox: str):
    """`ctr task exec` prints the process's output and returns its exit code."""
    run_detached(containerd, busybox, "c1", "sleep", "600")
    result = containerd.ctr(
        "task", "exec", "--exec-id", "e1", "c1", "sh", "-c", "echo in; exit 4", check=False
    )
    assert (result.stdout, result.returncode) == ("in\n", 4), result.stderr
    remove_container(containerd, "c1")


def test_exec_with_terminal(containerd: PrivateContainerd, busybox: str):
    """`ctr task exec -t` gets a pty that carries input and output both ways."""
    run_detached(containerd, busybox, "c1", "sleep", "600")
    argv = containerd.ctr_command(
        "task", "exec", "-t", "--exec-id", "e1", "c1",
        "sh", "-c", "tty; echo ready; read x; echo got-$x",
    )  # fmt: skip
    rc, output = run_with_tty(argv, input=b"word\r")
    assert rc == 0, output
    assert b"/dev/pts/" in output and b"got-word" in output
    remove_container(containerd, "c1")


def test_ps_lists_init_and_exec_processes(containerd: PrivateContainerd, busybox: str):
    """`ctr task ps` lists the init and a running exec by its id, and drops the exec once killed."""
    init = run_detached(containerd, busybox, "c1", "sleep", "600")
    containerd.ctr("task", "exec", "-d", "--exec-id", "e1", "c1", "sleep", "600")
    listed = eventually(
        lambda: task_ps(containerd, "c1"),
        "exec e1 in `ctr task ps`",
        lambda ps: "e1" in ps.values(),
    )
    assert listed.get(init) == "" and len(listed) == 2, listed
    containerd.ctr("task", "kill", "-s", "KILL", "--exec-id", "e1", "c1")
    eventually(lambda: list(task_ps(containerd, "c1")) == [init], "only the init left in ps")
    remove_container(containerd, "c1")


def test_exec_output_arrives_complete(containerd: PrivateContainerd, busybox: str):
    """A megabyte an exec writes reaches `ctr task exec` whole, stdout and stderr apart."""
    run_detached(containerd, busybox, "c1", "sleep", "600")
    script = "head -c 1000000 /dev/zero | tr '\\0' a; echo done >&2"
    result = containerd.ctr("task", "exec", "--exec-id", "big", "c1", "sh", "-c", script)
    assert (len(result.stdout), set(result.stdout), result.stderr) == (1000000, {"a"}, "done\n")
    remove_container(containerd, "c1")


def test_exec_of_missing_command_fails_and_task_runs_on(
    containerd: PrivateContainerd, busybox: str
):
    """An exec of a missing command fails with runc's words; the task and the exec id live on."""
    init = run_detached(containerd, busybox, "c1", "sleep", "600")
    result = containerd.ctr(
        "task", "exec", "--exec-id", "e1", "c1", "nosuchcmd", check=False, timeout=20
    )
    assert result.returncode != 0
    assert 'exec: "nosuchcmd": executable file not found in $PATH' in result.stderr
    assert task_status(containerd, "c1") == "RUNNING"
    assert list(task_ps(containerd, "c1")) == [init]
    result = containerd.ctr("task", "exec", "--exec-id", "e1", "c1", "echo", "again")
    assert result.stdout == "again\n"
    remove_container(containerd, "c1")


def test_exec_id_in_use_is_refused(containerd: PrivateContainerd, busybox: str):
    """A second exec with the id of a running one fails with AlreadyExists; the first runs on."""
    run_detached(containerd, busybox, "c1", "sleep", "600")
    containerd.ctr("task", "exec", "-d", "--exec-id", "e1", "c1", "sleep", "600")
    result = containerd.ctr("task", "exec", "--exec-id", "e1", "c1", "true", check=False)
    assert result.returncode != 0
    assert "already exists" in result.stderr
    assert "e1" in task_ps(containerd, "c1").values()
    remove_container(containerd, "c1")


def test_running_task_cannot_be_deleted(containerd: PrivateContainerd, busybox: str):
    """`ctr task delete` of a running task fails and the task keeps running."""
    run_detached(containerd, busybox, "c1", "sleep", "600")
    result = containerd.ctr("task", "delete", "c1", check=False)
    assert result.returncode != 0
    assert task_status(containerd, "c1") == "RUNNING"
    remove_container(containerd, "c1")


def test_exec_killed_by_sigterm_exits_143(containerd: PrivateContainerd, busybox: str):
    """`ctr task kill -s TERM --exec-id` ends an exec; its `ctr task exec` returns 128+15."""
    run_detached(containerd, busybox, "c1", "sleep", "600")
    argv = containerd.ctr_command("task", "exec", "--exec-id", "e1", "c1", "sleep", "600")
    execing = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        eventually(lambda: "e1" in task_ps(containerd, "c1").values(), "exec e1 running")
        containerd.ctr("task", "kill", "-s", "TERM", "--exec-id", "e1", "c1")
        assert execing.wait(timeout=30) == 143
    finally:
        if execing.poll() is None:
            execing.kill()
            execing.wait()
    assert task_status(containerd, "c1") == "RUNNING"
    remove_container(containerd, "c1")


def test_sigterm_stops_task_with_exit_status_143(containerd: PrivateContainerd, busybox: str):
    """`ctr task kill -s TERM` stops a task that handles TERM: STOPPED, /tasks/exit 143."""
    run_detached(containerd, busybox, "c1", "sh", "-c", TERM_HANDLER)
    with EventWatcher(containerd) as watcher:
        containerd.ctr("task", "kill", "-s", "TERM", "c1")
        wait_for_status(containerd, "c1", "STOPPED")
        watcher.wait_for(exited("c1", 143))
    again = containerd.ctr("task", "kill", "-s", "TERM", "c1", check=False)
    assert again.returncode != 0 and "already finished" in again.stderr
    remove_container(containerd, "c1")


def test_kill_all_ends_every_process(containerd: PrivateContainerd, busybox: str):
    """`ctr task kill --all` ends every process, though pid 1 alone would ignore TERM."""
    init = run_detached(containerd, busybox, "c1", "sh", "-c", "sleep 600 & sleep 600 & wait")
    pids = eventually(
        lambda: task_ps(containerd, "c1"), "init and two children in ps", lambda ps: len(ps) == 3
    )
    assert init in pids
    containerd.ctr("task", "kill", "--all", "c1")
    wait_for_status(containerd, "c1", "STOPPED")
    eventually(lambda: not any(alive(pid) for pid in pids), f"all of {sorted(pids)} gone")
    remove_container(containerd, "c1")


def test_pause_and_resume(containerd: PrivateContainerd, busybox: str):
    """`ctr task pause`/`resume`: PAUSED/RUNNING, cgroup FROZEN/THAWED, both events."""
    init = run_detached(containerd, busybox, "c1", "sleep", "600")
    freezer = cgroup_dir(init, "freezer") / "freezer.state"
    with EventWatcher(containerd) as watcher:
        containerd.ctr("task", "pause", "c1")
        assert task_status(containerd, "c1") == "PAUSED"
        assert freezer.read_text().strip() == "FROZEN"
        watcher.wait_for(topic_for("/tasks/paused", "c1"))

        containerd.ctr("task", "resume", "c1")
        assert task_status(containerd, "c1") == "RUNNING"
        assert freezer.read_text().strip() == "THAWED"
        watcher.wait_for(topic_for("/tasks/resumed", "c1"))
    result = containerd.ctr("task", "exec", "--exec-id", "e1", "c1", "echo", "awake")
    assert result.stdout == "awake\n"
    remove_container(containerd, "c1")


def test_metrics_show_memory_cpu_and_pids(containerd: PrivateContainerd, busybox: str):
    """`ctr task metrics` prints the container cgroup's memory, cpu and pids figures."""
    init = run_detached(containerd, busybox, "c1", "sh", "-c", "sleep 600 & wait")
    metrics = task_metrics(containerd, "c1")
    assert int(metrics["memory.usage_in_bytes"]) > 0, metrics
    assert int(metrics["cpuacct.usage"]) > 0, metrics
    assert int(metrics["pids.current"]) == 2, metrics
    limit = (cgroup_dir(init, "memory") / "memory.limit_in_bytes").read_text().strip()
    assert metrics["memory.limit_in_bytes"] == limit
    remove_container(containerd, "c1")


def test_update_changes_memory_limit(containerd: PrivateContainerd, busybox: str, api: Api):
    """A task update (Tasks.Update: ctr has no `task update`) sets the cgroup's memory limit."""
    init = run_detached(containerd, busybox, "c1", "sleep", "600")
    api.update_resources("c1", {"memory": {"limit": 67108864}})
    limit = cgroup_dir(init, "memory") / "memory.limit_in_bytes"
    assert limit.read_text().strip() == "67108864"
    assert task_metrics(containerd, "c1")["memory.limit_in_bytes"] == "67108864"
    remove_container(containerd, "c1")


def test_memory_hog_is_oom_killed(containerd: PrivateContainerd, busybox: str):
    """A container over its --memory-limit is OOM-killed: /tasks/oom, then exit 137."""
    with EventWatcher(containerd) as watcher:
        result = containerd.ctr(
            "run", "--rm", "--runtime", RUNTIME, "--memory-limit", "33554432",
            busybox, "hog", "tail", "/dev/zero", check=False,
        )  # fmt: skip
        assert result.returncode == 137, result.stderr
        watcher.wait_for(topic_for("/tasks/oom", "hog"))
        assert watcher.wait_for(exited("hog")).event.exit_status == 137


# -- 2. containerd restarts while a task runs ----------------------------------------------------


def test_task_survives_containerd_restart(containerd: PrivateContainerd, busybox: str):
    """After a containerd restart the task runs on, takes execs, reports its exit and deletes."""
    init = run_detached(containerd, busybox, "c1", "sh", "-c", TERM_HANDLER)
    shim = shim_pid_of(containerd, "c1")
    containerd.ctr("task", "exec", "-d", "--exec-id", "before", "c1", "sleep", "600")
    containerd.restart()
    assert (task_status(containerd, "c1"), task_pid(containerd, "c1")) == ("RUNNING", init)
    assert "before" in task_ps(containerd, "c1").values()
    result = containerd.ctr("task", "exec", "--exec-id", "e1", "c1", "echo", "still here")
    assert result.stdout == "still here\n"
    containerd.ctr("task", "kill", "-s", "KILL", "--exec-id", "before", "c1")
    eventually(lambda: "before" not in task_ps(containerd, "c1").values(), "exec `before` ended")
    with EventWatcher(containerd) as watcher:
        containerd.ctr("task", "kill", "c1")
        wait_for_status(containerd, "c1", "STOPPED")
        watcher.wait_for(exited("c1", 143))
    containerd.ctr("task", "delete", "c1")
    containerd.ctr("container", "delete", "c1")
    eventually(lambda: not alive(shim), f"shim {shim} exits")


def test_exit_while_containerd_is_down_is_reported(containerd: PrivateContainerd, busybox: str):
    """A task that died while containerd was down is not RUNNING once it is back."""
    # 1.6 shows it STOPPED; 2.x deletes it at once (spec 2.7, leaked-shim rule: Pids is
    # empty), as it does for the runc shim.
    init = run_detached(containerd, busybox, "c1", "sleep", "600")
    shim = shim_pid_of(containerd, "c1")
    containerd.stop()
    os.kill(init, signal.SIGKILL)
    eventually(lambda: not alive(init), f"init {init} dead")
    containerd.start()
    if containerd.install.label == "1.6":
        wait_for_status(containerd, "c1", "STOPPED")
        result = containerd.ctr("task", "delete", "c1")
        assert "exit code 137" in result.stderr
    else:
        eventually(lambda: task_status(containerd, "c1") is None, "task c1 deleted")
    containerd.ctr("container", "delete", "c1")
    eventually(lambda: not alive(shim), f"shim {shim} exits")


def test_shim_dead_at_restart_is_cleaned_up(containerd: PrivateContainerd, busybox: str):
    """A shim dead at restart is cleaned up: no task, process, mount or cgroup remains."""
    init = run_detached(containerd, busybox, "c1", "sleep", "600")
    rootfs = bundle_dir(containerd, "c1") / "rootfs"
    cgroups = [cgroup_dir(init, controller) for controller in ("memory", "pids", "freezer")]
    shim = shim_pid_of(containerd, "c1")
    containerd.stop()
    os.kill(shim, signal.SIGKILL)
    containerd.start()
    eventually(lambda: task_status(containerd, "c1") is None, "task c1 gone")
    eventually(lambda: not alive(init), f"init {init} gone")
    eventually(lambda: not points_below(rootfs), f"{rootfs} unmounted")
    eventually(lambda: not any(path.exists() for path in cgroups), "the cgroups removed")
    containerd.ctr("container", "delete", "c1")


# -- 3. the shim is killed ---------------------------------------------------------------------


def test_killed_shim_leaves_nothing_behind(containerd: PrivateContainerd, busybox: str):
    """SIGKILL to the shim: its delete action runs; no process, mount or cgroup remains."""
    init = run_detached(containerd, busybox, "c1", "sh", "-c", "sleep 600 & wait")
    pids = eventually(lambda: task_ps(containerd, "c1"), "two processes", lambda p: len(p) == 2)
    rootfs = bundle_dir(containerd, "c1") / "rootfs"
    assert points_below(rootfs), f"{rootfs} is not mounted while the task runs"
    cgroups = [cgroup_dir(init, controller) for controller in ("memory", "pids", "freezer")]
    assert all(path.is_dir() for path in cgroups)

    with EventWatcher(containerd) as watcher:
        os.kill(shim_pid_of(containerd, "c1"), signal.SIGKILL)
        # containerd publishes the exit from what the delete action reported (255 without it)
        exit_event = watcher.wait_for(exited("c1")).event
    assert (exit_event.pid, exit_event.exit_status) == (init, 137)
    eventually(lambda: task_status(containerd, "c1") != "RUNNING", "task c1 no longer RUNNING")
    eventually(lambda: not any(alive(pid) for pid in pids), f"all of {sorted(pids)} gone")
    eventually(lambda: not points_below(rootfs), f"{rootfs} unmounted")
    eventually(lambda: not any(path.exists() for path in cgroups), "the cgroups removed")
    remove_container(containerd, "c1")
    again = ctr_run_rm(containerd, busybox, "c1", "echo", "again")
    assert again.stdout == "again\n"


def test_template_listens_on_its_own_socket_only(containerd: PrivateContainerd, busybox: str):
    """The warm template holds no shim's socket, so a dead shim's address refuses calls."""
    run_detached(containerd, busybox, "c1", "sleep", "600")  # a template runs from now on
    own = template.socket_path()
    sockets = eventually(
        listening_sockets,
        f"one process listening at {own}",
        lambda found: len(found.get(own, ())) == 1,
    )
    (pid,) = sockets[own]
    assert {path for path, pids in sockets.items() if pid in pids} == {own}


# -- 4. one shim for a pod ---------------------------------------------------------------------

POD = ("--annotation", "io.kubernetes.cri.sandbox-id=pod1")


def test_pod_containers_share_one_shim(containerd: PrivateContainerd, busybox: str):
    """Two containers of one pod share a shim, which outlives the first and exits after both."""
    run_detached(containerd, busybox, "p1", "sleep", "601", opts=POD)
    run_detached(containerd, busybox, "p2", "sleep", "602", opts=POD)
    addresses = {(bundle_dir(containerd, cid) / "address").read_text() for cid in ("p1", "p2")}
    assert len(addresses) == 1, addresses
    shim = shim_pid_of(containerd, "p1")
    assert containerd.shim_pids() == [shim]

    def init_cmdline(cid: str) -> str:
        result = containerd.ctr("task", "exec", "--exec-id", "look", cid, "cat", "/proc/1/cmdline")
        return result.stdout.replace("\0", " ").strip()

    assert (init_cmdline("p1"), init_cmdline("p2")) == ("sleep 601", "sleep 602")

    remove_container(containerd, "p1")
    assert task_status(containerd, "p2") == "RUNNING"
    assert init_cmdline("p2") == "sleep 602"
    assert containerd.shim_pids() == [shim]

    remove_container(containerd, "p2")
    eventually(lambda: not alive(shim), f"shim {shim} exits after the last task")
    assert containerd.shim_pids() == []


def test_killed_pod_shim_cleans_up_every_task(containerd: PrivateContainerd, busybox: str):
    """SIGKILL to a pod's shim: both tasks end and no process, mount or cgroup remains."""
    inits = {
        cid: run_detached(containerd, busybox, cid, "sleep", "600", opts=POD)
        for cid in ("p1", "p2")
    }
    rootfs = [bundle_dir(containerd, cid) / "rootfs" for cid in inits]
    cgroups = [cgroup_dir(pid, "memory") for pid in inits.values()]
    shim = shim_pid_of(containerd, "p1")
    with EventWatcher(containerd) as watcher:
        os.kill(shim, signal.SIGKILL)
        statuses = {cid: watcher.wait_for(exited(cid)).event.exit_status for cid in inits}
    assert statuses == {"p1": 137, "p2": 137}
    eventually(lambda: not any(alive(pid) for pid in inits.values()), "both inits gone")
    eventually(lambda: not any(points_below(path) for path in rootfs), "rootfs unmounted")
    eventually(lambda: not any(path.exists() for path in cgroups), "the cgroups removed")
    for cid in inits:
        remove_container(containerd, cid)


# -- 5. specs that cannot run ------------------------------------------------------------------


def assert_nothing_left(ctrd: PrivateContainerd, cid: str) -> None:
    """No task, shim process, mount, bundle or runc state remains for *cid*."""
    assert task_status(ctrd, cid) is None
    eventually(lambda: not ctrd.shim_pids(), "no shim process left")
    bundle = bundle_dir(ctrd, cid)
    assert not points_below(bundle)
    eventually(lambda: not bundle.exists(), f"bundle {bundle} removed")
    assert not (Path("/run/containerd/runc") / ctrd.namespace / cid).exists()


def create_with_spec(ctrd: PrivateContainerd, api: Api, image: str, cid: str, spec: bytes):
    """Create container *cid* with ctr, give it *spec* verbatim, and create its task."""
    ctrd.ctr("container", "create", "--runtime", RUNTIME, image, cid, "true")
    api.replace_spec(cid, spec)
    api.create_task(cid)


def test_spec_that_is_no_object_is_refused(containerd: PrivateContainerd, busybox: str, api: Api):
    """A config.json of `null` (Go takes it) is refused in the shim's words; nothing is left."""
    with pytest.raises(grpc.RpcError) as failure:
        create_with_spec(containerd, api, busybox, "c5", b"null")
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "config.json must hold a JSON object" in failure.value.details()
    assert_nothing_left(containerd, "c5")
    containerd.ctr("container", "delete", "c5")


@pytest.mark.parametrize(
    "annotations", [{}, {"io.kubernetes.cri.sandbox-id": "pod1"}], ids=["alone", "in-a-pod"]
)
def test_deeply_nested_spec_is_refused_naming_config_json(
    containerd: PrivateContainerd, busybox: str, api: Api, annotations: dict[str, str]
):
    """A config.json nested 3000 deep (fine for Go) is refused naming config.json; nothing left."""
    nested = b"[" * 3000 + b"]" * 3000
    spec = b'{"ociVersion": "1.0.2", "annotations": %s, "x": %s}' % (
        json.dumps(annotations).encode(),
        nested,
    )
    with pytest.raises(grpc.RpcError) as failure:
        create_with_spec(containerd, api, busybox, "c5", spec)
    assert "config.json" in failure.value.details()
    assert_nothing_left(containerd, "c5")
    containerd.ctr("container", "delete", "c5")


def test_missing_executable_is_reported(containerd: PrivateContainerd, busybox: str):
    """`ctr run` of a command the image lacks fails with runc's words; nothing is left."""
    result = containerd.ctr(
        "run", "--rm", "--runtime", RUNTIME, busybox, "nobin", "nosuchcmd", check=False
    )
    assert result.returncode != 0
    assert 'exec: "nosuchcmd": executable file not found in $PATH' in result.stderr
    assert_nothing_left(containerd, "nobin")
    assert "nobin" not in containerd.ctr("container", "ls", "-q").stdout.split()


# -- 6. many at once ---------------------------------------------------------------------------


def test_parallel_runs_each_get_a_shim(containerd: PrivateContainerd, busybox: str, tmp_path: Path):
    """Five `ctr run --rm` at once all succeed, each served by a shim of its own."""
    sync = tmp_path / "sync"
    sync.mkdir()
    script = "touch /sync/ready-$0; while [ ! -e /sync/go ]; do sleep 0.05; done; echo done-$0"
    mount = f"type=bind,src={sync},dst=/sync,options=rbind:rw"
    ids = [f"par{i}" for i in range(5)]

    def argv(cid: str) -> list[str]:
        return containerd.ctr_command(
            "run", "--rm", "--runtime", RUNTIME, "--mount", mount,
            busybox, cid, "sh", "-c", script, cid,
        )  # fmt: skip

    runs = [
        subprocess.Popen(
            argv(cid),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for cid in ids
    ]
    try:
        eventually(lambda: len(list(sync.glob("ready-*"))) == 5, "all five containers running")
        shims = {shim_pid_of(containerd, cid) for cid in ids}
        assert len(shims) == 5 and shims == set(containerd.shim_pids())
        (sync / "go").touch()
        outputs = [run.communicate(timeout=60) for run in runs]
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.wait()
    assert [(run.returncode, out) for run, (out, _) in zip(runs, outputs, strict=True)] == [
        (0, f"done-{cid}\n") for cid in ids
    ], [err for _, err in outputs]
    eventually(lambda: not containerd.shim_pids(), "every shim exits")
    assert containerd.ctr("container", "ls", "-q").stdout.split() == []


def test_parallel_execs_into_one_task(containerd: PrivateContainerd, busybox: str):
    """Eight `ctr task exec` at once into one task each get their own output and exit code."""
    run_detached(containerd, busybox, "c1", "sleep", "600")
    execs = [
        subprocess.Popen(
            containerd.ctr_command(
                "task", "exec", "--exec-id", f"e{i}", "c1", "sh", "-c", f"echo out-{i}; exit {i}"
            ),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(8)
    ]
    try:
        outputs = [run.communicate(timeout=60) for run in execs]
    finally:
        for run in execs:
            if run.poll() is None:
                run.kill()
                run.wait()
    assert [(run.returncode, out) for run, (out, _) in zip(execs, outputs, strict=True)] == [
        (i, f"out-{i}\n") for i in range(8)
    ], [err for _, err in outputs]
    remove_container(containerd, "c1")
