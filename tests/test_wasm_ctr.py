"""Wasm containers through polyshim under real containerd (1.6 and 2.1), driven with ctr.

The image holds every guest of tests/wasm_guests as `/<name>.wasm` in one tar
layer (what `docker build` makes of `FROM scratch` + `COPY`), so selection
finds them by auto-detection. Images whose module is a raw wasm layer (OCI
wasm artifacts, `backends.wasm.oci`) are built by `images.wasm_artifact`.
What containerd itself does with those differs by version; the tests pin it
down (see `test_ctr_run_of_a_wasm_layer_image`).

Each test checks what a user sees (ctr's output and exit status, containerd's
events) and that a failure leaves nothing: no task, no shim or worker process
(a worker is a fork of the shim server, so `shim_pids` finds it too), no
bundle, no cgroup.
"""

from __future__ import annotations

import glob
import hashlib
import os
import select
import stat
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from backends.wasm import cache, oci
from tests.harness import Layer, PrivateContainerd, Symlink
from tests.harness.events import EventWatcher
from tests.harness.images import (
    MEDIA_WASM,
    MEDIA_WASM_COMPONENT_LAYER,
    MEDIA_WASM_CONTENT_LAYER,
    WasmLayer,
    import_image,
    wasm_artifact,
    wasm_image,
)
from tests.harness.wasm import build_guest, guest_names
from tests.test_shim_ctr import run_with_tty, task_status, wait_for_status
from tests.test_shim_lifecycle import (
    Api,
    alive,
    assert_nothing_left,
    eventually,
    exited,
    pb,
    remove_container,
    run_detached,
    shim_pid_of,
    task_metrics,
    topic_for,
)

pytestmark = pytest.mark.integration

RUNTIME = "io.containerd.polyshim.v2"
WASM = ("--annotation", "io.polyshim.backend=wasm")
POD = ("--annotation", "io.kubernetes.cri.sandbox-id=pod1")
KILL_WITHIN = 1.0  # seconds from `ctr task kill` to the guest's exit
MIB = 1 << 20
IMAGE = "example.com/polyshim/wasm-guests:1"
HOSTNAME = "wasm-box"

# A module with two linear memories that grows both, touching every page, until the store's
# limit stops each: the store limit is per memory (spec wasm.md §3), so together they take
# about twice what the worker allowed one, and the container's cgroup limit is hit.
TWO_MEMORIES = """
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory $a (export "memory") 1)
  (memory $b 1)
  (data (memory $a) (i32.const 16) "grown\\n")
  (func $fill_a (local $page i32) (local $at i32) (local $end i32)
    (loop $more
      (local.set $page (memory.grow $a (i32.const 16)))
      (if (i32.ne (local.get $page) (i32.const -1)) (then
        (local.set $at (i32.mul (local.get $page) (i32.const 65536)))
        (local.set $end (i32.add (local.get $at) (i32.const 1048576)))
        (loop $touch
          (i32.store $a (local.get $at) (i32.const 1))
          (local.set $at (i32.add (local.get $at) (i32.const 4096)))
          (br_if $touch (i32.lt_u (local.get $at) (local.get $end))))
        (br $more)))))
  (func $fill_b (local $page i32) (local $at i32) (local $end i32)
    (loop $more
      (local.set $page (memory.grow $b (i32.const 16)))
      (if (i32.ne (local.get $page) (i32.const -1)) (then
        (local.set $at (i32.mul (local.get $page) (i32.const 65536)))
        (local.set $end (i32.add (local.get $at) (i32.const 1048576)))
        (loop $touch
          (i32.store $b (local.get $at) (i32.const 1))
          (local.set $at (i32.add (local.get $at) (i32.const 4096)))
          (br_if $touch (i32.lt_u (local.get $at) (local.get $end))))
        (br $more)))))
  (func (export "_start")
    (call $fill_a)
    (call $fill_b)
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 6))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"""
INVALID = b"\0asm\x01\0\0\0\x01\xff\xff"  # the header, then a section that cannot be


# -- images ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def guests() -> dict[str, bytes]:
    """Every guest of tests/wasm_guests, plus `two_memories`, as wasm bytes."""
    import wasmtime

    built = {name: build_guest(name).read_bytes() for name in guest_names()}
    built["two_memories"] = bytes(wasmtime.wat2wasm(TWO_MEMORIES))
    return built


