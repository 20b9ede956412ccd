"""Start and stop a peer's consumer process group (Huey consumer, Celery worker)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.join(BENCH, "peers")


def env(extra: dict[str, str]) -> dict[str, str]:
    e = dict(os.environ, **extra)
    e["PYTHONPATH"] = os.pathsep.join([PEERS, BENCH, e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return e


def tool(name: str) -> str:
    """A console script installed beside this interpreter (huey_consumer, celery)."""
    return os.path.join(os.path.dirname(sys.executable), name)


def start(argv: list[str], extra_env: dict[str, str], log: str) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen(
            argv,
            env=env(extra_env),
            cwd=PEERS,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped as a whole below
        )


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
    """Ask the group to stop; kill it if it has not stopped by the deadline."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass
    try:  # leftovers of the group (pool children) go too
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
