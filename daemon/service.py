"""The gRPC face of the daemon: `containerd.services.snapshots.v1.Snapshots` on unix sockets.

Thin on purpose (containerd's `contrib/snapshotservice/service.go` is one
call and one error conversion per RPC): each method picks the snapshotter the
request names, decodes, calls `daemon.snapshotter.Snapshotter`, encodes.
Errors leave as the status of their class (`shim_framework.errors`), which
containerd turns back into its own (`errdefs.FromGRPC`); anything
unclassified is UNKNOWN with its message, and is logged with its traceback.

One process serves several snapshotters on one socket and dispatches on the
`snapshotter` field every request carries (containerd fills in the name of
its `[proxy_plugins.NAME]`). A socket may also be dedicated to one name; it
then refuses the others. An unknown name is InvalidArgument, not NotFound:
containerd reads NotFound as "no such snapshot" and would, for example,
silently skip every snapshot of a misconfigured proxy.

List answers in batches of 100 infos per stream message, as containerd's own
server does; the result is read in one transaction before the first batch
is sent, so a slow reader never holds the database.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import stat
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from daemon.model import Info, Kind, Mount
from daemon.snapshotter import Snapshotter
from shim_framework.api.services.snapshots.v1 import snapshots_pb2 as pb
from shim_framework.api.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from shim_framework.api.types import mount_pb2
from shim_framework.errors import Code, FailedPrecondition, InvalidArgument, PolyshimError

log = logging.getLogger("polyshim.snapshotd.service")

LIST_BATCH = 100  # infos per List message, as containerd's snapshot service
MAX_MESSAGE = 16 << 20  # containerd's defaults.DefaultMaxRecvMsgSize / SendMsgSize

_STATUS = {code.value[0]: code for code in grpc.StatusCode}

T = TypeVar("T")


def _rpc(method: Callable[..., T]) -> Callable[..., T]:
    """Convert what a unary method raises into the status containerd expects."""

    @functools.wraps(method)
    def wrapper(self: SnapshotsServicer, request: Any, context: grpc.ServicerContext) -> T:
        subject = getattr(request, "key", "") or getattr(getattr(request, "info", None), "name", "")
        log.debug("%s %s %r", method.__name__, request.snapshotter, subject)
        try:
            return method(self, request, context)
        except Exception as exc:
            self._abort(context, method.__name__, request, exc)
            raise  # not reached: abort raises

    return wrapper


class SnapshotsServicer(pb_grpc.SnapshotsServicer):
    """The Snapshots service for *snapshotters* (name -> Snapshotter); *only* restricts to one."""

    def __init__(self, snapshotters: Mapping[str, Snapshotter], only: str | None = None) -> None:
        self.snapshotters = dict(snapshotters)
        self.only = only

    def get(self, name: str) -> Snapshotter:
        """The snapshotter a request names. InvalidArgument: not served here."""
        served = [self.only] if self.only else sorted(self.snapshotters)
        if name in served and name in self.snapshotters:
            return self.snapshotters[name]
        if not name:
            raise InvalidArgument(
                f"request names no snapshotter; this socket serves {', '.join(served)}"
            )
        raise InvalidArgument(
            f'snapshotter "{name}" is not served on this socket (serving: {", ".join(served)}); '
            "check the [proxy_plugins] names in containerd's config and --snapshotters"
        )

    @_rpc
    def Prepare(self, request: pb.PrepareSnapshotRequest, context: Any) -> Any:
        sn = self.get(request.snapshotter)
        mounts = sn.prepare(request.key, request.parent, dict(request.labels))
        return pb.PrepareSnapshotResponse(mounts=_mounts(mounts))

    @_rpc
    def View(self, request: pb.ViewSnapshotRequest, context: Any) -> Any:
        sn = self.get(request.snapshotter)
        mounts = sn.view(request.key, request.parent, dict(request.labels))
        return pb.ViewSnapshotResponse(mounts=_mounts(mounts))

    @_rpc
    def Mounts(self, request: pb.MountsRequest, context: Any) -> Any:
        sn = self.get(request.snapshotter)
        return pb.MountsResponse(mounts=_mounts(sn.mounts(request.key)))

    @_rpc
    def Commit(self, request: pb.CommitSnapshotRequest, context: Any) -> Any:
        sn = self.get(request.snapshotter)
        sn.commit(request.name, request.key, dict(request.labels), request.parent)
        return empty_pb2.Empty()

    @_rpc
    def Remove(self, request: pb.RemoveSnapshotRequest, context: Any) -> Any:
        self.get(request.snapshotter).remove(request.key)
        return empty_pb2.Empty()

    @_rpc
    def Stat(self, request: pb.StatSnapshotRequest, context: Any) -> Any:
        info = self.get(request.snapshotter).stat(request.key)
        return pb.StatSnapshotResponse(info=info_to_proto(info))

    @_rpc
    def Update(self, request: pb.UpdateSnapshotRequest, context: Any) -> Any:
        sn = self.get(request.snapshotter)
        info = sn.update(info_from_proto(request.info), list(request.update_mask.paths))
        return pb.UpdateSnapshotResponse(info=info_to_proto(info))

    def List(self, request: pb.ListSnapshotsRequest, context: Any) -> Iterator[Any]:
        log.debug("List %s %s", request.snapshotter, list(request.filters))
        try:
            infos = self.get(request.snapshotter).walk(list(request.filters))
        except Exception as exc:
            self._abort(context, "List", request, exc)
            return  # not reached: abort raises
        for start in range(0, len(infos), LIST_BATCH):
            batch = infos[start : start + LIST_BATCH]
            yield pb.ListSnapshotsResponse(info=[info_to_proto(i) for i in batch])

    @_rpc
    def Usage(self, request: pb.UsageRequest, context: Any) -> Any:
        usage = self.get(request.snapshotter).usage(request.key)
        return pb.UsageResponse(size=usage.size, inodes=usage.inodes)

    @_rpc
    def Cleanup(self, request: pb.CleanupRequest, context: Any) -> Any:
        self.get(request.snapshotter).cleanup()
        return empty_pb2.Empty()

    def _abort(self, context: Any, method: str, request: Any, exc: Exception) -> None:
        if isinstance(exc, PolyshimError):
            code, message = exc.code, str(exc)
            log.debug("%s %s: %s: %s", method, request.snapshotter, code.name, message)
        else:
            code, message = Code.UNKNOWN, str(exc) or type(exc).__name__
            log.error("%s %s failed: %s", method, request.snapshotter, message, exc_info=exc)
        context.abort(_STATUS.get(int(code), grpc.StatusCode.UNKNOWN), message)


# ---------------------------------------------------------------------- conversions


def _mounts(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [
        mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=list(m.options))
        for m in mounts
    ]


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def info_to_proto(info: Info) -> pb.Info:
    return pb.Info(
        name=info.name,
        parent=info.parent,
        kind=int(info.kind),
        created_at=_timestamp(info.created),
        updated_at=_timestamp(info.updated),
        labels=dict(info.labels),
    )


def info_from_proto(info: pb.Info) -> Info:
    kind = Kind(info.kind) if info.kind in Kind._value2member_map_ else Kind.UNKNOWN
    return Info(
        name=info.name,
        parent=info.parent,
        kind=kind,
        created=info.created_at.seconds * 1_000_000_000 + info.created_at.nanos,
        updated=info.updated_at.seconds * 1_000_000_000 + info.updated_at.nanos,
        labels=dict(info.labels),
    )


# ---------------------------------------------------------------------- serving


class Server:
    """gRPC servers on unix sockets: `sockets` maps a path to the one name it serves, or None
    for all of *snapshotters*.

    Resource handling: `start` binds every socket (mode 0600; a stale socket
    file left by a killed daemon is replaced, a live one is an error) and
    `stop` ends in-flight calls after *grace* seconds, then removes the
    socket files it made. Both are idempotent."""

    def __init__(
        self,
        snapshotters: Mapping[str, Snapshotter],
        sockets: Mapping[Path, str | None],
        max_workers: int = 16,
    ) -> None:
        self.snapshotters = dict(snapshotters)
        self.sockets = {Path(p): name for p, name in sockets.items()}
        self.max_workers = max_workers
        self._servers: list[grpc.Server] = []
        self._bound: list[Path] = []

    def start(self) -> Server:
        if self._servers:
            return self
        try:
            for path, name in self.sockets.items():
                server = grpc.server(
                    futures.ThreadPoolExecutor(self.max_workers, thread_name_prefix="snapshotd"),
                    options=[
                        ("grpc.max_receive_message_length", MAX_MESSAGE),
                        ("grpc.max_send_message_length", MAX_MESSAGE),
                    ],
                )
                pb_grpc.add_SnapshotsServicer_to_server(
                    SnapshotsServicer(self.snapshotters, only=name), server
                )
                _prepare_socket_path(path)
                server.add_insecure_port(f"unix:{path}")
                os.chmod(path, 0o600)
                self._bound.append(path)
                self._servers.append(server)
                server.start()
        except BaseException:
            self.stop(grace=0)
            raise
        return self

    def stop(self, grace: float | None = 5.0) -> None:
        servers, self._servers = self._servers, []
        events = [s.stop(grace) for s in servers]
        for event in events:
            event.wait()
        bound, self._bound = self._bound, []
        for path in bound:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _prepare_socket_path(path: Path) -> None:
    """Make room for a new socket at *path*: remove a dead daemon's socket, refuse a live one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FailedPrecondition(f"{path} exists and is not a socket; remove it or pick another")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # nobody listens: a killed daemon's leftover
        return
    finally:
        probe.close()
    raise FailedPrecondition(f"{path}: another process is serving on this socket; stop it first")
