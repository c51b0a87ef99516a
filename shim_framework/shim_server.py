"""The long-running shim server: what `start` forks for a task or a pod.

Resource handling: this process is a child subreaper (so container processes
re-parented by runc are ours to reap), owns the listening socket and removes
it on exit, and owns the bundle's `log` FIFO as its stderr. The task
service, reaper, event publisher and ttrpc server are created and stopped
here, in that order of dependence.

It exits after containerd's `Shutdown` when no task is left, on SIGTERM or
SIGINT, or when no task arrived within IDLE_EXIT seconds of its start
(containerd leaves a server behind when it cannot use what `start` printed).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading

from shim_framework import _platform, logfmt
from shim_framework.api.task.v2 import shim_pb2
from shim_framework.bootstrap import RUNTIME, Flags
from shim_framework.events import Publisher
from shim_framework.reaper import Reaper
from shim_framework.task_service import TaskService
from shim_framework.ttrpc.server import Server

log = logging.getLogger("polyshim.shim")

TASK_SERVICE = shim_pb2.DESCRIPTOR.services_by_name["Task"]
TASK_V3 = "containerd.task.v3.Task"  # same methods and messages as v2, another package name
IDLE_EXIT = 60.0
SHUTDOWN_GRACE = 1.0  # let a Shutdown reply leave before connections close


def serve(flags: Flags, listener: socket.socket) -> None:
    """Run the shim server until it is told to stop; then exit the process."""
    _platform.set_child_subreaper()
    _open_log(flags)
    stop = threading.Event()
    reaper = Reaper()
    ttrpc_address = os.environ.get("TTRPC_ADDRESS", flags.address + ".ttrpc")
    publisher = Publisher(ttrpc_address.removeprefix("unix://"), flags.namespace)
    service = TaskService(
        namespace=flags.namespace,
        publisher=publisher,
        reaper=reaper,
        on_shutdown=stop.set,
        grpc_address=flags.address,
    )
    reaper.on_exit = service.on_exit
    reaper.on_signal = lambda signum: stop.set()
    reaper.start()

    server = Server()
    server.register_service(service, TASK_SERVICE)
    server.register_service(service, TASK_SERVICE, name=TASK_V3)
    accept = threading.Thread(target=server.serve, args=(listener,), name="ttrpc-accept")
    accept.daemon = True
    accept.start()
    log.info("shim serving at %s (pid %d)", listener.getsockname(), os.getpid())

    stopped = stop.wait(IDLE_EXIT)
    if not stopped and service.task_count() == 0 and server.connection_count() == 0:
        log.warning("no task arrived within %.0fs; exiting", IDLE_EXIT)
    else:
        stop.wait()

    log.info("shim shutting down")
    path = listener.getsockname()
    server.shutdown(grace=SHUTDOWN_GRACE)
    publisher.close(timeout=5)
    reaper.stop()
    service.close()
    try:
        os.unlink(path)
    except OSError:
        pass
    logging.shutdown()
    os._exit(0)


def _open_log(flags: Flags) -> None:
    """The bundle's `log` FIFO becomes our stderr and the logging target.

    containerd holds it open read-write, so opening it cannot block."""
    fields = {"runtime": RUNTIME, "namespace": flags.namespace, "id": flags.id}
    try:
        fd = os.open("log", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    os.dup2(fd, 2, inheritable=False)
    sys.stderr = open(2, "w", closefd=False, buffering=1)  # noqa: SIM115 - lives as long as we do
    logfmt.setup(fd, debug=flags.debug, fields=fields)
