"""Reading and making containers' cgroups, on this host's real hierarchies.

The test machines have a hybrid layout: v1 controllers under /sys/fs/cgroup/<controller>
and cgroup2 at /sys/fs/cgroup/unified with only hugetlb to offer. The v1 tests run the
path hybrid and legacy hosts take. The cgroup2 tests use the unified group `create` also
makes there, seen as a pure-v2 `Cgroup`: procs, cpu (core files) and hugetlb are real on
these machines; memory and pids only where cgroup2 has those controllers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest

from shim_framework import cgroups
from shim_framework.api.cgroups.v1 import metrics_pb2 as v1
from shim_framework.api.cgroups.v2 import metrics_pb2 as v2
from shim_framework.cgroups import Cgroup
from shim_framework.errors import FailedPrecondition, InvalidArgument, NotFound
from tests.harness import require, require_root

MiB = 1 << 20
TEST_ROOT = "/polyshim-test"

# Waits for a line, so that what it does next is charged to the cgroup the test moved it
# to; then touches 8 MiB and spins a little, says "ready", and idles until stdin closes.
BUSY = """
block = bytearray(8 << 20)
for i in range(0, len(block), 4096):
    block[i] = 1
n = 0
while n < 2_000_000:
    n += 1
print("ready", flush=True)
sys.stdin.read()
"""


class Worker:
    """A python child that waits for "go" on stdin before running *code*."""

    def __init__(self, code: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", f"import sys\nsys.stdin.readline()\n{code}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid = self.proc.pid

    def go(self, expect: str | None = None) -> None:
        """Let it run; with *expect*, wait for that line from it."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        if expect is not None:
            assert self.proc.stdout.readline().strip() == expect

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


class Lab:
    """Cgroups and workers made by one test, all removed afterwards, even on failure.

    Each test gets its own cgroups under /polyshim-test; the unified hierarchy's
    root cgroup.subtree_control is put back as it was (a cgroup2 update may enable a
    controller there for its group)."""

    def __init__(self) -> None:
        self.made: list[Cgroup] = []
        self.workers: list[Worker] = []
        self.prefix = f"{TEST_ROOT}/{uuid.uuid4().hex[:12]}"
        v2 = cgroups._mounts().v2
        self.v2_root = v2.point if v2 is not None else None
        self.v2_enabled = set(self._subtree_control())

    def cgroup(self, name: str = "c", resources: dict | None = None) -> Cgroup:
        cg = cgroups.create(f"{self.prefix}/{name}", resources)
        self.made.append(cg)
        return cg

    def worker(self, code: str, cgroup: Cgroup | None = None) -> Worker:
        worker = Worker(code)
        self.workers.append(worker)
        if cgroup is not None:
            cgroups.add_process(cgroup, worker.pid)
        return worker

    def cleanup(self) -> None:
        for worker in self.workers:
            worker.stop()
        errors = []
        for cg in reversed(self.made):
            try:
                cgroups.remove(cg)
            except Exception as e:
                errors.append(f"{cg!r}: {e}")
        for base in (self.prefix, TEST_ROOT):  # TEST_ROOT is shared by tests: best effort
            for directory in directories_of(base):
                with contextlib.suppress(OSError):
                    os.rmdir(directory)
        for controller in set(self._subtree_control()) - self.v2_enabled:
            assert self.v2_root is not None
            with open(os.path.join(self.v2_root, "cgroup.subtree_control"), "w") as f:
                f.write(f"-{controller}")
        assert not errors, errors

    def _subtree_control(self) -> list[str]:
        if self.v2_root is None:
            return []
        with open(os.path.join(self.v2_root, "cgroup.subtree_control")) as f:
            return f.read().split()


@pytest.fixture
def lab() -> Iterator[Lab]:
    require_root()
    made = Lab()
    try:
        yield made
    finally:
        made.cleanup()


def directories_of(path: str) -> list[str]:
    """Where cgroup *path* would be in each hierarchy create uses on this host."""
    return Cgroup(path, dict.fromkeys(cgroups.V1_CONTROLLERS, path))._directories()


def require_v1_memory() -> None:
    require("memory" in cgroups._mounts().v1, "needs the v1 memory controller (hybrid host)")


def require_cgroup2() -> None:
    require(cgroups._mounts().v2 is not None, "needs a cgroup2 hierarchy")


def as_v2(cg: Cgroup) -> Cgroup:
    """The cgroup2 side of *cg* alone: what a pure cgroup2 host would give."""
    assert cg.v2_path is not None
    return Cgroup(cg.v2_path, {})


