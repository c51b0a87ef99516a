"""Where a container's processes live in the cgroup hierarchies: their usage, pids and limits.

Theory of operation
-------------------
A process belongs to one cgroup in every hierarchy the kernel has, and
`/proc/<pid>/cgroup` names them, one `id:controllers:path` line each. v1
hierarchies carry controller names (`4:memory:/psc-ns/c1`, `2:cpu,cpuacct:/x`,
or `1:name=systemd:/x` for a named hierarchy without controllers); the cgroup2
hierarchy is the line `0::/path`. A `Cgroup` is that table, frozen. Its paths
are relative to each hierarchy's root; where each hierarchy is mounted comes
from `/proc/self/mountinfo`, never from a guess.

Hosts come in three layouts, and every function here serves all of them:

- legacy: v1 controllers only;
- hybrid: v1 controllers, plus cgroup2 at /sys/fs/cgroup/unified holding few or
  no controllers (the development machines offer only hugetlb there);
- unified: cgroup2 only, at /sys/fs/cgroup (most production hosts).

Which `Metrics` a cgroup reports follows its memory controller. containerd's
`cgroups.Mode()` calls a host Unified only when /sys/fs/cgroup itself is
cgroup2, and its runc shim reads cgroup1 otherwise, so hybrid hosts report v1
metrics. `Cgroup.mode()` decides per cgroup instead: memory on v1 means v1;
otherwise cgroup2 when the process has a path there and either that hierarchy
has the memory controller or the process has no v1 controller at all. On the
three standard layouts that is containerd's answer; it also lets a cgroup2
group be read on a hybrid host.

Reading follows containerd/cgroups' `Stat` (`cgroup1/*.go`, `cgroup2/manager.go`
and `cgroup2/utils.go`): the same files and units. v1 `cpuacct.stat` counts
USER_HZ ticks and becomes nanoseconds; "max" reads as 0 in v1 files and as
2^64-1 in v2 files, negative numbers as 0. Unlike containerd, a missing file
or controller is skipped rather than failing the call: a host without swap
accounting or a pids controller still gets the rest. A cgroup that is gone is
NotFound, which containerd's metrics collector skips quietly.

Writing (`create`, `update`) translates OCI `linux.resources` the way runc does
(opencontainers/cgroups `fs/*.go` for v1, `fs2/*.go` for v2), including the
write orders where the kernel checks one value against another (memory against
memory+swap, CFS period against quota). v1 goes through cgroupspy, v2 through
plain files. On a hybrid host the cgroup is made in the unified hierarchy too,
as runc does, so the process has a cgroup2 group of its own there as well.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import math
import os
import posixpath
import re
import time
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import attrs

from shim_framework import _platform as plat
from shim_framework.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PolyshimError,
)

if TYPE_CHECKING:
    from google.protobuf import any_pb2
    from google.protobuf.message import Message

U64_MAX = (1 << 64) - 1

# The v1 controllers a new cgroup is made in: every one whose numbers Stats reports.
# (cpuset only when cpu.cpus/cpu.mems ask for it: a new cpuset group needs its
# parent's cpus and mems copied in before it can take a process.)
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "blkio", "hugetlb")
# The cgroup2 controllers a new cgroup gets enabled when its parent offers them.
V2_CONTROLLERS = ("cpu", "memory", "pids", "io", "hugetlb")
# v1 hierarchies Cgroup.procs() may walk. runc walks "devices" and assumes every
# controller has the same path; we take the deepest of these instead, so a process
# that was moved into a memory group but left in the root of the others is not
# reported with every process of the host.
_PROCS_CONTROLLERS = ("pids", "memory", "cpu", "cpuacct", "devices", "freezer", "blkio")


def _frozen_paths(paths: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(paths))


@attrs.frozen
class Cgroup:
    """Where one process lives: its cgroup2 path and its path per v1 controller.

    Paths are relative to each hierarchy's root ("/psc-ns/c1"). `v2_path` is None
    when /proc shows no cgroup2 line; `v1_paths` is empty on a pure cgroup2 host and
    otherwise has one entry per controller ("cpu" and "cpuacct" both when they share
    a hierarchy) and per named hierarchy ("name=systemd").
    """

    v2_path: str | None
    v1_paths: Mapping[str, str] = attrs.field(
        factory=dict, converter=_frozen_paths, hash=False, repr=lambda m: repr(dict(m))
    )

    @classmethod
    def of_pid(cls, pid: int) -> Cgroup:
        """The cgroups of process *pid*. NotFound: the process is gone."""
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                text = f.read()
        except (FileNotFoundError, ProcessLookupError) as e:
            raise NotFound(f"process {pid}: not found; it has exited") from e
        return cls.parse(text)

    @classmethod
    def parse(cls, text: str) -> Cgroup:
        """A `Cgroup` from the text of a `/proc/<pid>/cgroup` file."""
        v2_path: str | None = None
        v1_paths: dict[str, str] = {}
        for line in text.splitlines():
            hierarchy, controllers, path = line.split(":", 2)
            # A zombie whose cgroup was removed shows the old path with this suffix.
            path = path.removesuffix(" (deleted)")
            if hierarchy == "0" and not controllers:
                v2_path = path
            else:
                for controller in controllers.split(","):
                    v1_paths[controller] = path
        return cls(v2_path, v1_paths)

    def mode(self) -> str:
        """Which hierarchy `metrics()` and `procs()` read: "v1" or "v2" (module docstring)."""
        mounts = _mounts()
        if "memory" in self.v1_paths and "memory" in mounts.v1:
            return "v1"
        if self.v2_path is not None and mounts.v2 is not None:
            v1_controllers = [c for c in self.v1_paths if c in mounts.v1 and "=" not in c]
            if not v1_controllers or "memory" in _v2_root_controllers():
                return "v2"
        return "v1"

    def directory(self, controller: str | None = None) -> str | None:
        """This cgroup's directory in *controller*'s v1 hierarchy, or in cgroup2 (None).

        None when that hierarchy is not mounted here or does not show this cgroup."""
        mounts = _mounts()
        if controller is None:
            if self.v2_path is None or mounts.v2 is None:
                return None
            return mounts.v2.dir(self.v2_path)
        path, mount = self.v1_paths.get(controller), mounts.v1.get(controller)
        return None if path is None or mount is None else mount.dir(path)

    def procs(self) -> list[int]:
        """Every pid in this cgroup and its sub-cgroups (runc ps does the same walk).

        NotFound: the cgroup is gone."""
        top = self._procs_dir()
        if top is None:
            raise NotFound(f"{self}: no mounted hierarchy shows it")
        try:
            pids = _read_pids(top)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENODEV):
                raise NotFound(f"{self}: not found; its processes have exited") from e
            raise
        for parent, children, _ in os.walk(top):
            for child in children:
                try:
                    pids.extend(_read_pids(os.path.join(parent, child)))
                except OSError as e:  # a sub-cgroup removed while we walk
                    if e.errno not in (errno.ENOENT, errno.ENODEV):
                        raise
        return pids

    def metrics(self) -> any_pb2.Any:
        """`io.containerd.cgroups.v1.Metrics` or `...v2.Metrics` (per `mode()`) in an Any.

        Missing files and controllers are left out. NotFound: the cgroup is gone."""
        from google.protobuf import any_pb2

        anchor = self._procs_dir()
        gone = NotFound(f"{self}: not found; its processes have exited")
        if anchor is None or not os.path.isdir(anchor):
            raise gone
        try:
            message = _v1_metrics(self) if self.mode() == "v1" else _v2_metrics(anchor)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENODEV) and not os.path.isdir(anchor):
                raise gone from e
            raise
        if not os.path.isdir(anchor):  # removed while we read: the numbers are not its last
            raise gone
        # Bare type names: containerd's typeurl registry and CRI expect these.
        return any_pb2.Any(type_url=message.DESCRIPTOR.full_name, value=message.SerializeToString())

    def is_same_as(self, other: Cgroup) -> bool:
        """Whether both are the same cgroup in every hierarchy.

        Named v1 hierarchies (name=systemd) do not count: they have no controller,
        so nothing Stats or Pids reads lives there."""
        return self._key() == other._key()

    def __str__(self) -> str:
        controller = None if self.mode() == "v2" else self._procs_controller()
        return f'cgroup "{self.v1_paths[controller] if controller else self.v2_path}"'

    # -- helpers --

    def _key(self) -> tuple[str | None, dict[str, str]]:
        return self.v2_path, {c: p for c, p in self.v1_paths.items() if "=" not in c}

    def _procs_controller(self) -> str | None:
        """The v1 controller whose hierarchy `procs()` walks: the deepest path among
        `_PROCS_CONTROLLERS` (the first of them on a tie), else any mounted controller."""
        mounted = [c for c in self.v1_paths if "=" not in c and self.directory(c) is not None]
        ranked = [c for c in _PROCS_CONTROLLERS if c in mounted] or mounted
        return max(ranked, key=lambda c: self.v1_paths[c].rstrip("/").count("/"), default=None)

    def _procs_dir(self) -> str | None:
        if self.mode() == "v2":
            return self.directory()
        controller = self._procs_controller()
        return None if controller is None else self.directory(controller)

    def _v1(self, controller: str) -> _V1Controller | None:
        directory = self.directory(controller)
        return None if directory is None else _V1Controller(controller, directory)

    def _directories(self) -> list[str]:
        """Every directory of this cgroup, once each (co-mounted controllers share one)."""
        found = [self.directory(c) for c in self.v1_paths] + [self.directory()]
        return list(dict.fromkeys(d for d in found if d is not None))


def self_cgroup() -> Cgroup:
    """The cgroups of this process."""
    return Cgroup.of_pid(os.getpid())


# -- making, changing and removing cgroups ---------------------------------------------------------


def create(path: str, resources: Mapping[str, Any] | None = None) -> Cgroup:
    """Make cgroup *path* ("/polyshim/<ns>/<id>", from the hierarchy roots) and set its limits.

    With v1 controllers on the host: in each mounted hierarchy of `V1_CONTROLLERS`
    (plus cpuset when `cpu.cpus` or `cpu.mems` is set), and on a hybrid host in the
    unified hierarchy too. On a cgroup2 host: one directory, with `V2_CONTROLLERS`
    enabled in its ancestors where offered. An existing cgroup is reused.
    *resources* is OCI `linux.resources`, applied as `update` does. If applying fails,
    the directories this call made are removed again.
    """
    path = _check_path(path)
    spec = _Resources.parse(resources)
    mounts = _mounts()
    if "memory" in mounts.v1:
        controllers = list(V1_CONTROLLERS)
        if spec.cpus is not None or spec.mems is not None:
            controllers.append("cpuset")
        controllers = [c for c in controllers if c in mounts.v1]
        cgroup = Cgroup(path if mounts.v2 else None, dict.fromkeys(controllers, path))
    elif mounts.v2 is not None:
        cgroup = Cgroup(path, {})
    else:
        raise FailedPrecondition(
            f'cgroup "{path}": no cgroup hierarchy is mounted here; mount cgroup2 '
            "at /sys/fs/cgroup (or v1 controllers under it)"
        )
    existed = [d for d in cgroup._directories() if os.path.isdir(d)]
    try:
        for controller in cgroup.v1_paths:
            _v1_mkdir(mounts.v1[controller], path, cgroup, copy_cpuset=controller == "cpuset")
        if cgroup.v2_path is not None:
            assert mounts.v2 is not None
            if cgroup.v1_paths:  # hybrid: a plain group, as runc makes; no controllers here
                _v2_mkdir(mounts.v2, path, ())
            else:
                wanted = list(V2_CONTROLLERS)
                if spec.cpus is not None or spec.mems is not None:
                    wanted.append("cpuset")
                _v2_mkdir(mounts.v2, path, wanted)
        _apply(cgroup, spec)
    except BaseException:
        made = [d for d in cgroup._directories() if d not in existed]
        for directory in made:
            # The first error is the one to report.
            with contextlib.suppress(OSError, PolyshimError):
                _rmdir(directory, cgroup)
        raise
    return cgroup


def update(cg: Cgroup, resources: Mapping[str, Any] | None) -> None:
    """Apply OCI `linux.resources` to *cg*, translated as runc translates them.

    Applied: memory.limit, memory.swap, memory.reservation, cpu.shares, cpu.quota,
    cpu.period, cpu.cpus, cpu.mems, pids.limit, hugepageLimits, and `unified` (cgroup2
    only). Not applied: blockIO, devices, network, rdma, realtime cpu, kernel memory.
    InvalidArgument: a malformed value, or one the kernel refuses. FailedPrecondition:
    the controller a value needs is not available. NotFound: the cgroup is gone."""
    _apply(cg, _Resources.parse(resources))


def add_process(cg: Cgroup, pid: int) -> None:
    """Move process *pid* (all its threads) into *cg* in every hierarchy *cg* has a path in.

    FailedPrecondition: no mounted hierarchy shows *cg*. NotFound: the process or the cgroup
    is gone."""
    directories = _v1_directories(cg)
    if not directories and cg.directory() is None:
        raise FailedPrecondition(f"{cg}: no mounted hierarchy shows it; cannot add process {pid}")
    for controller, directory in directories:
        _V1Controller(controller, directory).write("cgroup.procs", pid, cg)
    add_process_v2(cg, pid)


def add_process_v2(cg: Cgroup, pid: int) -> None:
    """Move process *pid* into *cg* in cgroup2 only, for one that enters the v1 hierarchies
    itself (`enter_v1`); nothing where cgroup2 does not show *cg*.

    NotFound: the process or the cgroup is gone."""
    directory = cg.directory()
    if directory is not None:
        _write(directory, "cgroup.procs", pid, cg)


def enter_v1(cg: Cgroup) -> None:
    """Move the calling thread into *cg* in every v1 hierarchy: in a single-threaded process
    (a fresh fork), the process. A thread moving itself (0 to `tasks`) skips the kernel's
    global threadgroup lock, whose first writer waits for an RCU grace period: 6-15 ms per
    `add_process` on this VM, ~1 ms for this. cgroup2 has no such way in (`cgroup.threads`
    needs a threaded subtree).

    FailedPrecondition: no v1 hierarchy shows *cg*. NotFound: the cgroup is gone."""
    directories = _v1_directories(cg)
    if not directories:
        raise FailedPrecondition(f"{cg}: no mounted v1 hierarchy shows it; cannot enter it")
    for _, directory in directories:
        _write(directory, "tasks", 0, cg)


def _v1_directories(cg: Cgroup) -> list[tuple[str, str]]:
    """(controller, directory) for each distinct v1 directory of *cg* that is mounted here."""
    found: dict[str, str] = {}
    for controller in cg.v1_paths:
        directory = cg.directory(controller)
        if directory is not None and directory not in found:
            found[directory] = controller
    return [(controller, directory) for directory, controller in found.items()]


def remove(cg: Cgroup) -> None:
    """Remove *cg*'s directories, and empty sub-cgroups below them, in every hierarchy.

    Meant for cgroups made by `create`. Kills nothing; already gone is fine.
    FailedPrecondition: processes are still inside."""
    for directory in cg._directories():
        if not os.path.isdir(directory):
            continue
        if os.path.ismount(directory):  # the root of a hierarchy is never ours to remove
            raise InvalidArgument(f"{cg}: is the root of a hierarchy; refusing to remove it")
        for parent, _, _ in os.walk(directory, topdown=False):
            _rmdir(parent, cg)


# -- OCI linux.resources ---------------------------------------------------------------------------


def _int(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"linux.resources.{where}: {value!r} is not an integer")
    return value


def _str(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidArgument(f"linux.resources.{where}: {value!r} is not a string")
    return value


_PAGE_SIZE = re.compile(r"[1-9][0-9]*[KMG]B")
_UNIFIED_KEY = re.compile(r"[a-z_]+\.[a-z0-9_.]+")


@attrs.frozen
class _Resources:
    """The part of OCI `linux.resources` we apply; None is "leave as it is"."""

    memory_limit: int | None = None
    memory_swap: int | None = None  # memory + swap, as OCI and cgroup v1 count it
    memory_reservation: int | None = None
    cpu_shares: int | None = None
    cpu_quota: int | None = None
    cpu_period: int | None = None
    cpus: str | None = None
    mems: str | None = None
    pids_limit: int | None = None
    hugepages: tuple[tuple[str, int], ...] = ()
    unified: Mapping[str, str] = attrs.field(factory=dict)

    @classmethod
    def parse(cls, resources: Mapping[str, Any] | None) -> _Resources:
        if not resources:
            return cls()
        if not isinstance(resources, Mapping):
            raise InvalidArgument(f"linux.resources: {resources!r} is not an object")
        memory = resources.get("memory") or {}
        cpu = resources.get("cpu") or {}
        pids = resources.get("pids") or {}
        hugepages = []
        for i, entry in enumerate(resources.get("hugepageLimits") or ()):
            size = _str(entry.get("pageSize"), f"hugepageLimits[{i}].pageSize")
            limit = _int(entry.get("limit"), f"hugepageLimits[{i}].limit")
            if size is None or not _PAGE_SIZE.fullmatch(size) or limit is None:
                raise InvalidArgument(
                    f"linux.resources.hugepageLimits[{i}]: {entry!r} needs a pageSize "
                    'such as "2MB" and a limit in bytes'
                )
            hugepages.append((size, limit))
        unified = resources.get("unified") or {}
        for key, value in unified.items():
            if not _UNIFIED_KEY.fullmatch(key) or not isinstance(value, str):
                raise InvalidArgument(
                    f"linux.resources.unified: {key!r}: {value!r} is not a cgroup2 file "
                    'name and string value (e.g. "memory.high": "1G")'
                )
        return cls(
            memory_limit=_int(memory.get("limit"), "memory.limit"),
            memory_swap=_int(memory.get("swap"), "memory.swap"),
            memory_reservation=_int(memory.get("reservation"), "memory.reservation"),
            cpu_shares=_int(cpu.get("shares"), "cpu.shares"),
            cpu_quota=_int(cpu.get("quota"), "cpu.quota"),
            cpu_period=_int(cpu.get("period"), "cpu.period"),
            cpus=_str(cpu.get("cpus"), "cpu.cpus") or None,
            mems=_str(cpu.get("mems"), "cpu.mems") or None,
            pids_limit=_int(pids.get("limit"), "pids.limit"),
            hugepages=tuple(hugepages),
            unified=dict(unified),
        )


def _apply(cg: Cgroup, spec: _Resources) -> None:
    if spec == _Resources():
        return
    if cg.mode() == "v1":
        if spec.unified:
            raise InvalidArgument(
                f"{cg}: linux.resources.unified needs cgroup2, and this cgroup's "
                "memory controller is on cgroup v1"
            )
        _v1_apply(cg, spec)
    else:
        _v2_apply(cg, spec)


def _need(cg: Cgroup, controller: str) -> _V1Controller:
    found = cg._v1(controller)
    if found is None:
        raise FailedPrecondition(
            f"{cg}: the {controller} controller is not available; "
            f"the limit set on it cannot be applied"
        )
    return found


def _v1_apply(cg: Cgroup, spec: _Resources) -> None:
    """runc's fs (v1) driver: memory.go, cpu.go, cpuset.go, pids.go, hugetlb.go."""
    limit, swap = spec.memory_limit, spec.memory_swap
    if limit or swap or spec.memory_reservation:
        memory = _need(cg, "memory")
        has_swap = memory.exists("memory.memsw.limit_in_bytes")
        if limit == -1 and not swap and has_swap:
            swap = -1  # "unlimited memory" means unlimited memory+swap too (runc)
        if swap and not has_swap:
            if swap not in (-1, limit):  # only "no swap limit" and "no swap" need no memsw
                raise FailedPrecondition(
                    f"{cg}: memory.swap is set but this kernel does not account swap "
                    "(no memory.memsw.*); boot with swapaccount=1 or drop the swap limit"
                )
            swap = None
        steps: list[tuple[str, int]] = []
        if limit:
            steps.append(("limit_in_bytes", limit))
        if swap:
            # The kernel keeps memory <= memory+swap at every step, so raise memsw first
            # when it grows past the current memory limit (runc setMemoryAndSwap).
            current = memory.number("memory.limit_in_bytes") or 0
            first = limit and (swap == -1 or current < swap)
            steps.insert(0 if first else len(steps), ("memsw_limit_in_bytes", swap))
        if spec.memory_reservation:
            steps.append(("soft_limit_in_bytes", spec.memory_reservation))
        for attribute, value in steps:
            memory.set(attribute, value, cg)

    if spec.cpu_shares or spec.cpu_quota or spec.cpu_period:
        cpu = _need(cg, "cpu")
        if spec.cpu_shares:
            cpu.set("shares", spec.cpu_shares, cg)
            got = cpu.number("cpu.shares")
            if got != spec.cpu_shares:  # the kernel clamps instead of refusing
                raise InvalidArgument(
                    f"{cg}: cpu.shares {spec.cpu_shares} is out of range; the kernel "
                    f"made it {got} (allowed: 2 to 262144)"
                )
        retry_period = None
        if spec.cpu_period:
            try:
                cpu.set("cfs_period_us", spec.cpu_period, cg)
            except InvalidArgument:
                # A shorter period can fail against the current quota; runc retries
                # it after setting the quota.
                if not spec.cpu_quota:
                    raise
                retry_period = spec.cpu_period
        if spec.cpu_quota:
            cpu.set("cfs_quota_us", spec.cpu_quota, cg)
            if retry_period is not None:
                cpu.set("cfs_period_us", retry_period, cg)

    if spec.cpus is not None or spec.mems is not None:
        cpuset = _need(cg, "cpuset")
        # cgroupspy's CpuSetController cannot take range strings like "0-3".
        if spec.cpus is not None:
            cpuset.write("cpuset.cpus", spec.cpus, cg)
        if spec.mems is not None:
            cpuset.write("cpuset.mems", spec.mems, cg)

    if spec.pids_limit is not None:
        _need(cg, "pids").write("pids.max", _pids_max(spec.pids_limit), cg)

    for size, hugepage_limit in spec.hugepages:
        _need(cg, "hugetlb").write(f"hugetlb.{size}.limit_in_bytes", hugepage_limit, cg)