@pytest.fixture(scope="session")
def host_secret(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A host file the guests must never read."""
    secret = tmp_path_factory.mktemp("host") / "secret.txt"
    secret.write_text("host secret\n")
    return secret


@pytest.fixture(scope="session")
def wasm_archive(
    tmp_path_factory: pytest.TempPathFactory, guests: dict[str, bytes], host_secret: Path
) -> Path:
    """The image of every guest at /<name>.wasm, an /etc/hostname, an invalid module and an
    absolute symlink to a host file."""
    modules = {f"{name}.wasm": wasm for name, wasm in guests.items()}
    modules["invalid.wasm"] = INVALID
    files = {"etc/hostname": f"{HOSTNAME}\n", "abs-link": Symlink(str(host_secret))}
    dest = tmp_path_factory.mktemp("images") / "wasm-guests.oci.tar"
    return wasm_image(dest, IMAGE, modules, files=files)


@pytest.fixture
def wasm(containerd: PrivateContainerd, wasm_archive: Path) -> str:
    """The guests' image imported into ``containerd``; its name."""
    return import_image(containerd, wasm_archive)


# -- helpers --------------------------------------------------------------------------------------


def ctr_run(ctrd: PrivateContainerd, image: str, cid: str, *args: str, opts=(), **kw):
    """`ctr run --rm` through polyshim; the CompletedProcess (not checked)."""
    kw.setdefault("check", False)
    kw.setdefault("timeout", 60)
    return ctrd.ctr("run", "--rm", "--runtime", RUNTIME, *opts, image, cid, *args, **kw)


def shim_log(ctrd: PrivateContainerd, cid: str) -> str:
    """The lines the shim serving *cid* logged (through containerd's log)."""
    return "\n".join(line for line in ctrd.log_text().splitlines() if f"id={cid}" in line)


def cgroups_of(ctrd: PrivateContainerd, cid: str) -> list[str]:
    """The container's cgroup directories left in any hierarchy (ctr's cgroupsPath is
    /<namespace>/<id>; the wasm backend's own default /polyshim/<namespace>/<id>)."""
    found = []
    for pattern in (f"/sys/fs/cgroup/*/{ctrd.namespace}/{cid}",
                    f"/sys/fs/cgroup/*/polyshim/{ctrd.namespace}/{cid}"):  # fmt: skip
        found += glob.glob(pattern)
    return found


def assert_nothing_left_of(ctrd: PrivateContainerd, cid: str) -> None:
    """No task, shim or worker process, mount, bundle, container or cgroup of *cid*."""
    assert_nothing_left(ctrd, cid)
    assert cid not in ctrd.ctr("container", "ls", "-q").stdout.split()
    eventually(lambda: not cgroups_of(ctrd, cid), f"the cgroups of {cid} removed")


def runtime_config(tmp_path: Path, text: str) -> tuple[str, str]:
    """`--runtime-config-path` options for a runtime config of *text*."""
    path = tmp_path / "runtime.toml"
    path.write_text(text)
    return ("--runtime-config-path", str(path))


def read_until(stream, needle: str, timeout: float = 30) -> str:
    """Read *stream* (a binary pipe) until *needle* has arrived; what was read."""
    data = b""
    deadline = time.monotonic() + timeout
    while needle.encode() not in data:
        left = deadline - time.monotonic()
        assert left > 0, f"{needle!r} not within {timeout}s; got {data!r}"
        if not select.select([stream], [], [], left)[0]:
            continue
        chunk = os.read(stream.fileno(), 4096)
        assert chunk, f"EOF before {needle!r}; got {data!r}"
        data += chunk
    return data.decode()


# -- 1. running guests ----------------------------------------------------------------------------


def test_hello_gets_argv_env_and_exit_code(containerd: PrivateContainerd, wasm: str):
    """Auto-detected (no annotation): argv as given, env from ctr, stdout/stderr, exit code."""
    result = ctr_run(containerd, wasm, "hello", "/hello.wasm", "7", "two words",
                     opts=["--env", "GREETING=hi from ctr"])  # fmt: skip
    assert result.returncode == 7, result.stderr
    assert result.stdout == (
        "argv[0]=/hello.wasm\nargv[1]=7\nargv[2]=two words\nGREETING=hi from ctr\n"
    )
    assert result.stderr == "hello on stderr\n"
    assert "backend wasm (auto-detection of hello.wasm)" in shim_log(containerd, "hello")


def test_guest_reads_its_rootfs_and_cannot_leave_it(
    containerd: PrivateContainerd, wasm: str, host_secret: Path
):
    """A file of the image is readable at its path; `..` and an absolute symlink to a host
    file both fail inside the guest."""
    escapes = ["/.." * 12 + str(host_secret), "../../../.." + str(host_secret), "/abs-link"]
    result = ctr_run(containerd, wasm, "files", "/readfile.wasm", "/etc/hostname", *escapes)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"/etc/hostname: {HOSTNAME}"
    assert len(lines) == 4
    for line in lines[1:]:
        assert ": error: " in line, line
    assert "host secret" not in result.stdout


def test_stdin_is_piped_through(containerd: PrivateContainerd, wasm: str):
    """ctr never closes stdin at EOF, so the guest reads one line."""
    result = ctr_run(containerd, wasm, "stdin", "/cat_line.wasm", input="a line for wasm\n")
    assert (result.returncode, result.stdout) == (0, "got: a line for wasm\n"), result.stderr


def test_component_runs(containerd: PrivateContainerd, wasm: str):
    """A WASI preview 2 component's wasi:cli/run export runs; err is exit status 1."""
    result = ctr_run(containerd, wasm, "comp", "/component_hello.wasm")
    assert (result.returncode, result.stdout) == (0, "hello from a component\n"), result.stderr
    assert ctr_run(containerd, wasm, "compfail", "/component_fail.wasm").returncode == 1


def test_linux_and_wasm_containers_share_a_pod_shim(
    containerd: PrivateContainerd, busybox: str, wasm: str
):
    """A busybox container and a wasm container of one pod: one shim serves both, both work."""
    run_detached(containerd, busybox, "linux", "sleep", "600", opts=POD)
    worker = run_detached(containerd, wasm, "wasm", "/sleeper.wasm", opts=POD)
    shim = shim_pid_of(containerd, "linux")
    assert shim_pid_of(containerd, "wasm") == shim
    assert int(Path(f"/proc/{worker}/stat").read_text().rpartition(")")[2].split()[2]) == shim
    assert set(containerd.shim_pids()) == {shim, worker}  # the worker is a fork of the shim

    linux = containerd.ctr("task", "exec", "--exec-id", "e1", "linux", "uname", "-s")
    assert linux.stdout == "Linux\n"
    wasm_exec = containerd.ctr(
        "task", "exec", "--exec-id", "e1", "wasm", "/hello.wasm", "4", check=False
    )
    assert wasm_exec.returncode == 4, wasm_exec.stderr
    assert wasm_exec.stdout.startswith("argv[0]=/hello.wasm\nargv[1]=4\n")

    remove_container(containerd, "wasm")
    assert task_status(containerd, "linux") == "RUNNING"
    remove_container(containerd, "linux")
    eventually(lambda: not alive(shim), f"shim {shim} exits after the last task")


# -- 2. selection and policy ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("annotation", "rule"),
    [
        ("io.polyshim.backend=wasm", "annotation io.polyshim.backend=wasm"),
        ("run.oci.handler=wasm", "annotation run.oci.handler=wasm"),
        ("module.wasm.image/variant=compat", "annotation module.wasm.image/variant=compat"),
        (
            "module.wasm.image/variant=compat-smart",
            "annotation module.wasm.image/variant=compat-smart and a wasm entrypoint",
        ),
        (None, "auto-detection of entry.wasm"),
    ],
    ids=["polyshim", "crun-handler", "compat", "compat-smart", "auto"],
)
def test_selection_by_annotation_or_detection(
    containerd: PrivateContainerd, wasm: str, annotation: str | None, rule: str
):
    """Each selection rule picks the wasm backend, and the shim says which rule did."""
    opts = ["--annotation", annotation] if annotation else []
    result = ctr_run(containerd, wasm, "sel", "/entry.wasm#greet", opts=opts)
    assert (result.returncode, result.stdout) == (0, "hi from greet\n"), result.stderr
    assert f"created task sel with backend wasm ({rule})" in shim_log(containerd, "sel")


