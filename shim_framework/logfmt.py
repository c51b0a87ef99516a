"""Logging in containerd's logfmt style, to the log pipe containerd gives the shim.

containerd copies whatever the shim writes to the bundle's `log` FIFO into
its own log, so lines look like its own:
`time="2026-11-28T06:44:53.241270897Z" level=info msg="..." runtime=... id=...`.
Writes never block and never fail loudly: while containerd is down nobody
reads the FIFO, and a full pipe must not stall the shim.
"""

from __future__ import annotations

import logging
import os
import time

LEVELS = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "fatal",
}


def _quote(value: str) -> str:
    if value and not any(c in value for c in ' "=\\\n\t'):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


class LogfmtFormatter(logging.Formatter):
    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__()
        self.fields = fields

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        nanos = int((record.created - seconds) * 1e9)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{nanos:09d}Z"
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        parts = [
            f'time="{stamp}"',
            f"level={LEVELS.get(record.levelno, 'info')}",
            f"msg={_quote(message)}",
        ]
        parts += [f"{k}={_quote(v)}" for k, v in self.fields.items()]
        return " ".join(parts)


class FdHandler(logging.Handler):
    """Writes whole lines to a non-blocking fd; drops what cannot be written now."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            os.write(self.fd, (self.format(record) + "\n").encode("utf-8", "replace"))
        except OSError:
            pass  # containerd is not reading (restarting) or the pipe is full


def setup(log_fd: int, *, debug: bool, fields: dict[str, str]) -> None:
    handler = FdHandler(log_fd)
    handler.setFormatter(LogfmtFormatter(fields))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
