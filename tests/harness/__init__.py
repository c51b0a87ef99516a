"""Test harness: real containerd daemons, locally built OCI images and bundles, requirements.

Used by the integration tests, ``bench/`` and the demo. Nothing here mocks anything.
"""

from .bundle import make_bundle
from .containerd import (
    INSTALL_LABELS,
    ContainerdError,
    ContainerdInstall,
    CtrError,
    InstallMissing,
    PrivateContainerd,
    get_install,
    installs,
    known_installs,
)
from .images import (
    Dir,
    File,
    HardLink,
    Layer,
    OpaqueWhiteout,
    Symlink,
    Whiteout,
    build_oci_archive,
    busybox_config,
    busybox_image,
    busybox_rootfs,
    host_platform,
    image_name,
    import_image,
)
from .requirements import in_ci, missing, require, require_binary, require_root

__all__ = [
    "INSTALL_LABELS",
    "ContainerdError",
    "ContainerdInstall",
    "CtrError",
    "Dir",
    "File",
    "HardLink",
    "InstallMissing",
    "Layer",
    "OpaqueWhiteout",
    "PrivateContainerd",
    "Symlink",
    "Whiteout",
    "build_oci_archive",
    "busybox_config",
    "busybox_image",
    "busybox_rootfs",
    "get_install",
    "host_platform",
    "image_name",
    "import_image",
    "in_ci",
    "installs",
    "known_installs",
    "make_bundle",
    "missing",
    "require",
    "require_binary",
    "require_root",
]