def test_annotation_cannot_escape_allowed_backends(
    containerd: PrivateContainerd, wasm: str, tmp_path: Path
):
    """allowed_backends = ["runc"]: a wasm annotation is refused by policy; nothing is left."""
    opts = [*runtime_config(tmp_path, 'allowed_backends = ["runc"]\n'), *WASM]
    result = ctr_run(containerd, wasm, "refused", "/hello.wasm", opts=opts)
    assert result.returncode != 0
    assert 'backend "wasm" (chosen by annotation io.polyshim.backend=wasm)' in result.stderr
    assert "not allowed by this runtime (allowed: runc)" in result.stderr
    assert result.stdout == ""
    assert_nothing_left_of(containerd, "refused")


def test_detected_wasm_is_refused_when_wasm_is_not_allowed(
    containerd: PrivateContainerd, wasm: str, tmp_path: Path
):
    """allowed_backends = ["runc"] and no annotation: the entrypoint is recognised as wasm and
    refused by policy with the reason (not handed to runc); nothing is left."""
    opts = runtime_config(tmp_path, 'allowed_backends = ["runc"]\n')
    result = ctr_run(containerd, wasm, "notwasm", "/hello.wasm", opts=opts)
    assert result.returncode != 0
    assert 'backend "wasm"' in result.stderr and "not allowed" in result.stderr, result.stderr
    assert "auto-detection of hello.wasm" in result.stderr
    assert result.stdout == ""
    assert_nothing_left_of(containerd, "notwasm")


