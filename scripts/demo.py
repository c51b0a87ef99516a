"""Smoke demo of what polyshim has today.

Brings up a private containerd 1.6 (own root, state and sockets under /tmp),
starts containerd's own `containerd-shim-runc-v2` through its `start`
protocol, and drives a busybox container with polyshim's ttrpc client and
wire types; then forwards an event to containerd with polyshim's publisher.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shim_framework.api.events import task_pb2 as events_pb2
from shim_framework.api.task.v2 import shim_pb2 as task
from shim_framework.errors import PolyshimError
from shim_framework.events import Publisher
from shim_framework.ttrpc import Client, Stub
from tests.harness import PrivateContainerd, get_install, make_bundle
from tests.harness.events import EventWatcher


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="polyshim-demo-"))
    with PrivateContainerd(get_install("1.6")) as ctrd:
        print(f"containerd 1.6 running privately under {ctrd.dir}")
        bundle = make_bundle(work / "bundle", ["sh", "-c", "echo hello from busybox; exit 3"])
        os.mkfifo(bundle / "log")
        log_fd = os.open(bundle / "log", os.O_RDWR | os.O_NONBLOCK)
        for name in ("stdout", "stderr"):
            os.mkfifo(work / name)
        out_fd = os.open(work / "stdout", os.O_RDONLY | os.O_NONBLOCK)
        err_fd = os.open(work / "stderr", os.O_RDONLY | os.O_NONBLOCK)
        env = ctrd.environ() | {"TTRPC_ADDRESS": str(ctrd.ttrpc_address)}
        argv = [str(ctrd.install.shim_runc_v2), "-namespace", ctrd.namespace,
                "-address", str(ctrd.address), "-publish-binary",
                str(ctrd.install.containerd), "-id", "demo", "start"]  # fmt: skip
        address = subprocess.run(
            argv, cwd=bundle, env=env, check=True, capture_output=True, text=True
        ).stdout.strip()
        print(f"containerd-shim-runc-v2 listening at {address}")
        with EventWatcher(ctrd) as watcher, Client.connect(address) as client:
            shim = Stub(client, task.DESCRIPTOR.services_by_name["Task"])
            pid = shim.Create(
                task.CreateTaskRequest(
                    id="demo",
                    bundle=str(bundle),
                    stdout=str(work / "stdout"),
                    stderr=str(work / "stderr"),
                )
            ).pid
            shim.Start(task.StartRequest(id="demo"))
            status = shim.Wait(task.WaitRequest(id="demo")).exit_status
            shim.Delete(task.DeleteRequest(id="demo"))
            print(f"container pid {pid} exited with status {status}")
            print(f"its stdout: {os.read(out_fd, 4096).decode().strip()!r}")
            watcher.wait_for(lambda s: s.topic == "/tasks/delete")
            print("events containerd saw:", ", ".join(watcher.topics_for("demo")))
            with contextlib.suppress(PolyshimError):  # it may exit before replying
                shim.Shutdown(task.ShutdownRequest(id="demo"), timeout=3)
            publisher = Publisher(str(ctrd.ttrpc_address), ctrd.namespace)
            publisher.publish(events_pb2.TaskOOM(container_id="demo"))
            publisher.close()
            seen = watcher.wait_for(lambda s: s.topic == "/tasks/oom")
            print(f"polyshim's publisher forwarded {seen.topic} for {seen.event.container_id}")
        os.close(out_fd)
        os.close(err_fd)
        os.close(log_fd)
    return 0 if status == 3 else 1


if __name__ == "__main__":
    sys.exit(main())
