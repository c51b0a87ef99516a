"""A wasm hello through polyshim against busybox `echo hello` through containerd-shim-runc-v2.

    .venv/bin/python bench/wasm_bench.py [--runs 30] [--tasks 200] [--parallel 4]
                                         [--containerd 1.6]

Both under one private containerd, in one run, alternating so both see the same
machine state:
- latency of `ctr run --rm` (median, p90): runc-v2 runs busybox `echo hello`,
  polyshim runs `/hello.wasm` (tests/wasm_guests/hello.c) from an image whose
  layer holds it, selected by auto-detection;
- throughput: --tasks `ctr run --rm` of each, --parallel at a time (tasks/s),
  with the CPU time each task costs the machine, split into `ctr`, this bench
  itself (the threads that spawn and wait for ctr), containerd and the rest
  (the runtime: shim, runc or wasm worker, and the kernel work they cause).
  With the CPU busy, tasks/s follows CPU per task, so the rest of runc-v2 over
  ctr + bench + containerd (the fixed part, whatever the runtime) bounds the
  throughput ratio any shim can reach, and half of runc-v2's total less wasm's
  fixed part is what a 2x throughput leaves the wasm runtime.
The wasm runs are measured twice: cold (each container gets an empty compile
cache, a `[backends.wasm] cache_dir` of its own through --runtime-config-path,
so every worker compiles) and warm (one cache, filled beforehand).

Prints medians and the polyshim/runc-v2 ratios (targets: latency <= 0.8,
throughput >= 2.0), then where the time of a serial run goes: phases cut at
containerd's own log lines (the daemon logs at debug for that, for both
runtimes alike), and for wasm the shim's own figures.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stats import median_p90
from shim_framework.bootstrap import RUNTIME
from tests.harness import PrivateContainerd, busybox_image, get_install, import_image
from tests.harness.images import wasm_image
from tests.harness.wasm import build_guest

RUNC = "io.containerd.runc.v2"
POLYSHIM = RUNTIME
FIXED = ("ctr", "bench", "containerd")  # CPU buckets a task costs whatever the runtime
VENV_BIN = Path(sys.prefix) / "bin"
# Points in one `ctr run --rm`: the first containerd log line after the previous point that
# matches ({cid} is the container); a phase ends at each point found. Lines the daemon writes
# for every runtime alike; some only on 1.6 (events) or only on 2.x ("connecting to shim").
MARKS = (
    ("ctr, container and snapshot made", r'msg="get snapshot mounts" key={cid}\b'),
    ("shim started (2.x)", r'msg="connecting to shim {cid}"'),
    ("task created (1.6)", r"topic=/tasks/create "),
    ("task started (1.6)", r"topic=/tasks/start "),
    ("exit reported (1.6)", r"topic=/tasks/exit "),
    ("task deleted (1.6)", r"topic=/tasks/delete "),
    ("shim gone", r'msg="shim disconnected" id={cid}\b'),
    ("delete action run, snapshot removed", r'msg="remove snapshot" key={cid}\b'),
)
_WORKER = r'container \\"{cid}\\": worker \d+ for \S+: '
SHIM_FIGURES = {  # what the polyshim shim logs about a Create (ms)
    "shim start (`start` action + server fork)": None,  # computed: see phases()
    "task Create in the shim": r"created task {cid} with backend wasm .* in (\d+) ms,",
    "  of it in the wasm backend": r"created task {cid} .* ms, (\d+) ms of them",
    "    fork of the worker": _WORKER + r"forked in ([\d.]+) ms",
    "    worker joins cgroup, prepares": _WORKER + r".* ready ([\d.]+) ms later",
    "      of it loading the module": _WORKER + r".*module \w+ in ([\d.]+) ms",
}


class Bench:
    def __init__(self, ctrd: PrivateContainerd, work: Path, busybox: str, wasm: str) -> None:
        self.ctrd, self.work, self.busybox, self.wasm = ctrd, work, busybox, wasm
        self.warm_config = self._config("warm")
        self.lost: dict[str, int] = {}  # runtime -> runs that exited 0 without their output

    def _config(self, name: str) -> Path:
        """A runtime config whose compile cache is a directory of its own, *name*."""
        path = self.work / f"runtime-{name}.toml"
        path.write_text(f'[backends.wasm]\ncache_dir = "{self.work / "cache" / name}"\n')
        return path

    def runc(self, cid: str) -> None:
        self._run(RUNC, self.busybox, cid, ["echo", "hello"], [])

    def wasm_warm(self, cid: str) -> None:
        self._run(POLYSHIM, self.wasm, cid, ["/hello.wasm"],
                  ["--runtime-config-path", str(self.warm_config)])  # fmt: skip

    def wasm_cold(self, cid: str) -> None:
        config = self._config(f"cold-{cid}")  # cids are unique: so is each cache
        self._run(POLYSHIM, self.wasm, cid, ["/hello.wasm"],
                  ["--runtime-config-path", str(config)])  # fmt: skip

    def _run(self, runtime: str, image: str, cid: str, args: list[str], opts: list[str]) -> None:
        result = self.ctrd.ctr("run", "--rm", "--runtime", runtime, *opts, image, cid, *args,
                               check=False, timeout=120)  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"{runtime} {cid}: exit {result.returncode}: {result.stderr}")
        if "hello" not in result.stdout:  # seen once in ~1000 runs of runc-v2 under load
            self.lost[runtime] = self.lost.get(runtime, 0) + 1


def throughput(
    run: Callable[[str], None], tag: str, tasks: int, parallel: int, containerd_pid: int
) -> tuple[float, dict[str, float]]:
    """Tasks per second for *tasks* runs, *parallel* at a time, and the CPU milliseconds
    per task of `ctr`, of this process (the bench), of containerd and of everything else
    the machine did."""
    before = _cpu_ms(containerd_pid)
    started = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(run, [f"{tag}-{i}" for i in range(tasks)]))
    rate = tasks / (time.perf_counter() - started)
    spent = {k: (v - before[k]) / tasks for k, v in _cpu_ms(containerd_pid).items()}
    spent["rest"] = spent.pop("busy") - sum(spent[k] for k in FIXED)
    return rate, spent


def _cpu_ms(containerd_pid: int) -> dict[str, float]:
    """CPU milliseconds so far: the whole machine's busy time, containerd's, that of our
    finished children (every `ctr`) and our own (the threads that run them: else it would
    count as the runtime's)."""
    tick = 1000 / os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:8]]
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    with open(f"/proc/{containerd_pid}/stat") as f:
        utime, stime = (int(x) for x in f.read().rsplit(")", 1)[1].split()[11:13])
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    ctr = (children.ru_utime + children.ru_stime) * 1000
    own = resource.getrusage(resource.RUSAGE_SELF)
    bench = (own.ru_utime + own.ru_stime) * 1000
    return {"busy": busy * tick, "containerd": (utime + stime) * tick, "ctr": ctr, "bench": bench}