def _v2_apply(cg: Cgroup, spec: _Resources) -> None:
    """runc's fs2 driver: memory.go, cpu.go, cpuset.go, pids.go, hugetlb.go, unified."""
    mounts = _mounts()
    directory = cg.directory()
    if directory is None or cg.v2_path is None or mounts.v2 is None:
        raise FailedPrecondition(f"{cg}: it has no cgroup2 group here to set limits on")
    writes: list[tuple[str, str, bool]] = []  # (file, value, fine if the file is missing)

    limit, swap = spec.memory_limit, spec.memory_swap
    if limit or swap:
        v2_swap = _v2_swap(limit or 0, swap or 0, cg)
        text = _v2_number(v2_swap)
        if not text and v2_swap == 0 and (swap or 0) > 0:
            text = "0"  # memory == memory+swap: no swap at all
        if text:
            # No memory.swap.max means no swap: "max" and "0" are then true already.
            writes.append(("memory.swap.max", text, text in ("max", "0")))
        if text := _v2_number(limit or 0):
            writes.append(("memory.max", text, False))
    if text := _v2_number(spec.memory_reservation or 0):
        writes.append(("memory.low", text, False))

    if spec.cpu_shares:
        writes.append(("cpu.weight", str(cpu_shares_to_weight(spec.cpu_shares)), False))
    if spec.cpu_quota or spec.cpu_period:
        quota = str(spec.cpu_quota) if spec.cpu_quota and spec.cpu_quota > 0 else "max"
        period = spec.cpu_period or 100_000  # the kernel's default (cgroup-v2.rst)
        writes.append(("cpu.max", f"{quota} {period}", False))
    if spec.cpus is not None:
        writes.append(("cpuset.cpus", spec.cpus, False))
    if spec.mems is not None:
        writes.append(("cpuset.mems", spec.mems, False))
    if spec.pids_limit is not None:
        writes.append(("pids.max", _pids_max(spec.pids_limit), False))
    for size, hugepage_limit in spec.hugepages:
        writes.append((f"hugetlb.{size}.max", str(hugepage_limit), False))
    for key, value in spec.unified.items():
        writes.append((key, value, False))

    _v2_enable(mounts.v2, cg.v2_path, [name.split(".", 1)[0] for name, _, _ in writes])
    for name, value, optional in writes:
        if optional and not os.path.exists(os.path.join(directory, name)):
            continue
        _write(directory, name, value, cg)


