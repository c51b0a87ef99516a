"""containerd configuration for polyshim-snapshotd: the `[proxy_plugins]` tables.

What each config version accepts (spec §1.5, and checked with the real
daemons):

- `type = "snapshot"` and `address = "<unix socket path>"`: every version.
- `[proxy_plugins.NAME.exports]` (string map): read by 1.7.16+ and 2.x;
  containerd 1.6.20 ignores the table silently (checked). We export `root`,
  the snapshotter's directory, which CRI uses for image-filesystem stats
  (1.6 always looks at `<containerd root>/io.containerd.snapshotter.v1.<NAME>`).
- `platform` and `capabilities`: 1.7.16+/1.7.23+ and 2.x. Not emitted: the
  default platform is the host's, and our drivers claim no capability
  (no `rebase`, no `remap-ids`).
- `[proxy_plugins]` is a top-level table in config version 2 (containerd
  1.6/1.7) and 3 (2.x) alike and is not renamed when 2.x migrates a version
  2 file, so both versions get the same text.

containerd creates the gRPC connection lazily: it starts fine before the
daemon, and calls made meanwhile fail with Unavailable.

containerd 2.x pulls and imports through its transfer service, which unpacks
only into snapshotters listed in its `unpack_config` (`ctr images import
--snapshotter X` fails with "no unpack platforms defined" otherwise); see
`unpack_config_toml`. 1.6 has no transfer service and ignores that table.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from daemon.registry import check_name
from shim_framework.errors import InvalidArgument


def proxy_plugins_toml(
    snapshotters: Iterable[str],
    address: str | Path,
    *,
    config_version: int = 2,
    root: str | Path | None = None,
    socket_dir: str | Path | None = None,
) -> str:
    """TOML to append to a containerd config: one `[proxy_plugins."NAME"]` per snapshotter.

    *address* is the daemon's shared socket; with *socket_dir* each name
    uses its own socket `<socket_dir>/<NAME>.sock` instead (`--socket-dir`).
    *root* (the daemon's `--root`) adds the `root` export. InvalidArgument:
    an unknown config version or a name containerd cannot take."""
    if config_version not in (2, 3):
        raise InvalidArgument(
            f"containerd config version {config_version}: expected 2 (containerd 1.6, 1.7) "
            "or 3 (containerd 2.x)"
        )
    names = list(snapshotters)
    if not names:
        raise InvalidArgument("no snapshotters to configure")
    lines = [
        f"# polyshim-snapshotd proxy snapshotters (containerd config version {config_version})"
    ]
    for name in names:
        check_name(name)
        where = Path(socket_dir) / f"{name}.sock" if socket_dir is not None else address
        lines += [
            "",
            f"[proxy_plugins.{_quote(name)}]",
            '  type = "snapshot"',
            f"  address = {_quote(str(where))}",
        ]
        if root is not None:
            lines += [
                f"  [proxy_plugins.{_quote(name)}.exports]",
                f"    root = {_quote(str(Path(root) / name))}",
            ]
    return "\n".join(lines) + "\n"


def unpack_config_toml(
    snapshotters: Iterable[str],
    platform: str,
    *,
    differ: str = "walking",
    keep_default: bool = True,
) -> str:
    """TOML for containerd 2.x's transfer service: unpack *platform* images into each snapshotter.

    Any `unpack_config` replaces containerd's default list (host platform
    into `overlayfs` with the `walking` differ), so *keep_default* repeats
    that entry. The plugin id is the same in config versions 2 and 3."""
    entries = [("overlayfs", "walking")] if keep_default else []
    for name in snapshotters:
        check_name(name)
        entries.append((name, differ))
    lines = ["# polyshim-snapshotd: let containerd 2.x's transfer service unpack into them"]
    for name, entry_differ in entries:
        lines += [
            "",
            '[[plugins."io.containerd.transfer.v1.local".unpack_config]]',
            f"  platform = {_quote(platform)}",
            f"  snapshotter = {_quote(name)}",
            f"  differ = {_quote(entry_differ)}",
        ]
    return "\n".join(lines) + "\n"


def _quote(value: str) -> str:
    """A TOML basic string."""
    out = ['"']
    for c in value:
        if c in ('"', "\\"):
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    out.append('"')
    return "".join(out)
