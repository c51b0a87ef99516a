"""A warm template that forks shim processes with everything already imported.

Why: containerd runs the shim binary for every container (`start`, then
`delete`) and `start` leaves a server behind; Python pays for its imports in
each of those processes — protobuf alone is ~40 ms, our modules and attrs
classes as much again — while containerd waits for the container. A fork of
a process that has paid already costs a few milliseconds.

How: the first `start` forks its server itself (as without a template) and
also leaves a template behind: a daemon that imports the server's modules,
freezes the garbage collector (so forked children share its pages instead
of touching them), and listens on a socket next to the shims' sockets, named
after this installation. It takes two kinds of request:

- `server`, from a `start` running in Python: its command line, environment,
  working directory and the listening socket it bound (SCM_RIGHTS). The
  template forks twice, so the server is nobody's child but init's, exactly
  like a server `start` forked, and answers with its pid.
- `run`, from the native launcher (launcher.c): the same three, plus the
  launcher's stdin, stdout and stderr. The template answers `+`, forks, and
  the child runs the shim binary's `main` on those descriptors and reports
  the exit status as `<status>\n`; a `start` that needed a new server then
  goes on as that server (the template's child still, reaped by it). No
  answer at all means nothing ran: the launcher runs the action in a new
  interpreter instead.

The template exits after IDLE seconds without a request, or soon after the
code it imported changes on disk (it checks a fingerprint of the framework,
the backends and the interpreter after CHECK_EVERY idle seconds, or
CHECK_BUSY seconds when requests keep coming), so an upgraded polyshim gets
processes of the new code from then on.

Resource handling: the template owns its listening socket and removes it
before it stops accepting; each request's fds are closed in the template
once the child has its copies. It runs no threads, so forking it is safe.
"""

from __future__ import annotations

import _socket
import gc
import hashlib
import os
import sys
import time

from shim_framework.bootstrap import detach_stdio

TYPE_CHECKING = False  # `import typing` would cost the start path ~15 ms
if TYPE_CHECKING:
    import socket

SOCKET_DIR = "/run/containerd/s"
IDLE = 600.0  # seconds without a request before the template exits
CHECK_EVERY = 1.0  # seconds between looks at whether the code changed, when idle
CHECK_BUSY = 30.0  # ... and at most this long apart when requests keep coming
REQUEST_MAX = 1 << 20
CONNECT_TIMEOUT = 2.0
SERVER, RUN = "server", "run"  # the two kinds of request


def _fingerprint() -> str:
    """Changes whenever the framework, polyshim's backends or the interpreter change, or a
    distribution's entry points may have (a new backend: registry.py)."""
    from shim_framework import registry  # the warm-up imports it anyway

    digest = hashlib.sha256(sys.executable.encode())
    digest.update(registry.distributions_stamp().encode())
    for top in (_package_dir(), os.path.join(os.path.dirname(_package_dir()), "backends")):
        for directory, dirs, files in os.walk(top):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                if name.endswith(".py"):
                    st = os.stat(os.path.join(directory, name))
                    digest.update(f"{directory}/{name}:{st.st_mtime_ns}:{st.st_size}".encode())
    return digest.hexdigest()[:24]


def _package_dir() -> str:
    return os.path.dirname(os.path.abspath(__file__))


def socket_path(socket_dir: str = SOCKET_DIR) -> str:
    """This installation's template socket: one per interpreter and package location, so
    the native launcher can be built knowing it, and two installations never share one."""
    install = hashlib.sha256(f"{sys.executable}\0{_package_dir()}".encode()).hexdigest()[:24]
    return os.path.join(socket_dir, f"polyshim-template-{install}")


