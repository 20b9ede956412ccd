"""Helpers for the [http] listener's tests: config, address, WebSocket clients, free ports."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from typing import Any

from conftest import Msgd, toml, wait_for
from websockets.sync.client import ClientConnection, connect

TOKEN = "s3cret-token"


def configure(
    daemon: Msgd, token: str | None = TOKEN, listen: str = "127.0.0.1:0", **keys: Any
) -> None:
    """Write the daemon's config with an [http] table (and its token file, 0600)."""
    http: dict[str, Any] = {"listen": listen, **keys}
    if token is not None:
        path = daemon.root / "token"
        path.write_text(f"{token}\n")
        path.chmod(0o600)
        http["token_file"] = "token"
    daemon.write_config(toml({"daemon": daemon.daemon, "http": http, "queues": daemon.queues}))


def address(daemon: Msgd) -> str:
    """The listener's address as the master published it in the state file."""
    return wait_for(lambda: daemon.state().get("http"), 10, "the http address in the state file")


def client(
    daemon: Msgd, token: str | None = None, origin: str | None = None, **kw: Any
) -> ClientConnection:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return connect(f"ws://{address(daemon)}/ws", additional_headers=headers, origin=origin, **kw)  # type: ignore[arg-type]


def ask(ws: ClientConnection, request: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
    """Send one request and return the reply that carries its ref (feed frames are skipped)."""
    ws.send(json.dumps(request))
    return next_frame(ws, lambda f: "op" in f and f.get("ref") == request.get("ref"), timeout)


def next_frame(ws: ClientConnection, match: Any, timeout: float = 10) -> dict[str, Any]:
    """The first frame, in the order received, for which `match(frame)` holds. Frames passed
    over are kept for later calls: a reply awaited must not swallow an event."""
    return wait_for(lambda: _matching(ws, match), timeout, "a matching frame", interval=0)


def _matching(ws: ClientConnection, match: Any) -> dict[str, Any] | None:
    kept: list[dict[str, Any]] = ws.__dict__.setdefault("kept_frames", [])
    for i, frame in enumerate(kept):
        if match(frame):
            return kept.pop(i)
    try:
        frame = json.loads(ws.recv(timeout=0.1))
    except TimeoutError:
        return None
    if match(frame):
        return frame
    kept.append(frame)
    return None


def subscribe(ws: ClientConnection, topics: list[str], **extra: Any) -> None:
    reply = ask(ws, {"op": "subscribe", "topics": topics, "ref": "sub", **extra})
    assert reply["op"] == "subscribed", reply


def get(daemon: Msgd, path: str) -> tuple[int, str, bytes]:
    """(status, content type, body) of a plain GET to the listener."""
    try:
        with urllib.request.urlopen(f"http://{address(daemon)}{path}", timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_send_and_events(daemon: Msgd, queue: str) -> None:
    """Over /ws, with the token: send "ok" and "fail" (max_attempts 2) to `queue`, and see their
    outcome events come in order: succeeded; retried then failed."""
    with client(daemon, token=TOKEN) as ws:
        subscribe(ws, ["events"], queues=[queue])
        ok = ask(ws, {"op": "send", "queue": queue, "body": "ok", "ref": 1})
        fail = ask(ws, {"op": "send", "queue": queue, "body": "fail", "ref": 2})
        assert ok["op"] == fail["op"] == "sent", (ok, fail)
        got = [next_frame(ws, lambda f: f.get("topic") == "event", 30) for _ in range(3)]
    by_id: dict[str, list[tuple[str, int]]] = {}
    for e in got:
        assert e["queue"] == queue
        by_id.setdefault(e["id"], []).append((e["event"], e["attempt"]))
    assert by_id == {ok["id"]: [("succeeded", 1)], fail["id"]: [("retried", 1), ("failed", 2)]}