def _when(line: str) -> float | None:
    found = re.match(r'time="([^"]+)"', line)
    if not found:
        return None
    return datetime.fromisoformat(found.group(1)).timestamp()  # 3.11 reads containerd's form


def phases(log: str, cid: str, began: float, ended: float) -> dict[str, float]:
    """Milliseconds of each phase of one serial run (MARKS), from *log* (its lines only)."""
    lines = log.splitlines()
    found, last, at = {}, began, 0
    for number, (name, pattern) in enumerate(MARKS):
        regex = re.compile(pattern.format(cid=re.escape(cid)))
        hits = [i for i in range(at, len(lines)) if regex.search(lines[i])]
        when = _when(lines[hits[-1] if number == 0 else hits[0]]) if hits else None
        if when is None:
            continue  # not logged by this containerd version
        at = hits[-1] if number == 0 else hits[0]  # ctr asks for the mounts twice: the last
        found["until " + name] = (when - last) * 1000
        last = when
    found["ctr exits"] = (ended - last) * 1000
    serving = [_when(line) for line in lines if "shim serving at" in line and f"id={cid}" in line]
    mounts = re.compile(MARKS[0][1].format(cid=re.escape(cid)))
    asked = [_when(line) for line in lines if mounts.search(line)]
    for name, pattern in SHIM_FIGURES.items():
        if pattern is None:
            if serving and asked and serving[0] and asked[-1]:
                found[name] = (serving[0] - asked[-1]) * 1000
            continue
        hit = re.search(pattern.format(cid=re.escape(cid)), log)
        if hit:
            found[name] = float(hit.group(1))
    return found


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--containerd", default="1.6")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="polyshim-wasm-bench-"))
    hello = build_guest("hello").read_bytes()  # before any containerd: clang via subprocess
    with PrivateContainerd(get_install(args.containerd), path_prepend=[VENV_BIN],
                           log_level="debug") as ctrd:  # fmt: skip
        busybox = import_image(ctrd, busybox_image(work))
        archive = wasm_image(work / "wasm.oci.tar", "example.com/bench/hello:1",
                             {"hello.wasm": hello})  # fmt: skip
        wasm = import_image(ctrd, archive)
        bench = Bench(ctrd, work, busybox, wasm)
        runners = {"runc-v2": bench.runc, "wasm-warm": bench.wasm_warm,
                   "wasm-cold": bench.wasm_cold}  # fmt: skip
        for name, run in runners.items():  # warm page cache, pyc, snapshots, the template
            for i in range(3):
                run(f"prep-{name}-{i}")
        latencies: dict[str, list[float]] = {name: [] for name in runners}
        split: dict[str, list[dict[str, float]]] = {name: [] for name in runners}
        for n in range(args.runs):
            for name, run in runners.items():
                cid = f"{name}-lat-{n}"
                mark = len(ctrd.log_text())
                began = time.time()
                run(cid)
                ended = time.time()
                latencies[name].append(ended - began)
                split[name].append(phases(ctrd.log_text()[mark:], cid, began, ended))
        rates, cpu = {}, {}
        assert ctrd.pid is not None
        for name, run in runners.items():
            rates[name], cpu[name] = throughput(run, f"{name}-tp", args.tasks, args.parallel,
                                                ctrd.pid)  # fmt: skip
        version = ctrd.install.version()

    print(f"containerd {version}; latency: {args.runs} runs each, alternating; throughput: "
          f"{args.tasks} tasks, {args.parallel} at a time")  # fmt: skip
    print(f"{'':10} {'median ms':>10} {'p90 ms':>8} {'tasks/s':>9}")
    med = {}
    for name, values in latencies.items():
        med[name], p90 = median_p90(values)
        print(f"{name:10} {med[name] * 1000:10.1f} {p90 * 1000:8.1f} {rates[name]:9.1f}")
    for kind in ("warm", "cold"):
        lat = med[f"wasm-{kind}"] / med["runc-v2"]
        rate = rates[f"wasm-{kind}"] / rates["runc-v2"]
        print(f"wasm {kind}/runc-v2: latency ratio {lat:.2f} (target <= 0.8), "
              f"throughput ratio {rate:.2f} (target >= 2.0)")  # fmt: skip

    print("\nCPU per task in the throughput runs, ms (rest: shim, runc or worker, kernel)")
    print("(bench: this process, the threads that spawn and wait for ctr)")
    columns = (*FIXED, "rest")
    heads = {"containerd": "ctrd"}
    print(f"{'':10} " + " ".join(f"{heads.get(k, k):>6}" for k in columns) + f" {'total':>6}")
    for name, spent in cpu.items():
        cells = " ".join(f"{spent[k]:6.1f}" for k in columns)
        print(f"{name:10} {cells} {sum(spent.values()):6.1f}")
    fixed = sum(cpu["runc-v2"][k] for k in FIXED)
    ratio = sum(cpu["runc-v2"].values()) / fixed
    print(f"a runtime costing no CPU at all would reach a throughput ratio of about {ratio:.2f} "
          "(ctr + bench + containerd stay)")  # fmt: skip
    warm = cpu["wasm-warm"]
    budget = sum(cpu["runc-v2"].values()) / 2 - sum(warm[k] for k in FIXED)
    print(f"2x leaves the wasm runtime {budget:.1f} ms per task (it takes {warm['rest']:.1f}); "
          f"runc-v2's runtime takes {cpu['runc-v2']['rest']:.1f}")  # fmt: skip

    for runtime, runs in bench.lost.items():
        print(f"{runtime}: {runs} run(s) exited 0 but ctr printed no output")
    print("\nwhere a serial run's time goes (medians, ms):")
    print(f"  {'phase':42} " + " ".join(f"{name:>9}" for name in runners))
    names = ["until " + n for n, _ in MARKS] + ["ctr exits", *SHIM_FIGURES]
    for phase in names:
        cells = []
        for name in runners:
            values = [s[phase] for s in split[name] if phase in s]
            cells.append(f"{statistics.median(values):9.1f}" if values else f"{'-':>9}")
        if any(cell.strip() != "-" for cell in cells):
            print(f"  {phase:42} " + " ".join(cells))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
