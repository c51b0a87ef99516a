"""Shared fixtures: private containerd daemons (one per containerd version) and images."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# `tests.harness` is importable however pytest is started (also as a bare `pytest`).
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from tests.harness import (  # noqa: E402
    INSTALL_LABELS,
    ContainerdInstall,
    InstallMissing,
    PrivateContainerd,
    busybox_image,
    get_install,
    import_image,
    missing,
    require,
    require_root,
)
from tests.harness.images import BUSYBOX  # noqa: E402

#: The venv's bin dir: holds containerd-shim-polyshim-v2 after `pip install -e .`.
VENV_BIN = Path(sys.prefix) / "bin"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the item so fixtures can tell whether the test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def _test_failed(request: pytest.FixtureRequest) -> bool:
    return any(
        getattr(getattr(request.node, f"rep_{when}", None), "failed", False)
        for when in ("setup", "call")
    )


@pytest.fixture(params=INSTALL_LABELS, ids=lambda label: f"containerd-{label}")
def containerd_install(request: pytest.FixtureRequest) -> ContainerdInstall:
    """Each containerd version in turn (1.6 from Debian 12, 2.1 unpacked by scripts/setup)."""
    require_root()
    try:
        return get_install(request.param)
    except InstallMissing as exc:
        missing(str(exc))


@pytest.fixture
def containerd_factory(
    containerd_install: ContainerdInstall, request: pytest.FixtureRequest
) -> Iterator[Callable[..., PrivateContainerd]]:
    """Make started private daemons of the parametrized version; all cleaned up after the test.

    Keyword arguments go to PrivateContainerd (extra_config, log_level, namespace, ...);
    ``path_prepend`` defaults to the venv's bin dir. On failure the daemons' log tails are
    printed in the teardown section of the report.
    """
    made: list[PrivateContainerd] = []

    def make(**kwargs: Any) -> PrivateContainerd:
        kwargs.setdefault("path_prepend", [VENV_BIN])
        ctrd = PrivateContainerd(containerd_install, **kwargs)
        made.append(ctrd)
        return ctrd.start()

    yield make

    failed = _test_failed(request)
    errors = []
    for ctrd in reversed(made):
        if failed:
            print(f"{ctrd!r}\n{ctrd.log_tail(60)}")
        try:
            ctrd.cleanup()
        except Exception as exc:
            errors.append(f"{ctrd!r}: {exc!r}")
    if errors:
        pytest.fail("cleanup of private containerd failed: " + "; ".join(errors))


@pytest.fixture
def containerd(containerd_factory: Callable[..., PrivateContainerd]) -> PrivateContainerd:
    """A started private containerd, once per containerd version (ids containerd-1.6/-2.1)."""
    return containerd_factory()


@pytest.fixture(scope="session")
def busybox_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The busybox OCI image archive (docker.io/library/busybox:latest), built once."""
    require(BUSYBOX.exists(), f"{BUSYBOX} missing (apt-get install busybox-static: scripts/setup)")
    return busybox_image(tmp_path_factory.mktemp("images"))


@pytest.fixture
def busybox(containerd: PrivateContainerd, busybox_archive: Path) -> str:
    """The busybox image imported into ``containerd``; its name."""
    return import_image(containerd, busybox_archive)
