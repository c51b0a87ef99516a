"""How containerd runs the shim binary: flags, and the `start` and `delete` actions.

containerd runs `containerd-shim-polyshim-v2` with Go-style flags
(`-namespace NS -address A -publish-binary B -id ID [-bundle B] [-debug]`)
and an action word:

- `start` (cwd = the bundle): make sure a shim server listens for this task,
  print its `unix://` address and exit. Tasks of one pod (same
  `io.kubernetes.cri.sandbox-id`, or a group label) share one server: the
  socket path is derived from containerd's address, the namespace and the
  group, so the second `start` finds the first server and prints its address.
  Otherwise `start` binds and listens (containerd dials once, at once), forks
  the server, and returns; the server holds none of `start`'s stdio, which
  containerd reads until every holder closes it.
- `delete` (after every task deletion, and after a shim died): clean up what
  the task left, print a `DeleteResponse`, within containerd's 5 s.

This module is on the start path of every container, so it imports only
what `start` needs; the server's modules load in the forked child.
"""

from __future__ import annotations

import _socket  # the C module: `import socket` costs every start ~10 ms of wrappers
import os
import sys
import time

TYPE_CHECKING = False  # `import typing` would cost the start path ~15 ms
if TYPE_CHECKING:
    from collections.abc import Callable

RUNTIME = "io.containerd.polyshim.v2"
SHIM_BINARY = "containerd-shim-polyshim-v2"
SOCKET_DIR = "/run/containerd/s"
SUN_PATH_MAX = 106  # what the Go shim library allows; sun_path is 108 bytes with the NUL
GROUP_ANNOTATIONS = (
    "io.polyshim.group",
    "io.containerd.runc.v2.group",
    "io.kubernetes.cri.sandbox-id",
)


class Flags:
    """The command line. A plain class: attrs costs the start path ~25 ms of imports."""

    __slots__ = ("action", "address", "bundle", "debug", "id", "info", "namespace",
                 "publish_binary", "socket", "version")  # fmt: skip

    def __init__(
        self,
        namespace: str = "",
        address: str = "",  # containerd's gRPC socket path
        publish_binary: str = "",
        id: str = "",
        bundle: str = "",
        debug: bool = False,
        socket: str = "",
        version: bool = False,
        info: bool = False,
        action: str = "",
    ) -> None:
        self.namespace, self.address, self.publish_binary = namespace, address, publish_binary
        self.id, self.bundle, self.debug, self.socket = id, bundle, debug, socket
        self.version, self.info, self.action = version, info, action

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Flags) and all(
            getattr(self, k) == getattr(other, k) for k in self.__slots__
        )

    def __repr__(self) -> str:
        return "Flags(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"


_VALUE_FLAGS = {
    "namespace": "namespace",
    "address": "address",
    "publish-binary": "publish_binary",
    "id": "id",
    "bundle": "bundle",
    "socket": "socket",
    "debug-socket": None,  # 2.x defines it; we have nothing to serve there
}
_BOOL_FLAGS = {"debug": "debug", "v": "version", "version": "version", "info": "info"}


class UsageError(Exception):
    pass


def parse_flags(argv: list[str]) -> Flags:
    """Go `flag` rules: -name value, -name=value, --name; the first non-flag is the action."""
    values: dict[str, object] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":  # end of flags
            values["action"] = argv[i + 1] if i + 1 < len(argv) else ""
            break
        if not arg.startswith("-") or arg == "-":
            values["action"] = arg
            break
        name, eq, inline = arg.lstrip("-").partition("=")
        if name in _BOOL_FLAGS:
            values[_BOOL_FLAGS[name]] = inline.lower() not in ("false", "0") if eq else True
        elif name in _VALUE_FLAGS:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise UsageError(f"flag needs an argument: -{name}")
                inline = argv[i]
            if _VALUE_FLAGS[name]:
                values[_VALUE_FLAGS[name]] = inline
        else:
            raise UsageError(f"flag provided but not defined: -{name}")
        i += 1
    return Flags(**values)  # type: ignore[arg-type]


# -- start --------------------------------------------------------------------------------


def group_id(bundle: str, task_id: str) -> str:
    """The shim group of this task: a pod's sandbox id, a group label, else the task itself."""
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            raw = f.read()
    except OSError:
        return task_id
    for key in GROUP_ANNOTATIONS:
        value = _plain_string_field(raw, key)
        if value is _UNSURE:
            return _group_id_from_json(raw, task_id)
        if value:
            return value  # type: ignore[return-value]
    return task_id


_UNSURE = object()


