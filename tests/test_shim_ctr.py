"""polyshim under real containerd (1.6 and 2.1), driven the way users drive it: with ctr.

Every test here runs busybox containers through `containerd-shim-polyshim-v2`
and the runc backend, for both containerd versions.
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time
from pathlib import Path

import pytest

from tests.harness import PrivateContainerd
from tests.harness.events import EventWatcher

pytestmark = pytest.mark.integration

RUNTIME = "io.containerd.polyshim.v2"


def ctr_run(ctrd: PrivateContainerd, image: str, cid: str, *args: str, opts=(), **kw):
    return ctrd.ctr("run", "--rm", "--runtime", RUNTIME, *opts, image, cid, *args, **kw)


def run_with_tty(argv: list[str], input: bytes = b"", timeout: float = 30) -> tuple[int, bytes]:
    """Run *argv* with a pty as its terminal, as a user at a shell would; return (rc, output)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    output = b""
    deadline = time.monotonic() + timeout
    sent = False
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: every holder of the slave side is gone
                    break
                if not chunk:
                    break
                output += chunk
            if input and not sent and b"ready" in output:
                os.write(master, input)
                sent = True
            if proc.poll() is not None and not ready:
                break
        return proc.wait(timeout=max(1, deadline - time.monotonic())), output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


@pytest.mark.parametrize("code", [0, 3])
def test_output_and_exit_code_arrive(containerd: PrivateContainerd, busybox: str, code: int):
    result = ctr_run(
        containerd,
        busybox,
        f"exit{code}",
        "sh",
        "-c",
        f"echo hello polyshim; exit {code}",
        check=False,
    )
    assert result.stdout == "hello polyshim\n", result.stderr
    assert result.returncode == code


def test_killed_container_exits_137(containerd: PrivateContainerd, busybox: str):
    """`ctr run` reports 128+9 when the task is SIGKILLed from outside."""
    argv = containerd.ctr_command("run", "--rm", "--runtime", RUNTIME, busybox, "killed",
                                  "sleep", "600")  # fmt: skip
    running = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    try:
        wait_for_status(containerd, "killed", "RUNNING")
        containerd.ctr("task", "kill", "-s", "SIGKILL", "killed")
        assert running.wait(timeout=30) == 137
    finally:
        if running.poll() is None:
            running.kill()


def task_status(ctrd: PrivateContainerd, cid: str) -> str | None:
    for line in ctrd.ctr("task", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid:
            return fields[-1]
    return None


def wait_for_status(ctrd: PrivateContainerd, cid: str, status: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while (seen := task_status(ctrd, cid)) != status:
        assert time.monotonic() < deadline, f"task {cid} is {seen}, never {status}"
        time.sleep(0.05)


def test_stdin_is_piped_through(containerd: PrivateContainerd, busybox: str):
    """ctr never closes stdin at EOF, so the guest reads one line."""
    result = ctr_run(
        containerd, busybox, "stdin", "sh", "-c", "read line; echo got: $line", input="hi\n"
    )
    assert result.stdout == "got: hi\n"


def test_stderr_is_separate(containerd: PrivateContainerd, busybox: str):
    result = ctr_run(containerd, busybox, "stderr", "sh", "-c", "echo out; echo err >&2")
    assert (result.stdout, result.stderr) == ("out\n", "err\n")


def test_terminal_run(containerd: PrivateContainerd, busybox: str):
    argv = containerd.ctr_command(
        "run", "--rm", "-t", "--runtime", RUNTIME, busybox, "tty1",
        "sh", "-c", "tty; echo ready; read x; echo got-$x",
    )  # fmt: skip
    rc, output = run_with_tty(argv, input=b"word\r")
    assert rc == 0, output
    assert b"/dev/pts/" in output and b"got-word" in output


def test_missing_rootfs_is_a_clear_error(containerd: PrivateContainerd, tmp_path: Path):
    result = containerd.ctr(
        "run", "--rm", "--runtime", RUNTIME, "--rootfs", str(tmp_path / "nowhere"), "norootfs",
        "sh", check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "root filesystem" in result.stderr and "does not exist" in result.stderr
    assert "norootfs" not in containerd.ctr("task", "ls").stdout


def test_empty_rootfs_fails_naming_the_missing_program(
    containerd: PrivateContainerd, tmp_path: Path
):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = containerd.ctr(
        "run", "--rm", "--runtime", RUNTIME, "--rootfs", str(empty), "emptyroot", "sh",
        check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert '"sh"' in result.stderr and "not found" in result.stderr
    assert "emptyroot" not in containerd.ctr("task", "ls").stdout


def test_unknown_backend_is_refused(containerd: PrivateContainerd, busybox: str):
    result = ctr_run(
        containerd, busybox, "unknown", "true",
        opts=["--annotation", "io.polyshim.backend=nosuch"], check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert 'backend "nosuch": no such backend is installed' in result.stderr


def test_backend_outside_allowed_backends_is_refused(
    containerd: PrivateContainerd, busybox: str, tmp_path: Path
):
    runtime_config = tmp_path / "runtime.toml"
    runtime_config.write_text('allowed_backends = ["wasm"]\ndefault_backend = "wasm"\n')
    result = ctr_run(
        containerd, busybox, "refused", "true",
        opts=["--runtime-config-path", str(runtime_config),
              "--annotation", "io.polyshim.backend=runc"],
        check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert 'backend "runc"' in result.stderr and "not allowed" in result.stderr
    assert "allowed: wasm" in result.stderr


def test_events_in_order(containerd: PrivateContainerd, busybox: str):
    with EventWatcher(containerd) as watcher:
        ctr_run(containerd, busybox, "evs", "true")
        watcher.wait_for(lambda s: s.topic == "/tasks/delete")
        assert watcher.topics_for("evs") == [
            "/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete",
        ]  # fmt: skip