def cpu_shares_to_weight(shares: int) -> int:
    """cgroup v1 cpu.shares [2, 262144] to cgroup2 cpu.weight [1, 10000].

    The quadratic fit runc uses since opencontainers/cgroups 0.0.3 (utils.go
    `ConvertCPUSharesToCgroupV2Value`): it maps 2 -> 1, 1024 -> 100, 262144 -> 10000.
    runc before 1.3 (Debian 12 ships 1.1) used the line 1 + (shares - 2) * 9999 / 262142,
    which maps the default 1024 to 39."""
    if shares <= 0:
        return 0
    if shares <= 2:
        return 1
    if shares >= 262144:
        return 10000
    log2 = math.log2(shares)
    return math.ceil(10 ** ((log2 * log2 + 125 * log2) / 612 - 7 / 34))


def _v2_swap(limit: int, swap: int, cg: Cgroup) -> int:
    """OCI memory.swap counts memory + swap; cgroup2's memory.swap.max counts swap alone.
    0 is "unset", -1 "unlimited" (runc `ConvertMemorySwapToCgroupV2Value`)."""
    if limit == -1 and swap == 0:
        return -1  # as in v1: unlimited memory with swap unset means unlimited both
    if swap in (-1, 0) or limit == -1:
        return swap
    if limit == 0:
        raise InvalidArgument(f"{cg}: memory.swap {swap} needs memory.limit to be set too")
    if limit < 0:
        raise InvalidArgument(f"{cg}: memory.limit {limit} is invalid (-1 means unlimited)")
    if swap < limit:
        raise InvalidArgument(
            f"{cg}: memory.swap {swap} is below memory.limit {limit}; memory.swap counts "
            "memory plus swap, so it must be at least the memory limit"
        )
    return swap - limit