# -- 3. kill, memory ------------------------------------------------------------------------------


@pytest.mark.parametrize(("signal", "status"), [("SIGTERM", 143), ("SIGKILL", 137)])
@pytest.mark.parametrize(("guest", "ready"), [("spin", "spinning"), ("sleeper", "sleeping")])
def test_kill_stops_a_guest_within_a_second(
    containerd: PrivateContainerd, wasm: str, guest: str, ready: str, signal: str, status: int
):
    """Spinning in wasm or blocked in a WASI sleep: `ctr task kill` ends it within 1 s (kill
    to the exit recorded in /tasks/exit), with status 128 + signal."""
    argv = containerd.ctr_command("run", "--rm", "--runtime", RUNTIME, wasm, "victim",
                                  f"/{guest}.wasm")  # fmt: skip
    running = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    try:
        read_until(running.stdout, ready)
        with EventWatcher(containerd) as watcher:
            sent = time.time()
            containerd.ctr("task", "kill", "-s", signal, "victim")
            event = watcher.wait_for(exited("victim")).event
        took = event.exited_at.ToDatetime().timestamp() - sent
        assert event.exit_status == status
        assert took < KILL_WITHIN, f"exited {took:.3f}s after the kill"
        assert running.wait(timeout=30) == status
    finally:
        if running.poll() is None:
            running.kill()
            running.wait()


def test_memory_limit_fails_the_allocation(containerd: PrivateContainerd, wasm: str):
    """Under --memory-limit the guest's malloc fails (it exits 3): no OOM kill."""
    with EventWatcher(containerd) as watcher:
        result = ctr_run(containerd, wasm, "hog", "/hog.wasm",
                         opts=["--memory-limit", str(48 * MIB)])  # fmt: skip
        assert result.returncode == 3, result.stderr
        assert result.stdout.startswith("malloc failed after "), result.stdout
        watcher.wait_for(exited("hog", 3))
        assert "/tasks/oom" not in watcher.topics_for("hog")


def test_memory_beyond_the_store_limit_is_oom_killed(containerd: PrivateContainerd, wasm: str):
    """Two linear memories each grow to the store's (per-memory) limit: the container's cgroup
    limit is hit, the kernel kills the worker: /tasks/oom, then exit 137."""
    with EventWatcher(containerd) as watcher:
        result = ctr_run(containerd, wasm, "oom", "/two_memories.wasm",
                         opts=["--memory-limit", str(64 * MIB)])  # fmt: skip
        assert result.returncode == 137, (result.stdout, result.stderr)
        assert result.stdout == ""  # never "grown"
        watcher.wait_for(topic_for("/tasks/oom", "oom"))
        assert watcher.wait_for(exited("oom")).event.exit_status == 137