def request_server(listener: _socket.socket, argv: list[str], socket_dir: str) -> int | None:
    """Ask a running template to fork the server for *listener*; its pid, or None.

    On the start path: plain `_socket`, as in bootstrap."""
    conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    conn.settimeout(CONNECT_TIMEOUT)
    try:
        conn.connect(socket_path(socket_dir))
        request = encode_request(SERVER, argv, dict(os.environ), os.getcwd())
        rights = listener.fileno().to_bytes(4, sys.byteorder)  # one int fd, SCM_RIGHTS
        conn.sendmsg([request], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])
        conn.shutdown(_socket.SHUT_WR)
        answer = conn.recv(64)
        return int(answer) if answer.strip().isdigit() else None
    except OSError:
        return None
    finally:
        conn.close()


def encode_request(kind: str, argv: list[str], env: dict[str, str], cwd: str) -> bytes:
    """kind, cwd, argc, argv..., KEY=VALUE...: NUL-separated (no NUL can occur in any of
    them). launcher.c writes the same layout."""
    parts = [kind, cwd, str(len(argv)), *argv, *(f"{k}={v}" for k, v in env.items())]
    return "\0".join(parts).encode("utf-8", "surrogateescape")


def decode_request(data: bytes) -> tuple[str, list[str], dict[str, str], str]:
    parts = data.decode("utf-8", "surrogateescape").split("\0")
    kind, cwd, argc = parts[0], parts[1], int(parts[2])
    if kind not in (SERVER, RUN) or not 0 <= argc <= len(parts) - 3:
        raise ValueError(f"not a template request: kind {kind!r}, argc {argc}")
    argv = parts[3 : 3 + argc]
    env = dict(item.split("=", 1) for item in parts[3 + argc :] if "=" in item)
    return kind, argv, env, cwd


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

    detach_stdio()
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # nothing of the `start` that spawned us
    os.chdir("/")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = socket_path(socket_dir)
    born_as = _fingerprint()
    try:
        _bind_exclusively(listener, path)
    except OSError:
        os._exit(0)  # another template won the race: it serves
    try:
        from shim_framework import _platform, shim_main, shim_server  # pay once

        _platform.set_cmdline(["polyshim-template", path])
        _warm_up()
        gc.freeze()
        listener.settimeout(CHECK_EVERY)
        last_request = checked = time.monotonic()
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                if time.monotonic() - last_request >= IDLE:
                    break
                idle = True
            else:
                with conn:
                    _serve_request(conn, listener, shim_server, shim_main)
                last_request = time.monotonic()
                idle = False
            _reap_workers()
            # Look at the code when idle: right after a request its worker and server need
            # the CPU. A steady stream of requests still gets a look every CHECK_BUSY.
            since = time.monotonic() - checked
            if since >= (CHECK_EVERY if idle else CHECK_BUSY):
                if _fingerprint() != born_as:
                    break
                checked = time.monotonic()
    finally:
        try:
            os.unlink(path)  # before the listener closes: nobody can have re-bound it yet
        except OSError:
            pass
        os._exit(0)


def _warm_up() -> None:
    """Import what a server needs by its first Create and Start, backends included (the
    framework's lazy imports too: each would cost every new server its import time)."""
    from cgroupspy import controllers, nodes  # noqa: F401 - cgroups' v1 files

    from shim_framework import cgroups, mounts, oom  # noqa: F401
    from shim_framework.api.runc.options import oci_pb2  # noqa: F401 - runtime options
    from shim_framework.api.runtimeoptions.v1 import api_pb2  # noqa: F401
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
    os.makedirs(os.path.dirname(path), mode=0o711, exist_ok=True)
    old_umask = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(old_umask)
    listener.listen(64)