def _v2_number(value: int) -> str:
    return {0: "", -1: "max"}.get(value, str(value))


def _pids_max(limit: int) -> str:
    if limit > 0:
        return str(limit)
    # 0 becomes 1 as in runc: systemd cannot express 0, and both drivers must agree.
    return "1" if limit == 0 else "max"


# -- files -----------------------------------------------------------------------------------------


def _check_path(path: str) -> str:
    if (
        not isinstance(path, str)
        or not path.startswith("/")
        or path == "/"
        or posixpath.normpath(path) != path
    ):
        raise InvalidArgument(
            f"cgroup path {path!r}: must be absolute and normalized below the root, "
            'like "/polyshim/default/c1"'
        )
    return path


def _refused(cg: Cgroup, name: str, value: object, e: OSError) -> PolyshimError:
    """The error for a refused write of *value* to *name*, by what the kernel said."""
    what = f"{cg}: writing {value!r} to {name}"
    if name == "cgroup.procs" and e.errno == errno.ESRCH:
        return NotFound(f"process {value}: not found; it has exited")
    if e.errno == errno.ENOENT:
        if name == "cgroup.procs" or name == "cgroup.subtree_control":
            return NotFound(f"{cg}: not found; it was removed")
        controller = name.split(".", 1)[0]
        return FailedPrecondition(
            f"{what}: no such file; the {controller} controller is not available here"
        )
    if e.errno in (errno.EINVAL, errno.ERANGE, errno.EOVERFLOW):
        return InvalidArgument(f"{what}: refused by the kernel ({e.strerror}); check the value")
    if e.errno == errno.EBUSY:
        return FailedPrecondition(
            f"{what}: busy ({e.strerror}); the cgroup's current use or its children "
            "conflict with the new value"
        )
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return FailedPrecondition(f"{what}: {e.strerror}; cgroups are managed as root")
    return PolyshimError(f"{what}: {e.strerror}")


