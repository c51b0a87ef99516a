"""The snapshot model the whole daemon shares: kinds, infos, usage, mounts, label rules.

The vocabulary is containerd's (`core/snapshots/snapshotter.go`): a *key*
names an active snapshot or a view, a *name* names a committed snapshot, and
both live in one key space per snapshotter. A *parent* is the name of a
committed snapshot. Storage is addressed by an integer *id* the metadata store
hands out; keys never become file names.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

import attrs

from shim_framework.errors import InvalidArgument

#: containerd's `labels.Validate`: key and value together at most this many bytes.
MAX_LABEL_BYTES = 4096
#: Longest key or name we accept. containerd's own metastore is bbolt, whose
#: `MaxKeySize` is 32768 bytes; a longer key could never have worked upstream.
MAX_KEY_BYTES = 32768


class Kind(enum.IntEnum):
    """A snapshot's kind; the values are the wire enum's (`snapshots.proto` Kind)."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3

    def __str__(self) -> str:
        # As containerd prints kinds and as filters name them: `kind==active`.
        return self.name.lower()


def _labels(value: Mapping[str, str] | None) -> Mapping[str, str]:
    return dict(value or {})


@attrs.frozen
class Info:
    """What Stat, Update and List report about one snapshot."""

    name: str
    parent: str = ""
    kind: Kind = Kind.UNKNOWN
    created: int = 0  # nanoseconds since the epoch, UTC
    updated: int = 0
    labels: Mapping[str, str] = attrs.field(factory=dict, converter=_labels)


@attrs.frozen
class Usage:
    """Resources a snapshot takes itself, parents excluded: bytes on disk and inodes."""

    size: int = 0
    inodes: int = 0


@attrs.frozen
class Snapshot:
    """What a driver is told about one snapshot: its storage id, kind and parent chain.

    `parent_ids` are the storage ids of the committed parents, nearest first:
    `parent_ids[0]` is the direct parent (the order overlay lowerdirs take)."""

    id: int
    kind: Kind
    parent_ids: tuple[int, ...] = ()


@attrs.frozen
class Mount:
    """One `containerd.types.Mount`, as Prepare, View and Mounts return it."""

    type: str
    source: str
    target: str = ""
    options: tuple[str, ...] = attrs.field(default=(), converter=tuple)


def check_key(key: str, what: str = "key") -> None:
    """InvalidArgument unless *key* can name a snapshot (any non-empty string up to 32 KiB)."""
    if not key:
        raise InvalidArgument(f"snapshot {what} must not be empty")
    size = len(key.encode("utf-8", "surrogatepass"))
    if size > MAX_KEY_BYTES:
        raise InvalidArgument(
            f'snapshot {what} "{key[:40]}...": {size} bytes, more than the limit of '
            f"{MAX_KEY_BYTES} bytes"
        )


def check_labels(labels: Mapping[str, str]) -> None:
    """InvalidArgument for a label containerd itself would refuse (`labels.Validate`)."""
    for key, value in labels.items():
        if not key:
            raise InvalidArgument("label keys must not be empty")
        size = len(key.encode()) + len(value.encode())
        if size > MAX_LABEL_BYTES:
            raise InvalidArgument(
                f'label "{key[:40]}": key and value are {size} bytes, more than the limit of '
                f"{MAX_LABEL_BYTES} bytes"
            )
