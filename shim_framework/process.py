"""Processes of a task and their states: one table of legal moves, checked in one place.

A task has one init process (id = the container id, exec id "") and any
number of exec processes. Each moves through:

    CREATED --start--> RUNNING --pause--> PAUSING --paused--> PAUSED --resume--> RUNNING
       |                  |                  |                   |
       +------------------+------exit--------+-------------------+--> STOPPED

An exit is recorded exactly once: `Process.record_exit` refuses a second one,
so however exits reach the task service (reaper, backend callback, a buffered
early exit) only the first counts.
"""

from __future__ import annotations

import enum
import threading
import time

import attrs

from shim_framework.api.types import task_pb2 as task_types
from shim_framework.errors import FailedPrecondition
from shim_framework.stdio import ProcessStdio


class Status(enum.Enum):
    CREATED = task_types.CREATED
    RUNNING = task_types.RUNNING
    PAUSING = task_types.PAUSING
    PAUSED = task_types.PAUSED
    STOPPED = task_types.STOPPED


_TRANSITIONS: dict[tuple[Status, str], Status] = {
    (Status.CREATED, "start"): Status.RUNNING,
    (Status.CREATED, "exit"): Status.STOPPED,
    (Status.RUNNING, "pause"): Status.PAUSING,
    (Status.RUNNING, "exit"): Status.STOPPED,
    (Status.PAUSING, "paused"): Status.PAUSED,
    (Status.PAUSING, "pause failed"): Status.RUNNING,
    (Status.PAUSING, "exit"): Status.STOPPED,
    (Status.PAUSED, "resume"): Status.RUNNING,
    (Status.PAUSED, "exit"): Status.STOPPED,
}


def next_status(status: Status, event: str) -> Status:
    """The status after *event*; FailedPrecondition names the illegal move."""
    try:
        return _TRANSITIONS[(status, event)]
    except KeyError:
        raise FailedPrecondition(
            f"invalid state transition: {status.name.lower()} => {event}"
        ) from None


@attrs.define(eq=False)
class Process:
    container_id: str
    exec_id: str  # "" for the init process
    stdio: ProcessStdio
    pid: int = 0
    status: Status = Status.CREATED
    exit_status: int = 0
    exited_at: float | None = None
    exited: threading.Event = attrs.field(factory=threading.Event)
    # While Start runs, an exit is held back so /tasks/start goes out before /tasks/exit.
    starting: bool = False
    held_exit: tuple[int, float] | None = None

    @property
    def id(self) -> str:
        return self.exec_id or self.container_id

    @property
    def is_init(self) -> bool:
        return not self.exec_id

    def move(self, event: str) -> None:
        self.status = next_status(self.status, event)

    def record_exit(self, status: int, exited_at: float | None = None) -> bool:
        """Record the exit; False if one was already recorded."""
        if self.exited.is_set():
            return False
        self.status = next_status(self.status, "exit")
        self.exit_status = status
        self.exited_at = exited_at if exited_at is not None else time.time()
        self.exited.set()
        return True
