"""polyshim's runc backend against containerd-shim-runc-v2, side by side under one containerd.

    .venv/bin/python bench/shim_bench.py [--runs 30] [--containerd 1.6] [--pod-size 10]

Measures, in one run and alternating the two runtimes so both see the same
machine state:
- latency of `ctr run --rm <busybox> <id> true` (median, p90);
- shim memory per pod (`ctr run -d ... sleep`): one pod of one container, one
  pod of --pod-size containers grouped by `io.kubernetes.cri.sandbox-id` (both
  shims group by it), and --pod-size pods of one container running at once.
  RSS and PSS of the shim processes; PSS+ adds polyshim's warm template, which
  every polyshim server shares its pages with (RSS counts those shared pages in
  every server again, PSS divides them among the sharers).
Prints medians and the polyshim/runc-v2 ratios (targets: latency <= 1.10,
per-pod RSS <= 1.0), and the RSS floor of any shim server in Python: a process
holding only the interpreter, the stdlib a server uses and the task API's
protobuf messages.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stats import median_p90
from shim_framework import template
from shim_framework.bootstrap import RUNTIME
from tests.harness import PrivateContainerd, busybox_image, get_install, import_image
from tests.harness.template import template_pids

RUNTIMES = {"runc-v2": "io.containerd.runc.v2", "polyshim": RUNTIME}
VENV_BIN = Path(sys.prefix) / "bin"


def run_latency(ctrd: PrivateContainerd, image: str, runtime: str, n: int) -> float:
    started = time.perf_counter()
    ctrd.ctr("run", "--rm", "--runtime", runtime, image, f"lat-{n}", "true")
    return time.perf_counter() - started


def memory_of(pids: list[int]) -> tuple[int, int]:
    """(RSS, PSS) in bytes, summed over *pids*."""
    rss = pss = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss += int(line.split()[1]) * 1024
            elif line.startswith("Pss:"):
                pss += int(line.split()[1]) * 1024
    return rss, pss


def helper_pids(runtime: str) -> list[int]:
    """Processes a runtime keeps besides its shims: this installation's warm template."""
    if runtime != RUNTIMES["polyshim"]:
        return []
    return template_pids(Path(template.socket_path()))


def pods_memory(ctrd: PrivateContainerd, image: str, runtime: str, pods: int, size: int,
                tag: str) -> tuple[int, int, int, int]:  # fmt: skip
    """Start *pods* pods of *size* containers, measure, remove them: (shims, RSS of the
    shims, PSS of the shims, PSS of the runtime's helpers), bytes summed over all pods."""
    ids = [(f"{tag}-{p}", f"{tag}-{p}-{i}") for p in range(pods) for i in range(size)]
    before = set(ctrd.shim_pids())
    for pod, cid in ids:
        ctrd.ctr("run", "-d", "--runtime", runtime, "--annotation",
                 f"io.kubernetes.cri.sandbox-id={pod}", image, cid, "sleep", "600")  # fmt: skip
    time.sleep(1)  # let the shims settle after their last Create
    shims = [pid for pid in ctrd.shim_pids() if pid not in before]
    rss, pss = memory_of(shims)
    _, helpers_pss = memory_of(helper_pids(runtime))
    for _, cid in ids:
        ctrd.ctr("task", "kill", "-s", "SIGKILL", cid, check=False)
    for _, cid in ids:
        deadline = time.monotonic() + 20
        while ctrd.ctr("task", "delete", cid, check=False).returncode != 0:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        ctrd.ctr("container", "delete", cid, check=False)
    return len(shims), rss, pss, helpers_pss


# The least any shim server in Python needs: the interpreter, the stdlib a server uses and
# the task API's messages; no ttrpc, task service, backend or attrs.
FLOOR = (
    "import logging, socket, sys, threading\n"
    "from shim_framework.api.task.v2 import shim_pb2\n"
    "sys.stdout.write('ready\\n'); sys.stdout.flush(); sys.stdin.read()\n"
)


def python_floor() -> int:
    """RSS in bytes of a Python process holding only FLOOR's imports."""
    repo = Path(__file__).resolve().parent.parent
    with subprocess.Popen([sys.executable, "-c", FLOOR], cwd=repo, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as floor:  # fmt: skip
        assert floor.stdout is not None and floor.stdout.readline() == "ready\n"
        rss, _ = memory_of([floor.pid])
        floor.communicate("")
    return rss


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--containerd", default="1.6")
    parser.add_argument("--pod-size", type=int, default=10)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="polyshim-bench-"))
    with PrivateContainerd(get_install(args.containerd), path_prepend=[VENV_BIN],
                           log_level="info") as ctrd:  # fmt: skip
        image = import_image(ctrd, busybox_image(work))
        for runtime in RUNTIMES.values():  # warm caches (page cache, pyc, snapshots)
            for i in range(3):
                run_latency(ctrd, image, runtime, 10_000 + i)
        latencies: dict[str, list[float]] = {name: [] for name in RUNTIMES}
        for n in range(args.runs):
            for name, runtime in RUNTIMES.items():
                latencies[name].append(run_latency(ctrd, image, runtime, n))
        memory = {}
        layouts = [(1, 1), (1, args.pod_size), (args.pod_size, 1)]  # (pods, containers each)
        for name, runtime in RUNTIMES.items():
            for pods, size in layouts:
                memory[(name, pods, size)] = pods_memory(
                    ctrd, image, runtime, pods, size, f"m{pods}x{size}-{name}"
                )

    print(f"containerd {ctrd.install.version()}, {args.runs} runs each, alternating")
    print(f"{'':10} {'median ms':>10} {'p90 ms':>8}")
    med = {}
    for name, values in latencies.items():
        med[name], p90 = median_p90(values)
        print(f"{name:10} {med[name] * 1000:10.1f} {p90 * 1000:8.1f}")
    print(f"latency ratio polyshim/runc-v2: {med['polyshim'] / med['runc-v2']:.2f} "
          "(target <= 1.10)")  # fmt: skip
    print("\nshim memory per pod, MiB (PSS+: with polyshim's template, shared by all pods)")
    print(f"{'':10} {'pods':>4} {'ctrs':>4} {'shims':>5} {'RSS':>6} {'PSS':>6} {'PSS+':>6}")
    for (name, pods, size), (shims, rss, pss, helpers) in memory.items():
        print(f"{name:10} {pods:4} {size:4} {shims:5} {rss / pods / 2**20:6.1f} "
              f"{pss / pods / 2**20:6.1f} {(pss + helpers) / pods / 2**20:6.1f}")  # fmt: skip
    for pods, size in layouts:
        ours, theirs = memory[("polyshim", pods, size)], memory[("runc-v2", pods, size)]
        target = " (target <= 1.0)" if size > 1 else ""
        print(f"{pods} pod(s) of {size}: RSS ratio {ours[1] / theirs[1]:.2f}{target}, "
              f"PSS+ ratio {(ours[2] + ours[3]) / (theirs[2] + theirs[3]):.2f}")  # fmt: skip
    floor, pod = python_floor(), memory[("runc-v2", 1, args.pod_size)][1]
    print(
        f"floor of a Python server (interpreter, stdlib, task API messages; no polyshim code): "
        f"{floor / 2**20:.1f} MiB RSS, {floor / pod:.2f} x runc-v2's pod of {args.pod_size}"
    )
    subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
