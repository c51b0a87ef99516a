"""The OCI `linux.seccomp` profile as a seccomp filter on the current process.

For backends that run the workload in a process of their own making (the wasm
backend's workers) instead of handing the spec to an OCI runtime, which would
apply the profile itself. `build` translates and checks a profile without
touching the process, so a bad profile fails a Create; `Filter.load` (or
`apply`, both in one) installs it, for the calling thread and every thread it
starts later.

`compile` goes one step further: the filter as a BPF `Program` (libseccomp
generates it), whose `load` is two system calls. libseccomp needs ~10 ms to
build containerd's default profile and as long again to generate its BPF
(measured), so a backend compiles each distinct profile once, in the shim, and
its forked processes only load the program.

Translation follows runc (libcontainer/seccomp/seccomp_linux.go):

- `defaultAction` (+ `defaultErrnoRet`) is the filter's default action;
- `architectures` (`SCMP_ARCH_X86`, ...) are added beside the native one;
- each of `syscalls[]` (`names`, or the older `name`; `action`, `errnoRet`,
  `args`) becomes rules. A name this libseccomp does not know is skipped (a
  profile may list syscalls of newer kernels); a rule whose action is the
  default action is skipped (libseccomp refuses those). Conditions on
  different arguments are ANDed in one rule; when an argument index repeats,
  each condition becomes a rule of its own (ORed), runc's "old behaviour".
  `SCMP_CMP_MASKED_EQ` compares `(arg & value) == valueTwo`;
- `flags`: `SECCOMP_FILTER_FLAG_TSYNC`, `_LOG` and `_SPEC_ALLOW`.

Actions: `SCMP_ACT_KILL` (= `_KILL_THREAD`), `SCMP_ACT_KILL_PROCESS`,
`SCMP_ACT_TRAP`, `SCMP_ACT_ERRNO` (errnoRet, default EPERM), `SCMP_ACT_TRACE`
(errnoRet is the tracer's data, default EPERM), `SCMP_ACT_ALLOW`,
`SCMP_ACT_LOG`. `SCMP_ACT_NOTIFY` needs a listener process (`listenerPath`),
which no in-process backend has: InvalidArgument, like any other action or
flag this module does not know. Not done (runc does): patching the BPF so that
syscalls newer than the profile get ENOSYS instead of the default errno.

no_new_privs: set by default (libseccomp's default); a caller with
CAP_SYS_ADMIN may pass `no_new_privileges=False`, as runc does for a process
without `noNewPrivileges`.

pyseccomp is imported when this module is: forked workers must not import
(see `Reaper.fork`). pyseccomp finds its libraries with
`ctypes.util.find_library`, which runs `ldconfig -p` through
`subprocess.Popen` — forbidden in a shim, whose reaper would race its wait —
so the import is handed the sonames instead. On a host without libseccomp
(FreeBSD) this module still imports; `unavailable()` says why it cannot work,
and `build` of a profile raises FailedPrecondition.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from shim_framework.errors import FailedPrecondition, InvalidArgument

# sonames pyseccomp asks find_library for; None loads the process's own symbols (libc)
_SONAMES: dict[str, str | None] = {"c": None, "seccomp": "libseccomp.so.2"}


def _import_pyseccomp() -> Any:
    import ctypes.util

    real = ctypes.util.find_library

    def find_library(name: str) -> str | None:
        return _SONAMES[name] if name in _SONAMES else real(name)

    ctypes.util.find_library = find_library
    try:
        import pyseccomp
    finally:
        ctypes.util.find_library = real
    return pyseccomp


try:
    _seccomp: Any = _import_pyseccomp()
    _libc = ctypes.CDLL(None, use_errno=True)
    _NR_SECCOMP = int(_seccomp.resolve_syscall(_seccomp.Arch.NATIVE, "seccomp"))
    _UNAVAILABLE = ""
except (ImportError, OSError, RuntimeError, AttributeError) as e:
    _seccomp = None
    _UNAVAILABLE = f"pyseccomp cannot be used here: {e}"

# <linux/prctl.h>, <linux/seccomp.h>
_PR_SET_NO_NEW_PRIVS = 38
_SECCOMP_SET_MODE_FILTER = 1
_KERNEL_FLAGS = {"CTL_TSYNC": 1, "CTL_LOG": 2, "CTL_SSB": 4}  # SECCOMP_FILTER_FLAG_*
_BPF_INSTRUCTION = 8  # sizeof(struct sock_filter)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_ERRNO_ACTIONS = ("SCMP_ACT_ERRNO", "SCMP_ACT_TRACE")
_OPS = {
    "SCMP_CMP_NE": "NE",
    "SCMP_CMP_LT": "LT",
    "SCMP_CMP_LE": "LE",
    "SCMP_CMP_EQ": "EQ",
    "SCMP_CMP_GE": "GE",
    "SCMP_CMP_GT": "GT",
    "SCMP_CMP_MASKED_EQ": "MASKED_EQ",
}
_FLAGS = {  # OCI flag -> pyseccomp.Attr name
    "SECCOMP_FILTER_FLAG_TSYNC": "CTL_TSYNC",
    "SECCOMP_FILTER_FLAG_LOG": "CTL_LOG",
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW": "CTL_SSB",
}
_MAX_ARGS = 6  # a syscall has at most six arguments


def unavailable() -> str:
    """Why seccomp filters cannot be built here; empty when they can."""
    return _UNAVAILABLE


@attrs.define(eq=False)
class Filter:
    """A built filter, not yet loaded. `rules` counts the rules added (for tests, logs)."""

    _filter: Any
    no_new_privileges: bool = True
    flags: int = 0  # SECCOMP_FILTER_FLAG_* for the kernel
    rules: int = 0

    def load(self) -> None:
        """Install the filter on this thread (all threads with TSYNC); no way back."""
        try:
            self._filter.load()
        except OSError as e:
            raise FailedPrecondition(f"seccomp: the kernel refused the filter: {e.strerror}") from e

    def program(self) -> Program:
        """The filter as BPF, to load later (in another process, say) without libseccomp."""
        fd = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
        try:
            self._filter.export_bpf(_Fileno(fd))
            size = os.fstat(fd).st_size
            bpf = os.pread(fd, size, 0)
        except OSError as e:
            raise FailedPrecondition(f"seccomp: libseccomp cannot export the filter: {e}") from e
        finally:
            os.close(fd)
        return Program(bpf, self.flags, self.no_new_privileges)


@attrs.frozen
class Program:
    """A filter as the kernel takes it: BPF instructions and SECCOMP_FILTER_FLAG_* bits."""

    bpf: bytes = attrs.field(repr=lambda b: f"<{len(b) // _BPF_INSTRUCTION} instructions>")
    flags: int = 0
    no_new_privileges: bool = True

    def load(self) -> None:
        """Install it on this thread (all threads with TSYNC): prctl + seccomp(2), as
        libseccomp's own `seccomp_load` does. Safe in a forked child: nothing is imported
        or allocated by libseccomp. FailedPrecondition if the kernel refuses."""
        if self.no_new_privileges and _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise FailedPrecondition(
                f"seccomp: cannot set no_new_privs: {os.strerror(ctypes.get_errno())}"
            )
        buffer = ctypes.create_string_buffer(self.bpf, len(self.bpf))
        prog = _SockFprog(len(self.bpf) // _BPF_INSTRUCTION, ctypes.addressof(buffer))
        result = _libc.syscall(
            _NR_SECCOMP, _SECCOMP_SET_MODE_FILTER, self.flags, ctypes.byref(prog)
        )
        if result != 0:
            problem = os.strerror(ctypes.get_errno()) if result < 0 else f"thread {result}"
            raise FailedPrecondition(f"seccomp: the kernel refused the filter: {problem}")


class _Fileno:
    """What pyseccomp's export_bpf wants: something with a fileno()."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


