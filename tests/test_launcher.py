"""The native launcher: the same shim binary as the Python one, run by the warm template.

Each launcher here is built for the test: its template socket lives in a directory of the
test's own, so no template of the installation or of another test answers it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from shim_framework import bootstrap, launcher, template
from shim_framework.api.runtime.bootstrap.v1 import bootstrap_pb2
from shim_framework.api.task.v2 import shim_pb2
from shim_framework.api.types import introspection_pb2
from shim_framework.ttrpc import Client, Stub
from tests.harness.requirements import require, require_binary, require_root
from tests.harness.template import template_pids

SHIM = bootstrap.SHIM_BINARY


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pl-", dir="/tmp"))  # sun_path is short
    yield path
    shutil.rmtree(path, ignore_errors=True)


def build(tmp_path: Path, socket_dir: Path, python: str = sys.executable) -> Path:
    require_binary(os.environ.get("CC", "cc"))
    output = tmp_path / SHIM
    launcher.build(output, python=python, template_socket=template.socket_path(str(socket_dir)))
    return output


@pytest.fixture
def running_template(socket_dir: Path) -> Iterator[Path]:
    """A template of this installation listening in *socket_dir*; stopped afterwards."""
    path = Path(template.socket_path(str(socket_dir)))
    subprocess.run(
        [sys.executable, "-c", "import sys; from shim_framework import template; "
         "template.spawn(sys.argv[1])", str(socket_dir)],
        check=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not path.exists():
        assert time.monotonic() < deadline, f"no template listening at {path}"
        time.sleep(0.05)
    yield path
    for pid in template_pids(path):
        os.kill(pid, signal.SIGTERM)


def run(binary: Path, *args: str, stdin: bytes = b"", cwd: Path | None = None):
    return subprocess.run([str(binary), *args], input=stdin, capture_output=True, cwd=cwd,
                          timeout=30)  # fmt: skip


def test_without_a_template_it_runs_the_shim_in_a_new_interpreter(
    tmp_path: Path, socket_dir: Path
) -> None:
    binary = build(tmp_path, socket_dir)
    version = run(binary, "-v")
    assert version.returncode == 0, version.stderr
    assert b"Runtime: io.containerd.polyshim.v2" in version.stdout
    bad = run(binary, "-frobnicate", "start")
    assert bad.returncode == 2
    assert b"flag provided but not defined: -frobnicate" in bad.stderr


def test_with_a_template_the_template_runs_it(
    tmp_path: Path, socket_dir: Path, running_template: Path
) -> None:
    """Built for an interpreter that does not exist, the launcher can only work through the
    template: output, exit status, stdin and working directory all arrive."""
    binary = build(tmp_path, socket_dir, python="/nonexistent/python3")
    version = run(binary, "-v")
    assert version.returncode == 0, version.stderr
    assert b"Runtime: io.containerd.polyshim.v2" in version.stdout

    bad = run(binary, "-frobnicate", "start")
    assert (bad.returncode, bad.stdout) == (2, b"")
    assert b"flag provided but not defined: -frobnicate" in bad.stderr

    options = any_pb2.Any(type_url="example.com/Options", value=b"\x08\x01")
    info = run(binary, "-info", stdin=options.SerializeToString())
    assert info.returncode == 0, info.stderr
    assert introspection_pb2.RuntimeInfo.FromString(info.stdout).options == options

    bundle = tmp_path / "bundle"
    bundle.mkdir()  # no marker: the shim never deleted the task, so Python cleans up
    deleted = run(binary, "-namespace", "ns", "-id", "c1", "delete", cwd=bundle)
    assert deleted.returncode == 0, deleted.stderr
    response = shim_pb2.DeleteResponse.FromString(deleted.stdout)
    assert (response.pid, response.exit_status) == (0, 137)


def test_the_usual_delete_is_answered_without_python(tmp_path: Path, socket_dir: Path) -> None:
    """After the shim deleted the task (its marker in the bundle, nothing mounted) the
    launcher answers `delete` itself, as Python's delete would; every other case still
    reaches Python, which this launcher cannot find (127)."""
    binary = build(tmp_path, socket_dir, python="/nonexistent/python3")
    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    bootstrap.mark_deleted(str(bundle), 4242)  # what Delete leaves for the delete action
    given = ["-namespace", "ns", "-address", "/run/x.sock", "-publish-binary", "/bin/c"]
    forms = [
        ([*given, "-id", "c1", "-bundle", str(bundle), "delete"], None),
        (["-debug", "--namespace=ns", "-id", "c1", f"-bundle={bundle}", "delete"], None),
        (["-namespace", "ns", "-id", "c1", "delete"], bundle),  # 1.6: the bundle is the cwd
    ]
    for args, cwd in forms:
        result = run(binary, *args, cwd=cwd)
        assert result.returncode == 0, (args, result.stderr)
        native = shim_pb2.DeleteResponse.FromString(result.stdout)
        flags = bootstrap.parse_flags([*args[:-1], "-bundle", str(bundle), "delete"])
        python = shim_pb2.DeleteResponse.FromString(bootstrap.delete(flags))
        assert (native.pid, native.exit_status) == (python.pid, python.exit_status) == (4242, 137)
        assert abs(native.exited_at.ToNanoseconds() - time.time_ns()) < 10 * 10**9

    not_usual = [
        ["-id", "c1", "-bundle", str(tmp_path), "delete"],  # no marker
        ["-v", "delete"],
        ["-frobnicate", "x", "-bundle", str(bundle), "delete"],
        ["-id", "c1", "-bundle", str(bundle), "start"],
        ["-bundle", str(bundle), "delete", "more"],
    ]
    for args in not_usual:
        assert run(binary, *args).returncode == 127, args
    require_root()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(bundle / "rootfs")], check=True)
    try:  # still mounted: Python unmounts it
        assert run(binary, "-id", "c1", "-bundle", str(bundle), "delete").returncode == 127
    finally:
        subprocess.run(["umount", str(bundle / "rootfs")], check=True)


def test_without_template_or_interpreter_it_says_what_to_do(
    tmp_path: Path, socket_dir: Path
) -> None:
    binary = build(tmp_path, socket_dir, python="/nonexistent/python3")
    result = run(binary, "-v")
    assert result.returncode == 127
    assert b"cannot run /nonexistent/python3" in result.stderr
    assert b"polyshim install-launcher" in result.stderr


def test_a_template_answers_after_its_requester_left(
    tmp_path: Path, socket_dir: Path, running_template: Path
) -> None:
    """A launcher killed mid-request (containerd gave up) costs the template nothing."""
    binary = build(tmp_path, socket_dir, python="/nonexistent/python3")
    victim = subprocess.Popen([str(binary), "-info"], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(0.2)  # the worker now waits for stdin that never comes
    victim.kill()
    victim.wait()
    assert victim.stdin is not None
    victim.stdin.close()
    assert run(binary, "-v").returncode == 0
    assert len(template_pids(running_template)) == 1


def test_a_template_gives_way_when_a_distribution_is_installed(
    tmp_path: Path, socket_dir: Path
) -> None:
    """The template reads the backends' entry points once for all its forks; a backend
    installed afterwards must not stay unknown until it idles out: it stops soon after."""
    site = tmp_path / "site"
    site.mkdir()
    path = Path(template.socket_path(str(socket_dir)))
    spawn = "import sys; from shim_framework import template; template.spawn(sys.argv[1])"
    env = {**os.environ, "PYTHONPATH": str(site)}
    subprocess.run([sys.executable, "-c", spawn, str(socket_dir)], check=True, env=env)
    deadline = time.monotonic() + 30
    while not template_pids(path):
        assert time.monotonic() < deadline, f"no template listening at {path}"
        time.sleep(0.05)
    time.sleep(template.CHECK_EVERY * 2)
    assert template_pids(path), "the template stopped although nothing changed"
    dist = site / "newbackend-1.0.dist-info"
    dist.mkdir()
    (dist / "entry_points.txt").write_text("[polyshim.backends]\nnew = newbackend:Backend\n")
    deadline = time.monotonic() + template.CHECK_EVERY * 5
    while template_pids(path):
        assert time.monotonic() < deadline, "the template kept serving with stale entry points"
        time.sleep(0.1)


def test_python_start_serves_with_and_without_a_template(tmp_path: Path, socket_dir: Path) -> None:
    """Without the native launcher `start` runs in Python: the first forks its server itself
    and leaves a template behind; the next asks that template for its server. Both servers
    answer containerd's first call, and show as the shim binary in `ps`."""
    entry = "import sys; from shim_framework.shim_main import main; sys.exit(main())"
    try:
        for cid in ("first", "second"):
            bundle = tmp_path / cid
            bundle.mkdir()
            (bundle / "config.json").write_text('{"ociVersion": "1.0.2", "annotations": {}}')
            params = bootstrap_pb2.BootstrapParams(instance_id=cid, namespace="ns",
                                                   socket_dir=str(socket_dir))  # fmt: skip
            started = subprocess.run(
                [sys.executable, "-P", "-c", entry, "-namespace", "ns", "-address",
                 str(tmp_path / "containerd.sock"), "-publish-binary", "/bin/true", "-id", cid,
                 "start"],
                input=params.SerializeToString(), capture_output=True, cwd=bundle, timeout=30,
                env={**os.environ, "TTRPC_ADDRESS": str(tmp_path / "ttrpc.sock")},
            )  # fmt: skip
            assert started.returncode == 0, started.stderr
            address = started.stdout.decode()
            assert address.startswith(f"unix://{socket_dir}/")
            with Client.connect(address.removeprefix("unix://")) as client:
                stub = Stub(client, shim_pb2.DESCRIPTOR.services_by_name["Task"])
                pid = stub.Connect(shim_pb2.ConnectRequest(id=cid), timeout=10).shim_pid
                assert Path(f"/proc/{pid}/cmdline").read_bytes().startswith(SHIM.encode())
                stub.Shutdown(shim_pb2.ShutdownRequest(id=cid), timeout=10)
            if cid == "first":  # it left a template behind, which takes a moment to import
                deadline = time.monotonic() + 30
                while not template_pids(Path(template.socket_path(str(socket_dir)))):
                    assert time.monotonic() < deadline, "the first start left no template"
                    time.sleep(0.05)
    finally:
        for pid in template_pids(Path(template.socket_path(str(socket_dir)))):
            os.kill(pid, signal.SIGTERM)


def test_installed_shim_binary_is_the_native_launcher() -> None:
    """scripts/setup installs it; a silent fall back to the Python script would pass every
    other test, only slower."""
    installed = Path(sys.prefix) / "bin" / SHIM
    require(installed.exists(), f"{installed} is missing (run scripts/setup)")
    require(
        launcher.is_native(installed),
        f"{installed} is the Python launcher; run `polyshim install-launcher`",
    )
