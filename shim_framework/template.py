"""A warm template that forks shim servers with everything already imported.

Why: a shim server starts for every container (or pod), and Python pays for
its imports each time — protobuf alone is ~40 ms, our modules and attrs
classes as much again — while containerd waits for the container. A fork of
a process that has paid already costs a few milliseconds.

How: the first `start` forks its server itself (as without a template) and
also leaves a template behind: a daemon that imports the server's modules,
freezes the garbage collector (so forked children share its pages instead
of touching them), and listens on a socket next to the shims' sockets. Later
`start`s send it their command line, environment, working directory and the
listening socket they bound (SCM_RIGHTS); the template forks twice, so the
server is nobody's child but init's, exactly like a server `start` forked,
and answers with its pid. The template exits after IDLE seconds without a
request; its socket name carries a fingerprint of the code, so an upgraded
polyshim never gets a server from an old template.

Resource handling: the template owns its listening socket and removes it on
exit; each request's fds are closed in the template once the server has its
copies. It runs no threads, so forking it is safe.
"""

from __future__ import annotations

import _socket
import gc
import hashlib
import os
import sys

TYPE_CHECKING = False  # `import typing` would cost the start path ~15 ms
if TYPE_CHECKING:
    import socket

SOCKET_DIR = "/run/containerd/s"
IDLE = 600.0  # seconds without a request before the template exits
REQUEST_MAX = 1 << 20
CONNECT_TIMEOUT = 2.0


def _fingerprint() -> str:
    """Changes whenever the framework, polyshim's backends or the interpreter change."""
    package = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256(sys.executable.encode())
    for top in (package, os.path.join(os.path.dirname(package), "backends")):
        for directory, dirs, files in os.walk(top):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                if name.endswith(".py"):
                    st = os.stat(os.path.join(directory, name))
                    digest.update(f"{directory}/{name}:{st.st_mtime_ns}:{st.st_size}".encode())
    return digest.hexdigest()[:24]


def socket_path(socket_dir: str = SOCKET_DIR) -> str:
    return os.path.join(socket_dir, f"polyshim-template-{_fingerprint()}")


def request_server(listener: _socket.socket, argv: list[str], socket_dir: str) -> int | None:
    """Ask a running template to fork the server for *listener*; its pid, or None.

    On the start path: plain `_socket`, as in bootstrap."""
    conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    conn.settimeout(CONNECT_TIMEOUT)
    try:
        conn.connect(socket_path(socket_dir))
        request = encode_request(argv, dict(os.environ), os.getcwd())
        rights = listener.fileno().to_bytes(4, sys.byteorder)  # one int fd, SCM_RIGHTS
        conn.sendmsg([request], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])
        conn.shutdown(_socket.SHUT_WR)
        answer = conn.recv(64)
        return int(answer) if answer.strip().isdigit() else None
    except OSError:
        return None
    finally:
        conn.close()


def encode_request(argv: list[str], env: dict[str, str], cwd: str) -> bytes:
    """cwd, argc, argv..., KEY=VALUE...: NUL-separated (no NUL can occur in any of them)."""
    parts = [cwd, str(len(argv)), *argv, *(f"{k}={v}" for k, v in env.items())]
    return "\0".join(parts).encode("utf-8", "surrogateescape")


def decode_request(data: bytes) -> tuple[list[str], dict[str, str], str]:
    parts = data.decode("utf-8", "surrogateescape").split("\0")
    cwd, argc = parts[0], int(parts[1])
    argv = parts[2 : 2 + argc]
    env = dict(item.split("=", 1) for item in parts[2 + argc :] if "=" in item)
    return argv, env, cwd


def spawn(socket_dir: str) -> None:
    """Leave a template daemon behind for the next `start` (returns at once)."""
    if os.fork() != 0:
        return
    try:  # the first child: detach, and let the grandchild be the template
        os.setsid()
        if os.fork() == 0:
            _become_template(socket_dir)
    finally:
        os._exit(0)


def _become_template(socket_dir: str) -> None:
    import socket

    _detach_stdio()
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # nothing of the `start` that spawned us
    os.chdir("/")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = socket_path(socket_dir)
    try:
        _bind_exclusively(listener, path)
    except OSError:
        os._exit(0)  # another template won the race: it serves
    try:
        from shim_framework import _platform, shim_server  # the point of it all: pay once

        _platform.set_cmdline([sys.executable, sys.argv[0], "template", path])
        _warm_up()
        gc.freeze()
        listener.settimeout(IDLE)
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                break
            with conn:
                _fork_server(conn, listener, shim_server)
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
        os._exit(0)


def _warm_up() -> None:
    """Import what a server needs by its first Create and Start, backends included."""
    from shim_framework import cgroups, mounts, oom  # noqa: F401
    from shim_framework.registry import Registry

    registry = Registry()
    for name in registry.names():
        try:
            registry.load(name)
        except Exception:  # a broken backend fails its own Creates, not the template
            pass


def _bind_exclusively(listener: socket.socket, path: str) -> None:
    """Bind *path* unless a live template already listens there."""
    probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        probe.connect(path)
        raise OSError("a template is already serving")
    except (FileNotFoundError, ConnectionRefusedError):
        pass
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    old_umask = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(old_umask)
    listener.listen(64)


def _fork_server(conn: socket.socket, template: socket.socket, shim_server: object) -> None:
    conn.settimeout(CONNECT_TIMEOUT)
    try:
        import socket

        data, fds, _, _ = socket.recv_fds(conn, REQUEST_MAX, 1)
        while chunk := conn.recv(REQUEST_MAX):
            data += chunk
        request = decode_request(data)
    except (OSError, ValueError, UnicodeDecodeError):
        return
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        return
    read_end, write_end = os.pipe()
    first = os.fork()
    if first == 0:
        os.close(read_end)
        _start_server(request, fds[0], template, conn, write_end, shim_server)
    os.close(write_end)
    os.close(fds[0])
    pid = os.read(read_end, 32)
    os.close(read_end)
    os.waitpid(first, 0)
    try:
        conn.sendall(pid or b"0")
    except OSError:
        pass


def _start_server(
    request: tuple[list[str], dict[str, str], str],
    listener_fd: int,
    template: socket.socket,
    conn: socket.socket,
    report_fd: int,
    shim_server: object,
) -> None:
    """In the first child: fork the server, report its pid, exit (so init adopts it)."""
    try:
        template.close()
        conn.close()
        pid = os.fork()
        if pid != 0:
            os.write(report_fd, str(pid).encode())
            os._exit(0)
        os.close(report_fd)
        os.setsid()
        argv, env, cwd = request
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        from shim_framework.bootstrap import parse_flags

        flags = parse_flags(argv)
        from shim_framework import _platform

        # Look like the server `start` would have forked, not like our template.
        _platform.set_cmdline([sys.executable, sys.argv[0], *argv])
        import socket

        listener = socket.socket(fileno=listener_fd)
        shim_server.serve(flags, listener)  # type: ignore[attr-defined]
    finally:
        os._exit(1)


def _detach_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