# -- 4. modules that cannot run -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "opts", "message"),
    [
        (["/missing.wasm"], WASM, "module /missing.wasm: no such file in the container's rootfs"),
        (["/invalid.wasm"], (), "/invalid.wasm: not a valid WebAssembly module"),
        (["/entry.wasm"], (), '/entry.wasm: the module exports no "_start"'),
    ],
    ids=["missing", "invalid", "no-start"],
)
def test_bad_module_is_a_clear_error_and_leaves_nothing(
    containerd: PrivateContainerd, wasm: str, args: list[str], opts, message: str
):
    """`ctr run` fails with the shim's words; the task create failed with InvalidArgument."""
    result = ctr_run(containerd, wasm, "bad", *args, opts=opts)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert_nothing_left_of(containerd, "bad")

    containerd.ctr("container", "create", "--runtime", RUNTIME, *opts, wasm, "bad2", *args)
    api = Api(containerd)
    try:
        with pytest.raises(grpc.RpcError) as failure:
            api.create_task("bad2")
    finally:
        api.close()
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in failure.value.details()
    containerd.ctr("container", "delete", "bad2")
    assert_nothing_left_of(containerd, "bad2")


def test_corrupt_cache_entry_is_recompiled(
    containerd: PrivateContainerd, wasm: str, tmp_path: Path
):
    """A damaged artifact in the runtime's cache_dir is noticed, rebuilt, and the run works."""
    cache_dir = tmp_path / "wasm-cache"
    opts = runtime_config(tmp_path, f'[backends.wasm]\ncache_dir = "{cache_dir}"\n')
    first = ctr_run(containerd, wasm, "cold", "/hello.wasm", opts=opts)
    assert first.returncode == 0, first.stderr
    assert "(module compiled in" in shim_log(containerd, "cold")
    [artifact] = cache_dir.glob(f"*{cache.SUFFIX}")
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF  # in the machine code: wasmtime alone would not notice
    artifact.write_bytes(bytes(data))

    again = ctr_run(containerd, wasm, "again", "/hello.wasm", "5", opts=opts)
    assert again.returncode == 5, again.stderr
    assert "argv[1]=5" in again.stdout
    # the worker's note goes to the shim's stderr (containerd's log) as a plain line
    assert f"{artifact}: checksum mismatch (corrupted); compiling again" in containerd.log_text()
    assert "(module recompiled in" in shim_log(containerd, "again")
    fd = os.open(artifact, os.O_RDONLY)
    try:
        assert cache.check(fd) is None
    finally:
        os.close(fd)
    assert_nothing_left_of(containerd, "again")


# -- 5. exec, metrics, terminals ------------------------------------------------------------------


def test_exec_runs_another_module_and_a_function(containerd: PrivateContainerd, wasm: str):
    """`ctr task exec` runs another module of the image, and `module#function`."""
    run_detached(containerd, wasm, "c1", "/sleeper.wasm")
    result = containerd.ctr("task", "exec", "--exec-id", "e1", "c1", "/hello.wasm", "5",
                            check=False)  # fmt: skip
    assert result.returncode == 5, result.stderr
    assert result.stdout.startswith("argv[0]=/hello.wasm\nargv[1]=5\n")
    result = containerd.ctr("task", "exec", "--exec-id", "e2", "c1", "/entry.wasm#greet")
    assert result.stdout == "hi from greet\n"
    remove_container(containerd, "c1")


def test_metrics_of_a_wasm_container(containerd: PrivateContainerd, wasm: str):
    """`ctr task metrics` prints the container cgroup's figures: its memory, limit, tasks."""
    run_detached(containerd, wasm, "c1", "/sleeper.wasm",
                 opts=["--memory-limit", str(96 * MIB)])  # fmt: skip
    metrics = task_metrics(containerd, "c1")
    assert int(metrics["memory.usage_in_bytes"]) > 0, metrics
    assert int(metrics["memory.limit_in_bytes"]) == 96 * MIB, metrics
    assert int(metrics["pids.current"]) >= 1, metrics  # the worker's threads (wasmtime's too)
    remove_container(containerd, "c1")


def test_terminal_is_refused_clearly(containerd: PrivateContainerd, wasm: str):
    """`ctr run -t` of a wasm container fails saying WASI has no terminals; nothing is left."""
    argv = containerd.ctr_command("run", "--rm", "-t", "--runtime", RUNTIME, wasm, "tty",
                                  "/hello.wasm")  # fmt: skip
    rc, output = run_with_tty(argv)
    assert rc != 0
    assert b"backend wasm does not support terminals: WASI has no terminals" in output, output
    assert_nothing_left_of(containerd, "tty")


