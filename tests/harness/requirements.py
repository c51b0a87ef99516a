"""Test requirements that skip locally but fail in CI.

A test whose environment lacks something (root, a binary, a containerd install) is skipped on a
developer machine, but in CI (env ``CI=true``) the same gap fails the test: CI must never pass
by silently skipping what it was meant to check.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn


def in_ci() -> bool:
    """True when running in CI (env ``CI`` set to true/1/yes)."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def missing(reason: str) -> NoReturn:
    """Skip the current test, or fail it in CI."""
    import pytest  # imported here so bench/ and the demo can use the harness without pytest

    if in_ci():
        pytest.fail(f"CI requirement missing: {reason}", pytrace=False)
    pytest.skip(reason)


def require(condition: bool, reason: str) -> None:
    """Skip (fail in CI) with ``reason`` unless ``condition`` holds."""
    if not condition:
        missing(reason)


def require_root() -> None:
    """Require running as root (real containerd, mounts, namespaces)."""
    require(os.geteuid() == 0, "needs root")


def require_binary(name: str) -> Path:
    """Require ``name`` on PATH and return its path."""
    found = shutil.which(name)
    require(found is not None, f"{name} not found on PATH (run scripts/setup)")
    assert found is not None
    return Path(found)
