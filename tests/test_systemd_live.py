"""msgd.service under a real systemd: this machine's own OS booted once per session (nspawn.py).

msgd is installed in the container by running the README's "Install as a systemd service"
commands as they are written, in a copy of this checkout. Each test starts from msgd active on
the base config below and leaves it so. Skips, saying why, where no container can be booted.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import nspawn
import pytest
from conftest import wait_for
from test_systemd_units import MAX_EXPOSURE

pytestmark = pytest.mark.xdist_group("mounts")  # one worker: see pyproject's addopts

CHECKOUT = Path(__file__).resolve().parent.parent
README = CHECKOUT / "README.md"
SOURCE = "/srv/msgd-checkout"  # the checkout, bound read-only
COPY = "/root/msgd"  # where the README's commands run: pip builds in the source tree
CONFIG = "/etc/msgd/msgd.toml"
HANDLED = "/var/log/msgd/handled"  # what the handler writes (LogsDirectory= is writable)
GATE = "/var/log/msgd/gate"  # a message whose body starts with "hold" waits for this file
STATE = "/run/msgd/msgd.state"
# The handler is a command: `started BODY`, then for a "hold..." body wait for the gate, then
# `done BODY`, each one line appended to HANDLED.
HANDLER = (
    f'body=$(cat); echo "started $body" >> {HANDLED}; '
    f"case $body in hold*) while [ ! -e {GATE} ]; do sleep 0.05; done;; esac; "
    f'echo "done $body" >> {HANDLED}'
)
BASE_CONFIG = f"""\
[daemon]
log_format = "json"
workers = 2
grace_period = 20.0

[queues.default]
command = ["/bin/sh", "-c", {json.dumps(HANDLER)}]
"""
# msgctl's check passes it, msgd refuses it: the spool cannot change under a running daemon.
MOVED_SPOOL = BASE_CONFIG.replace("[daemon]\n", '[daemon]\nspool = "/var/spool/elsewhere"\n')
DROP_INS = "/etc/systemd/system/msgd.service.d"
# Warnings and errors msgd may log here, each caused on purpose by a test: (event, outcome).
EXPECTED_COMPLAINTS = {("reload", "rejected"), ("worker_nice not applied", None)}


def readme_install_commands() -> str:
    """The shell block of the README's "Install as a systemd service" section, as written."""
    section = README.read_text().split("## Install as a systemd service", 1)[1]
    found = re.search(r"```sh\n(.*?)```", section, re.S)
    assert found, "README.md: no ```sh block under 'Install as a systemd service'"
    return found.group(1)


def checkout_files() -> str:
    """NUL-separated paths of the checkout's files as a clone would have them (plus edits)."""
    tracked_and_new = ["ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    listed = subprocess.run(
        ["git", "-C", str(CHECKOUT), *tracked_and_new],
        capture_output=True,
        text=True,
        check=True,
    )
    return listed.stdout


@pytest.fixture(scope="session")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[nspawn.Machine]:
    """A booted container with msgd installed as the README says, running on BASE_CONFIG."""
    reason = nspawn.unavailable()
    if reason:
        pytest.skip(f"no systemd container: {reason}")
    files = checkout_files()
    m = nspawn.boot(tmp_path_factory.mktemp("nspawn"), binds=[(CHECKOUT, SOURCE)])
    try:
        m.run("mkdir", "-p", COPY, "/etc/msgd")
        # --ignore-failed-read: a tracked file deleted in the work tree is left out.
        m.sh(f"tar -C {SOURCE} --ignore-failed-read --null -T - -c | tar -C {COPY} -x", input=files)
        m.run("tee", CONFIG, input=BASE_CONFIG)
        m.run("sh", "-exc", f"cd {COPY}\n{readme_install_commands()}")
        yield m
    finally:
        m.stop()