# -- 6. images whose module is a wasm layer (backends.wasm.oci) ----------------------------------

ARTIFACT = "example.com/polyshim/wasm-artifact:1"
ROOTFS_LAYER = Layer.from_entries({"etc/hostname": f"{HOSTNAME}\n"})


def artifact(
    tmp: Path, guests: dict[str, bytes], names: list[str], *, media_type: str = MEDIA_WASM, **kw
) -> Path:
    layers = [WasmLayer(guests[n], f"{n}.wasm", media_type) for n in names]
    return wasm_artifact(tmp / "artifact.oci.tar", ARTIFACT, layers, **kw)


def create_from_image(
    ctrd: PrivateContainerd, image: str, cid: str, rootfs: Path, *args: str, opts=()
):
    """Make container *cid* from *image* with the directory *rootfs* as its rootfs, not a
    snapshot: what works where containerd cannot unpack the image (1.6.20) or ctr refuses its
    config type (the CNCF one): `ctr container create --rootfs`, then the containers API
    records the image (Containers/Update of `image`). `ctr task start` runs it."""
    ctrd.ctr("container", "create", "--runtime", RUNTIME, *WASM, *opts, "--rootfs", str(rootfs),
             cid, *args)  # fmt: skip
    api = Api(ctrd)
    try:
        api._call(
            "/containerd.services.containers.v1.Containers/Update",
            pb((1, pb((1, cid), (3, image))), (2, pb((1, "image")))),
        )
    finally:
        api.close()


def start_from_image(
    ctrd: PrivateContainerd, image: str, cid: str, rootfs: Path, *args: str, opts=()
) -> subprocess.CompletedProcess[str]:
    """`create_from_image`, `ctr task start` (attached), then delete task and container."""
    create_from_image(ctrd, image, cid, rootfs, *args, opts=opts)
    try:
        return ctrd.ctr("task", "start", cid, check=False, timeout=60)
    finally:
        ctrd.ctr("task", "delete", cid, check=False)
        ctrd.ctr("container", "delete", cid, check=False)


