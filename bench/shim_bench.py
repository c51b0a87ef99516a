"""polyshim's runc backend against containerd-shim-runc-v2, side by side under one containerd.

    .venv/bin/python bench/shim_bench.py [--runs 30] [--containerd 1.6] [--pod-size 10]

Measures, in one run and alternating the two runtimes so both see the same
machine state:
- latency of `ctr run --rm <busybox> <id> true` (median, p90);
- shim memory for one container (`ctr run -d ... sleep`), and for a pod of
  --pod-size containers grouped by `io.kubernetes.cri.sandbox-id` (both shims
  group by it): RSS and PSS summed over the pod's shim processes.
Prints medians and the polyshim/runc-v2 ratios (targets: latency <= 1.10,
per-pod RSS <= 1.0).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import PrivateContainerd, busybox_image, get_install, import_image

RUNTIMES = {"runc-v2": "io.containerd.runc.v2", "polyshim": "io.containerd.polyshim.v2"}
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


def pod_memory(ctrd: PrivateContainerd, image: str, runtime: str, size: int, tag: str):
    """Start *size* containers of one pod, measure the shims, remove them."""
    ids = [f"{tag}-{i}" for i in range(size)]
    before = set(ctrd.shim_pids())
    for cid in ids:
        ctrd.ctr("run", "-d", "--runtime", runtime, "--annotation",
                 f"io.kubernetes.cri.sandbox-id={tag}", image, cid, "sleep", "600")  # fmt: skip
    time.sleep(1)  # let the shims settle after their last Create
    shims = [pid for pid in ctrd.shim_pids() if pid not in before]
    rss, pss = memory_of(shims)
    for cid in ids:
        ctrd.ctr("task", "kill", "-s", "SIGKILL", cid, check=False)
    for cid in ids:
        deadline = time.monotonic() + 20
        while ctrd.ctr("task", "delete", cid, check=False).returncode != 0:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        ctrd.ctr("container", "delete", cid, check=False)
    return len(shims), rss, pss


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
        for name, runtime in RUNTIMES.items():
            memory[(name, 1)] = pod_memory(ctrd, image, runtime, 1, f"one-{name}")
            memory[(name, args.pod_size)] = pod_memory(
                ctrd, image, runtime, args.pod_size, f"pod-{name}"
            )

    print(f"containerd {ctrd.install.version()}, {args.runs} runs each, alternating")
    print(f"{'':10} {'median ms':>10} {'p90 ms':>8}")
    med = {}
    for name, values in latencies.items():
        values.sort()
        med[name] = statistics.median(values)
        print(f"{name:10} {med[name] * 1000:10.1f} {values[int(len(values) * 0.9)] * 1000:8.1f}")
    print(f"latency ratio polyshim/runc-v2: {med['polyshim'] / med['runc-v2']:.2f} "
          "(target <= 1.10)")  # fmt: skip
    print(f"\n{'':10} {'pod':>4} {'shims':>6} {'RSS MiB':>8} {'PSS MiB':>8}")
    for (name, size), (shims, rss, pss) in memory.items():
        print(f"{name:10} {size:4} {shims:6} {rss / 2**20:8.1f} {pss / 2**20:8.1f}")
    for size in (1, args.pod_size):
        ratio = memory[("polyshim", size)][1] / memory[("runc-v2", size)][1]
        print(f"RSS ratio polyshim/runc-v2, pod of {size}: {ratio:.2f}"
              + (" (target <= 1.0)" if size > 1 else ""))  # fmt: skip
    subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
