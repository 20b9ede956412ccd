"""structlog set-up: JSON or console lines, to stderr or a file that HUP reopens.

Reopening swaps the file under the same descriptor number (dup2), so every logger that holds the
file object, in the master and in forked workers alike, writes to the new file without being
rebuilt. The file is opened O_APPEND: lines from several processes never overwrite each other.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

import structlog

_stream: TextIO | None = None


def setup(log_file: str, log_format: str, log_level: str) -> None:
    """Configure (or reconfigure, on reload) where and how every process logs."""
    global _stream
    if log_file:
        fd = _open(log_file)
        if _stream is not None and _stream is not sys.stderr:
            os.dup2(fd, _stream.fileno())
            os.close(fd)
        else:
            _stream = os.fdopen(fd, "a", buffering=1)
    else:
        _stream = sys.stderr
    renderer = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, log_level.upper())),
        logger_factory=structlog.WriteLoggerFactory(file=_stream),
        cache_logger_on_first_use=False,
    )


def reopen(log_file: str) -> None:
    """After logrotate moved the file away: start a new one at the same path."""
    if log_file and _stream is not None and _stream is not sys.stderr:
        fd = _open(log_file)
        os.dup2(fd, _stream.fileno())
        os.close(fd)


def log_fds() -> list[int]:
    """Descriptors that must survive python-daemon's closing of files."""
    return [_stream.fileno()] if _stream is not None else []


def _open(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