def v1_metrics(cg: Cgroup) -> v1.Metrics:
    found = cg.metrics()
    assert found.type_url == "io.containerd.cgroups.v1.Metrics"
    return v1.Metrics.FromString(found.value)


def v2_metrics(cg: Cgroup) -> v2.Metrics:
    found = cg.metrics()
    assert found.type_url == "io.containerd.cgroups.v2.Metrics"
    return v2.Metrics.FromString(found.value)


def read(cg: Cgroup, controller: str | None, name: str) -> str:
    directory = cg.directory(controller)
    assert directory is not None
    with open(os.path.join(directory, name)) as f:
        return f.read().strip()


# -- where a process lives ---------------------------------------------------------------------


def test_parse_reads_every_hierarchy_of_proc_cgroup() -> None:
    """Co-mounted controllers, named hierarchies and the cgroup2 line all land."""
    cg = Cgroup.parse(
        "12:cpu,cpuacct:/psc-ns/c1\n4:memory:/psc-ns/c1\n1:name=systemd:/user.slice\n"
        "0::/psc-ns/c1 (deleted)\n"
    )
    assert cg.v2_path == "/psc-ns/c1"
    assert dict(cg.v1_paths) == {
        "cpu": "/psc-ns/c1",
        "cpuacct": "/psc-ns/c1",
        "memory": "/psc-ns/c1",
        "name=systemd": "/user.slice",
    }


def test_same_cgroup_ignores_named_hierarchies() -> None:
    """name=systemd holds no controller, so it does not make two cgroups different."""
    a = Cgroup("/x", {"memory": "/x", "name=systemd": "/a"})
    assert a.is_same_as(Cgroup("/x", {"memory": "/x", "name=systemd": "/b"}))
    assert not a.is_same_as(Cgroup("/x", {"memory": "/y"}))
    assert not a.is_same_as(Cgroup("/y", {"memory": "/x"}))


def test_of_pid_names_the_cgroup_a_process_was_moved_to(lab: Lab) -> None:
    """After add_process, /proc shows the new cgroup in every hierarchy create made."""
    cg = lab.cgroup()
    worker = lab.worker(BUSY, cg)
    found = Cgroup.of_pid(worker.pid)
    for controller, path in cg.v1_paths.items():
        assert found.v1_paths[controller] == path
    if cg.v2_path is not None:
        assert found.v2_path == cg.v2_path
    assert not found.is_same_as(cgroups.self_cgroup())
    assert Cgroup.of_pid(os.getpid()).is_same_as(cgroups.self_cgroup())


def test_a_fresh_fork_enters_the_v1_hierarchies_itself(lab: Lab) -> None:
    """enter_v1 in a forked child moves it in every v1 hierarchy; add_process_v2
    then adds cgroup2 alone, and /proc shows the cgroup everywhere."""
    require_v1_memory()
    cg = lab.cgroup()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            cgroups.enter_v1(cg)
            os.write(write_end, b"in")
            time.sleep(30)
        finally:
            os._exit(0)
    try:
        os.close(write_end)
        assert os.read(read_end, 2) == b"in"
        entered = Cgroup.of_pid(pid)
        for controller, path in cg.v1_paths.items():
            assert entered.v1_paths[controller] == path, controller
        if cg.v2_path is not None:
            assert entered.v2_path != cg.v2_path  # not there yet: that takes add_process_v2
            cgroups.add_process_v2(cg, pid)
            assert Cgroup.of_pid(pid).v2_path == cg.v2_path
    finally:
        os.close(read_end)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_of_pid_of_an_exited_process_is_not_found() -> None:
    """A pid whose process is gone (and reaped) is NotFound."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(NotFound):
        Cgroup.of_pid(proc.pid)


def test_hybrid_host_reports_v1_metrics(lab: Lab) -> None:
    """With memory on v1 the cgroup counts as v1, as containerd's runc shim decides."""
    require_v1_memory()
    cg = lab.cgroup()
    assert cg.mode() == "v1"
    assert cg.metrics().type_url == "io.containerd.cgroups.v1.Metrics"


# -- v1 ----------------------------------------------------------------------------------------


def test_procs_lists_the_process_and_those_in_sub_cgroups(lab: Lab) -> None:
    """Like runc ps: the container's cgroup and everything below it."""
    top = lab.cgroup("top")
    below = lab.cgroup("top/below")
    a = lab.worker(BUSY, top)
    b = lab.worker(BUSY, below)
    assert sorted(top.procs()) == sorted([a.pid, b.pid])
    assert below.procs() == [b.pid]