def _write(directory: str, name: str, value: object, cg: Cgroup) -> None:
    """One write(2) of *value* to a cgroup2 file (no O_CREAT: a missing file stays missing)."""
    try:
        fd = os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, str(value).encode())
        finally:
            os.close(fd)
    except OSError as e:
        raise _refused(cg, name, value, e) from e


def _read(path: str) -> str | None:
    """A cgroup file's text; None when there is no such file (or no PSI on this kernel)."""
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.EOPNOTSUPP:  # pressure files when booted with psi=0
            return None
        raise


def _uint(text: str, max_value: int) -> int:
    """A counter as containerd parses it: "max" is *max_value*, negative is 0."""
    text = text.strip()
    if text == "max":
        return max_value
    return min(max(int(text), 0), U64_MAX)


def _kv(text: str) -> dict[str, int]:
    """A flat keyed file ("key value" lines); lines of another shape are skipped."""
    table = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            with contextlib.suppress(ValueError):
                table[parts[0]] = _uint(parts[1], U64_MAX)
    return table


def _number(path: str, max_value: int = U64_MAX) -> int | None:
    text = _read(path)
    return None if text is None or not text.strip() else _uint(text, max_value)


def _table(path: str) -> dict[str, int] | None:
    text = _read(path)
    return None if text is None else _kv(text)


def _read_pids(directory: str) -> list[int]:
    try:
        text = _read_required(os.path.join(directory, "cgroup.procs"))
    except OSError as e:
        if e.errno != errno.EOPNOTSUPP:
            raise
        # A threaded cgroup2 group refuses cgroup.procs; runc reads its threads.
        text = _read_required(os.path.join(directory, "cgroup.threads"))
    return [int(line) for line in text.split()]


def _read_required(path: str) -> str:
    with open(path) as f:
        return f.read()


def _rmdir(directory: str, cg: Cgroup) -> None:
    # The kernel can still say EBUSY just after the last process exited, until the
    # exit is complete; containerd retries 5 times from 10 ms, doubling.
    delay = 0.01
    for attempt in range(6):
        try:
            os.rmdir(directory)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                raise PolyshimError(f"{cg}: cannot remove {directory}: {e.strerror}") from e
            if attempt == 5:
                raise FailedPrecondition(
                    f"{cg}: cannot remove {directory}: processes or sub-cgroups "
                    "are still inside; kill them first"
                ) from e
        time.sleep(delay)
        delay *= 2


