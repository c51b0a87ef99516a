"""polyshim-snapshotd's drivers against containerd's built-in snapshotters, side by side.

    .venv/bin/python bench/snapshot_bench.py [--imports 9] [--cycles 100]

One private containerd 2.1 (it has overlayfs and erofs built in) with
polyshim-snapshotd as proxy plugins, in one run:
- image unpack: `ctr images import --snapshotter S` of a 4-layer image
  (distinct layers each time, so nothing is reused from an earlier import),
  alternating between the two snapshotters of a pair, each after a `sync`;
- 100 x (Prepare on the image's top layer, mount what it returns, unmount,
  Remove), through containerd's own Snapshots gRPC API, in alternating blocks
  of 10 per snapshotter.
Pairs: polyshim-overlay vs overlayfs, polyshim-erofs vs erofs. Prints
medians and polyshim/built-in ratios (target <= 1.3).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc

from daemon.config import proxy_plugins_toml, unpack_config_toml
from shim_framework.api.services.snapshots.v1 import (
    snapshots_pb2,
    snapshots_pb2_grpc,
)
from shim_framework.backend import Mount
from shim_framework.mounts import mount_all, unmount_all
from tests.harness import File, Layer, PrivateContainerd, build_oci_archive, get_install
from tests.harness.images import host_platform
from tests.harness.snapshotd import SnapshotdProcess, remove_tree, short_tempdir

PAIRS = [("polyshim-overlay", "overlayfs"), ("polyshim-erofs", "erofs")]


def layered_image(work: Path, tag: str) -> Path:
    """Four layers: 20 MB of data files, 2000 small files, a binary-ish blob, a config dir."""
    nonce = secrets.token_hex(8).encode()
    big = {f"data/big{i}": File(bytes([i]) * (5 << 20)) for i in range(4)}
    layers = [
        Layer.from_entries({"nonce": File(nonce), **big}),
        Layer.from_entries({f"small/{i:04d}": File(b"x" * 512) for i in range(2000)}),
        Layer.from_entries({"blob": File(hashlib.sha256(nonce).digest() * 65536)}),
        Layer.from_entries({"etc/app.conf": File(b"answer = 42\n")}),
    ]
    return build_oci_archive(work / f"{tag}.tar", f"bench.local/layers:{tag}", layers, {})


def top_chain_id(archive: Path) -> str:
    """The chain id of the image's last layer: the parent to Prepare on."""
    with tarfile.open(archive) as tar:
        index = json.load(tar.extractfile("index.json"))
        manifest = json.load(tar.extractfile(_blob(index["manifests"][0]["digest"])))
        config = json.load(tar.extractfile(_blob(manifest["config"]["digest"])))
    chain = ""
    for diff_id in config["rootfs"]["diff_ids"]:
        chain = (
            diff_id
            if not chain
            else "sha256:" + hashlib.sha256(f"{chain} {diff_id}".encode()).hexdigest()
        )
    return chain


def _blob(digest: str) -> str:
    return "blobs/sha256/" + digest.split(":", 1)[1]


def time_imports(
    ctrd: PrivateContainerd, pair: tuple[str, str], work: Path, n: int
) -> tuple[dict[str, list[float]], dict[str, Path]]:
    """Import *n* fresh images into each snapshotter of *pair*, alternating; their times, and
    each one's last archive (to Prepare on). Each import starts after a `sync`, so one
    import's writeback is not charged to the next."""
    times: dict[str, list[float]] = {name: [] for name in pair}
    archives: dict[str, Path] = {}
    for i in range(n):
        for snapshotter in pair if i % 2 == 0 else reversed(pair):
            archive = archives[snapshotter] = layered_image(work, f"{snapshotter}-{i}")
            os.sync()
            started = time.perf_counter()
            ctrd.ctr("images", "import", "--platform", host_platform(), "--snapshotter",
                     snapshotter, str(archive), timeout=300)  # fmt: skip
            times[snapshotter].append(time.perf_counter() - started)
    return times, archives