def test_v1_metrics_report_usage_and_the_limits_set(lab: Lab) -> None:
    """cpu, memory and pids numbers of a busy process, and the limits create applied."""
    require_v1_memory()
    cg = lab.cgroup(
        resources={
            "memory": {"limit": 64 * MiB},
            "cpu": {"shares": 512, "quota": 50_000, "period": 100_000},
            "pids": {"limit": 32},
        }
    )
    worker = lab.worker(BUSY, cg)
    worker.go(expect="ready")
    m = v1_metrics(cg)

    assert m.cpu.usage.total > 0
    assert m.cpu.usage.user + m.cpu.usage.kernel > 0
    assert len(m.cpu.usage.per_cpu) == os.cpu_count()
    assert m.memory.usage.usage >= 8 * MiB
    assert m.memory.usage.limit == 64 * MiB
    assert m.memory.total_rss >= 8 * MiB  # what CRI's working set starts from
    assert m.memory.hierarchical_memory_limit == 64 * MiB
    assert m.HasField("memory_oom_control")
    assert m.pids.current == 1
    assert m.pids.limit == 32
    # What the task service reads: the init's cgroup as /proc names it.
    seen = Cgroup.of_pid(worker.pid)
    assert seen.procs() == [worker.pid]
    assert v1_metrics(seen).pids.current == 1
    assert read(cg, "cpu", "cpu.shares") == "512"
    assert read(cg, "cpu", "cpu.cfs_quota_us") == "50000"
    assert read(cg, "cpu", "cpu.cfs_period_us") == "100000"


def test_update_changes_limits(lab: Lab) -> None:
    """New memory, cpu and pids limits show in the files and in the metrics."""
    require_v1_memory()
    cg = lab.cgroup(resources={"memory": {"limit": 64 * MiB}, "pids": {"limit": 32}})
    cgroups.update(
        cg,
        {"memory": {"limit": 128 * MiB}, "cpu": {"quota": 20_000}, "pids": {"limit": -1}},
    )
    m = v1_metrics(cg)
    assert m.memory.usage.limit == 128 * MiB
    assert read(cg, "cpu", "cpu.cfs_quota_us") == "20000"
    assert read(cg, "pids", "pids.max") == "max"
    assert m.pids.limit == 0  # v1 reads "max" as 0, as containerd does


def test_memory_and_swap_limits_can_grow_and_shrink(lab: Lab) -> None:
    """The kernel keeps memory <= memory+swap at every write; updates order them for it."""
    require_v1_memory()
    cg = lab.cgroup(resources={"memory": {"limit": 16 * MiB, "swap": 16 * MiB}})
    for limit in (64 * MiB, 16 * MiB, 32 * MiB):
        cgroups.update(cg, {"memory": {"limit": limit, "swap": limit}})
        assert read(cg, "memory", "memory.limit_in_bytes") == str(limit)
        if os.path.exists(
            os.path.join(cg.directory("memory") or "", "memory.memsw.limit_in_bytes")
        ):
            assert read(cg, "memory", "memory.memsw.limit_in_bytes") == str(limit)


def test_cpu_shares_the_kernel_clamps_are_invalid_argument(lab: Lab) -> None:
    """cpu.shares 1 would silently become 2; runc refuses it, and so do we."""
    require_v1_memory()
    cg = lab.cgroup()
    with pytest.raises(InvalidArgument):
        cgroups.update(cg, {"cpu": {"shares": 1}})


def test_malformed_resources_are_invalid_argument(lab: Lab) -> None:
    """Values of the wrong type fail before anything is written or made."""
    with pytest.raises(InvalidArgument):
        lab.cgroup(resources={"memory": {"limit": "64M"}})
    with pytest.raises(InvalidArgument):
        lab.cgroup(resources={"hugepageLimits": [{"pageSize": "2M", "limit": 1}]})
    assert not any(os.path.exists(d) for d in directories_of(f"{lab.prefix}/c"))


def test_paths_must_be_absolute_and_below_the_root() -> None:
    """A relative path, the root itself or a path with .. is refused."""
    for path in ("polyshim/c1", "/", "/polyshim/../c1", "/polyshim//c1"):
        with pytest.raises(InvalidArgument):
            cgroups.create(path)


def test_remove_cleans_up_every_hierarchy_and_tolerates_gone(lab: Lab) -> None:
    """Every directory create made is gone afterwards; removing twice is fine."""
    cg = lab.cgroup()
    directories = cg._directories()
    assert directories and all(os.path.isdir(d) for d in directories)
    cgroups.remove(cg)
    assert not any(os.path.exists(d) for d in directories)
    cgroups.remove(cg)


