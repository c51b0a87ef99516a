"""OOM kills in containers' cgroups, reported as they happen.

Theory of operation
-------------------
One thread, started by the first `watch`, sleeps in `epoll_wait` on three kinds of fd:

- per container on cgroup v1, an eventfd the kernel signals when the memory cgroup
  runs out of memory. It is registered by writing "<eventfd> <fd of
  memory.oom_control>" to the group's cgroup.event_control (cgroup-v1/memory.rst,
  "OOM Control"). The kernel signals the same eventfd when the group is removed,
  so a wakeup counts only while the directory still exists; otherwise the watch
  ends. As in containerd's pkg/oom/v1, each wakeup of a live group is one OOM.
- one inotify instance for every container on cgroup2, with IN_MODIFY watches on
  each group's memory.events and cgroup.events. A change re-reads memory.events,
  and an `oom_kill` count above the last one seen is one OOM (containerd's
  pkg/oom/v2 and cgroups `EventChan`). The watch ends when the group is empty
  (cgroup.events "populated 0") or gone. One instance for all, not one per
  container: inotify instances are limited per user (fs.inotify.max_user_instances,
  128 by default) and every shim on a host runs as root.
- an eventfd that `close()` signals.

`on_oom(container_id)` runs on the watcher thread, outside the watcher's lock, so
it may call `watch` and `unwatch`; it should not block. Its exceptions are logged
and the thread goes on.

Races: `unwatch` closes a v1 eventfd at once. A wakeup for it that epoll already
returned then finds no watch for that fd, or, when a new watch got the same fd
number, a fresh eventfd with nothing to read (they are non-blocking): either way
nothing is reported, so an OOM is never reported for the wrong container.
inotify watch descriptors are allocated cyclically, so a stale event does not
meet a new watch, and an `oom_kill` count only counts against its own baseline.

Resource handling: the watcher owns its thread and every fd it opens. `close()`
stops the thread and closes them all (also when called from `on_oom`); `watch`
after `close` is FailedPrecondition. Linux-only calls (epoll, eventfd, inotify)
are reached only from `watch`, so this module imports on FreeBSD too.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import struct
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from shim_framework.errors import FailedPrecondition, NotFound, Unimplemented

if TYPE_CHECKING:
    from shim_framework.cgroups import Cgroup

log = logging.getLogger("polyshim.oom")

IN_MODIFY = 0x00000002  # <sys/inotify.h>
IN_IGNORED = 0x00008000  # the watch is gone: removed, or its file deleted
_INOTIFY_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name


class OomWatcher:
    """One thread watching many containers' cgroups; calls on_oom(container_id) per OOM kill."""

    def __init__(self, on_oom: Callable[[str], None]) -> None:
        self._on_oom = on_oom
        self._lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._epoll: Any = None  # select.epoll, made with the thread
        self._wake = -1  # eventfd close() signals
        self._inotify: _Inotify | None = None  # made by the first cgroup2 watch
        self._by_id: dict[str, _V1Watch | _V2Watch] = {}
        self._by_eventfd: dict[int, _V1Watch] = {}
        self._by_wd: dict[int, _V2Watch] = {}

    def watch(self, container_id: str, cgroup: Cgroup) -> None:
        """Report OOM kills in *cgroup* as `on_oom(container_id)` from now on.

        Replaces an earlier watch of *container_id*. NotFound: the cgroup is gone.
        FailedPrecondition: it has no memory controller, or the watcher is closed.
        Unimplemented: not on Linux."""
        with self._lock:
            if self._closed:
                raise FailedPrecondition(
                    f'OOM watcher: closed; cannot watch container "{container_id}"'
                )
            self._start()
            self._drop(self._by_id.get(container_id))
            if cgroup.mode() == "v1":
                watch: _V1Watch | _V2Watch = self._add_v1(container_id, cgroup)
            else:
                watch = self._add_v2(container_id, cgroup)
            self._by_id[container_id] = watch

    def unwatch(self, container_id: str) -> None:
        """Stop reporting OOM kills of *container_id*; not watched is fine."""
        with self._lock:
            self._drop(self._by_id.get(container_id))

    def close(self) -> None:
        """Stop the thread and close every fd. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            if self._wake >= 0:
                os.eventfd_write(self._wake, 1)
        if thread is threading.current_thread():
            return  # called from on_oom: the thread releases everything on its way out
        if thread is not None:
            thread.join()
        self._release()

    # -- registering --

    def _start(self) -> None:
        if self._thread is not None:
            return
        if not hasattr(select, "epoll") or not hasattr(os, "eventfd"):
            raise Unimplemented("OOM watcher: needs Linux (epoll, eventfd)")
        self._epoll = select.epoll()  # close-on-exec, like every fd Python makes
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll.register(self._wake, select.EPOLLIN)
        self._thread = threading.Thread(target=self._run, name="polyshim-oom", daemon=True)
        self._thread.start()

    def _add_v1(self, container_id: str, cgroup: Cgroup) -> _V1Watch:
        directory = cgroup.directory("memory")
        if directory is None:
            raise FailedPrecondition(f"{cgroup}: no memory controller; cannot watch for OOM")
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            control = os.open(os.path.join(directory, "memory.oom_control"), os.O_RDONLY)
            try:
                _write_line(os.path.join(directory, "cgroup.event_control"), f"{efd} {control}")
            finally:
                os.close(control)  # the kernel keeps its own reference
            self._epoll.register(efd, select.EPOLLIN)
        except BaseException as e:
            os.close(efd)
            if isinstance(e, FileNotFoundError):
                raise NotFound(f"{cgroup}: not found; its processes have exited") from e
            if isinstance(e, OSError):
                raise FailedPrecondition(
                    f"{cgroup}: cannot register for OOM notifications: {e.strerror}"
                ) from e
            raise
        watch = _V1Watch(container_id, directory, efd)
        self._by_eventfd[efd] = watch
        return watch

    def _add_v2(self, container_id: str, cgroup: Cgroup) -> _V2Watch:
        directory = cgroup.directory()
        if directory is None or not os.path.isdir(directory):
            raise NotFound(f"{cgroup}: not found; its processes have exited")
        # The baseline before the watch: a kill in between shows up at the next change.
        kills = _oom_kills(directory)
        if kills is None:
            raise FailedPrecondition(
                f"{cgroup}: no memory.events (the memory controller is not enabled for "
                "this cgroup2 group); cannot watch for OOM"
            )
        if self._inotify is None:
            self._inotify = _Inotify()
            self._epoll.register(self._inotify.fd, select.EPOLLIN)
        watch = _V2Watch(container_id, directory, kills)
        try:
            for name in ("memory.events", "cgroup.events"):
                wd = self._inotify.add_watch(os.path.join(directory, name), IN_MODIFY)
                watch.wds.add(wd)
                self._by_wd[wd] = watch
        except OSError as e:
            self._drop(watch)
            if e.errno == errno.ENOENT:
                raise NotFound(f"{cgroup}: not found; its processes have exited") from e
            raise FailedPrecondition(f"{cgroup}: cannot watch memory.events: {e.strerror}") from e
        return watch

    def _drop(self, watch: _V1Watch | _V2Watch | None) -> None:
        """Forget *watch* and release what it holds (under the lock)."""
        if watch is None:
            return
        if self._by_id.get(watch.container_id) is watch:
            del self._by_id[watch.container_id]
        if isinstance(watch, _V1Watch):
            if self._by_eventfd.pop(watch.eventfd, None) is watch:
                self._epoll.unregister(watch.eventfd)
                os.close(watch.eventfd)
            return
        for wd in watch.wds:
            if self._by_wd.get(wd) is watch:
                del self._by_wd[wd]
                assert self._inotify is not None
                self._inotify.rm_watch(wd)
        watch.wds.clear()

    # -- the thread --

    def _run(self) -> None:
        try:
            while True:
                ready = self._epoll.poll()
                with self._lock:
                    if self._closed:
                        return
                    fired = []
                    for fd, _ in ready:
                        if self._inotify is not None and fd == self._inotify.fd:
                            fired += self._inotify_ready()
                        elif fd in self._by_eventfd:
                            fired += self._eventfd_ready(self._by_eventfd[fd])
                for container_id in fired:
                    try:
                        self._on_oom(container_id)
                    except Exception:
                        log.exception("OOM callback for container %s failed", container_id)
        except Exception:  # a bug: say so, rather than end silently
            log.exception("OOM watcher stopped")
        finally:
            self._release()

    def _eventfd_ready(self, watch: _V1Watch) -> list[str]:
        try:
            os.eventfd_read(watch.eventfd)
        except BlockingIOError:  # a stale wakeup for a closed fd whose number came back
            return []
        if not os.path.isdir(watch.directory):  # removal signals the eventfd too
            self._drop(watch)
            return []
        return [watch.container_id]

    def _inotify_ready(self) -> list[str]:
        assert self._inotify is not None
        touched: dict[int, _V2Watch] = {}
        for wd, mask in self._inotify.read_events():
            watch = self._by_wd.get(wd)
            if watch is None:
                continue
            if mask & IN_IGNORED:  # the file went away with its group
                del self._by_wd[wd]
                watch.wds.discard(wd)
            touched[id(watch)] = watch
        fired = []
        for watch in touched.values():
            if self._by_id.get(watch.container_id) is not watch:
                continue
            kills = _oom_kills(watch.directory)
            if kills is None:  # gone
                self._drop(watch)
                continue
            if kills > watch.oom_kills:
                fired.append(watch.container_id)
            watch.oom_kills = max(kills, watch.oom_kills)
            if not _populated(watch.directory):
                self._drop(watch)  # nothing left in it that could run out of memory
        return fired

    def _release(self) -> None:
        with self._lock:
            self._closed = True  # also after a crash of the thread: no watch can work now
            for watch in list(self._by_id.values()):
                self._drop(watch)
            if self._inotify is not None:
                self._inotify.close()
                self._inotify = None
            if self._wake >= 0:
                os.close(self._wake)
                self._wake = -1
            if self._epoll is not None:
                self._epoll.close()
                self._epoll = None


@attrs.define(eq=False)
class _V1Watch:
    container_id: str
    directory: str  # the memory controller's directory of the group
    eventfd: int


@attrs.define(eq=False)
class _V2Watch:
    container_id: str
    directory: str
    oom_kills: int  # the last memory.events oom_kill count seen
    wds: set[int] = attrs.field(factory=set)


def _write_line(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _keyed(path: str) -> dict[str, str] | None:
    """A flat keyed cgroup file; None when it (or its group) is gone."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENODEV):  # ENODEV: read after the group was removed
            return None
        raise
    return dict(line.split(None, 1) for line in text.splitlines() if " " in line)


