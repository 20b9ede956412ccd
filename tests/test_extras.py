"""Optional dependencies are optional: what a plain `pip install .` gives.

`make test` runs this file (with the spool suites) a second time in a virtual environment made
with a plain `pip install .`, where redis-py, pika, websockets and cronsim are missing: the tests
that need a library to be missing run there, and say why they skip here.
"""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys

import pytest
from conftest import BIN, Msgd, wait_for

OPTIONAL = {"redis": ("redis", "redis-py"), "amqp": ("pika", "pika")}
URL = {"redis": "redis://127.0.0.1:1/0", "amqp": "amqp://guest:guest@127.0.0.1:1/%2F"}


def missing(library: str) -> bool:
    return importlib.util.find_spec(library) is None


def needs_missing(backend: str) -> pytest.MarkDecorator:
    library = OPTIONAL[backend][0]
    return pytest.mark.skipif(
        not missing(library), reason=f"{library} is installed (runs in make test's plain venv)"
    )


def remote(daemon: Msgd, backend: str) -> str:
    daemon.queues["remote"] = {"handler": "handlers:record", "backend": backend}
    daemon.queues["remote"]["url"] = URL[backend]
    daemon.write_config()
    what = OPTIONAL[backend][1]
    return f"queues.remote.backend: \"{backend}\" needs {what}: pip install 'msgd[{backend}]'"


@pytest.mark.parametrize("backend", [pytest.param(b, marks=needs_missing(b)) for b in OPTIONAL])
def test_a_queue_whose_library_is_missing_is_a_config_error(daemon: Msgd, backend: str) -> None:
    """At --check, at start and at reload (rejected: the old config keeps running)."""
    error = remote(daemon, backend)
    check = subprocess.run(
        [str(BIN / "msgd"), "-c", str(daemon.config_path), "--check"],
        capture_output=True,
        text=True,
    )
    assert (check.returncode, check.stderr.strip()) == (1, f"msgd: {error}")
    daemon.start(wait=False)
    assert daemon.wait_exit() == 1
    assert daemon.stderr().strip().endswith(error)
    del daemon.queues["remote"]
    daemon.write_config()
    daemon.start()
    remote(daemon, backend)
    refused = daemon.msgctl("reload")  # msgctl checks the file first, like nginx -s reload
    assert (refused.returncode, refused.stderr.strip()) == (1, f"msgctl: {error}")
    daemon.kill(signal.SIGHUP)  # and msgd rejects it itself
    wait_for(lambda: daemon.generation("reload") == 1, what="the reload's answer")
    assert daemon.state()["last"]["reload"] == {
        **daemon.state()["last"]["reload"],
        "outcome": "rejected",
        "error": error,
    }
    daemon.store().send_many([b"still served"])  # msgd.send would refuse the file too
    daemon.wait_processed(1)
    assert daemon.stop() == 0


def test_spool_queues_import_no_optional_library(daemon: Msgd) -> None:
    """A producer and msgctl with spool queues only never import redis-py, pika, websockets or
    cronsim, even where they are installed."""
    code = (
        "import sys, msgd\n"
        f"msgd.send(b'x', config={str(daemon.config_path)!r})\n"
        "from msgctl.cli import main\n"
        f"main(['-c', {str(daemon.config_path)!r}, 'queues'])\n"
        "print(sorted(m for m in ('redis', 'pika', 'websockets', 'cronsim') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.skipif(not missing("websockets"), reason="websockets is installed (plain venv only)")
def test_an_http_listener_without_websockets_is_a_config_error(daemon: Msgd) -> None:
    daemon.write_config(daemon.config_path.read_text() + '[http]\nlisten = "127.0.0.1:0"\n')
    check = subprocess.run(
        [str(BIN / "msgd"), "-c", str(daemon.config_path), "--check"],
        capture_output=True,
        text=True,
    )
    error = "msgd: http.listen: needs websockets: pip install 'msgd[http]'"
    assert (check.returncode, check.stderr.strip()) == (1, error)


@pytest.mark.skipif(not missing("cronsim"), reason="cronsim is installed (runs in the plain venv)")
def test_a_cron_schedule_needs_cronsim_and_every_does_not(daemon: Msgd) -> None:
    daemon.queues["nightly"] = {"handler": "handlers:record", "mode": "burst"}
    daemon.queues["nightly"]["schedule"] = "0 3 * * *"
    daemon.write_config()
    check = subprocess.run(
        [str(BIN / "msgd"), "-c", str(daemon.config_path), "--check"],
        capture_output=True,
        text=True,
    )
    error = "queues.nightly.schedule: cron expressions need cronsim: pip install 'msgd[cron]'"
    assert (check.returncode, check.stderr.strip()) == (1, f"msgd: {error}")
    daemon.queues["nightly"]["schedule"] = "@every 1s"  # no library needed
    daemon.write_config()
    daemon.start()
    mid = daemon.send(b"x", queue="nightly")
    wait_for(lambda: daemon.succeeded() == [mid], 10, "the scheduled burst")
