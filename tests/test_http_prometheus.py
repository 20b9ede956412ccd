"""/metrics scraped by a real Prometheus server, and read back through its query API."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("websockets")
from conftest import Msgd, wait_for
from httpkit import address, configure, free_port

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(not PROMETHEUS, reason="no prometheus (Debian: prometheus)")


class Prometheus:
    """A private Prometheus on a loopback port, scraping one target every 200 ms."""

    def __init__(self, root: Path, target: str) -> None:
        self.root = root
        config = root / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 200ms\n  scrape_timeout: 150ms\n"
            f"scrape_configs:\n  - job_name: msgd\n    static_configs:\n"
            f"      - targets: ['{target}']\n"
        )
        self.port = free_port()
        self.log = open(root / "prometheus.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(PROMETHEUS), f"--config.file={config}", f"--storage.tsdb.path={root / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=self.log,
        )  # fmt: skip

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector; [] while Prometheus is not up (yet)."""
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited: {(self.root / 'prometheus.log').read_text()}")
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expr}
        )
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return list(json.load(r)["data"]["result"])
        except (urllib.error.URLError, ConnectionError):
            return []

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Any]:
    started: list[Prometheus] = []

    def start(target: str) -> Prometheus:
        root = tmp_path / "prometheus"
        root.mkdir()
        started.append(Prometheus(root, target))
        return started[-1]

    yield start
    for p in started:
        p.stop()


def test_prometheus_scrapes_msgd_messages_total(daemon: Msgd, prometheus_for: Any) -> None:
    configure(daemon)
    daemon.start()
    prom = prometheus_for(address(daemon))
    wait_for(lambda: prom.query('up{job="msgd"} == 1'), 60, "prometheus to scrape msgd")
    daemon.send_many([b"x"] * 7)
    daemon.wait_processed(7)

    def succeeded() -> float | None:
        rows = prom.query('msgd_messages_total{queue="default",outcome="succeeded"}')
        return float(rows[0]["value"][1]) if rows else None

    wait_for(lambda: succeeded() == 7, 30, "msgd_messages_total 7 in prometheus")
    buckets = prom.query('msgd_handler_seconds_bucket{queue="default",le="+Inf"}')
    assert float(buckets[0]["value"][1]) == 7