# -- v1 through cgroupspy --------------------------------------------------------------------------


class _V1Controller:
    """One v1 controller's directory of a cgroup, through cgroupspy.

    cgroupspy models memory, cpu, cpuacct, cpuset and blkio files; its typed
    attributes set the limits it knows, and its plain file access covers the rest
    (pids, hugetlb, kmem). Numbers are read as text and parsed the way containerd
    does: cgroupspy's integer files would turn -1 into None and "max" into an error.
    """

    def __init__(self, controller: str, directory: str) -> None:
        from cgroupspy import controllers, nodes

        cls = {
            "memory": controllers.MemoryController,
            "cpu": controllers.CpuController,
            "cpuacct": controllers.CpuAcctController,
            "cpuset": controllers.CpuSetController,
            "blkio": controllers.BlkIOController,
        }.get(controller, controllers.Controller)
        self.directory = directory
        self.ctl = cls(nodes.Node(directory.encode()))

    def exists(self, name: str) -> bool:
        return os.path.exists(os.path.join(self.directory, name))

    def text(self, name: str) -> str | None:
        try:
            return self.ctl.get_property(name.encode())
        except FileNotFoundError:
            return None

    def number(self, name: str) -> int | None:
        text = self.text(name)
        return None if text is None or not text else _uint(text, 0)  # v1 readUint: max is 0

    def table(self, name: str) -> dict[str, int] | None:
        text = self.text(name)
        return None if text is None else _kv(text)

    def set(self, attribute: str, value: int, cg: Cgroup) -> None:
        """Set a file cgroupspy models, by its attribute name (`limit_in_bytes`)."""
        try:
            setattr(self.ctl, attribute, value)
        except OSError as e:
            name = self.ctl.get_interface(attribute).filename.decode()
            raise _refused(cg, name, value, e) from e

    def write(self, name: str, value: object, cg: Cgroup) -> None:
        """Write a file cgroupspy has no attribute for."""
        try:
            self.ctl.set_property(name.encode(), value)
        except OSError as e:
            raise _refused(cg, name, value, e) from e


def _v1_mkdir(mount: _Mount, path: str, cg: Cgroup, copy_cpuset: bool) -> None:
    from cgroupspy.nodes import Node

    directory = mount.dir(path)
    if directory is None:
        raise FailedPrecondition(
            f'cgroup "{path}": the hierarchy mounted at {mount.point} shows only '
            f'"{mount.root}" and below; choose a path under it'
        )
    node = Node(mount.point.encode())
    for part in os.path.relpath(directory, mount.point).split("/"):
        parent = node
        try:
            node = parent.create_cgroup(part)  # mkdir; an existing one is fine
        except OSError as e:
            raise FailedPrecondition(
                f'cgroup "{path}": cannot make {node.full_path.decode()}/{part}: {e.strerror}'
            ) from e
        if copy_cpuset:
            _cpuset_copy_if_empty(parent.full_path.decode(), node.full_path.decode(), cg)


def _cpuset_copy_if_empty(parent: str, child: str, cg: Cgroup) -> None:
    # A new v1 cpuset group starts with no cpus and no mems and refuses processes
    # until it has both; runc copies the parent's (cpusetCopyIfNeeded).
    mine, theirs = _V1Controller("cpuset", child), _V1Controller("cpuset", parent)
    for name in ("cpuset.cpus", "cpuset.mems"):
        if not mine.text(name):
            mine.write(name, theirs.text(name) or "", cg)


def _v1_metrics(cg: Cgroup) -> Message:
    """containerd/cgroups cgroup1 `Stat`, one controller after another."""
    from shim_framework.api.cgroups.v1 import metrics_pb2 as v1

    metrics = v1.Metrics()
    if (memory := cg._v1("memory")) is not None:
        _v1_memory(memory, metrics)
    _v1_cpu(cg._v1("cpuacct"), cg._v1("cpu"), metrics)
    if (pids := cg._v1("pids")) is not None and (
        current := pids.number("pids.current")
    ) is not None:
        metrics.pids.current = current
        metrics.pids.limit = pids.number("pids.max") or 0
    if (blkio := cg._v1("blkio")) is not None:
        _v1_blkio(blkio, metrics.blkio)
    if (hugetlb := cg._v1("hugetlb")) is not None:
        for size in _hugepage_sizes():
            usage = hugetlb.number(f"hugetlb.{size}.usage_in_bytes")
            if usage is not None:
                metrics.hugetlb.add(
                    pagesize=size,
                    usage=usage,
                    max=hugetlb.number(f"hugetlb.{size}.max_usage_in_bytes") or 0,
                    failcnt=hugetlb.number(f"hugetlb.{size}.failcnt") or 0,
                )
    return metrics


# memory.stat keys whose MemoryStat field is spelled differently (the rest match).
_V1_MEMORY_KEYS = {
    "pg_pg_in": "pgpgin",
    "pg_pg_out": "pgpgout",
    "pg_fault": "pgfault",
    "pg_maj_fault": "pgmajfault",
    "hierarchical_swap_limit": "hierarchical_memsw_limit",
    "total_pg_pg_in": "total_pgpgin",
    "total_pg_pg_out": "total_pgpgout",
    "total_pg_fault": "total_pgfault",
    "total_pg_maj_fault": "total_pgmajfault",
}


def _v1_memory(memory: _V1Controller, metrics: Any) -> None:
    stat = memory.table("memory.stat")
    if stat is not None:
        _fill(metrics.memory, stat, _V1_MEMORY_KEYS)
    for field, prefix in (
        ("usage", "memory."),
        ("swap", "memory.memsw."),
        ("kernel", "memory.kmem."),
        ("kernel_tcp", "memory.kmem.tcp."),
    ):
        usage = memory.number(prefix + "usage_in_bytes")
        if usage is None:  # no swap accounting, or a kernel without kmem files
            continue
        entry = getattr(metrics.memory, field)
        entry.usage = usage
        entry.max = memory.number(prefix + "max_usage_in_bytes") or 0
        entry.failcnt = memory.number(prefix + "failcnt") or 0
        entry.limit = memory.number(prefix + "limit_in_bytes") or 0
    if (oom := memory.table("memory.oom_control")) is not None:
        _fill(metrics.memory_oom_control, oom)


