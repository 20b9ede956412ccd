"""A throw-away RabbitMQ node for the tests: Debian's rabbitmq-server, once per test session.

The node is ours alone: its own node name, AMQP and distribution ports on free loopback ports,
its own epmd port, data and logs in a temporary directory, and its own Erlang cookie (HOME points
at that directory, so neither /var/lib/rabbitmq nor a running system broker is touched). Run as
root, the scripts are started as the rabbitmq user directly (Debian's /usr/sbin wrappers would
`su` to it and reset HOME, which decides where the cookie is read); run as anyone else, as that
user. The guest user may log in from loopback, which is RabbitMQ's default.

Starting takes about ten seconds, so the fixture is session-scoped; each test uses its own queue
names. `stop_app()` / `start_app()` stop and start the broker application inside the running node
(what `rabbitmqctl stop_app` does), for outage tests.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

SBIN = Path("/usr/lib/rabbitmq/bin")
SERVER = SBIN / "rabbitmq-server"
CTL = SBIN / "rabbitmqctl"
START_TIMEOUT = 60  # seconds; the node is usually up in about ten


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RabbitNode:
    """One rabbitmq-server node in a temporary directory; `url` is the guest user's AMQP URL."""

    def __init__(self) -> None:
        self.user = "rabbitmq" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        self.dir = Path(tempfile.mkdtemp(prefix="msgd-rabbit-"))
        self.port = free_port()
        self.node = f"msgdtest-{os.getpid()}@localhost"
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.dir),  # the Erlang cookie is $HOME/.erlang.cookie
            "LANG": "C.UTF-8",
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_EPMD_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq"),  # .conf is appended
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(self.dir / "node.pid"),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def _prepare(self) -> None:
        for sub in ("mnesia", "log"):
            (self.dir / sub).mkdir()
        (self.dir / "rabbitmq.conf").write_text("loopback_users.guest = true\n")
        (self.dir / "advanced.config").write_text("[].\n")
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq-env.conf").write_text("")
        cookie = self.dir / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20))
        cookie.chmod(0o400)
        for path in (self.dir, *self.dir.rglob("*")):
            shutil.chown(path, self.user, self.user)

    def _run_as(self) -> dict[str, object]:
        return (
            {"user": self.user, "group": self.user, "extra_groups": []} if os.geteuid() == 0 else {}
        )

    def start(self) -> None:
        self._prepare()
        log = open(self.dir / "server.out", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(SERVER)],
            env=self.env,
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **self._run_as(),  # type: ignore[arg-type]
        )
        pidfile = self.env["RABBITMQ_PID_FILE"]
        done = self.ctl("wait", "--timeout", str(START_TIMEOUT), pidfile, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmq-server did not start: {done.stdout}{done.stderr}")

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """rabbitmqctl against this node, as the node's user (with its cookie)."""
        return subprocess.run(
            [str(CTL), "-n", self.node, *args],
            env=self.env,
            cwd=self.dir,
            capture_output=True,
            text=True,
            check=check,
            timeout=START_TIMEOUT + 30,
            **self._run_as(),  # type: ignore[arg-type]
        )

    def stop_app(self) -> None:
        """The broker stops (connections are closed, queues go offline); the node stays up."""
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        self.ctl("await_startup")

    def stop(self) -> None:
        """Stop the node and its epmd, and remove the directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.ctl("stop", check=False)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        epmd = shutil.which("epmd")
        if epmd:  # started by the node on our port; it would outlive the session
            subprocess.run(
                [epmd, "-kill"], env=self.env, capture_output=True, timeout=10, check=False
            )
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def rabbit() -> Iterator[RabbitNode]:
    """The session's broker; tests that use it are skipped where rabbitmq-server is missing."""
    if not SERVER.exists() or not CTL.exists():
        pytest.skip("rabbitmq-server not installed (run `make system-deps`)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("rabbitmq")
        except KeyError:
            pytest.skip("rabbitmq-server's user 'rabbitmq' does not exist")
    node = RabbitNode()
    try:
        node.start()
        yield node
    finally:
        node.stop()