def _plain_string_field(raw: bytes, key: str) -> str | object | None:
    """The value of `"key": "value"` when *key* occurs once and the value has no escapes;
    None when *key* does not occur; _UNSURE otherwise. Every pod container's `start`
    reads its sandbox id this way, without paying ~15 ms for `import json`."""
    needle = b'"' + key.encode() + b'"'
    at = raw.find(needle)
    if at < 0:
        return None
    if raw.find(needle, at + 1) >= 0:
        return _UNSURE
    rest = raw[at + len(needle) :].lstrip()
    if not rest.startswith(b":"):
        return _UNSURE
    rest = rest[1:].lstrip()
    end = rest.find(b'"', 1)
    if not rest.startswith(b'"') or end < 0 or b"\\" in rest[:end]:
        return _UNSURE
    try:
        return rest[1:end].decode()
    except UnicodeDecodeError:
        return _UNSURE


def _group_id_from_json(raw: bytes, task_id: str) -> str:
    import json

    try:
        annotations = json.loads(raw).get("annotations") or {}
    except (ValueError, AttributeError, RecursionError):
        return task_id  # Create reports what is wrong with config.json
    for key in GROUP_ANNOTATIONS:
        if value := annotations.get(key):
            return str(value)
    return task_id


def socket_path(address: str, namespace: str, group: str, socket_dir: str = SOCKET_DIR) -> str:
    """Where the group's server listens. Like the Go shim library's scheme, hashed from
    containerd's address (two daemons on one host stay apart), namespace and group; with
    "polyshim" in the hash so we never meet a runc shim of the same pod at its socket."""
    import hashlib

    digest = hashlib.sha256("/".join((address, namespace, "polyshim", group)).encode())
    path = os.path.join(socket_dir, digest.hexdigest())
    if len(path) > SUN_PATH_MAX:
        raise UsageError(f"socket path {path} is longer than {SUN_PATH_MAX} bytes")
    return path


def start(
    flags: Flags,
    argv: list[str],
    stdin: bytes,
    serve: object,
    hand_over: Callable[[_socket.socket], None] | None = None,
) -> str:
    """The `start` action: return the address to print; fork the server when needed.

    *serve* is called in the forked child with (flags, listener) and must not return.
    *hand_over*: this process is a fork of the template (see template.py) and becomes
    the server itself once `start` is reported: it takes the listener instead of a fork.
    """
    bundle = os.getcwd()
    socket_dir = _bootstrap_socket_dir(stdin, flags) or SOCKET_DIR
    path = socket_path(flags.address, flags.namespace, group_id(bundle, flags.id), socket_dir)
    address = "unix://" + path
    if not _serving(path):
        listener = _listen(path)
        if hand_over is not None:
            hand_over(listener)
        else:
            try:
                _launch_server(flags, argv, listener, socket_dir, serve)
            finally:
                listener.close()
    with open(os.path.join(bundle, "address"), "w") as f:  # 1.6/1.7 read it after a restart
        f.write(address)
    return address


def _launch_server(
    flags: Flags, argv: list[str], listener: _socket.socket, socket_dir: str, serve: object
) -> None:
    """A warm template forks the server when one runs; otherwise fork it from here, and
    leave a template behind for the next container (see template.py)."""
    from shim_framework import template

    if template.request_server(listener, argv, socket_dir) is not None:
        return
    pid = os.fork()
    if pid == 0:
        try:
            _become_daemon(keep=listener.fileno())
            show_as_shim(argv)
            import socket

            serve(flags, socket.socket(fileno=listener.detach()))  # type: ignore[operator]
        finally:
            os._exit(1)
    listener.close()  # the server has it; the template must not inherit it
    template.spawn(socket_dir)


def show_as_shim(argv: list[str]) -> None:
    """Show a server in `ps` as the shim binary with its flags, however it was started."""
    from shim_framework import _platform

    _platform.set_cmdline([SHIM_BINARY, *argv])


def unix_socket() -> _socket.socket:
    return _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)


def _serving(path: str) -> bool:
    probe = unix_socket()
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _listen(path: str) -> _socket.socket:
    os.makedirs(os.path.dirname(path), mode=0o711, exist_ok=True)
    try:
        os.unlink(path)  # a stale socket: nobody accepted on it
    except FileNotFoundError:
        pass
    listener = unix_socket()
    old_umask = os.umask(0o177)  # the socket is born 0600
    try:
        listener.bind(path)
    finally:
        os.umask(old_umask)
    listener.listen(128)
    return listener


def _become_daemon(keep: int) -> None:
    """A new session, /dev/null for stdio, and no descriptor but *keep* (containerd reads
    `start`'s output until every holder of its pipe closes it)."""
    os.setsid()
    close_fds_except(keep)
    detach_stdio()


def close_fds_except(keep: int) -> None:
    """Close every descriptor from 3 up but *keep*."""
    os.closerange(3, keep)
    os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))


