"""The dashboard in a real headless Chromium, driven over the DevTools protocol: its numbers
follow the messages sent during the test, live over /ws."""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("websockets")
from conftest import Msgd, wait_for
from httpkit import address, configure
from websockets.sync.client import ClientConnection, connect

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM, reason="no chromium (Debian: chromium)")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--remote-debugging-port=0", "--window-size=1400,1000",
]  # fmt: skip


class Browser:
    """One headless Chromium and a DevTools connection to its page."""

    def __init__(self, root: Path) -> None:
        profile = root / "chromium"
        self.log = open(root / "chromium.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=self.log, stderr=self.log,
        )  # fmt: skip
        port_file = profile / "DevToolsActivePort"
        wait_for(lambda: port_file.exists() and port_file.read_text().count("\n"), 30, "chromium")
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self.url = page["webSocketDebuggerUrl"]
        self.cdp: ClientConnection
        self.ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command and its result (events in between are dropped)."""
        mid = next(self.ids)
        self.cdp.send(json.dumps({"id": mid, "method": method, "params": params}))
        while True:
            reply = json.loads(self.cdp.recv(timeout=30))
            if reply.get("id") == mid:
                assert "error" not in reply, reply
                return dict(reply["result"])

    def text(self, selector: str) -> str:
        expr = f"(document.querySelector({json.dumps(selector)}) || {{}}).textContent || ''"
        return str(self.call("Runtime.evaluate", expression=expr, returnByValue=True)["result"]
                   .get("value", ""))  # fmt: skip

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    b = Browser(tmp_path)
    try:
        with connect(b.url, max_size=2**26) as b.cdp:
            yield b
    finally:
        b.close()


def test_the_dashboard_follows_messages_live(daemon: Msgd, browser: Browser) -> None:
    daemon.queues = {"default": {"handler": "handlers:by_body", "max_attempts": 1}}
    configure(daemon)
    daemon.start()
    browser.call("Page.navigate", url=f"http://{address(daemon)}/")
    wait_for(lambda: browser.text("#conn") == "live", 30, "the page's WebSocket")
    wait_for(lambda: browser.text("#succeeded") == "0", 30, "the first snapshot")
    assert "default" in browser.text("#queues")
    daemon.send_many([b"ok"] * 5 + [b"fail"])
    wait_for(lambda: browser.text("#succeeded") == "5", 30, "5 succeeded on the page")
    wait_for(lambda: browser.text("#failed") == "1", 30, "1 failed on the page")
    failures = wait_for(lambda: "RuntimeError" in browser.text("#failures") and
                        browser.text("#failures"), 10, "the failure's error")  # fmt: skip
    assert "failing attempt 1" in failures
    assert browser.text("#workers").count("idle") == 2
    shot = daemon.root / "dashboard.png"
    browser.screenshot(shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_dashboard_reconnects_by_itself(daemon: Msgd, browser: Browser) -> None:
    configure(daemon)
    daemon.start()
    browser.call("Page.navigate", url=f"http://{address(daemon)}/")
    wait_for(lambda: browser.text("#conn") == "live", 30, "the page's WebSocket")
    configure(daemon, token="another")  # a new token: the master starts a new listener
    assert daemon.msgctl("reload").returncode == 0
    daemon.send_many([b"x"] * 3)
    wait_for(lambda: browser.text("#succeeded") == "3", 30, "the page to reconnect and update")
