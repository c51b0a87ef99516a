"""What both platforms' modules return alike."""

from __future__ import annotations

from typing import NamedTuple


class MountEntry(NamedTuple):
    """One mount of the mount table."""

    point: str  # where it is mounted
    fstype: str
    root: str  # the directory of its filesystem mounted there: "/" unless a bind mount
    options: str  # the filesystem's own options, comma-separated ("" where not reported)