def detach_stdio() -> None:
    """/dev/null for fds 0, 1 and 2."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def _bootstrap_socket_dir(stdin: bytes, flags: Flags) -> str | None:
    """containerd 2.3+ sends BootstrapParams on stdin; honour its socket_dir."""
    if not _first_field_is(stdin, flags.id):
        # Empty, or an options Any (field 1 is its type URL, never the task id): the
        # common case, answered without importing protobuf (~40 ms on this path).
        return None
    from google.protobuf.message import DecodeError

    from shim_framework.api.runtime.bootstrap.v1 import bootstrap_pb2

    try:
        params = bootstrap_pb2.BootstrapParams.FromString(stdin)
    except DecodeError:
        return None
    # An options Any also parses as BootstrapParams; only a matching id and namespace
    # tell the 2.3 form apart (spec 2.4.1).
    if params.instance_id != flags.id or params.namespace != flags.namespace:
        return None
    return params.socket_dir if params.HasField("socket_dir") else None


def _first_field_is(data: bytes, text: str) -> bool:
    """Does *data* start with protobuf field 1 (length-delimited) holding *text*?"""
    wanted = text.encode()
    length = len(wanted)
    header = bytearray([0x0A])  # field 1, wire type 2
    while True:  # varint of the length
        byte = length & 0x7F
        length >>= 7
        header.append(byte | (0x80 if length else 0))
        if not length:
            break
    return bool(wanted) and data.startswith(bytes(header) + wanted)


# -- the bundle's state file --------------------------------------------------------------

STATE_FILE = "polyshim.json"  # what the `delete` action needs after the shim is gone
DELETED_FILE = "polyshim.deleted"  # the shim deleted the task: holds the init's pid
KILLED_STATUS = 128 + 9  # the exit status delete reports, as containerd's runc shim does


def mark_deleted(bundle: str, pid: int) -> None:
    """The task is gone: the `delete` action then only answers (plain text, so that
    per-container process need not even import json)."""
    with open(os.path.join(bundle, DELETED_FILE), "w") as f:
        f.write(str(pid))


def _deleted_pid(bundle: str) -> int | None:
    try:
        with open(os.path.join(bundle, DELETED_FILE)) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return None


def write_state(bundle: str, state: dict) -> None:
    import json

    path = os.path.join(bundle, STATE_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(state, f)
    os.replace(path + ".tmp", path)


def read_state(bundle: str) -> dict | None:
    import json

    try:
        with open(os.path.join(bundle, STATE_FILE)) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


# -- delete --------------------------------------------------------------------------------


def delete(flags: Flags) -> bytes:
    """The `delete` action: clean up after the task and return a serialized DeleteResponse.

    containerd runs it after every task deletion, with a 5 s limit, and waits for it
    before `ctr run --rm` returns. When the shim deleted the task itself (the usual
    case) nothing is left to do, so that path imports nothing heavy, not even protobuf."""
    bundle = flags.bundle or os.getcwd()
    pid = _deleted_pid(bundle)
    if pid is None:  # the shim died before deleting the task: clean up after it
        state = read_state(bundle) or {}
        if state:
            _backend_cleanup(bundle, flags, state)
        pid = int(state.get("pid") or 0)
    rootfs = os.path.join(bundle, "rootfs")
    if _mounted_at_or_below(rootfs):
        from pathlib import Path

        from shim_framework import mounts

        mounts.unmount_all(Path(rootfs))
    return delete_response(pid, KILLED_STATUS, time.time_ns())


def _backend_cleanup(bundle: str, flags: Flags, state: dict) -> None:
    from pathlib import Path

    from shim_framework.config import from_dict
    from shim_framework.registry import Registry

    name = state.get("backend", "")
    try:
        config = from_dict(state.get("config") or {}, source=bundle)
        Registry().load(name).cleanup(
            Path(bundle), flags.id, flags.namespace, config.backend_config(name)
        )
    except Exception as e:  # clean up what we can; containerd logs our stderr
        print(f"polyshim delete: backend {name} cleanup of {flags.id}: {e}", file=sys.stderr)


def _mounted_at_or_below(path: str) -> bool:
    """A raw scan, as the launcher's: no import of `mounts` for the common "nothing there"."""
    if any(c in path for c in " \t\n\\"):
        return True  # mountinfo escapes these: the raw comparison cannot tell; unmount_all can
    try:
        with open("/proc/self/mountinfo") as f:
            return any(
                (point := line.split(" ", 5)[4]) == path or point.startswith(path + "/")
                for line in f
            )
    except OSError:
        return True  # cannot tell: let unmount_all look


def delete_response(pid: int, exit_status: int, exited_at_ns: int) -> bytes:
    """`containerd.task.v2.DeleteResponse{1 pid, 2 exit_status, 3 exited_at}`, encoded by
    hand: importing protobuf would cost this per-container process ~40 ms.
    tests/test_bootstrap.py checks the bytes against the generated class."""
    seconds, nanos = divmod(exited_at_ns, 1_000_000_000)
    stamp = _field_varint(1, seconds) + _field_varint(2, nanos)
    return (
        _field_varint(1, pid)
        + _field_varint(2, exit_status)
        + _key(3, 2) + _varint(len(stamp)) + stamp
    )  # fmt: skip


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 is two's complement on the wire
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _field_varint(field: int, value: int) -> bytes:
    return _key(field, 0) + _varint(value) if value else b""  # proto3: zero is not sent
