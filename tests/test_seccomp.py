"""OCI seccomp profiles through `shim_framework.seccomp`, applied for real in forked children.

A filter cannot be removed once loaded, so every profile is tried in a child
of the test process: the child applies it, does something, writes what
happened to a pipe and exits; the parent reads the pipe and the exit status.
(No reaper runs in this module, so `waitpid` collects the child here.)
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shim_framework import seccomp
from shim_framework.errors import FailedPrecondition, InvalidArgument
from tests.harness import require

ALLOW = "SCMP_ACT_ALLOW"
ERRNO = "SCMP_ACT_ERRNO"


@pytest.fixture(autouse=True)
def _libseccomp() -> None:
    require(not seccomp.unavailable(), seccomp.unavailable() or "")


@pytest.fixture(params=["libseccomp", "program"])
def loader(request: pytest.FixtureRequest) -> str:
    """How the child installs the profile: `apply` (libseccomp builds and loads it there), or
    a `Program` compiled here before the fork and loaded there (what the wasm backend does)."""
    return request.param


def in_child(
    profile: dict[str, Any] | None, action: Callable[[], str], loader: str = "libseccomp"
) -> tuple[int, str]:
    """(exit status, what *action* returned) of a child that applied *profile* first.

    The status is negative when a signal killed the child (os.waitstatus_to_exitcode)."""
    program = seccomp.compile(profile) if loader == "program" else None
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(r)
            if program is not None:
                program.load()
            else:
                seccomp.apply(profile)
            os.write(w, action().encode())
        except BaseException as e:
            os.write(w, f"error: {e!r}".encode())
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    while chunk := os.read(r, 4096):
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), data.decode()


def errno_of(call: Callable[[], object]) -> str:
    """ "ok", or the errno name *call* failed with."""
    try:
        call()
    except OSError as e:
        return errno.errorcode[e.errno]
    return "ok"


def profile(*rules: dict[str, Any], default: str = ALLOW, **extra: Any) -> dict[str, Any]:
    return {"defaultAction": default, "syscalls": list(rules), **extra}


def test_errno_rule_fails_that_syscall_only(tmp_path: Any, loader: str) -> None:
    """mkdir fails with EPERM; other calls (open, write, getpid) still work."""
    rules = profile({"names": ["mkdir", "mkdirat"], "action": ERRNO})

    def action() -> str:
        made = errno_of(lambda: os.mkdir(tmp_path / "d"))
        wrote = errno_of(lambda: (tmp_path / "f").write_text("x"))
        return f"{made} {wrote} {os.getpid() > 0}"

    assert in_child(rules, action, loader) == (0, "EPERM ok True")
    assert not (tmp_path / "d").exists()
    assert (tmp_path / "f").read_text() == "x"


def test_errno_ret_and_default_errno_ret(tmp_path: Any, loader: str) -> None:
    rules = profile({"names": ["mkdirat", "mkdir"], "action": ERRNO, "errnoRet": errno.EROFS})
    mkdir = lambda: errno_of(lambda: os.mkdir(tmp_path / "d"))  # noqa: E731
    assert in_child(rules, mkdir, loader) == (0, "EROFS")
    # default action ERRNO with its own errno, and just enough allowed to report and exit
    allowlist = profile(
        {
            "names": ["write", "exit_group", "exit", "brk", "mmap", "munmap", "futex"],
            "action": ALLOW,
        },
        default=ERRNO,
        defaultErrnoRet=errno.ENOSYS,
    )
    assert in_child(allowlist, mkdir, loader) == (0, "ENOSYS")


@pytest.mark.parametrize("action", ["SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL", "SCMP_ACT_TRAP"])
def test_kill_action_kills_the_child_with_sigsys(action: str, loader: str) -> None:
    rules = profile({"names": ["getppid"], "action": action})
    status, output = in_child(rules, lambda: str(os.getppid()), loader)
    assert status == -signal.SIGSYS
    assert output == ""


def test_argument_conditions_are_anded(loader: str) -> None:
    """lseek(fd, 7, SEEK_SET) is refused; other offsets or whence are not."""
    rules = profile(
        {
            "names": ["lseek"],
            "action": ERRNO,
            "args": [
                {"index": 1, "value": 7, "op": "SCMP_CMP_EQ"},
                {"index": 2, "value": os.SEEK_SET, "op": "SCMP_CMP_EQ"},
            ],
        }
    )

    def action() -> str:
        fd = os.open("/dev/zero", os.O_RDONLY)
        return " ".join(
            errno_of(lambda offset=offset, whence=whence: os.lseek(fd, offset, whence))
            for offset, whence in ((7, os.SEEK_SET), (8, os.SEEK_SET), (7, os.SEEK_CUR))
        )

    assert in_child(rules, action, loader) == (0, "EPERM ok ok")


def lseeks(*offsets: int) -> Callable[[], str]:
    """An action: lseek(fd, offset, SEEK_SET) for each offset, the errno names of the results."""

    def action() -> str:
        fd = os.open("/dev/zero", os.O_RDONLY)
        return " ".join(errno_of(lambda o=o: os.lseek(fd, o, os.SEEK_SET)) for o in offsets)

    return action


def test_repeated_argument_index_means_any_of_them(loader: str) -> None:
    """Two conditions on the same argument: each is a rule of its own (runc's behaviour)."""
    rules = profile(
        {
            "names": ["lseek"],
            "action": ERRNO,
            "args": [
                {"index": 1, "value": 7, "op": "SCMP_CMP_EQ"},
                {"index": 1, "value": 9, "op": "SCMP_CMP_EQ"},
            ],
        }
    )
    assert in_child(rules, lseeks(7, 9, 8), loader) == (0, "EPERM EPERM ok")


def test_masked_eq_compares_the_masked_argument(loader: str) -> None:
    """(offset & 0xF0) == 0x30 is refused: offsets 0x30 to 0x3F."""
    rules = profile(
        {
            "names": ["lseek"],
            "action": ERRNO,
            "args": [{"index": 1, "value": 0xF0, "valueTwo": 0x30, "op": "SCMP_CMP_MASKED_EQ"}],
        }
    )
    assert in_child(rules, lseeks(0x30, 0x3F, 0x40, 0x20), loader) == (0, "EPERM EPERM ok ok")


def test_comparison_operators(loader: str) -> None:
    """GT and LE: lseek offsets above 100 are refused, and so are those up to 3."""
    rules = profile(
        {
            "names": ["lseek"],
            "action": ERRNO,
            "args": [{"index": 1, "value": 100, "op": "SCMP_CMP_GT"}],
        },
        {
            "names": ["lseek"],
            "action": ERRNO,
            "args": [{"index": 1, "value": 3, "op": "SCMP_CMP_LE"}],
        },
    )
    assert in_child(rules, lseeks(101, 100, 4, 3, 0), loader) == (0, "EPERM ok ok EPERM EPERM")


def test_unknown_names_and_default_repeats_are_skipped() -> None:
    """A syscall this libseccomp does not know is skipped (as runc does); so is a rule that
    only repeats the default action."""
    built = seccomp.build(
        profile(
            {"names": ["no_such_syscall_xyz", "mkdir"], "action": ERRNO},
            {"names": ["getpid"], "action": ALLOW},
            architectures=["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            flags=["SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_LOG"],
        )
    )
    assert built is not None and built.rules == 1


def test_no_profile_does_nothing() -> None:
    assert seccomp.build(None) is None and seccomp.build({}) is None
    assert seccomp.compile(None) is None
    assert in_child(None, lambda: "fine") == (0, "fine")


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        (profile(default="SCMP_ACT_NOTIFY"), "SCMP_ACT_NOTIFY"),
        (profile({"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}), "SCMP_ACT_NOTIFY"),
        (profile({"names": ["mkdir"], "action": "SCMP_ACT_WHATEVER"}), "SCMP_ACT_WHATEVER"),
        (profile(listenerPath="/run/listener.sock"), "listenerPath"),
        (profile(flags=["SECCOMP_FILTER_FLAG_NEW"]), "SECCOMP_FILTER_FLAG_NEW"),
        (profile(architectures=["SCMP_ARCH_VAX"]), "SCMP_ARCH_VAX"),
        (
            profile({"names": ["umask"], "action": ERRNO, "args": [{"index": 0, "op": "X"}]}),
            "'X'",
        ),
        (
            profile(
                {"names": ["umask"], "action": ERRNO, "args": [{"index": 6, "op": "SCMP_CMP_EQ"}]}
            ),
            "index",
        ),
        (profile({"names": "mkdir", "action": ERRNO}), "names"),
    ],
)
def test_unsupported_profiles_are_invalid_argument_naming_the_problem(
    bad: dict[str, Any], named: str
) -> None:
    with pytest.raises(InvalidArgument, match=named):
        seccomp.build(bad)


def test_no_libseccomp_is_a_failed_precondition(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(seccomp, "_seccomp", None)
    monkeypatch.setattr(seccomp, "_UNAVAILABLE", "pyseccomp cannot be used here: test")
    with pytest.raises(FailedPrecondition, match="install libseccomp"):
        seccomp.build(profile())
    assert seccomp.build(None) is None


def test_program_carries_the_flags_and_no_new_privs(loader: str) -> None:
    """TSYNC and LOG reach the kernel; no_new_privs is set in the child (as libseccomp does)."""
    rules = profile(
        {"names": ["mkdirat", "mkdir"], "action": ERRNO},
        flags=["SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_LOG"],
    )
    program = seccomp.compile(rules)
    assert program is not None and program.flags == 1 | 2 and len(program.bpf) % 8 == 0

    def action() -> str:
        status = Path("/proc/self/status").read_text()
        nnp = next(line for line in status.splitlines() if line.startswith("NoNewPrivs"))
        mode = next(line for line in status.splitlines() if line.startswith("Seccomp:"))
        return f"{nnp.split()[1]} {mode.split()[1]}"

    assert in_child(rules, action, loader) == (0, "1 2")  # no_new_privs, SECCOMP_MODE_FILTER
