"""`polyshim`: the umbrella command.

polyshim backends                 installed backends, their capabilities, and whether
                                  this host can run them (with the reason when not)
polyshim containerd-config        the containerd runtime section for polyshim
    [--config-version 2|3] [--runtime-name NAME] [--config-path PATH]
polyshim install-launcher         build the native containerd-shim-polyshim-v2 (needs cc)
    [--dest PATH]                 and put it where pip put the Python one
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shim_framework.bootstrap import RUNTIME
from shim_framework.config import DEFAULTS_PATH, from_dict
from shim_framework.errors import PolyshimError
from shim_framework.registry import Registry

SELECTION_ANNOTATIONS = '["io.polyshim.*", "run.oci.handler", "module.wasm.image/*"]'
CRI_PLUGIN = {
    2: 'plugins."io.containerd.grpc.v1.cri".containerd.runtimes',  # containerd 1.6, 1.7
    3: 'plugins."io.containerd.cri.v1.runtime".containerd.runtimes',  # containerd 2.x
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="polyshim", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("backends", help="list backends and whether this host can run them")
    config = commands.add_parser(
        "containerd-config", help="print the containerd config section that adds polyshim"
    )
    config.add_argument(
        "--config-version",
        type=int,
        choices=(2, 3),
        default=2,
        help="containerd config version: 2 for containerd 1.6/1.7, 3 for 2.x",
    )
    config.add_argument(
        "--runtime-name",
        default="polyshim",
        help="the CRI runtime handler name (a RuntimeClass's handler)",
    )
    config.add_argument(
        "--config-path",
        default="/etc/polyshim/runtime.toml",
        help="polyshim runtime config the shim reads (default_backend, ...)",
    )
    config.add_argument(
        "--snapshotters",
        default="polyshim-overlay,polyshim-erofs,polyshim-blockfile",
        help="names polyshim-snapshotd serves (its --snapshotters: DRIVER is polyshim-DRIVER)",
    )
    config.add_argument(
        "--no-snapshotters", action="store_true", help="only the runtime, no [proxy_plugins]"
    )
    config.add_argument("--snapshotd-socket", default="/run/polyshim-snapshotd/snapshotd.sock")
    config.add_argument("--snapshotd-root", default="/var/lib/polyshim-snapshotd")
    install = commands.add_parser(
        "install-launcher",
        help="build the native shim launcher (faster container start and delete)",
    )
    install.add_argument("--dest", type=Path, help="default: next to this polyshim command")
    args = parser.parse_args(argv)
    if args.command == "backends":
        return _backends()
    if args.command == "install-launcher":
        return _install_launcher(args.dest)
    print(containerd_config(args.config_version, args.runtime_name, args.config_path))
    if not args.no_snapshotters:
        print(snapshotter_config(args))
    return 0


def _backends() -> int:
    registry = Registry()
    try:
        defaults = from_dict({}, source=str(DEFAULTS_PATH))
    except PolyshimError as e:
        print(f"polyshim: {e}", file=sys.stderr)
        return 1
    rows = [("BACKEND", "FROM", "CAPABILITIES", "AVAILABLE")]
    for name in registry.names():
        entry = registry.entries[name]
        try:
            cls = registry.load(name)
            caps = ",".join(sorted(c.value for c in cls.capabilities)) or "-"
            probe = cls.probe(defaults.backend_config(name))
            available = "yes" if probe.ok else f"no: {probe.reason}"
        except Exception as e:  # a broken third-party backend must not hide the others
            caps, available = "?", f"no: failed to load: {e}"
        rows.append((name, entry.distribution, caps, available))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
            + "  "
            + row[3]
        )
    return 0


def _install_launcher(destination: Path | None) -> int:
    from shim_framework import launcher

    try:
        installed = launcher.install(destination)
    except (PolyshimError, OSError) as e:
        print(f"polyshim install-launcher: {e}", file=sys.stderr)
        return 1
    print(f"installed the native launcher at {installed}")
    return 0


def containerd_config(version: int, runtime_name: str, config_path: str) -> str:
    """The TOML that registers polyshim as CRI runtime handler *runtime_name*.

    Options travel as `runtimeoptions.v1.Options`: both 1.6 and 2.x CRI fill its
    ConfigPath from this table, and the shim reads the TOML file it names."""
    table = f"{CRI_PLUGIN[version]}.{runtime_name}"
    return "\n".join(
        [
            f"# containerd config version {version}: runtime handler {runtime_name!r} "
            f"-> polyshim ({RUNTIME})",
            f"version = {version}",
            "",
            f"[{table}]",
            f'  runtime_type = "{RUNTIME}"',
            "  # CRI passes a pod's or container's annotations to the runtime only when listed:",
            "  # these are the ones polyshim selects backends by.",
            f"  pod_annotations = {SELECTION_ANNOTATIONS}",
            f"  container_annotations = {SELECTION_ANNOTATIONS}",
            f"  [{table}.options]",
            f'    ConfigPath = "{config_path}"',
            "",
            f"# {config_path}, read by the shim for every container of this handler:",
            '#   default_backend = "runc"',
            '#   allowed_backends = ["runc", "wasm"]',
            "#   [backends.runc]",
            '#   binary = "runc"',
        ]
    )


def snapshotter_config(args: argparse.Namespace) -> str:
    """polyshim-snapshotd's `[proxy_plugins]`, and for 2.x the transfer service's unpack list."""
    import platform

    from daemon.config import proxy_plugins_toml, unpack_config_toml

    names = [n.strip() for n in args.snapshotters.split(",") if n.strip()]
    text = proxy_plugins_toml(names, args.snapshotd_socket, config_version=args.config_version,
                              root=args.snapshotd_root)  # fmt: skip
    if args.config_version == 3:
        arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
        text += "\n" + unpack_config_toml(names, f"linux/{arch}")
    return text
