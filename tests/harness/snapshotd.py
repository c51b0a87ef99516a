"""polyshim-snapshotd for tests: a gRPC client, an in-process server, a daemon process.

- :class:`SnapshotClient` talks to a daemon over its unix socket with a real
  grpcio channel, like containerd's proxy does, and raises the
  ``shim_framework.errors`` class of each failed call's status.
- :class:`InProcessSnapshotd` runs the daemon's own ``Daemon`` and gRPC
  ``Server`` inside the test process (fast; the conformance suite).
- :class:`SnapshotdProcess` runs ``polyshim-snapshotd`` as a subprocess that
  tests can SIGKILL and restart (crash tests, containerd integration).

Socket paths live in short ``/tmp/pss-*`` dirs: AF_UNIX paths max out at 108 bytes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType

import grpc
from google.protobuf import field_mask_pb2

from daemon.driver import Driver
from daemon.model import Info, Kind, Mount, Usage
from shim_framework.api.services.snapshots.v1 import snapshots_pb2 as pb
from shim_framework.api.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from shim_framework.errors import PolyshimError, from_status

REPO = Path(__file__).resolve().parents[2]


def short_tempdir(prefix: str = "pss-") -> Path:
    """A fresh directory under /tmp with a short path (room for socket names)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def _raise(exc: grpc.RpcError) -> PolyshimError:
    return from_status(exc.code().value[0], exc.details() or "")


class SnapshotClient:
    """The Snapshots API of one snapshotter *name* on the daemon at *socket*.

    Methods mirror containerd's Snapshotter interface and return the
    daemon's own model types; failed calls raise ``shim_framework.errors``."""

    def __init__(self, socket: Path, name: str, timeout: float = 120) -> None:
        self.socket = Path(socket)
        self.name = name
        self.timeout = timeout
        self.channel = _channel(self.socket)
        self.stub = pb_grpc.SnapshotsStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def named(self, name: str) -> SnapshotClient:
        """A client for another snapshotter on the same socket."""
        return SnapshotClient(self.socket, name, self.timeout)

    def _call(self, method: str, request: object) -> object:
        try:
            return getattr(self.stub, method)(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise _raise(exc) from None

    def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None):
        req = pb.PrepareSnapshotRequest(
            snapshotter=self.name, key=key, parent=parent, labels=dict(labels or {})
        )
        return [_mount(m) for m in self._call("Prepare", req).mounts]

    def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None):
        req = pb.ViewSnapshotRequest(
            snapshotter=self.name, key=key, parent=parent, labels=dict(labels or {})
        )
        return [_mount(m) for m in self._call("View", req).mounts]

    def mounts(self, key: str) -> list[Mount]:
        req = pb.MountsRequest(snapshotter=self.name, key=key)
        return [_mount(m) for m in self._call("Mounts", req).mounts]

    def commit(
        self, name: str, key: str, labels: Mapping[str, str] | None = None, parent: str = ""
    ) -> None:
        req = pb.CommitSnapshotRequest(
            snapshotter=self.name, name=name, key=key, labels=dict(labels or {}), parent=parent
        )
        self._call("Commit", req)

    def remove(self, key: str) -> None:
        self._call("Remove", pb.RemoveSnapshotRequest(snapshotter=self.name, key=key))

    def stat(self, key: str) -> Info:
        return _info(
            self._call("Stat", pb.StatSnapshotRequest(snapshotter=self.name, key=key)).info
        )

    def update(self, info: Info, *paths: str) -> Info:
        req = pb.UpdateSnapshotRequest(
            snapshotter=self.name,
            info=pb.Info(
                name=info.name,
                parent=info.parent,
                kind=int(info.kind),
                labels=dict(info.labels),
            ),
            update_mask=field_mask_pb2.FieldMask(paths=list(paths)),
        )
        return _info(self._call("Update", req).info)

    def list_batches(self, *filters: str) -> Iterator[list[Info]]:
        """The List stream, one list per message, read lazily."""
        req = pb.ListSnapshotsRequest(snapshotter=self.name, filters=list(filters))
        try:
            for message in self.stub.List(req, timeout=self.timeout):
                yield [_info(i) for i in message.info]
        except grpc.RpcError as exc:
            raise _raise(exc) from None

    def list(self, *filters: str) -> list[Info]:
        return [info for batch in self.list_batches(*filters) for info in batch]

    def usage(self, key: str) -> Usage:
        res = self._call("Usage", pb.UsageRequest(snapshotter=self.name, key=key))
        return Usage(res.size, res.inodes)

    def cleanup(self) -> None:
        self._call("Cleanup", pb.CleanupRequest(snapshotter=self.name))


