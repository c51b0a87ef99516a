"""`containerd-shim-polyshim-v2`: the binary containerd runs for runtime io.containerd.polyshim.v2.

    containerd-shim-polyshim-v2 -namespace NS -address A -publish-binary B -id ID start
    containerd-shim-polyshim-v2 -namespace NS -address A -publish-binary B -id ID -bundle B delete
    containerd-shim-polyshim-v2 -info      (stdin: options Any; stdout: RuntimeInfo)
    containerd-shim-polyshim-v2 -v

Only what the protocol asks for goes to stdout; errors go to stderr with a
non-zero exit, which containerd shows to the user.
"""

from __future__ import annotations

import os
import sys

from shim_framework import __version__, bootstrap

TYPE_CHECKING = False  # `import typing` would cost the start path ~15 ms
if TYPE_CHECKING:
    import _socket
    from collections.abc import Callable


def main(
    argv: list[str] | None = None, hand_over: Callable[[_socket.socket], None] | None = None
) -> int:
    """Run the binary with *argv*. *hand_over*: in a fork of the template, which becomes
    the server after `start` (see template.py and `bootstrap.start`)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        flags = bootstrap.parse_flags(argv)
    except bootstrap.UsageError as e:
        print(f"containerd-shim-polyshim-v2: {e}", file=sys.stderr)
        return 2
    if flags.version:
        print(f"containerd-shim-polyshim-v2:\n  Version: {__version__}")
        print(f"  Runtime: {bootstrap.RUNTIME}")
        return 0
    if flags.info:
        sys.stdout.buffer.write(_runtime_info(sys.stdin.buffer.read()))
        return 0
    try:
        if flags.action == "start":
            address = bootstrap.start(flags, argv, _read_stdin(), _serve, hand_over)
            sys.stdout.write(address)
            sys.stdout.flush()
            return 0
        if flags.action == "delete":
            sys.stdout.buffer.write(bootstrap.delete(flags))
            sys.stdout.flush()
            return 0
    except Exception as e:
        print(f"containerd-shim-polyshim-v2 {flags.action}: {e}", file=sys.stderr)
        return 1
    print(
        f"containerd-shim-polyshim-v2: unknown action {flags.action!r} (start, delete, -info, -v)",
        file=sys.stderr,
    )
    return 2


def _read_stdin() -> bytes:
    """containerd gives /dev/null, or the options Any (2.3+: BootstrapParams)."""
    if os.isatty(0):
        return b""
    return sys.stdin.buffer.read()


def _serve(flags: bootstrap.Flags, listener: object) -> None:
    from shim_framework.shim_server import serve  # only the forked server pays for these imports

    serve(flags, listener)  # type: ignore[arg-type]


def _runtime_info(options: bytes) -> bytes:
    from google.protobuf import any_pb2

    from shim_framework.api.types import introspection_pb2

    info = introspection_pb2.RuntimeInfo(name=bootstrap.RUNTIME)
    info.version.version = __version__
    if options:
        info.options.CopyFrom(any_pb2.Any.FromString(options))
    # containerd 2.0/2.1 decode `features` when a spec uses idmapped mounts: an OCI
    # Features document that claims nothing we cannot back up.
    info.features.type_url = "types.containerd.io/opencontainers/runtime-spec/1/features/Features"
    info.features.value = b'{"ociVersionMin":"1.0.0","ociVersionMax":"1.1.0"}'
    return info.SerializeToString()
