"""The error classes polyshim raises, one per wire status code.

Code raises the class that states the fact where the fact is known
(`NotFound` for an unknown task) and the ttrpc or gRPC edge converts it to a
status once. Anything that is not a `PolyshimError` leaves as UNKNOWN, which
is what containerd's own shim does for unclassified errors.

Messages put the context first and then the problem, as containerd's do
(`task "c1": not found`), and say what to do when that is known.
"""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    """gRPC status codes, as carried in ttrpc's `Status.code`."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class PolyshimError(Exception):
    """Base class: an error with a wire status code."""

    code: Code = Code.UNKNOWN


class InvalidArgument(PolyshimError, ValueError):
    code = Code.INVALID_ARGUMENT


class NotFound(PolyshimError, LookupError):
    code = Code.NOT_FOUND


class AlreadyExists(PolyshimError):
    code = Code.ALREADY_EXISTS


class FailedPrecondition(PolyshimError):
    code = Code.FAILED_PRECONDITION


class Unimplemented(PolyshimError, NotImplementedError):
    """containerd's ErrNotImplemented."""

    code = Code.UNIMPLEMENTED


class Unavailable(PolyshimError):
    code = Code.UNAVAILABLE


class DeadlineExceeded(PolyshimError, TimeoutError):
    code = Code.DEADLINE_EXCEEDED


class ResourceExhausted(PolyshimError):
    code = Code.RESOURCE_EXHAUSTED


class Cancelled(PolyshimError):
    code = Code.CANCELLED


class Internal(PolyshimError):
    code = Code.INTERNAL


_BY_CODE: dict[int, type[PolyshimError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Unimplemented,
        Unavailable,
        DeadlineExceeded,
        ResourceExhausted,
        Cancelled,
        Internal,
    )
}


class RemoteError(PolyshimError):
    """A status a peer returned whose code has no class of its own."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = Code(code) if code in Code._value2member_map_ else Code.UNKNOWN


def from_status(code: int, message: str) -> PolyshimError:
    """The error a client raises for a failed call's status."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return RemoteError(code, message)
    return cls(message)


def to_status(exc: BaseException) -> tuple[Code, str]:
    """The (code, message) to put on the wire for *exc*; unclassified is UNKNOWN."""
    if isinstance(exc, PolyshimError):
        return exc.code, str(exc)
    return Code.UNKNOWN, str(exc) or type(exc).__name__