class Unit:
    """msgd.service in the container, seen through systemctl, journalctl and msgctl."""

    def __init__(self, machine: nspawn.Machine) -> None:
        self.m = machine

    def show(self, prop: str) -> str:
        return self.m.run("systemctl", "show", "-P", prop, "msgd.service").stdout.strip()

    def main_pid(self) -> int:
        return int(self.show("MainPID"))

    def workers(self) -> list[str]:
        """The master's worker processes, by their titles."""
        ps = self.m.run("ps", "--no-headers", "-o", "args", "--ppid", str(self.main_pid()))
        return [title for title in ps.stdout.splitlines() if title.startswith("msgd: worker")]

    def nice(self, pid: int) -> int:
        return int(self.m.run("ps", "-o", "nice=", "-p", str(pid)).stdout)

    def nice_of_workers(self) -> list[int]:
        pids = self.m.run("pgrep", "-P", str(self.main_pid()), "-f", "^msgd: worker").stdout
        return [self.nice(int(pid)) for pid in pids.split()]

    @contextlib.contextmanager
    def drop_in(self, name: str, *settings: str) -> Iterator[None]:
        """msgd restarted with these [Service] settings added, and restarted without them after."""
        path = f"{DROP_INS}/{name}.conf"
        self.m.run("mkdir", "-p", DROP_INS)
        self.m.run("tee", path, input="[Service]\n" + "".join(f"{s}\n" for s in settings))
        self.m.sh("systemctl daemon-reload && systemctl restart msgd.service")
        try:
            yield
        finally:
            self.m.sh(f"rm -f {path} && systemctl daemon-reload")
            self.systemctl("restart")

    def handles_a_message(self) -> None:
        body = new_body()
        self.send(body)
        self.wait_handled(body)

    def systemctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.m.run("systemctl", *args, "msgd.service", check=False)

    def write_config(self, text: str) -> None:
        self.m.run("tee", CONFIG, input=text)

    def msgd_lines(self) -> list[str]:
        """What msgd itself wrote to the journal (not systemd, not msgctl), oldest first."""
        out = self.m.run("journalctl", "-u", "msgd.service", "-o", "json", "--no-pager").stdout
        entries = [json.loads(line) for line in out.splitlines()]
        return [str(e["MESSAGE"]) for e in entries if e.get("SYSLOG_IDENTIFIER") == "msgd"]

    def events(self, name: str | None = None) -> list[dict[str, str]]:
        """msgd's log events (log_format = "json"), oldest first."""
        events = [json.loads(line) for line in self.msgd_lines() if line.startswith("{")]
        return [e for e in events if name is None or e["event"] == name]

    def journal(self) -> str:
        return self.m.run("journalctl", "-u", "msgd.service", "-o", "cat", "--no-pager").stdout

    def send(self, body: str) -> str:
        """Enqueue `body` as the msgd user, as the README says producers must."""
        result = self.m.run(
            "runuser", "-u", "msgd", "--", "msgctl", "-c", CONFIG, "send", input=body
        )
        return result.stdout.strip()

    def handled(self) -> list[str]:
        return self.m.run("sh", "-c", f"cat {HANDLED} 2>/dev/null || true").stdout.splitlines()

    def wait_handled(self, body: str) -> None:
        wait_for(lambda: f"done {body}" in self.handled(), 20, f"the handler to finish {body!r}")

    def generation(self, action: str) -> int:
        state = json.loads(self.m.run("cat", STATE).stdout)
        return state["generations"].get(action, 0)


def new_body(prefix: str = "msg") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def unit(machine: nspawn.Machine) -> Unit:
    """msgd active on BASE_CONFIG, however the previous test left it."""
    u = Unit(machine)
    u.write_config(BASE_CONFIG)
    if u.show("ActiveState") != "active":
        assert u.systemctl("start").returncode == 0, u.journal()[-3000:]
    return u


def test_enable_now_started_msgd_ready(unit: Unit) -> None:
    assert unit.show("UnitFileState") == "enabled"
    assert unit.show("ActiveState") == "active"  # Type=notify: only after READY=1
    assert unit.show("StatusText").startswith("2 workers")
    assert len(unit.workers()) == 2
    user = unit.m.run("ps", "-o", "user=", "-p", str(unit.main_pid())).stdout.strip()
    assert user == "msgd"
    assert [e["workers"] for e in unit.events("started")][-1:] == [2]


def test_a_message_is_handled(unit: Unit) -> None:
    body = new_body()
    assert re.fullmatch(r"[0-9a-f]{24}", unit.send(body))
    unit.wait_handled(body)


def test_reload_applies_a_good_config(unit: Unit) -> None:
    pid = unit.main_pid()
    reloads = unit.generation("reload")
    unit.write_config(BASE_CONFIG.replace("workers = 2", "workers = 3"))
    try:
        result = unit.systemctl("reload")
        assert result.returncode == 0, unit.journal()[-2000:]
        assert unit.generation("reload") == reloads + 1
        last = unit.events("reload")[-1]
        assert (last["outcome"], last["workers"]) == ("ok", 3)
        # The old workers finish what they hold while the new ones start.
        wait_for(lambda: len(unit.workers()) == 3, 20, "3 workers")
        assert unit.main_pid() == pid
        body = new_body()
        unit.send(body)
        unit.wait_handled(body)
    finally:
        unit.write_config(BASE_CONFIG)
        unit.systemctl("reload")


