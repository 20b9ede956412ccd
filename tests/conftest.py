"""Test harness: a real msgd in a subprocess, on a temporary config, spool and log.

Nothing here sleeps to synchronise: `wait_for` polls a condition until a deadline and fails with
what it was waiting for.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgd
import pytest
from msgd.config import DaemonConfig, QueueConfig
from msgd.spool import SpoolStore
from rabbitkit import rabbit  # noqa: F401  (the session's RabbitMQ node, a fixture)

TESTS = Path(__file__).parent
BIN = Path(sys.executable).parent


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    what: str = "condition",
    interval: float = 0.005,
) -> Any:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its reaper does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def toml(data: dict[str, Any]) -> str:
    """Enough TOML for test configs: nested tables of scalars and lists."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines: list[str] = []

    def table(prefix: str, d: dict[str, Any]) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict)}
        if prefix:
            lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {value(v)}" for k, v in scalars.items())
        for k, v in d.items():
            if isinstance(v, dict):
                key = k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)
                table(f"{prefix}.{key}" if prefix else key, v)

    table("", data)
    return "\n".join(lines) + "\n"


class Msgd:
    """One daemon under test, with its files and the means to poke it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.out = root / "out"
        self.out.mkdir()
        self.config_path = root / "msgd.toml"
        self.proc: subprocess.Popen[bytes] | None = None
        self.daemon: dict[str, Any] = {
            "pidfile": "run/msgd.pid",
            "spool": "spool",
            "workers": 2,
            "grace_period": 10.0,
            "log_file": "msgd.log",
            "log_format": "json",
            "log_level": "info",
            "stats_file": "run/stats.json",
            "allow_root": True,
            "pythonpath": [str(TESTS)],
        }
        self.queues: dict[str, dict[str, Any]] = {"default": {"handler": "handlers:record"}}
        self.write_config()

    # -- files -----------------------------------------------------------------------------------

    def write_config(self, text: str | None = None) -> None:
        """Replace the config file whole, as editors do: a producer or the daemon reading it
        meanwhile sees the old file or the new one."""
        if text is None:
            text = toml({"daemon": self.daemon, "queues": self.queues})
        tmp = self.config_path.with_name(self.config_path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(self.config_path)

    @property
    def pidfile(self) -> Path:
        return self.root / "run/msgd.pid"

    @property
    def state_file(self) -> Path:
        return self.root / "run/msgd.state"

    def store(self, queue: str = "default") -> SpoolStore:
        """The spool queue `queue` of this daemon, for writing and looking at it directly."""
        return spool_store(self.root / "spool", queue)

    def state(self) -> dict[str, Any]:
        return _json(self.state_file) or {}

    def generation(self, action: str) -> int:
        return self.state().get("generations", {}).get(action, 0)

    def stats(self) -> dict[str, Any]:
        return _json(self.root / "run/stats.json") or {}

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        try:
            lines = (self.root / "msgd.log").read_text().split("\n")[:-1]  # not a half line
        except FileNotFoundError:
            return []
        events = [json.loads(line) for line in lines if line.startswith("{")]
        return [e for e in events if name is None or e["event"] == name]

    def succeeded(self) -> list[str]:
        """Ids the `record` handler saw succeed, in order, one line per success."""
        try:
            return (self.out / "succeeded").read_text().split()
        except FileNotFoundError:
            return []

    def files(self, queue: str, state: str) -> list[str]:
        names = []
        base = self.root / "spool" / queue / state
        if state == "cur":
            for slot in base.glob("*"):
                names += [p.name for p in slot.iterdir()]
            return names
        return sorted(p.name for p in base.glob("*")) if base.exists() else []

    # -- process ---------------------------------------------------------------------------------

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {**os.environ, "MSGD_TEST_OUT": str(self.out), **(extra or {})}

    def start(self, *args: str, env: dict[str, str] | None = None, wait: bool = True) -> None:
        stderr = open(self.root / "stderr.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(BIN / "msgd"), "-c", str(self.config_path), *args],
            env=self.env(env),
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
        )
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Ready: the state file is there and is this daemon's (not one a killed daemon left)."""

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"msgd exited {self.proc.returncode}: {self.stderr()}")
            return self.state().get("pid") == self.proc.pid

        wait_for(ready, 15, "msgd to be ready")

    def stderr(self) -> str:
        try:
            return (self.root / "stderr.log").read_text()
        except FileNotFoundError:
            return ""

    @property
    def pid(self) -> int:
        return int(self.pidfile.read_text())

    def kill(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait_exit(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> int:
        self.kill(signal.SIGTERM)
        return self.wait_exit()

    def workers(self) -> list[int]:
        """Pids of the live worker processes (children of the master)."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return [int(p) for p in children.read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            return []

    def msgctl(
        self, *args: str, input: bytes | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "msgctl"), "-c", str(self.config_path), *args],
            input=input.decode() if input is not None else None,
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=timeout,
        )

    def send(self, body: bytes = b"x", queue: str = "default") -> str:
        return msgd.send(body, queue=queue, config=str(self.config_path))

    def send_many(self, bodies: list[bytes], queue: str = "default") -> list[str]:
        return msgd.send_many(bodies, queue=queue, config=str(self.config_path))

    def wait_processed(self, n: int, timeout: float = 30.0) -> None:
        wait_for(lambda: len(self.succeeded()) >= n, timeout, f"{n} successes")

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def spool_store(root: Path, queue: str, **policy: Any) -> SpoolStore:
    """One queue of the spool at `root` (the daemon's default modes and flushing)."""
    return SpoolStore(queue, QueueConfig(handler="-", **policy), DaemonConfig(spool=str(root)))


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Msgd]:
    d = Msgd(tmp_path)
    yield d
    d.cleanup()