def apply(profile: Mapping[str, Any] | None, *, no_new_privileges: bool = True) -> None:
    """Translate OCI `linux.seccomp` *profile* and install it on the current process.

    None or an empty profile does nothing. InvalidArgument: an action, operator,
    architecture or flag this translation does not support (named in the message)."""
    built = build(profile, no_new_privileges=no_new_privileges)
    if built is not None:
        built.load()


def compile(profile: Mapping[str, Any] | None, *, no_new_privileges: bool = True) -> Program | None:
    """*profile* as a BPF `Program` to load later; None for no profile. Errors as `build`."""
    built = build(profile, no_new_privileges=no_new_privileges)
    return None if built is None else built.program()


def build(profile: Mapping[str, Any] | None, *, no_new_privileges: bool = True) -> Filter | None:
    """The filter for *profile*, checked but not loaded; None for no profile."""
    if not profile:
        return None
    if not isinstance(profile, Mapping):
        raise InvalidArgument(f"linux.seccomp: {profile!r} is not an object")
    if _seccomp is None:
        raise FailedPrecondition(
            f"linux.seccomp: the spec asks for a seccomp profile but {_UNAVAILABLE}; "
            "install libseccomp, or drop the profile"
        )
    if profile.get("listenerPath"):
        raise InvalidArgument(
            "linux.seccomp.listenerPath: seccomp notification needs a listener process, "
            "which this backend does not support; drop SCMP_ACT_NOTIFY rules"
        )
    default = _action(
        profile.get("defaultAction"), profile.get("defaultErrnoRet"), "linux.seccomp.defaultAction"
    )
    try:
        flt = _seccomp.SyscallFilter(default)
        flt.set_attr(_seccomp.Attr.CTL_NNP, 1 if no_new_privileges else 0)
    except OSError as e:
        raise FailedPrecondition(f"linux.seccomp: libseccomp failed: {e.strerror}") from e
    built = Filter(flt, no_new_privileges)
    for arch in profile.get("architectures") or ():
        _add_arch(flt, arch)
    for flag in profile.get("flags") or ():
        attr = _FLAGS.get(flag)
        if attr is None:
            raise InvalidArgument(
                f"linux.seccomp.flags: {flag!r} is not supported here "
                f"(supported: {', '.join(sorted(_FLAGS))})"
            )
        _set_attr(flt, getattr(_seccomp.Attr, attr), flag)
        built.flags |= _KERNEL_FLAGS[attr]
    for i, rule in enumerate(profile.get("syscalls") or ()):
        built.rules += _add_syscalls(flt, default, rule, f"linux.seccomp.syscalls[{i}]")
    return built


