"""The runtime configuration: which backends a runtime allows and how they are set up.

It reaches the shim as the `options` of `CreateTaskRequest` (the same Any
`start` gets on stdin), in one of these forms:

- `runtimeoptions.v1.Options` (what CRI sends for non-runc runtimes and what
  `ctr run --runtime-config-path` sends): `config_path` names a TOML file;
  2.x CRI puts the runtime's whole `options` table, as TOML text, in
  `config_body` when there is no path;
- `containerd.runc.v1.Options`: read as settings of the runc backend, so a
  runtime configured like runc's keeps working;
- nothing: the shim's defaults.

The TOML (all keys optional):

    default_backend = "runc"            # rule 4 of selection; "runc" if unset
    allowed_backends = ["runc", "wasm"] # what annotations may pick; default: any installed
    fallback_backends = ["runc"]        # tried in order when the chosen one cannot run here
    [backends.runc]                     # one table per backend, handed to it as-is
    binary = "crun"

The shim's own defaults come from `/etc/polyshim/config.toml` (or the file
named by `POLYSHIM_CONFIG`) when it exists; the runtime's options override
them key by key.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from shim_framework.errors import InvalidArgument

DEFAULTS_PATH = Path("/etc/polyshim/config.toml")
KNOWN_KEYS = frozenset(
    {"default_backend", "allowed_backends", "fallback_backends", "backends", "ConfigPath"}
)
RUNC_OPTIONS = "containerd.runc.v1.Options"
RUNTIME_OPTIONS = "runtimeoptions.v1.Options"

# containerd.runc.v1.Options field -> key of [backends.runc]
_RUNC_OPTION_KEYS = {
    "binary_name": "binary",
    "root": "root",
    "systemd_cgroup": "systemd_cgroup",
    "no_pivot_root": "no_pivot_root",
    "no_new_keyring": "no_new_keyring",
    "criu_path": "criu_path",
    "criu_image_path": "criu_image_path",
    "criu_work_path": "criu_work_path",
    "io_uid": "io_uid",
    "io_gid": "io_gid",
}


@attrs.frozen
class RuntimeConfig:
    default_backend: str = "runc"
    allowed_backends: tuple[str, ...] | None = None  # None: every installed backend
    fallback_backends: tuple[str, ...] = ()
    backends: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)

    def backend_config(self, name: str) -> Mapping[str, Any]:
        return self.backends.get(name, {})

    def to_dict(self) -> dict[str, Any]:
        """A TOML/JSON-able form, kept in the bundle for the `delete` action."""
        data: dict[str, Any] = {
            "default_backend": self.default_backend,
            "fallback_backends": list(self.fallback_backends),
            "backends": {k: dict(v) for k, v in self.backends.items()},
        }
        if self.allowed_backends is not None:
            data["allowed_backends"] = list(self.allowed_backends)
        return data


def load(options: any_pb2.Any | None, *, defaults_path: Path | None = None) -> RuntimeConfig:
    """The runtime config for one task: shim defaults overridden by the task's options."""
    data = _read_defaults(defaults_path)
    if options is not None and (options.type_url or options.value):
        _merge(data, _from_options(options))
    return from_dict(data, source="runtime options")


def from_dict(data: Mapping[str, Any], *, source: str) -> RuntimeConfig:
    unknown = set(data) - KNOWN_KEYS
    if unknown:
        raise InvalidArgument(
            f"{source}: unknown key(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(sorted(KNOWN_KEYS - {'ConfigPath'}))}"
        )
    default = data.get("default_backend", "runc")
    if not isinstance(default, str) or not default:
        raise InvalidArgument(f"{source}: default_backend must be a backend name, not {default!r}")
    backends = data.get("backends", {})
    if not isinstance(backends, Mapping) or not all(
        isinstance(v, Mapping) for v in backends.values()
    ):
        raise InvalidArgument(f"{source}: [backends.<name>] must be tables")
    allowed = data.get("allowed_backends")
    return RuntimeConfig(
        default_backend=default,
        allowed_backends=None if allowed is None else _names(allowed, "allowed_backends", source),
        fallback_backends=_names(data.get("fallback_backends", []), "fallback_backends", source),
        backends={name: dict(table) for name, table in backends.items()},
    )


def _names(value: Any, key: str, source: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise InvalidArgument(f"{source}: {key} must be a list of backend names, not {value!r}")
    return tuple(value)


def _read_defaults(path: Path | None) -> dict[str, Any]:
    path = path or Path(os.environ.get("POLYSHIM_CONFIG", DEFAULTS_PATH))
    try:
        return _parse_toml(path.read_text(), str(path))
    except FileNotFoundError:
        return {}


def _from_options(options: any_pb2.Any) -> dict[str, Any]:
    name = options.type_url.rsplit("/", 1)[-1]
    if name == RUNTIME_OPTIONS:
        return _from_runtime_options(options.value)
    if name == RUNC_OPTIONS:
        return _from_runc_options(options.value)
    # containerd: "a shim should accept unknown option types gracefully"
    return {}


def _from_runtime_options(value: bytes) -> dict[str, Any]:
    from shim_framework.api.runtimeoptions.v1 import api_pb2

    try:
        opts = api_pb2.Options.FromString(value)
    except DecodeError as e:
        raise InvalidArgument(f"runtime options: malformed {RUNTIME_OPTIONS}: {e}") from e
    data: dict[str, Any] = {}
    if opts.config_body:
        data = _parse_toml(opts.config_body.decode("utf-8", "replace"), "runtime options body")
    path = opts.config_path or data.pop("ConfigPath", "")
    if path:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise InvalidArgument(
                f"runtime config {path}: cannot read it ({e.strerror}); fix the runtime's "
                "ConfigPath or create the file"
            ) from e
        _merge(data, _parse_toml(text, path))
    return data


def _from_runc_options(value: bytes) -> dict[str, Any]:
    from shim_framework.api.runc.options import oci_pb2

    try:
        opts = oci_pb2.Options.FromString(value)
    except DecodeError as e:
        raise InvalidArgument(f"runtime options: malformed {RUNC_OPTIONS}: {e}") from e
    runc = {
        key: getattr(opts, field)
        for field, key in _RUNC_OPTION_KEYS.items()
        if getattr(opts, field)
    }
    return {"backends": {"runc": runc}} if runc else {}


def _parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InvalidArgument(f"runtime config {source}: not valid TOML: {e}") from e


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> None:
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