def _mount(m: object) -> Mount:
    return Mount(m.type, m.source, m.target, tuple(m.options))


def _info(i: pb.Info) -> Info:
    return Info(
        name=i.name,
        parent=i.parent,
        kind=Kind(i.kind),
        created=i.created_at.seconds * 1_000_000_000 + i.created_at.nanos,
        updated=i.updated_at.seconds * 1_000_000_000 + i.updated_at.nanos,
        labels=dict(i.labels),
    )


class InProcessSnapshotd:
    """The daemon (database, snapshotters, gRPC server) running inside this process.

    *drivers* maps snapshotter names to driver factories (driver root -> Driver)."""

    def __init__(
        self,
        drivers: Mapping[str, Callable[[Path], Driver]],
        *,
        base: Path | None = None,
        pauses: Mapping[str, float] | None = None,
    ) -> None:
        from daemon.main import Daemon
        from daemon.service import Server

        self.base = base or short_tempdir()
        self.root = self.base / "root"
        self.socket = self.base / "snapshotd.sock"
        self.daemon = Daemon(self.root, drivers, pauses=pauses)
        self.server = Server(self.daemon.snapshotters, {self.socket: None}).start()
        self._closed = False

    def client(self, name: str) -> SnapshotClient:
        return SnapshotClient(self.socket, name)

    def close(self) -> None:
        """Stop serving and close the daemon. Idempotent (containerd's CloseTwice)."""
        if self._closed:
            return
        self._closed = True
        self.server.stop(grace=1)
        self.daemon.close()


class SnapshotdProcess:
    """``polyshim-snapshotd`` as a subprocess: start, SIGTERM, SIGKILL, restart.

    Its stderr goes to ``log_path``; :meth:`log_tail` shows it on failures."""

    def __init__(
        self,
        base: Path,
        snapshotters: str,
        *,
        extra_args: tuple[str, ...] = (),
        env: Mapping[str, str] | None = None,
        log_level: str = "debug",
    ) -> None:
        self.base = Path(base)
        self.root = self.base / "root"
        self.socket = self.base / "snapshotd.sock"
        self.log_path = self.base / "snapshotd.log"
        self.snapshotters = snapshotters
        self.extra_args = tuple(extra_args)
        self.env = dict(env or {})
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "daemon.main",
            "--root",
            str(self.root),
            "--socket",
            str(self.socket),
            "--snapshotters",
            self.snapshotters,
            "--log-level",
            self.log_level,
            *self.extra_args,
        ]

    def start(self, env: Mapping[str, str] | None = None, timeout: float = 30) -> SnapshotdProcess:
        environ = dict(os.environ)
        environ.update(self.env)
        environ.update(env or {})
        environ["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(REPO), environ.get("PYTHONPATH")])
        )
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environ,
                cwd=REPO,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self._serving():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"polyshim-snapshotd exited with {self.proc.returncode}\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"polyshim-snapshotd not serving after {timeout}s\n{self.log_tail()}"
                )
            time.sleep(0.02)
        return self

    def _serving(self) -> bool:
        if not self.socket.is_socket():
            return False
        channel = _channel(self.socket)
        try:
            grpc.channel_ready_future(channel).result(timeout=0.5)
            return True
        except grpc.FutureTimeoutError:
            return False
        finally:
            channel.close()

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind, as a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM and wait; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        return self.proc.returncode

    def client(self, name: str) -> SnapshotClient:
        return SnapshotClient(self.socket, name)

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except FileNotFoundError:
            return "(no log)"
        return f"--- last {len(text)} lines of {self.log_path} ---\n" + "\n".join(text)

    def __enter__(self) -> SnapshotdProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _channel(socket: Path) -> grpc.Channel:
    """A channel with connections of its own. grpc shares them between a process's channels
    by default, so after a daemon restart a new channel could take over the dead daemon's
    connection, still marked ready: `_serving` answered yes before the new daemon listened."""
    return grpc.insecure_channel(f"unix:{socket}", options=[("grpc.use_local_subchannel_pool", 1)])


def remove_tree(path: Path) -> None:
    """Unmount whatever is below *path* (lazily), then delete it."""
    from shim_framework.mounts import unmount_all

    with contextlib.suppress(Exception):
        unmount_all(path)
    shutil.rmtree(path, ignore_errors=True)