def _serve_request(
    conn: socket.socket, template: socket.socket, shim_server: object, shim_main: object
) -> None:
    import socket

    conn.settimeout(CONNECT_TIMEOUT)
    fds: list[int] = []
    try:
        data, fds, _, _ = socket.recv_fds(conn, REQUEST_MAX, 3)
        while chunk := conn.recv(REQUEST_MAX):
            data += chunk
        kind, argv, env, cwd = decode_request(data)
        wanted_fds = 1 if kind == SERVER else 3
        if len(fds) != wanted_fds:
            raise ValueError(f"{kind} request with {len(fds)} fds, not {wanted_fds}")
        if kind == RUN:
            conn.sendall(b"+")  # from here on the launcher must not run the action itself
    except (OSError, ValueError, UnicodeDecodeError):
        for fd in fds:
            os.close(fd)
        return  # closing without an answer: the requester does the work itself
    if kind == RUN:
        _fork_worker(argv, env, cwd, fds, conn, template, shim_main, shim_server)
    else:
        _fork_server(argv, env, cwd, fds[0], conn, template, shim_server)


def _fork_worker(
    argv: list[str],
    env: dict[str, str],
    cwd: str,
    fds: list[int],
    conn: socket.socket,
    template: socket.socket,
    shim_main: object,
    shim_server: object,
) -> None:
    """One fork, since the launcher waits: the worker (and the server it may become)
    stays our child until it exits (collected by _reap_workers)."""
    if os.fork() == 0:
        try:
            template.close()
            _run_main(argv, env, cwd, fds, conn, shim_main, shim_server)
        finally:
            os._exit(1)
    for fd in fds:
        os.close(fd)


def _reap_workers() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _fork_server(
    argv: list[str],
    env: dict[str, str],
    cwd: str,
    listener_fd: int,
    conn: socket.socket,
    template: socket.socket,
    shim_server: object,
) -> None:
    """Fork twice, so the long-lived server is init's child, not ours; answer its pid."""
    read_end, write_end = os.pipe()
    first = os.fork()
    if first == 0:
        try:
            template.close()
            os.close(read_end)
            server = os.fork()
            if server != 0:
                os.write(write_end, str(server).encode())
            else:
                os.close(write_end)
                _enter_request(argv, env, cwd)
                _run_server(argv, listener_fd, conn, shim_server)
        finally:
            os._exit(0)
    os.close(write_end)
    os.close(listener_fd)
    pid = os.read(read_end, 32)
    os.close(read_end)
    os.waitpid(first, 0)
    try:
        conn.sendall(pid or b"0")
    except OSError:
        pass


def _enter_request(argv: list[str], env: dict[str, str], cwd: str) -> None:
    """Take on the requester's working directory, environment and command line."""
    os.setsid()
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.argv[1:] = argv


def _run_server(
    argv: list[str], listener_fd: int, conn: socket.socket, shim_server: object
) -> None:
    import socket

    from shim_framework.bootstrap import close_fds_except, parse_flags, show_as_shim

    conn.close()
    close_fds_except(listener_fd)  # nothing of the requester's but the listener
    show_as_shim(argv)
    shim_server.serve(parse_flags(argv), socket.socket(fileno=listener_fd))  # type: ignore[attr-defined]


def _run_main(
    argv: list[str],
    env: dict[str, str],
    cwd: str,
    fds: list[int],
    conn: socket.socket,
    shim_main: object,
    shim_server: object,
) -> None:
    """Be the shim binary on the launcher's stdio; report its exit status on *conn*.

    A `start` that needs a new server hands its listener over instead of forking: once
    the status is reported this process is that server (one fork per shim, not two)."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    status = 1
    listeners: list[_socket.socket] = []
    try:
        from shim_framework import _platform

        _platform.set_cmdline(["polyshim-template-worker", *argv[-1:]])
        _enter_request(argv, env, cwd)
        status = shim_main.main(argv, hand_over=listeners.append)  # type: ignore[attr-defined]
    except BaseException as e:  # the launcher's stderr is containerd's error message
        print(f"containerd-shim-polyshim-v2: {type(e).__name__}: {e}", file=sys.stderr)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        detach_stdio()  # containerd reads the pipes until every holder closes them
        conn.sendall(f"{status}\n".encode())
        if status == 0 and listeners:
            _run_server(argv, listeners[0].detach(), conn, shim_server)
        os._exit(0)
