"""What the daemon loads: the master leaves out what it never uses, workers still get it."""

from __future__ import annotations

from pathlib import Path

from conftest import Msgd


def maps_ssl(pid: int) -> bool:
    """Whether the process has Python's _ssl extension (and so OpenSSL) mapped."""
    return "/_ssl." in Path(f"/proc/{pid}/maps").read_text()


def test_master_has_no_ssl_but_a_handler_can_use_it(daemon: Msgd) -> None:
    daemon.queues["default"] = {"handler": "handlers:tls"}
    daemon.write_config()
    daemon.start()
    mid = daemon.send(b"x")
    daemon.wait_processed(1)
    assert daemon.succeeded() == [mid]
    assert not maps_ssl(daemon.pid)
    assert any(maps_ssl(pid) for pid in daemon.workers())
    assert daemon.stop() == 0
