"""sd_notify (issue 6): what msgd tells systemd, read from a datagram socket the test owns.

$NOTIFY_SOCKET names either a path or an abstract socket ('@name'); both are tested. The order of
the lifecycle messages is asserted exactly; the watchdog's cadence only loosely.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import BIN, Msgd, wait_for
from faultkit import title

Message = dict[str, str]


class NotifySocket:
    """The service manager's end: an AF_UNIX datagram socket, and every message it received."""

    def __init__(self, abstract: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.dir = ""
        if abstract:
            name = f"msgd-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.env_value = "@" + name
        else:
            self.dir = tempfile.mkdtemp(prefix="msgd-notify-")  # short: sun_path is 108 bytes
            self.env_value = os.path.join(self.dir, "notify")
            self.sock.bind(self.env_value)
        self.received: list[tuple[float, Message]] = []  # (monotonic time, fields)
        self.cursor = 0  # where the next wait() starts looking

    def env(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.env_value, **extra}

    def poll(self, timeout: float = 0.0) -> None:
        """Take every datagram that arrives within `timeout` seconds (or is already queued)."""
        self.sock.settimeout(timeout or None)
        if not timeout:
            self.sock.setblocking(False)
        try:
            while True:
                data = self.sock.recv(4096)
                fields = dict(line.split("=", 1) for line in data.decode().splitlines())
                self.received.append((time.monotonic(), fields))
                self.sock.setblocking(False)
        except (BlockingIOError, TimeoutError):
            pass

    def wait(self, predicate: Callable[[Message], bool], what: str, timeout: float = 10) -> Message:
        """The first message satisfying `predicate` after the one the previous wait returned:
        successive waits walk the messages in the order they were sent."""

        def found() -> tuple[int, Message] | None:
            self.poll(0.05)
            for i in range(self.cursor, len(self.received)):
                if predicate(self.received[i][1]):
                    return i, self.received[i][1]
            return None

        index, message = wait_for(found, timeout, what)
        self.cursor = index + 1
        return message

    def lifecycle(self) -> list[Message]:
        """The messages that are neither watchdog pings nor plain STATUS updates."""
        return [m for _, m in self.received if set(m) - {"WATCHDOG", "STATUS"}]

    def close(self) -> None:
        self.sock.close()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(params=["path", "abstract"])
def notify(request: pytest.FixtureRequest) -> Iterator[NotifySocket]:
    s = NotifySocket(abstract=request.param == "abstract")
    yield s
    s.close()


@pytest.fixture
def path_notify() -> Iterator[NotifySocket]:
    s = NotifySocket(abstract=False)
    yield s
    s.close()


def is_ready(m: Message) -> bool:
    return m.get("READY") == "1"


def summary_re(workers: int, done: int, failed: int, pending: int) -> str:
    return f"{workers} workers, {done} done, {failed} failed, {pending} pending"


# -- the life cycle -------------------------------------------------------------------------------


def test_ready_reload_stopping_sequence(daemon: Msgd, notify: NotifySocket) -> None:
    daemon.start(env=notify.env())
    ready = notify.wait(is_ready, "READY=1")
    assert ready["MAINPID"] == str(daemon.pid)
    assert ready["STATUS"] == summary_re(2, 0, 0, 0)
    # The pool is up when READY is sent: the state file (written last at start) exists already.
    assert daemon.state_file.exists() and len(daemon.workers()) == 2

    before = time.monotonic_ns() // 1000  # CLOCK_MONOTONIC, the clock systemd compares with
    daemon.kill(signal.SIGHUP)
    reloading = notify.wait(lambda m: m.get("RELOADING") == "1", "RELOADING=1")
    after = time.monotonic_ns() // 1000
    assert before <= int(reloading["MONOTONIC_USEC"]) <= after
    again = notify.wait(is_ready, "READY=1 after the reload")
    assert again["MAINPID"] == str(daemon.pid)
    wait_for(lambda: daemon.generation("reload") == 1, 5, "reload ack")

    daemon.kill(signal.SIGTERM)
    notify.wait(lambda m: m.get("STOPPING") == "1", "STOPPING=1")
    assert daemon.wait_exit() == 0
    notify.poll()
    assert [sorted(m) for m in notify.lifecycle()] == [
        ["MAINPID", "READY", "STATUS"],
        ["MONOTONIC_USEC", "RELOADING"],
        ["MAINPID", "READY", "STATUS"],
        ["STOPPING"],
    ]
    assert not [m for _, m in notify.received if "WATCHDOG" in m]  # no WATCHDOG_USEC: no pings
    assert not [m for _, m in notify.received if "ERRNO" in m]


def test_status_is_refreshed_with_the_summary(daemon: Msgd, path_notify: NotifySocket) -> None:
    daemon.queues = {"default": {"handler": "handlers:by_body", "max_attempts": 1}}
    daemon.write_config()
    daemon.start(env=path_notify.env())
    path_notify.wait(is_ready, "READY=1")
    daemon.send_many([b"ok"] * 5 + [b"fail"])
    wait_for(lambda: daemon.stats()["processed"] == 6, 5, "6 messages worked")
    # STATUS= lines come every few seconds (5): wait for one that has caught up.
    update = path_notify.wait(
        lambda m: set(m) == {"STATUS"} and m["STATUS"] == summary_re(2, 5, 1, 0),
        "a STATUS update with the new counts",
        timeout=12,
    )
    assert update == {"STATUS": summary_re(2, 5, 1, 0)}
    daemon.stop()


def test_watchdog_pings_at_half_the_timeout(daemon: Msgd, path_notify: NotifySocket) -> None:
    """WATCHDOG_USEC=200000: pings every ~100 ms. Asserted loosely: enough pings over the window
    the test measures, and a median gap between 50 and 300 ms."""
    daemon.start(env=path_notify.env(WATCHDOG_USEC="200000"))
    path_notify.wait(is_ready, "READY=1")
    first = path_notify.wait(lambda m: m.get("WATCHDOG") == "1", "a first WATCHDOG=1")
    assert first == {"WATCHDOG": "1"}
    start = len(path_notify.received)
    pings = lambda: [t for t, m in path_notify.received[start:] if m.get("WATCHDOG")]  # noqa: E731
    window = time.monotonic()
    wait_for(lambda: path_notify.poll(0.05) or len(pings()) >= 8, 10, "8 more pings")
    window = time.monotonic() - window
    times = pings()
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # Times of receipt: a stalled test process receives queued pings back to back, so the
    # typical gap is asserted, and the count over the window.
    assert 0.05 <= statistics.median(gaps) <= 0.3, gaps
    assert len(times) >= window / 0.5  # never silent for a whole watchdog timeout
    daemon.stop()
    path_notify.poll()
    last_ping = max(i for i, (_, m) in enumerate(path_notify.received) if m.get("WATCHDOG"))
    stopping = next(i for i, (_, m) in enumerate(path_notify.received) if m.get("STOPPING") == "1")
    assert last_ping < stopping  # no "alive" once it is stopping


def test_watchdog_pid_of_another_process_means_no_pings(
    daemon: Msgd, path_notify: NotifySocket
) -> None:
    daemon.start(env=path_notify.env(WATCHDOG_USEC="200000", WATCHDOG_PID="1"))
    path_notify.wait(is_ready, "READY=1")
    daemon.send(b"x")
    daemon.wait_processed(1)
    daemon.kill(signal.SIGUSR1)  # a few loop turns later: pings would have come by now
    wait_for(lambda: daemon.generation("stats") == 1, 5, "stats ack")
    wait_for(lambda: daemon.stats()["uptime"] > 0.5, 5, "half a second of uptime")
    daemon.stop()
    path_notify.poll()
    assert not [m for _, m in path_notify.received if "WATCHDOG" in m]


# -- failures -------------------------------------------------------------------------------------


def test_failed_start_reports_errno_and_status(daemon: Msgd, notify: NotifySocket) -> None:
    daemon.queues["default"]["threads"] = 0
    daemon.write_config()
    daemon.start(env=notify.env(), wait=False)
    assert daemon.wait_exit() == 1
    notify.poll()
    messages = [m for _, m in notify.received]
    assert len(messages) == 1, messages
    assert set(messages[0]) == {"STATUS", "ERRNO"}
    assert "queues.default.threads" in messages[0]["STATUS"]
    assert int(messages[0]["ERRNO"]) > 0
    assert "READY" not in messages[0]


def test_second_instance_reports_already_running(daemon: Msgd, path_notify: NotifySocket) -> None:
    daemon.start()
    second = subprocess.run(
        [str(BIN / "msgd"), "-c", str(daemon.config_path)],
        env=daemon.env(path_notify.env()),
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert second.returncode == 1, second.stderr
    path_notify.poll()
    messages = [m for _, m in path_notify.received]
    assert len(messages) == 1 and set(messages[0]) == {"STATUS", "ERRNO"}, messages
    assert f"already running (pid {daemon.pid})" in messages[0]["STATUS"]


def test_rejected_reload_still_says_ready_and_msgctl_exits_1(
    daemon: Msgd, path_notify: NotifySocket
) -> None:
    daemon.start(env=path_notify.env())
    path_notify.wait(is_ready, "READY=1")
    # Valid for msgctl, refused by the daemon: what `ExecReload=msgctl reload` meets.
    daemon.daemon["spool"] = "elsewhere"
    daemon.write_config()
    done = daemon.msgctl("reload")
    assert done.returncode == 1
    assert "reload rejected: daemon.spool: cannot change on reload" in done.stderr
    path_notify.wait(lambda m: m.get("RELOADING") == "1", "RELOADING=1")
    ready = path_notify.wait(is_ready, "READY=1 after the rejected reload")
    assert "reload rejected" in ready["STATUS"]
    # A file that does not even parse: msgctl refuses before signalling, so systemd hears nothing.
    daemon.write_config("[daemon\n")
    broken = daemon.msgctl("reload")
    assert broken.returncode == 1 and "TOML syntax error" in broken.stderr
    daemon.stop()
    path_notify.poll()
    assert [sorted(m) for m in path_notify.lifecycle()] == [
        ["MAINPID", "READY", "STATUS"],
        ["MONOTONIC_USEC", "RELOADING"],
        ["MAINPID", "READY", "STATUS"],
        ["STOPPING"],
    ]


def test_reload_that_cannot_reopen_the_log_is_rejected_with_ready(
    daemon: Msgd, path_notify: NotifySocket
) -> None:
    """The log's directory went away (a careless rotation): the reload is refused, and systemd
    still hears READY=1 (without it the unit would hang in "reloading" until its timeout)."""
    daemon.daemon["log_file"] = "logs/msgd.log"
    daemon.write_config()
    (daemon.root / "logs").mkdir()
    daemon.start(env=path_notify.env())
    path_notify.wait(is_ready, "READY=1")
    (daemon.root / "logs").rename(daemon.root / "logs.old")
    done = daemon.msgctl("reload")
    assert done.returncode == 1
    assert "reload rejected: daemon.log_file: cannot reopen" in done.stderr
    path_notify.wait(lambda m: m.get("RELOADING") == "1", "RELOADING=1")
    assert "reload rejected" in path_notify.wait(is_ready, "READY=1")["STATUS"]
    (daemon.root / "logs").mkdir()
    again = daemon.msgctl("reload")
    assert again.returncode == 0, again.stderr
    path_notify.wait(lambda m: m.get("RELOADING") == "1", "RELOADING=1")
    status = path_notify.wait(is_ready, "READY=1")["STATUS"]  # old workers may still count
    assert re.fullmatch(r"[2-4] workers, 0 done, 0 failed, 0 pending", status), status
    assert (daemon.root / "logs" / "msgd.log").exists()
    daemon.stop()


def test_notifier_sends_one_line_per_field(
    path_notify: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    from msgd.notify import Notifier

    monkeypatch.setenv("NOTIFY_SOCKET", path_notify.env_value)
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    n = Notifier()
    assert n.watchdog_interval == 1.5
    n.failed("msgd: line one\nline two", errno=22)
    n.extend_timeout(10)
    path_notify.poll(1)
    path_notify.poll()
    assert [m for _, m in path_notify.received] == [
        {"STATUS": "msgd: line one line two", "ERRNO": "22"},
        {"EXTEND_TIMEOUT_USEC": "10000000"},
    ]


def test_no_notify_socket_no_harm(daemon: Msgd) -> None:
    """Without $NOTIFY_SOCKET (and with one naming nothing) msgd runs as usual."""
    env: dict[str, Any] = {"NOTIFY_SOCKET": os.path.join(str(daemon.root), "absent")}
    daemon.start(env=env)
    daemon.send(b"x")
    daemon.wait_processed(1)
    assert daemon.stop() == 0


# -- the loop never blocks ------------------------------------------------------------------------


def idle_workers(daemon: Msgd) -> list[int]:
    return [p for p in daemon.workers() if " idle" in title(p)]


def test_a_slow_handler_import_during_reload_stalls_nothing(
    daemon: Msgd, path_notify: NotifySocket
) -> None:
    """While a reload's new workers import a handler module that takes long (until the test
    releases it), USR1 is answered, an old worker killed with -9 is replaced and the watchdog keeps
    being fed: the check runs off the master's loop. Each is seen before the reload's
    acknowledgement."""
    daemon.queues["default"] = {"handler": "slow_import:record"}
    daemon.write_config()
    daemon.start(env=path_notify.env(WATCHDOG_USEC="400000"))
    path_notify.wait(is_ready, "READY=1")
    wait_for(lambda: len(idle_workers(daemon)) == 2, what="the workers' own imports done")
    (daemon.out / "slow").touch()
    daemon.kill(signal.SIGHUP)
    wait_for(lambda: (daemon.out / "importing").exists(), what="the reload's import under way")
    pings_before = len([m for _, m in path_notify.received if m.get("WATCHDOG")])
    stats = daemon.msgctl("stats", "--json")
    assert stats.returncode == 0, stats.stderr
    before = set(daemon.workers())  # the two serving, the reload's two loading
    victim = idle_workers(daemon)[0]  # a serving one (the new ones say "starting")
    os.kill(victim, signal.SIGKILL)
    wait_for(
        lambda: victim not in daemon.workers() and len(set(daemon.workers()) - before) == 1,
        what="the worker replaced",
    )
    path_notify.poll(0.5)
    pings = len([m for _, m in path_notify.received if m.get("WATCHDOG")])
    daemon.send(b"during")  # the old workers serve while the new ones load
    daemon.wait_processed(1)
    assert daemon.generation("reload") == 0, "the import is still going on"
    assert pings > pings_before, "the watchdog was fed while the import ran"
    (daemon.out / "release").touch()
    wait_for(lambda: daemon.generation("reload") == 1, 15, what="the reload's acknowledgement")
    assert daemon.state()["last"]["reload"]["outcome"] == "ok"
    daemon.send(b"after")
    daemon.wait_processed(2)
    daemon.stop()
