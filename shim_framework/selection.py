"""Which backend runs a container: the rules, then the runtime's policy.

Per container, the first rule that names a backend wins:

1. the `io.polyshim.backend` annotation;
2. crun's annotations: `run.oci.handler` (`wasm`, `krun`) and
   `module.wasm.image/variant` (`compat`; `compat-smart` only when the
   entrypoint is a wasm file);
3. auto-detection: an installed backend recognises the entrypoint file (the
   wasm backend: its magic bytes);
4. the runtime's `default_backend`;
5. `runc`.

A Kubernetes sandbox (pause) container skips every rule that names a backend
unable to run it.

Then policy: an annotation may only pick what the runtime's
`allowed_backends` lists, so a pod can never talk its way out of the
isolation its RuntimeClass promised. A backend that cannot run on this host
fails the Create with its reason, unless the runtime lists
`fallback_backends`; there is never a silent fallback.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from shim_framework import rootfs
from shim_framework.backend import Backend
from shim_framework.config import RuntimeConfig
from shim_framework.errors import FailedPrecondition, InvalidArgument
from shim_framework.registry import Registry

BACKEND_ANNOTATION = "io.polyshim.backend"
CRUN_HANDLER = "run.oci.handler"
WASM_VARIANT = "module.wasm.image/variant"
CRUN_HANDLERS = {"wasm": "wasm", "krun": "libkrun"}  # crun handler name -> polyshim backend
CONTAINER_TYPE = "io.kubernetes.cri.container-type"
FALLBACK_BACKEND = "runc"


@attrs.frozen
class Choice:
    name: str
    rule: str  # why: "annotation io.polyshim.backend=wasm", "default_backend", ...
    backend: type[Backend]


def choose(
    spec: Mapping[str, Any], root: Path, config: RuntimeConfig, registry: Registry
) -> Choice:
    """The backend for this container, allowed and able to run here, or a clear error."""
    name, rule = _by_rules(spec, root, config, registry)
    _check_allowed(name, rule, config)
    cls = registry.load(name)
    probe = cls.probe(config.backend_config(name))
    if probe.ok:
        return Choice(name, rule, cls)
    for fallback in config.fallback_backends:
        if not _allowed(fallback, config):
            continue
        fallback_cls = registry.load(fallback)
        if fallback_cls.probe(config.backend_config(fallback)).ok:
            return Choice(
                fallback, f"fallback_backends (after {name}: {probe.reason})", fallback_cls
            )
    raise FailedPrecondition(
        f'backend "{name}" (chosen by {rule}) cannot run on this host: {probe.reason}; '
        f"allowed: {_allowed_text(config, registry)}"
    )


def _by_rules(
    spec: Mapping[str, Any], root: Path, config: RuntimeConfig, registry: Registry
) -> tuple[str, str]:
    annotations: Mapping[str, str] = spec.get("annotations") or {}
    is_sandbox = annotations.get(CONTAINER_TYPE) == "sandbox"

    def usable(name: str) -> bool:
        if not is_sandbox:
            return True
        try:
            return registry.load(name).runs_sandbox_containers
        except InvalidArgument:
            return True  # let the policy check report the unknown name

    if (name := annotations.get(BACKEND_ANNOTATION)) and usable(name):
        return name, f"annotation {BACKEND_ANNOTATION}={name}"
    if handler := annotations.get(CRUN_HANDLER):
        name = CRUN_HANDLERS.get(handler)
        if name is None:
            raise InvalidArgument(
                f"annotation {CRUN_HANDLER}={handler}: unknown handler "
                f"(known: {', '.join(sorted(CRUN_HANDLERS))})"
            )
        if usable(name):
            return name, f"annotation {CRUN_HANDLER}={handler}"
    variant = annotations.get(WASM_VARIANT)
    if variant == "compat" and usable("wasm"):
        return "wasm", f"annotation {WASM_VARIANT}=compat"
    entry = rootfs.entrypoint(spec, root)
    smart = variant == "compat-smart" and entry is not None and usable("wasm")
    if smart and _recognizes("wasm", entry, registry):
        return "wasm", f"annotation {WASM_VARIANT}=compat-smart and a wasm entrypoint"
    if entry is not None and not is_sandbox:
        # Every installed backend is asked, allowed or not: a wasm entrypoint on a
        # runc-only runtime is then refused by policy, saying why, instead of failing
        # later as "exec format error".
        for name in registry.names():
            if _recognizes(name, entry, registry):
                return name, f"auto-detection of {entry.name}"
    if usable(config.default_backend):
        return config.default_backend, "the runtime's default_backend"
    return FALLBACK_BACKEND, "the built-in default"


def _recognizes(name: str, entry: Path, registry: Registry) -> bool:
    try:
        return registry.load(name).recognizes(entry)
    except InvalidArgument:
        return False  # not installed


def _allowed(name: str, config: RuntimeConfig) -> bool:
    return config.allowed_backends is None or name in config.allowed_backends


def _check_allowed(name: str, rule: str, config: RuntimeConfig) -> None:
    if not _allowed(name, config):
        allowed = ", ".join(config.allowed_backends or ()) or "none"
        raise FailedPrecondition(
            f'backend "{name}" (chosen by {rule}) is not allowed by this runtime '
            f"(allowed: {allowed}); use an allowed backend or add it to allowed_backends "
            "in the runtime config"
        )


def _allowed_text(config: RuntimeConfig, registry: Registry) -> str:
    if config.allowed_backends is not None:
        return ", ".join(config.allowed_backends) or "none"
    return "any installed (" + ", ".join(registry.names()) + ")"
