"""OOM kills in real cgroups, seen by the watcher.

A worker moved into a cgroup with a 16 MiB memory limit allocates 64 MiB and is
killed by the kernel's OOM killer. On the hybrid test machines that is a v1 memory
cgroup (eventfd through cgroup.event_control); the cgroup2 path (inotify on
memory.events) runs where cgroup2 has the memory controller.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

import pytest

from shim_framework import cgroups
from shim_framework.cgroups import Cgroup
from shim_framework.errors import FailedPrecondition
from shim_framework.oom import OomWatcher
from tests.harness import require_root
from tests.test_cgroups import Lab, MiB, as_v2, require_cgroup2, require_v1_memory

HOG = "b = b'x' * (64 << 20)"  # touches every page: 64 MiB charged at once
SMALL = {"memory": {"limit": 16 * MiB, "swap": 16 * MiB}}


class Calls:
    """What on_oom received, and a way to wait for one container's call."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self._changed = threading.Condition()

    def __call__(self, container_id: str) -> None:
        with self._changed:
            self.ids.append(container_id)
            self._changed.notify_all()

    def wait_for(self, container_id: str, timeout: float = 10) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: container_id in self.ids, timeout)


@pytest.fixture
def lab() -> Iterator[Lab]:
    require_root()
    made = Lab()
    try:
        yield made
    finally:
        made.cleanup()


@pytest.fixture
def calls() -> Calls:
    return Calls()


@pytest.fixture
def watcher(calls: Calls) -> Iterator[OomWatcher]:
    made = OomWatcher(calls)
    try:
        yield made
    finally:
        made.close()


def oom(lab: Lab, cg: Cgroup) -> None:
    """Run a worker in *cg* that allocates past the limit, and see the kernel kill it."""
    worker = lab.worker(HOG, cg)
    worker.go()
    assert worker.wait() == -signal.SIGKILL


def new_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t not in before]


def eventfds() -> int:
    """How many eventfds this process holds."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the fd listdir itself used
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    return count


def test_oom_kill_is_reported_for_its_container(
    lab: Lab, watcher: OomWatcher, calls: Calls
) -> None:
    """The kernel kills the worker; on_oom gets the container id, once, within seconds."""
    require_v1_memory()
    cg = lab.cgroup("c1", SMALL)
    barrier = lab.cgroup("barrier", SMALL)
    watcher.watch("c1", cg)
    oom(lab, cg)
    assert calls.wait_for("c1")
    watcher.watch("barrier", barrier)
    oom(lab, barrier)  # any second report for c1 was signalled before this one
    assert calls.wait_for("barrier")
    assert calls.ids == ["c1", "barrier"]


def test_unwatched_container_is_not_reported(lab: Lab, watcher: OomWatcher, calls: Calls) -> None:
    """After unwatch, an OOM in that container is not reported; others still are."""
    require_v1_memory()
    a = lab.cgroup("a", SMALL)
    b = lab.cgroup("b", SMALL)
    watcher.watch("a", a)
    watcher.watch("b", b)
    watcher.unwatch("a")
    oom(lab, a)
    oom(lab, b)  # a's notification, had there been one, came first
    assert calls.wait_for("b")
    assert calls.ids == ["b"]


def test_a_removed_cgroup_ends_its_watch_quietly(
    lab: Lab, watcher: OomWatcher, calls: Calls
) -> None:
    """Removal signals the v1 eventfd too; that is no OOM, and the fd is released."""
    require_v1_memory()
    gone = lab.cgroup("gone", SMALL)
    other = lab.cgroup("other", SMALL)
    watcher.watch("other", other)
    before = eventfds()
    watcher.watch("gone", gone)
    assert eventfds() == before + 1
    cgroups.remove(gone)
    oom(lab, other)  # the removal was signalled first
    assert calls.wait_for("other")
    assert calls.ids == ["other"]
    assert eventfds() == before


def test_close_leaves_no_thread_or_fd(lab: Lab, calls: Calls) -> None:
    """close() stops the thread and closes every fd it opened; watch() afterwards fails."""
    require_v1_memory()
    fds = sorted(os.listdir("/proc/self/fd"))
    threads = set(threading.enumerate())
    watcher = OomWatcher(calls)
    watcher.watch("c1", lab.cgroup("c1", SMALL))
    watcher.watch("c2", lab.cgroup("c2", SMALL))
    assert [t.name for t in new_threads(threads)] == ["polyshim-oom"]
    watcher.close()
    watcher.close()
    assert new_threads(threads) == []
    assert sorted(os.listdir("/proc/self/fd")) == fds
    with pytest.raises(FailedPrecondition):
        watcher.watch("c3", lab.cgroup("c3"))


def test_close_from_the_callback_stops_the_watcher(lab: Lab) -> None:
    """on_oom may close the watcher; the thread then releases everything on its way out."""
    require_v1_memory()
    done = threading.Event()
    watcher: OomWatcher

    def on_oom(container_id: str) -> None:
        watcher.close()
        done.set()

    watcher = OomWatcher(on_oom)
    cg = lab.cgroup(resources=SMALL)
    threads = set(threading.enumerate())
    watcher.watch("c1", cg)
    (thread,) = new_threads(threads)
    oom(lab, cg)
    assert done.wait(10)
    thread.join(10)
    assert not thread.is_alive()


def test_a_watcher_that_never_watched_starts_no_thread(calls: Calls) -> None:
    """The thread starts with the first watch, not with the watcher."""
    threads = set(threading.enumerate())
    watcher = OomWatcher(calls)
    assert new_threads(threads) == []
    watcher.close()


def test_v2_oom_kill_is_reported_or_refused_with_the_reason(
    lab: Lab, watcher: OomWatcher, calls: Calls
) -> None:
    """cgroup2 with memory: an OOM kill reaches on_oom. Without it (hybrid hosts, where
    memory is a v1 controller): watching is a FailedPrecondition, not a silent no-op."""
    require_cgroup2()
    memory_on_v2 = (
        "memory" in cgroups._v2_root_controllers() and "memory" not in cgroups._mounts().v1
    )
    if not memory_on_v2:
        cg = as_v2(lab.cgroup())
        assert not os.path.exists(os.path.join(cg.directory(), "memory.events"))
        with pytest.raises(FailedPrecondition):
            watcher.watch("c1", cg)
        return
    cg = lab.cgroup(resources=SMALL)
    assert cg.mode() == "v2"
    watcher.watch("c1", cg)
    oom(lab, cg)
    assert calls.wait_for("c1")
    assert set(calls.ids) == {"c1"}


def test_inotify_reports_modification_and_removal(tmp_path) -> None:
    """The libc inotify binding the cgroup2 path uses: IN_MODIFY, then IN_IGNORED."""
    from shim_framework.oom import IN_IGNORED, IN_MODIFY, _Inotify

    path = tmp_path / "memory.events"
    path.write_text("oom_kill 0\n")
    inotify = _Inotify()
    try:
        wd = inotify.add_watch(str(path), IN_MODIFY)
        assert inotify.read_events() == []
        path.write_text("oom_kill 1\n")
        assert (wd, IN_MODIFY) in inotify.read_events()
        path.unlink()
        assert any(w == wd and mask & IN_IGNORED for w, mask in inotify.read_events())
        with pytest.raises(FileNotFoundError):
            inotify.add_watch(str(path), IN_MODIFY)
    finally:
        inotify.close()