def time_cycles(
    ctrd: PrivateContainerd, pair: tuple[str, str], parents: dict[str, str], work: Path, n: int
) -> dict[str, list[float]]:
    """*n* Prepare+mount+Remove cycles on each snapshotter of *pair*, in alternating blocks
    of BLOCK, so that both see the same drift of the machine."""
    channel = grpc.insecure_channel(f"unix:{ctrd.address}")
    stub = snapshots_pb2_grpc.SnapshotsStub(channel)
    md = [("containerd-namespace", ctrd.namespace)]
    times: dict[str, list[float]] = {name: [] for name in pair}
    targets = {name: work / f"mnt-{name}" for name in pair}
    for target in targets.values():
        target.mkdir()
    try:
        for first in range(0, n, BLOCK):
            for snapshotter in pair:
                parent, target = parents[snapshotter], targets[snapshotter]
                for i in range(first, min(first + BLOCK, n)):
                    key = f"bench-{snapshotter}-{i}"
                    times[snapshotter].append(one_cycle(stub, md, snapshotter, parent, target, key))
    finally:
        for target in targets.values():
            unmount_all(target)
        channel.close()
    return times


BLOCK = 10


def one_cycle(stub: snapshots_pb2_grpc.SnapshotsStub, md: list[tuple[str, str]], snapshotter: str,
              parent: str, target: Path, key: str) -> float:  # fmt: skip
    started = time.perf_counter()
    prepared = stub.Prepare(
        snapshots_pb2.PrepareSnapshotRequest(
            snapshotter=snapshotter,
            key=key,
            parent=parent,
            # without a gc root (or a lease) containerd's GC may take it meanwhile
            labels={"containerd.io/gc.root": "bench"},
        ),
        metadata=md,
    )
    mounts = [Mount(m.type, m.source, m.target, tuple(m.options)) for m in prepared.mounts]
    mount_all(mounts, target)
    assert (target / "etc" / "app.conf").read_bytes() == b"answer = 42\n"
    unmount_all(target)
    stub.Remove(snapshots_pb2.RemoveSnapshotRequest(snapshotter=snapshotter, key=key),
                metadata=md)  # fmt: skip
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--imports", type=int, default=9)
    parser.add_argument("--cycles", type=int, default=100)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="polyshim-snapbench-"))
    names = [ours for ours, _ in PAIRS]
    snapshotd = SnapshotdProcess(
        short_tempdir(),
        ",".join(f"{name}={name.removeprefix('polyshim-')}" for name in names),
        log_level="info",  # as deployed (the test harness logs every call)
    )
    snapshotd.start()
    try:
        config = proxy_plugins_toml(names, snapshotd.socket, config_version=2,
                                    root=snapshotd.root)  # fmt: skip
        config += unpack_config_toml(names, host_platform())
        # containerd's own erofs: its erofs differ needs erofs-utils >= 1.7 (tar mode);
        # Debian 12 has 1.5, so it unpacks with the walking differ and converts at Commit,
        # as our erofs driver does (not a proxy, so written out here).
        config += (
            '\n[[plugins."io.containerd.transfer.v1.local".unpack_config]]\n'
            f'  platform = "{host_platform()}"\n  snapshotter = "erofs"\n  differ = "walking"\n'
        )
        with PrivateContainerd(get_install("2.1"), extra_config=config, log_level="info") as ctrd:
            results = {}
            for pair in PAIRS:
                imports, archives = time_imports(ctrd, pair, work, args.imports)
                parents = {name: top_chain_id(archives[name]) for name in pair}
                cycles = time_cycles(ctrd, pair, parents, work, args.cycles)
                for snapshotter in pair:
                    results[snapshotter] = (statistics.median(imports[snapshotter]),
                                            statistics.median(cycles[snapshotter]))  # fmt: skip
    finally:
        snapshotd.stop()
        remove_tree(snapshotd.base)
        remove_tree(work)

    print(f"containerd 2.1, {args.imports} imports (4 layers, ~31 MB) and {args.cycles} "
          "Prepare+mount+Remove cycles per snapshotter")  # fmt: skip
    print(f"{'snapshotter':18} {'import ms':>10} {'cycle ms':>9}")
    for name, (imp, cyc) in results.items():
        print(f"{name:18} {imp * 1000:10.1f} {cyc * 1000:9.2f}")
    for ours, builtin in PAIRS:
        (oi, oc), (bi, bc) = results[ours], results[builtin]
        print(f"{ours} / {builtin}: import {oi / bi:.2f}, Prepare+mount+Remove {oc / bc:.2f} "
              "(target <= 1.3)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