@pytest.fixture
def rootfs_dir(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text(f"{HOSTNAME}\n")
    return root


@pytest.fixture
def cache_dir(tmp_path: Path) -> tuple[Path, tuple[str, str]]:
    """A cache_dir of the test's own (it keeps the stored wasm layers) and the ctr options
    of a runtime config that names it."""
    directory = tmp_path / "wasm-cache"
    return directory, runtime_config(tmp_path, f'[backends.wasm]\ncache_dir = "{directory}"\n')


def stored_layer(cache_dir: Path, wasm: bytes) -> Path:
    """Where the shim keeps the wasm layer whose bytes are *wasm*."""
    return cache_dir / oci.LAYER_DIR / f"sha256-{hashlib.sha256(wasm).hexdigest()}.wasm"


@pytest.mark.parametrize(
    "media_type", [MEDIA_WASM, MEDIA_WASM_COMPONENT_LAYER, MEDIA_WASM_CONTENT_LAYER]
)
@pytest.mark.parametrize("cncf_config", [False, True], ids=["oci-config", "cncf-config"])
def test_wasm_layer_runs_from_the_content_store(
    containerd: PrivateContainerd,
    guests: dict[str, bytes],
    tmp_path: Path,
    rootfs_dir: Path,
    cache_dir: tuple[Path, tuple[str, str]],
    media_type: str,
    cncf_config: bool,
):
    """The shim finds the container's image, reads its wasm layer from containerd's content
    store, keeps it in its own cache_dir (0600, never in the rootfs) and runs it (args[0]'s
    path ignored, argv as given). Works on 1.6 and 2.1, for either config type."""
    directory, opts = cache_dir
    archive = artifact(tmp_path, guests, ["hello"], media_type=media_type, cncf_config=cncf_config)
    image = import_image(containerd, archive, unpack=containerd.install.label != "1.6")
    result = start_from_image(containerd, image, "art", rootfs_dir, "/app/hello.wasm", "6",
                              opts=opts)  # fmt: skip
    assert result.returncode == 6, result.stderr
    assert result.stdout.startswith("argv[0]=/app/hello.wasm\nargv[1]=6\n"), result.stdout
    assert "runs wasm layer sha256:" in shim_log(containerd, "art")
    assert "(read from containerd: " in shim_log(containerd, "art")
    stored = stored_layer(directory, guests["hello"])
    assert stored.read_bytes() == guests["hello"]
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert stat.S_IMODE(stored.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in rootfs_dir.iterdir()) == ["etc"]  # the rootfs untouched
    assert_nothing_left_of(containerd, "art")


def test_wasm_layers_are_chosen_by_title(
    containerd: PrivateContainerd, guests: dict[str, bytes], tmp_path: Path, rootfs_dir: Path
):
    """Of several wasm layers, args[0]'s file name picks one (`#function` kept); naming none
    of them is a clear error."""
    archive = artifact(tmp_path, guests, ["hello", "entry", "component_hello"])
    image = import_image(containerd, archive, unpack=False)
    result = start_from_image(containerd, image, "t1", rootfs_dir, "/entry.wasm#greet")
    assert (result.returncode, result.stdout) == (0, "hi from greet\n"), result.stderr
    result = start_from_image(containerd, image, "t2", rootfs_dir, "component_hello.wasm")
    assert (result.returncode, result.stdout) == (0, "hello from a component\n"), result.stderr
    result = start_from_image(containerd, image, "t3", rootfs_dir, "/nope.wasm")
    assert result.returncode != 0
    assert "has 3 wasm layers (hello.wasm, entry.wasm, component_hello.wasm)" in result.stderr
    assert sorted(p.name for p in rootfs_dir.iterdir()) == ["etc"]


def test_wasm_layer_without_args_and_a_layer_that_is_no_wasm(
    containerd: PrivateContainerd, guests: dict[str, bytes], tmp_path: Path, rootfs_dir: Path
):
    """No process args: the layer runs with argv /<its title>. A layer whose bytes are no
    WebAssembly fails the create, naming layer and image; nothing is left."""
    image = import_image(containerd, artifact(tmp_path, guests, ["hello"]), unpack=False)
    result = start_from_image(containerd, image, "noargs", rootfs_dir)
    assert (result.returncode, result.stdout.splitlines()[0]) == (0, "argv[0]=/hello.wasm")

    layers = [WasmLayer(b"not wasm at all", "broken.wasm")]
    broken = wasm_artifact(tmp_path / "broken.oci.tar", "example.com/broken:1", layers)
    image = import_image(containerd, broken, unpack=False)
    result = start_from_image(containerd, image, "broken", rootfs_dir, "/broken.wasm")
    assert result.returncode != 0
    assert "wasm layer broken.wasm (sha256:" in result.stderr, result.stderr
    assert "of image example.com/broken:1 is not a WebAssembly module" in result.stderr
    assert sorted(p.name for p in rootfs_dir.iterdir()) == ["etc"]
    assert_nothing_left_of(containerd, "broken")


def test_stored_wasm_layer_is_checked_before_it_is_used_again(
    containerd: PrivateContainerd,
    guests: dict[str, bytes],
    tmp_path: Path,
    rootfs_dir: Path,
    cache_dir: tuple[Path, tuple[str, str]],
):
    """A second container of the image runs the stored layer once its digest checks out; a
    stored layer that no longer matches its digest is fetched and stored again, and the
    container runs what the image holds."""
    directory, opts = cache_dir
    image = import_image(containerd, artifact(tmp_path, guests, ["hello"]), unpack=False)
    result = start_from_image(containerd, image, "first", rootfs_dir, "/hello.wasm", opts=opts)
    assert result.returncode == 0, result.stderr
    result = start_from_image(containerd, image, "again", rootfs_dir, "/hello.wasm", "4",
                              opts=opts)  # fmt: skip
    assert result.returncode == 4, result.stderr
    assert "(stored before, digest checked: " in shim_log(containerd, "again")

    stored = stored_layer(directory, guests["hello"])
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    result = start_from_image(containerd, image, "bad", rootfs_dir, "/hello.wasm", "5",
                              opts=opts)  # fmt: skip
    assert result.returncode == 5, result.stderr
    assert f"stored wasm layer {stored}: its digest does not match; fetching it again" in (
        containerd.log_text()
    )
    assert "(read from containerd: " in shim_log(containerd, "bad")
    assert stored.read_bytes() == guests["hello"]
    assert sorted(p.name for p in rootfs_dir.iterdir()) == ["etc"]
    assert_nothing_left_of(containerd, "bad")


def test_exec_into_a_wasm_layer_container(
    containerd: PrivateContainerd,
    guests: dict[str, bytes],
    tmp_path: Path,
    rootfs_dir: Path,
    cache_dir: tuple[Path, tuple[str, str]],
):
    """The init runs the image's wasm layer; an exec whose args[0] names no file of the
    rootfs runs the layer again (its own argv), one naming a file runs that file."""
    directory, opts = cache_dir
    archive = artifact(tmp_path, guests, ["sleeper"])
    image = import_image(containerd, archive, unpack=False)
    (rootfs_dir / "hello.wasm").write_bytes(guests["hello"])
    create_from_image(containerd, image, "c1", rootfs_dir, "/sleeper.wasm", opts=opts)
    containerd.ctr("task", "start", "-d", "c1")
    wait_for_status(containerd, "c1", "RUNNING")
    stored = stored_layer(directory, guests["sleeper"])
    assert stored.read_bytes() == guests["sleeper"]
    result = containerd.ctr("task", "exec", "--exec-id", "e1", "c1", "/sleeper.wasm", "0")
    assert result.stdout == "sleeping 0\nwoke\n"
    stored.unlink()  # gone from the shim's directory: the next exec fetches it again
    result = containerd.ctr("task", "exec", "--exec-id", "e2", "c1", "/app.wasm", "0")
    assert result.stdout == "sleeping 0\nwoke\n"
    assert stored.read_bytes() == guests["sleeper"]
    result = containerd.ctr("task", "exec", "--exec-id", "e3", "c1", "/hello.wasm", "3",
                            check=False)  # fmt: skip
    assert (result.returncode, result.stdout.splitlines()[0]) == (3, "argv[0]=/hello.wasm")
    remove_container(containerd, "c1")
    assert sorted(p.name for p in rootfs_dir.iterdir()) == ["etc", "hello.wasm"]


@pytest.mark.parametrize("kind", ["with-tar-layer", "wasm-only", "cncf"])
def test_ctr_run_of_a_wasm_layer_image(
    request: pytest.FixtureRequest,
    containerd: PrivateContainerd,
    guests: dict[str, bytes],
    tmp_path: Path,
    kind: str,
):
    """What `ctr images import` and `ctr run` do with images of raw wasm layers, per version:

        image                          containerd 1.6.20          containerd 2.1.9
        OCI config, tar + wasm layer   ctr refuses to unpack      runs
        OCI config, wasm layer only    ctr refuses to unpack      runs (empty snapshot)
        CNCF config (wasm.config.v0)   ctr refuses to unpack      ctr refuses the config type

    1.6.20's client-side unpack compares diff_ids with all layers ("mismatched image rootfs
    and manifest layers"; containerd PR #9142, in 1.6.25/1.7.7, skips non-layer media types).
    ctr builds the spec from the image config and knows only OCI/Docker config types."""
    label = containerd.install.label
    tar_layers = [ROOTFS_LAYER] if kind == "with-tar-layer" else []
    archive = artifact(tmp_path, guests, ["hello"], tar_layers=tar_layers,
                       cncf_config=kind == "cncf", entrypoint=["/hello.wasm"])  # fmt: skip
    if label == "1.6":
        imported = containerd.ctr("images", "import", str(archive), check=False)
        assert "mismatched image rootfs and manifest layers" in imported.stderr
    image = import_image(containerd, archive, unpack=label != "1.6")
    wasm_runtime = runtime_config(tmp_path, 'default_backend = "wasm"\n')  # as a RuntimeClass
    result = ctr_run(containerd, image, "art", "/hello.wasm", "2", opts=wasm_runtime)
    if label == "1.6":
        assert result.returncode != 0
        assert "mismatched image rootfs and manifest layers" in result.stderr, result.stderr
    elif kind == "cncf":
        assert result.returncode != 0
        assert "unknown image config media type application/vnd.wasm.config.v0+json" in (
            result.stderr
        ), result.stderr
    else:
        assert result.returncode == 2, result.stderr
        assert result.stdout.startswith("argv[0]=/hello.wasm\nargv[1]=2\n")
    if result.returncode != 0:
        assert "art" not in containerd.ctr("container", "ls", "-q").stdout.split()
        assert not containerd.shim_pids()