def _oom_kills(directory: str) -> int | None:
    events = _keyed(os.path.join(directory, "memory.events"))
    return None if events is None else int(events.get("oom_kill", 0))


def _populated(directory: str) -> bool:
    events = _keyed(os.path.join(directory, "cgroup.events"))
    return events is not None and events.get("populated", "0").strip() != "0"


class _Inotify:
    """A non-blocking inotify instance, through libc (Python has no binding)."""

    def __init__(self) -> None:
        import ctypes

        self._libc = ctypes.CDLL(None, use_errno=True)  # the C library already loaded
        self._libc.inotify_add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
        self._libc.inotify_rm_watch.argtypes = (ctypes.c_int, ctypes.c_int)
        self._get_errno = ctypes.get_errno
        # IN_NONBLOCK and IN_CLOEXEC are O_NONBLOCK and O_CLOEXEC
        self.fd = self._check(self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC), "init")

    def add_watch(self, path: str, mask: int) -> int:
        return self._check(self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask), path)

    def rm_watch(self, wd: int) -> None:
        # EINVAL: the kernel already removed it (its file is gone); nothing to do.
        self._libc.inotify_rm_watch(self.fd, wd)

    def read_events(self) -> list[tuple[int, int]]:
        """(wd, mask) of every queued event."""
        events = []
        while True:
            try:
                data = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                return events
            offset = 0
            while offset + _INOTIFY_EVENT.size <= len(data):
                wd, mask, _, name_length = _INOTIFY_EVENT.unpack_from(data, offset)
                events.append((wd, mask))
                offset += _INOTIFY_EVENT.size + name_length

    def close(self) -> None:
        os.close(self.fd)

    def _check(self, result: int, what: str) -> int:
        if result < 0:
            code = self._get_errno()
            raise OSError(code, f"inotify {what}: {os.strerror(code)}")
        return result