def _v1_cpu(cpuacct: _V1Controller | None, cpu: _V1Controller | None, metrics: Any) -> None:
    if cpuacct is not None:
        if (total := cpuacct.number("cpuacct.usage")) is not None:
            metrics.cpu.usage.total = total
        if (percpu := cpuacct.text("cpuacct.usage_percpu")) is not None:
            metrics.cpu.usage.per_cpu.extend(_uint(v, 0) for v in percpu.split())
        if (ticks := cpuacct.table("cpuacct.stat")) is not None:
            # USER_HZ ticks; containerd assumes 100, which sysconf also says on Linux.
            hz = os.sysconf("SC_CLK_TCK")
            metrics.cpu.usage.user = ticks.get("user", 0) * 1_000_000_000 // hz
            metrics.cpu.usage.kernel = ticks.get("system", 0) * 1_000_000_000 // hz
    if cpu is not None and (stat := cpu.table("cpu.stat")) is not None:
        metrics.cpu.throttling.periods = stat.get("nr_periods", 0)
        metrics.cpu.throttling.throttled_periods = stat.get("nr_throttled", 0)
        metrics.cpu.throttling.throttled_time = stat.get("throttled_time", 0)


# blkio files per BlkIOStat field: the CFQ/BFQ "_recursive" set when the kernel has it
_V1_BLKIO_RECURSIVE = (
    ("sectors_recursive", "blkio.sectors_recursive"),
    ("io_service_bytes_recursive", "blkio.io_service_bytes_recursive"),
    ("io_serviced_recursive", "blkio.io_serviced_recursive"),
    ("io_queued_recursive", "blkio.io_queued_recursive"),
    ("io_service_time_recursive", "blkio.io_service_time_recursive"),
    ("io_wait_time_recursive", "blkio.io_wait_time_recursive"),
    ("io_merged_recursive", "blkio.io_merged_recursive"),
    ("io_time_recursive", "blkio.time_recursive"),
)
# ... else the throttle files, which every kernel with blkio has (containerd's fallback).
_V1_BLKIO_THROTTLE = (
    ("io_serviced_recursive", "blkio.throttle.io_serviced"),
    ("io_service_bytes_recursive", "blkio.throttle.io_service_bytes"),
)


def _v1_blkio(blkio: _V1Controller, stat: Any) -> None:
    devices = _block_devices()
    count = 0
    if blkio.exists("blkio.io_serviced_recursive"):
        count = _v1_blkio_files(blkio, stat, _V1_BLKIO_RECURSIVE, devices)
    if count == 0:  # no CFQ files, or a cgroup whose devices use another scheduler
        _v1_blkio_files(blkio, stat, _V1_BLKIO_THROTTLE, devices)


def _v1_blkio_files(
    blkio: _V1Controller,
    stat: Any,
    files: Iterable[tuple[str, str]],
    devices: Mapping[tuple[int, int], str],
) -> int:
    count = 0
    for field, name in files:
        text = blkio.text(name)
        if text is None:
            continue
        for line in text.splitlines():
            # "8:0 Read 4096", "8:0 4096" (no operation), or the "Total 4096" line
            fields = line.replace(":", " ").split()
            if len(fields) not in (3, 4) or not fields[0].isdigit():
                continue
            major, minor = int(fields[0]), int(fields[1])
            getattr(stat, field).add(
                op=fields[2] if len(fields) == 4 else "",
                device=devices.get((major, minor), ""),
                major=major,
                minor=minor,
                value=_uint(fields[-1], 0),
            )
            count += 1
    return count


@functools.cache
def _block_devices() -> Mapping[tuple[int, int], str]:
    """(major, minor) -> /dev/name from /proc/partitions; the first name wins, as in containerd."""
    devices: dict[tuple[int, int], str] = {}
    for line in (_read("/proc/partitions") or "").splitlines()[2:]:
        fields = line.split()
        if len(fields) == 4 and fields[0].isdigit() and fields[1].isdigit():
            devices.setdefault((int(fields[0]), int(fields[1])), "/dev/" + fields[3])
    return devices


# -- v2 --------------------------------------------------------------------------------------------


# MemoryStat fields that come from their own files rather than memory.stat
_V2_MEMORY_FILES = (
    ("usage", "memory.current"),
    ("usage_limit", "memory.max"),
    ("max_usage", "memory.peak"),
    ("swap_usage", "memory.swap.current"),
    ("swap_limit", "memory.swap.max"),
    ("swap_max_usage", "memory.swap.peak"),
)


def _v2_metrics(directory: str) -> Message:
    """containerd/cgroups cgroup2 `Manager.Stat`."""
    from shim_framework.api.cgroups.v2 import metrics_pb2 as v2

    def path(name: str) -> str:
        return os.path.join(directory, name)

    metrics = v2.Metrics()
    if (current := _number(path("pids.current"))) is not None:
        metrics.pids.current = current
        metrics.pids.limit = _number(path("pids.max")) or 0
    if (cpu := _table(path("cpu.stat"))) is not None:
        _fill(metrics.cpu, cpu)
        _fill_psi(metrics.cpu.psi, path("cpu.pressure"))
    if (memory := _table(path("memory.stat"))) is not None:
        own_files = {field for field, _ in _V2_MEMORY_FILES}
        _fill(metrics.memory, {k: v for k, v in memory.items() if k not in own_files})
        for field, name in _V2_MEMORY_FILES:
            if (value := _number(path(name))) is not None:
                setattr(metrics.memory, field, value)
        _fill_psi(metrics.memory.psi, path("memory.pressure"))
    if (events := _table(path("memory.events"))) is not None:
        _fill(metrics.memory_events, events)
    for line in (_read(path("io.stat")) or "").splitlines():
        # "8:0 rbytes=4096 wbytes=0 rios=1 wios=0 dbytes=0 dios=0"
        device, *pairs = line.split() or [""]
        major, _, minor = device.partition(":")
        if major.isdigit() and minor.isdigit():
            entry = metrics.io.usage.add(major=int(major), minor=int(minor))
            _fill(entry, _kv("\n".join(p.replace("=", " ") for p in pairs)))
    _fill_psi(metrics.io.psi, path("io.pressure"))
    for field, name in (("current", "rdma.current"), ("limit", "rdma.max")):
        for line in (_read(path(name)) or "").splitlines():
            # "mlx4_0 hca_handle=2 hca_object=2000"
            device, *pairs = line.split() or [""]
            if not device:
                continue
            entry = getattr(metrics.rdma, field).add(device=device)
            for key, _, value in (p.partition("=") for p in pairs):
                number = min(_uint(value, 0xFFFFFFFF), 0xFFFFFFFF)
                if key in ("hca_handle", "hca_object"):
                    setattr(entry, key + "s", number)
    for size in _hugepage_sizes():
        if (current := _number(path(f"hugetlb.{size}.current"))) is not None:
            events = _table(path(f"hugetlb.{size}.events")) or {}
            metrics.hugetlb.add(
                pagesize=size,
                current=current,
                max=_number(path(f"hugetlb.{size}.max")) or 0,
                failcnt=events.get("max", 0),
            )
    return metrics