def _action(name: Any, errno_ret: Any, where: str) -> int:
    if errno_ret is not None and (not isinstance(errno_ret, int) or errno_ret < 0):
        raise InvalidArgument(f"{where}: errnoRet {errno_ret!r} is not an errno number")
    code = errno.EPERM if errno_ret is None else errno_ret
    if name == "SCMP_ACT_ERRNO":
        return int(_seccomp.ERRNO(code))
    if name == "SCMP_ACT_TRACE":
        return int(_seccomp.TRACE(code))
    actions = {
        "SCMP_ACT_KILL": _seccomp.KILL_THREAD,
        "SCMP_ACT_KILL_THREAD": _seccomp.KILL_THREAD,
        "SCMP_ACT_KILL_PROCESS": _seccomp.KILL_PROCESS,
        "SCMP_ACT_TRAP": _seccomp.TRAP,
        "SCMP_ACT_ALLOW": _seccomp.ALLOW,
        "SCMP_ACT_LOG": _seccomp.LOG,
    }
    if name not in actions:
        raise InvalidArgument(
            f"{where}: action {name!r} is not supported here (supported: "
            f"{', '.join(sorted([*actions, *_ERRNO_ACTIONS]))})"
        )
    return int(actions[name])


def _add_arch(flt: Any, name: Any) -> None:
    arch = getattr(_seccomp.Arch, str(name).removeprefix("SCMP_ARCH_"), None)
    if not isinstance(name, str) or not name.startswith("SCMP_ARCH_") or arch is None:
        raise InvalidArgument(f"linux.seccomp.architectures: {name!r} is not an architecture")
    try:
        if not flt.exist_arch(arch):
            flt.add_arch(arch)
    except OSError as e:
        raise InvalidArgument(
            f"linux.seccomp.architectures: libseccomp cannot add {name}: {e.strerror}"
        ) from e


def _set_attr(flt: Any, attr: int, flag: str) -> None:
    try:
        flt.set_attr(attr, 1)
    except OSError as e:
        raise InvalidArgument(
            f"linux.seccomp.flags: {flag} is not supported by this libseccomp or kernel: "
            f"{e.strerror}"
        ) from e


def _add_syscalls(flt: Any, default: int, rule: Any, where: str) -> int:
    """Add one `syscalls[]` entry; the number of rules added."""
    if not isinstance(rule, Mapping):
        raise InvalidArgument(f"{where}: {rule!r} is not an object")
    names = rule.get("names") or ([rule["name"]] if rule.get("name") else [])
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise InvalidArgument(f"{where}.names: {names!r} is not a list of syscall names")
    action = _action(rule.get("action"), rule.get("errnoRet"), f"{where}.action")
    if action == default:
        return 0  # libseccomp refuses a rule that only repeats the default (runc skips it)
    groups = _conditions(rule.get("args") or (), f"{where}.args")
    added = 0
    for name in names:
        if not isinstance(name, str):
            raise InvalidArgument(f"{where}.names: {name!r} is not a syscall name")
        number = _seccomp.resolve_syscall(_seccomp.Arch.NATIVE, name)
        if number == -1:  # __NR_SCMP_ERROR: not a syscall this libseccomp knows; runc skips it
            continue
        for args in groups:
            try:
                flt.add_rule(action, number, *args)
            except OSError as e:
                raise InvalidArgument(f"{where}: libseccomp refused {name}: {e.strerror}") from e
            added += 1
    return added


def _conditions(specs: Any, where: str) -> list[list[Any]]:
    """Argument conditions as rule groups: one group (AND) or one rule per condition (OR)."""
    if not isinstance(specs, Sequence):
        raise InvalidArgument(f"{where}: {specs!r} is not a list")
    conditions = []
    indexes = []
    for i, spec in enumerate(specs):
        here = f"{where}[{i}]"
        if not isinstance(spec, Mapping):
            raise InvalidArgument(f"{here}: {spec!r} is not an object")
        index, value, value2 = spec.get("index"), spec.get("value", 0), spec.get("valueTwo", 0)
        op = _OPS.get(spec.get("op"))
        if op is None:
            raise InvalidArgument(
                f"{here}.op: {spec.get('op')!r} is not supported (supported: "
                f"{', '.join(sorted(_OPS))})"
            )
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < _MAX_ARGS:
            raise InvalidArgument(f"{here}.index: {index!r} is not an argument index 0-5")
        for label, number in (("value", value), ("valueTwo", value2)):
            if not isinstance(number, int) or isinstance(number, bool) or not 0 <= number < 2**64:
                raise InvalidArgument(f"{here}.{label}: {number!r} is not a 64-bit unsigned value")
        conditions.append(_seccomp.Arg(index, getattr(_seccomp, op), value, value2))
        indexes.append(index)
    if len(set(indexes)) < len(indexes):
        return [[c] for c in conditions]
    return [conditions]