def test_remove_with_a_process_inside_is_failed_precondition(lab: Lab) -> None:
    """remove kills nothing: a live process keeps its cgroup."""
    cg = lab.cgroup()
    lab.worker(BUSY, cg)
    with pytest.raises(FailedPrecondition):
        cgroups.remove(cg)
    assert all(os.path.isdir(d) for d in cg._directories())


def test_a_removed_cgroup_is_not_found(lab: Lab) -> None:
    """metrics and procs of a cgroup that is gone are NotFound (containerd skips those)."""
    cg = lab.cgroup()
    cgroups.remove(cg)
    with pytest.raises(NotFound):
        cg.metrics()
    with pytest.raises(NotFound):
        cg.procs()


def test_adding_an_exited_process_is_not_found(lab: Lab) -> None:
    """The kernel's ESRCH becomes NotFound."""
    cg = lab.cgroup()
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(NotFound):
        cgroups.add_process(cg, proc.pid)


# -- cgroup2 -------------------------------------------------------------------------------------


def test_v2_procs_and_cpu_metrics(lab: Lab) -> None:
    """A cgroup2 group reports its processes and cpu.stat; absent controllers are left out."""
    require_cgroup2()
    cg = as_v2(lab.cgroup())
    assert cg.mode() == "v2"
    worker = lab.worker(BUSY, cg)
    worker.go(expect="ready")
    assert cg.procs() == [worker.pid]
    m = v2_metrics(cg)
    assert m.cpu.usage_usec > 0
    assert m.cpu.user_usec + m.cpu.system_usec > 0
    directory = cg.directory()
    assert directory is not None
    has = os.path.exists
    assert m.HasField("memory") == has(os.path.join(directory, "memory.stat"))
    assert m.HasField("pids") == has(os.path.join(directory, "pids.current"))
    if m.HasField("memory"):  # a host with memory on cgroup2: what CRI reads
        assert m.memory.usage >= 8 * MiB
        assert m.memory.anon >= 8 * MiB
    if m.HasField("pids"):
        assert m.pids.current == 1


def test_v2_sub_cgroups_count_in_procs(lab: Lab) -> None:
    """The recursive walk holds on cgroup2 too."""
    require_cgroup2()
    top = as_v2(lab.cgroup("top"))
    below = as_v2(lab.cgroup("top/below"))
    a = lab.worker(BUSY, top)
    b = lab.worker(BUSY, below)
    assert sorted(top.procs()) == sorted([a.pid, b.pid])


def test_v2_hugetlb_limit_is_applied_and_reported(lab: Lab) -> None:
    """update enables hugetlb in the ancestors and sets hugetlb.<size>.max."""
    require_cgroup2()
    sizes = cgroups._hugepage_sizes()
    require("2MB" in sizes, "needs 2 MB huge pages")
    root = cgroups._mounts().v2
    assert root is not None
    with open(os.path.join(root.point, "cgroup.controllers")) as f:
        require("hugetlb" in f.read().split(), "needs hugetlb on cgroup2")
    cg = as_v2(lab.cgroup())
    cgroups.update(cg, {"hugepageLimits": [{"pageSize": "2MB", "limit": 4 * MiB}]})
    assert read(cg, None, "hugetlb.2MB.max") == str(4 * MiB)
    by_size = {h.pagesize: h for h in v2_metrics(cg).hugetlb}
    assert by_size["2MB"].max == 4 * MiB
    assert by_size["2MB"].current == 0


def test_v2_limits_for_absent_controllers_are_failed_precondition(lab: Lab) -> None:
    """A limit whose controller cgroup2 does not offer here cannot be applied."""
    require_cgroup2()
    cg = as_v2(lab.cgroup())
    require(cg.directory() is not None, "needs the cgroup2 group")
    limits = {"pids": {"pids": {"limit": 5}}, "memory": {"memory": {"limit": 64 * MiB}}}
    offered = cgroups._v2_root_controllers()
    absent = [resources for controller, resources in limits.items() if controller not in offered]
    require(bool(absent), "needs a cgroup2 hierarchy without the pids or memory controller")
    with pytest.raises(FailedPrecondition):
        cgroups.update(cg, absent[0])


def test_cpu_shares_convert_to_weight_as_runc_does() -> None:
    """The fixed points of runc's formula (opencontainers/cgroups utils_test.go)."""
    cases = {0: 0, 1: 1, 2: 1, 3: 2, 1024: 100, 262143: 10000, 262144: 10000, 262145: 10000}
    assert {s: cgroups.cpu_shares_to_weight(s) for s in cases} == cases