def _fill_psi(psi: Any, path: str) -> None:
    """Pressure stall information: "some avg10=0.00 avg60=0.00 avg300=0.00 total=0"."""
    text = _read(path)
    if text is None:
        return
    for line in text.splitlines():
        kind, *pairs = line.split() or [""]
        if kind not in ("some", "full"):
            continue
        data = getattr(psi, kind)
        for key, _, value in (p.partition("=") for p in pairs):
            if key == "total":
                data.total = _uint(value, U64_MAX)
            elif key in ("avg10", "avg60", "avg300"):
                setattr(data, key, float(value))


def _v2_enable(mount: _Mount, path: str, controllers: Iterable[str]) -> None:
    """Enable *controllers* in the cgroup.subtree_control of every ancestor of *path*
    that offers them, from the top down (containerd `ToggleControllers`)."""
    wanted = list(dict.fromkeys(controllers))
    parts = path.strip("/").split("/")
    for depth in range(len(parts)):
        ancestor = "/" + "/".join(parts[:depth])
        directory = mount.dir(ancestor)
        if directory is None:
            continue  # above what this mount shows: not ours to change
        offered = (_read(os.path.join(directory, "cgroup.controllers")) or "").split()
        enabled = (_read(os.path.join(directory, "cgroup.subtree_control")) or "").split()
        missing = [c for c in wanted if c in offered and c not in enabled]
        if missing:
            where = Cgroup(ancestor, {})
            try:
                _write(
                    directory, "cgroup.subtree_control", " ".join("+" + c for c in missing), where
                )
            except FailedPrecondition as e:
                raise FailedPrecondition(
                    f"{e}; cgroup2 lets a group with processes of its own enable no "
                    f"controllers for its children: choose a path below a group without "
                    "processes"
                ) from e


def _v2_mkdir(mount: _Mount, path: str, controllers: Iterable[str]) -> None:
    _v2_enable(mount, path, controllers)
    directory = mount.dir(path)
    if directory is None:
        raise FailedPrecondition(
            f'cgroup "{path}": the cgroup2 hierarchy mounted at {mount.point} shows only '
            f'"{mount.root}" and below; choose a path under it'
        )
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise FailedPrecondition(f'cgroup "{path}": cannot make {directory}: {e.strerror}') from e


def _v2_root_controllers() -> list[str]:
    mount = _mounts().v2
    if mount is None:
        return []
    return (_read(os.path.join(mount.point, "cgroup.controllers")) or "").split()


# -- shared ----------------------------------------------------------------------------------------


def _fill(
    message: Any, values: Mapping[str, int], renames: Mapping[str, str] | None = None
) -> None:
    """Set each unsigned field of *message* from *values*, keyed by field name (or rename)."""
    for field in message.DESCRIPTOR.fields:
        if field.cpp_type == field.CPPTYPE_UINT64 and not field.is_repeated:
            key = (renames or {}).get(field.name, field.name)
            if key in values:
                setattr(message, field.name, min(values[key], U64_MAX))


@functools.cache
def _hugepage_sizes() -> tuple[str, ...]:
    """Huge page sizes as cgroup files name them ("2MB", "1GB"), smallest first."""
    sizes = []
    try:
        names = os.listdir("/sys/kernel/mm/hugepages")
    except OSError:
        return ()
    for name in names:  # hugepages-2048kB
        kb = name.removeprefix("hugepages-").removesuffix("kB")
        if kb.isdigit():
            sizes.append(int(kb))
    # the kernel's own naming (mm/hugetlb_cgroup.c), which containerd copies
    return tuple(
        f"{kb >> 20}GB" if kb >= 1 << 20 else f"{kb >> 10}MB" if kb >= 1 << 10 else f"{kb}KB"
        for kb in sorted(sizes)
    )


@attrs.frozen
class _Mount:
    """One mounted cgroup hierarchy: where, and which of its cgroups appears there."""

    point: str
    root: str  # "/" unless a sub-cgroup was bind-mounted

    def dir(self, path: str) -> str | None:
        """The directory of cgroup *path* under this mount; None when it does not show it."""
        if self.root != "/":
            if path != self.root and not path.startswith(self.root.rstrip("/") + "/"):
                return None
            path = path[len(self.root) :]
        return os.path.join(self.point, path.lstrip("/")).rstrip("/") or "/"


@attrs.frozen
class _Mounts:
    v2: _Mount | None
    v1: Mapping[str, _Mount]  # controller or "name=..." -> its hierarchy


@functools.cache
def _mounts() -> _Mounts:
    """The cgroup hierarchies mounted in our mount namespace."""
    v2: _Mount | None = None
    v1: dict[str, _Mount] = {}
    try:
        table = plat.mount_table()
    except OSError:
        table = []
    for entry in table:
        if entry.fstype not in ("cgroup", "cgroup2"):
            continue
        mount = _Mount(point=entry.point, root=entry.root)
        if entry.fstype == "cgroup2":
            v2 = v2 or mount
            continue
        for option in entry.options.split(","):
            # superoptions name the controllers ("rw,cpu,cpuacct") or the named hierarchy
            if option not in ("rw", "ro") and ("=" not in option or option.startswith("name=")):
                v1.setdefault(option, mount)
    return _Mounts(v2=v2, v1=v1)