@pytest.mark.parametrize(
    ("config", "who", "complaint"),
    [
        # msgctl's own check fails: msgd is never sent SIGHUP.
        (BASE_CONFIG.replace("workers = 2", 'workers = "many"'), "msgctl", "daemon.workers"),
        # msgctl's check passes; msgd itself rejects the file and keeps the old one.
        (MOVED_SPOOL, "msgd", "daemon.spool: cannot change on reload"),
    ],
    ids=["rejected-by-msgctl", "rejected-by-msgd"],
)
def test_reload_of_a_bad_config_fails_and_msgd_keeps_serving(
    unit: Unit, config: str, who: str, complaint: str
) -> None:
    pid = unit.main_pid()
    reloads = unit.generation("reload")
    unit.write_config(config)
    result = unit.systemctl("reload")
    assert result.returncode != 0
    msgctl_said = [line for line in unit.journal().splitlines() if line.startswith("msgctl:")]
    assert complaint in msgctl_said[-1]
    if who == "msgd":
        assert unit.generation("reload") == reloads + 1  # msgd read the file and said no
        last = unit.events("reload")[-1]
        assert (last["outcome"], last["error"]) == ("rejected", complaint + " (restart msgd)")
    else:
        assert unit.generation("reload") == reloads  # no SIGHUP at all
    assert unit.show("ActiveState") == "active"
    assert unit.main_pid() == pid
    unit.write_config(BASE_CONFIG)  # for the producer: the bad file would stop it too
    body = new_body()
    unit.send(body)
    unit.wait_handled(body)


def test_usr1_through_systemctl_logs_stats(unit: Unit) -> None:
    before = len(unit.events("stats"))
    assert unit.systemctl("kill", "--kill-whom=main", "--signal=SIGUSR1").returncode == 0
    wait_for(lambda: len(unit.events("stats")) > before, 10, "a stats event in the journal")


def test_security_exposure_of_the_live_unit(unit: Unit) -> None:
    report = unit.m.run("systemd-analyze", "security", "--no-pager", "msgd.service").stdout
    found = re.search(r"Overall exposure level for msgd\.service: (\d+\.\d+)", report)
    assert found, report
    assert float(found.group(1)) <= MAX_EXPOSURE, report


def test_watchdog_restarts_a_frozen_master(unit: Unit) -> None:
    with unit.drop_in("test-watchdog", "WatchdogSec=3s", "RestartSec=100ms"):
        frozen = unit.main_pid()
        restarts = int(unit.show("NRestarts"))
        unit.m.run("kill", "-STOP", str(frozen))
        try:
            wait_for(
                lambda: unit.show("ActiveState") == "active" and unit.main_pid() not in (0, frozen),
                30,
                "systemd to kill the frozen master and start a new one",
            )
        except AssertionError as e:  # what systemd did instead
            state = {p: unit.show(p) for p in ("ActiveState", "SubState", "MainPID", "Result")}
            tail = unit.m.run("journalctl", "--no-pager", "-n", "40").stdout
            raise AssertionError(f"{e}; {state}; the journal's end:\n{tail}") from None
        assert int(unit.show("NRestarts")) == restarts + 1
        assert "msgd.service: Watchdog timeout" in unit.journal()
        unit.handles_a_message()


def test_workers_lower_their_priority_under_the_hardened_unit(unit: Unit) -> None:
    """The unit's system call filter lets a worker lower its own priority (worker_nice)."""
    master = unit.nice(unit.main_pid())
    wait_for(lambda: unit.nice_of_workers() == [master + 5] * 2, 20, "2 workers at nice +5")


def test_a_sandbox_forbidding_setpriority_costs_only_the_priority(unit: Unit) -> None:
    """Injected: setpriority refused (EPERM). Each worker says so once and serves at the
    master's priority."""
    before = len(unit.events("worker_nice not applied"))
    with unit.drop_in("test-no-setpriority", "SystemCallFilter=~setpriority"):
        master = unit.nice(unit.main_pid())
        warned = lambda: len(unit.events("worker_nice not applied")) == before + 2  # noqa: E731
        wait_for(warned, 20, "a warning from each worker")
        assert unit.nice_of_workers() == [master] * 2
        unit.handles_a_message()


def test_stop_drains_in_flight_messages_and_logs_stopped(unit: Unit) -> None:
    unit.m.run("rm", "-f", GATE)
    body = new_body("hold")
    unit.send(body)
    wait_for(lambda: f"started {body}" in unit.handled(), 20, "the held message to start")
    stopping = len(unit.events("stopping"))
    assert unit.systemctl("stop", "--no-block").returncode == 0
    wait_for(lambda: len(unit.events("stopping")) > stopping, 10, "msgd to log stopping")
    assert unit.show("ActiveState") == "deactivating"  # waiting for the in-flight message
    unit.m.run("touch", GATE)
    wait_for(lambda: unit.show("ActiveState") == "inactive", 30, "msgd to stop")
    assert f"done {body}" in unit.handled()
    assert unit.show("Result") == "success"
    assert unit.events()[-1]["event"] == "stopped"
    leftover = unit.m.sh("find /var/spool/msgd/default/new /var/spool/msgd/default/cur -type f")
    assert leftover.stdout == ""


def test_journal_has_no_unexpected_warnings_from_msgd(unit: Unit) -> None:
    lines = unit.msgd_lines()
    assert lines, "nothing from msgd in the journal"
    assert [line for line in lines if not line.startswith("{")] == []  # no tracebacks
    complaints = [
        e
        for e in unit.events()
        if e["level"] not in ("debug", "info")
        and (e["event"], e.get("outcome")) not in EXPECTED_COMPLAINTS
    ]
    assert complaints == []
