"""Real containerd daemons for tests: the installs on this machine and private daemons.

A :class:`PrivateContainerd` runs a real ``containerd`` with its own root, state, sockets, opt
dir and namespace under a short temp dir, so two private daemons and a system containerd never
share state. Stopping it leaves shims running (containerd shims outlive the daemon by design);
:meth:`PrivateContainerd.cleanup` removes everything it made.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import attrs

from shim_framework import _platform as plat
from shim_framework.mounts import unmount_all

CACHE_DIR = Path(os.environ.get("POLYSHIM_CACHE", "/var/cache/polyshim"))

#: Labels of the containerd versions the tests run against, oldest first.
INSTALL_LABELS = ("1.6", "2.1")

_BIN_DIRS = {
    "1.6": Path("/usr/bin"),  # Debian 12's containerd package (1.6.20)
    "2.1": CACHE_DIR / "containerd-2.1" / "usr" / "bin",  # Debian unstable's, unpacked by setup
}

# Plugins disabled in every private daemon. The CRI gRPC service is slow to start and wants
# CNI; NRI's socket is a fixed host path (/var/run/nri/nri.sock) two daemons would fight over.
# 2.1 splits CRI into io.containerd.cri.v1.{images,runtime} (+ the podsandbox controller);
# those load fine without the gRPC service and without CNI, and disabling them would break
# io.containerd.grpc.v1.sandbox-controllers (the sandbox API), so they stay enabled.
_DISABLED_PLUGINS = {
    "1.6": ["io.containerd.grpc.v1.cri"],
    "2.1": ["io.containerd.grpc.v1.cri", "io.containerd.nri.v1.nri"],
}


class InstallMissing(RuntimeError):
    """A containerd install the caller asked for is not on this machine."""


class ContainerdError(RuntimeError):
    """A private containerd failed to start or stop."""


class CtrError(subprocess.CalledProcessError):
    """``ctr`` exited non-zero; the message carries args, exit code, stdout and stderr."""

    def __str__(self) -> str:
        return (
            f"ctr failed (exit {self.returncode}): {self.cmd!r}\n"
            f"--- stdout ---\n{self.stdout or ''}"
            f"--- stderr ---\n{self.stderr or ''}"
        )


@attrs.frozen
class ContainerdInstall:
    """One containerd version on this machine: ``containerd``, ``ctr`` and the runc shim."""

    label: str
    bin_dir: Path

    @property
    def containerd(self) -> Path:
        return self.bin_dir / "containerd"

    @property
    def ctr(self) -> Path:
        return self.bin_dir / "ctr"

    @property
    def shim_runc_v2(self) -> Path:
        return self.bin_dir / "containerd-shim-runc-v2"

    def missing_reason(self) -> str | None:
        """Why this install is unusable, or None when it is complete and the right version."""
        for exe in (self.containerd, self.ctr, self.shim_runc_v2):
            if not os.access(exe, os.X_OK):
                return f"containerd {self.label}: {exe} missing (run scripts/setup)"
        version = self.version()
        if not version.startswith(self.label + "."):
            return (
                f"containerd {self.label}: {self.containerd} is version {version!r}, "
                f"not {self.label}.x (run scripts/setup)"
            )
        return None

    @property
    def available(self) -> bool:
        return self.missing_reason() is None

    def version(self) -> str:
        """The version ``containerd --version`` reports, e.g. ``1.6.20~ds1``."""
        return _version_of(self.containerd)


_version_cache: dict[Path, str] = {}


def _version_of(containerd: Path) -> str:
    if containerd not in _version_cache:
        try:
            out = subprocess.run(
                [containerd, "--version"], capture_output=True, text=True, timeout=30, check=True
            ).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            return f"unknown ({exc})"
        # "containerd github.com/containerd/containerd[/v2] 1.6.20~ds1 <revision>"
        fields = out.split()
        _version_cache[containerd] = fields[2].lstrip("v") if len(fields) >= 3 else out.strip()
    return _version_cache[containerd]


def known_installs() -> list[ContainerdInstall]:
    """Every install the tests know about, present or not."""
    return [ContainerdInstall(label, _BIN_DIRS[label]) for label in INSTALL_LABELS]


def installs() -> list[ContainerdInstall]:
    """The installs present and usable on this machine."""
    return [i for i in known_installs() if i.available]


def get_install(label: str) -> ContainerdInstall:
    """The install labelled ``label`` ("1.6" or "2.1"); raises InstallMissing if unusable."""
    if label not in _BIN_DIRS:
        raise InstallMissing(f"unknown containerd label {label!r}; known: {INSTALL_LABELS}")
    install = ContainerdInstall(label, _BIN_DIRS[label])
    reason = install.missing_reason()
    if reason is not None:
        raise InstallMissing(reason)
    return install


def _toml_str(value: str | Path) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


class PrivateContainerd:
    """A real containerd with its own root, state, sockets and namespace under /tmp/psc-*.

    Use as a context manager, or call :meth:`start` and finally :meth:`cleanup`.

    ``extra_config`` is TOML appended to the generated config: whole tables such as
    ``[proxy_plugins.x]`` or ``[plugins."io.containerd.runtime.v2.task"]`` (not ``[plugins]``
    itself, nor the opt plugin's table, which the generated part already has).
    ``path_prepend`` dirs come first on the daemon's PATH, then the install's bin dir, so
    containerd finds ``containerd-shim-<name>-v2`` there and runs its own version's runc shim.
    ``namespace`` defaults to a fresh ``psc-<hex>``, so container ids never collide with another
    daemon's in runc's state dir or the cgroup tree.
    """

    def __init__(
        self,
        install: ContainerdInstall,
        *,
        extra_config: str = "",
        path_prepend: Sequence[Path] = (),
        log_level: str = "debug",
        namespace: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.install = install
        self.extra_config = extra_config
        self.path_prepend = [Path(p) for p in path_prepend]
        self.log_level = log_level
        # AF_UNIX paths are limited to 108 bytes: keep the base dir short.
        self.dir = Path(tempfile.mkdtemp(prefix="psc-", dir="/tmp"))
        # A namespace of its own: runc's state (/run/containerd/runc/<ns>/<id>) and the
        # default cgroup path (/<ns>/<id>) are keyed by namespace and container id, not by
        # daemon, so the same id in two daemons would collide in a shared namespace.
        self.namespace = namespace or f"psc-{secrets.token_hex(4)}"
        self.root = self.dir / "root"
        self.state = self.dir / "state"
        self.temp = self.dir / "tmp"
        self.opt = self.dir / "opt"
        self.address = self.dir / "grpc.sock"
        self.ttrpc_address = self.dir / "ttrpc.sock"
        self.config_path = self.dir / "config.toml"
        self.log_path = self.dir / "containerd.log"
        self.extra_env = dict(env or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._cleaned = False
        for d in (self.root, self.state, self.temp, self.opt):
            d.mkdir(mode=0o711)
        text = self.config_text()
        try:
            tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            shutil.rmtree(self.dir)
            raise ValueError(f"invalid containerd config ({exc}):\n{text}") from exc
        self.config_path.write_text(text)

    def __repr__(self) -> str:
        return f"<PrivateContainerd {self.install.label} {self.dir} ns={self.namespace}>"

    # ------------------------------------------------------------------ config and env

    def config_text(self) -> str:
        """The config file this daemon runs with (config version 2: read by 1.6 and 2.1)."""
        disabled = ", ".join(_toml_str(p) for p in _DISABLED_PLUGINS[self.install.label])
        text = f"""\
version = 2
root = {_toml_str(self.root)}
state = {_toml_str(self.state)}
temp = {_toml_str(self.temp)}
disabled_plugins = [{disabled}]

[grpc]
  address = {_toml_str(self.address)}

[ttrpc]
  address = {_toml_str(self.ttrpc_address)}

[debug]
  address = ""
  level = {_toml_str(self.log_level)}

[metrics]
  address = ""

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = {_toml_str(self.opt)}
"""
        if self.extra_config:
            text += "\n" + self.extra_config.rstrip() + "\n"
        return text

    def environ(self) -> dict[str, str]:
        """Environment of the daemon (and so of its shims): PATH has path_prepend first."""
        env = dict(os.environ)
        env.update(self.extra_env)
        rest = env.get("PATH") or "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        first = [str(p) for p in self.path_prepend] + [str(self.install.bin_dir)]
        env["PATH"] = os.pathsep.join([*first, rest])
        return env

    # ------------------------------------------------------------------ life cycle

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc else None

    def start(self, timeout: float = 30.0) -> PrivateContainerd:
        """Launch containerd and wait until ``ctr version`` answers."""
        if self.running:
            return self
        if self._cleaned:
            raise ContainerdError(f"{self!r} was cleaned up; make a new one")
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [str(self.install.containerd), "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environ(),
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            if self._proc.poll() is not None:
                raise ContainerdError(
                    f"containerd {self.install.label} exited with {self._proc.returncode} "
                    f"during start-up\n{self.log_tail()}"
                )
            if self.address.is_socket():
                res = self.ctr("version", check=False, timeout=10)
                if res.returncode == 0:
                    return self
                last = res.stderr
            if time.monotonic() > deadline:
                self.stop()
                raise ContainerdError(
                    f"containerd {self.install.label} not ready after {timeout:.0f}s "
                    f"(last ctr error: {last.strip()!r})\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the daemon, SIGKILL after ``timeout``. Shims are left running."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        self._proc = None

    def restart(self, timeout: float = 30.0) -> PrivateContainerd:
        """Stop and start the daemon with the same root, state and config."""
        self.stop()
        return self.start(timeout=timeout)

    def __enter__(self) -> PrivateContainerd:
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # ------------------------------------------------------------------ ctr and logs

    def ctr_command(self, *args: str) -> list[str]:
        """The argv of this install's ctr talking to this daemon."""
        return [
            str(self.install.ctr),
            "--address",
            str(self.address),
            "--namespace",
            self.namespace,
            *args,
        ]

    def ctr(
        self,
        *args: str,
        input: str | None = None,
        timeout: float = 60,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run ctr against this daemon; raise CtrError on a non-zero exit when ``check``."""
        cmd = self.ctr_command(*args)
        res = subprocess.run(
            cmd,
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.environ(),
        )
        if check and res.returncode != 0:
            raise CtrError(res.returncode, cmd, res.stdout, res.stderr)
        return res

    def log_text(self) -> str:
        """Everything the daemon logged so far (all starts)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return f"--- last {len(tail)} lines of {self.log_path} ---\n" + "\n".join(tail)

    # ------------------------------------------------------------------ cleanup

    def cleanup(self) -> None:
        """Kill leftover tasks, stop the daemon, unmount and remove everything it made."""
        if self._cleaned:
            return
        try:
            if not self.running and self.shim_pids():
                # Stopped with shims still serving it: start it again to end their tasks.
                with contextlib.suppress(ContainerdError):
                    self.start()
            if self.running:
                self._delete_tasks_and_containers()
            self.stop()
            self._kill_leftover_shims()
            self._delete_runc_leftovers()
            unmount_all(self.dir)
            _remove_namespace_dirs(self.namespace)
        finally:
            self._cleaned = True
            if self.dir.exists():
                shutil.rmtree(self.dir)

    def _delete_tasks_and_containers(self) -> None:
        tasks = self.ctr("task", "ls", "-q", check=False, timeout=30).stdout.split()
        for task in tasks:
            self.ctr("task", "kill", "-s", "SIGKILL", task, check=False, timeout=30)
        for task in tasks:
            deadline = time.monotonic() + 10
            while True:
                if self.ctr("task", "delete", task, check=False, timeout=30).returncode == 0:
                    break
                if time.monotonic() > deadline:
                    self.ctr("task", "delete", "--force", task, check=False, timeout=30)
                    break
                time.sleep(0.05)
        for container in self.ctr("container", "ls", "-q", check=False, timeout=30).stdout.split():
            self.ctr("container", "delete", container, check=False, timeout=30)

    def shim_pids(self) -> list[int]:
        """Pids of the shim processes serving this daemon (found by ``-address`` in argv)."""
        needle = str(self.address).encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            # A Go shim is argv[0]; a Python one (polyshim) runs as `python <script> ...`.
            if needle in argv and any(b"containerd-shim" in a for a in argv[:2]):
                pids.append(int(entry.name))
        return pids

    def _kill_leftover_shims(self) -> None:
        for pid in self.shim_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _delete_runc_leftovers(self) -> None:
        """Force-delete runc containers of this namespace that outlived their shims."""
        runc_root = Path("/run/containerd/runc") / self.namespace
        runc = shutil.which("runc")
        if runc is None or not runc_root.is_dir():
            return
        for container in runc_root.iterdir():
            subprocess.run(
                [runc, "--root", str(runc_root), "delete", "--force", container.name],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=30,
            )


def _remove_namespace_dirs(namespace: str) -> None:
    """Remove the empty per-namespace dirs runc leaves: its state root and parent cgroups."""
    candidates = [Path("/run/containerd/runc") / namespace]
    for mount in plat.mount_table():
        if mount.fstype in ("cgroup", "cgroup2"):
            candidates.append(Path(mount.point) / namespace)
    for path in candidates:
        with contextlib.suppress(OSError):
            path.rmdir()
