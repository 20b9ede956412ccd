"""The [http] listener: routes, the WebSocket frames and refusals, the event feed, reloads."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("websockets")
from conftest import BIN, Msgd, alive, wait_for
from httpkit import (
    TOKEN,
    address,
    ask,
    client,
    configure,
    free_port,
    get,
    next_frame,
    subscribe,
)
from websockets.exceptions import ConnectionClosed, InvalidStatus


def events_until(ws: Any, n: int, timeout: float = 30) -> list[dict[str, Any]]:
    """The next `n` outcome events (other frames are dropped)."""
    return [next_frame(ws, lambda f: f.get("topic") == "event", timeout) for _ in range(n)]


def listener_pid(daemon: Msgd) -> int:
    """The pid of the master's one listener child, or 0."""
    out = subprocess.run(["pgrep", "-P", str(daemon.pid), "-f", "msgd: http"], capture_output=True)
    pids = out.stdout.split()
    return int(pids[0]) if len(pids) == 1 else 0


def new_listener(daemon: Msgd, old: int = 0) -> int:
    """Wait for the one listener process (not `old`) to run, under its title; its pid."""
    return wait_for(lambda: listener_pid(daemon) not in (0, old) and listener_pid(daemon), 10,
                    "one new listener process")  # fmt: skip


@pytest.fixture
def web(daemon: Msgd) -> Msgd:
    daemon.queues = {"default": {"handler": "handlers:by_body", "max_attempts": 2,
                                 "backoff": [0.05]}}  # fmt: skip
    configure(daemon)
    daemon.start()
    return daemon


# -- plain HTTP -----------------------------------------------------------------------------------


def test_stats_metrics_dashboard_and_404(web: Msgd) -> None:
    web.send(b"ok")
    wait_for(lambda: web.stats().get("processed") == 1, 10, "one message counted")
    status, kind, body = get(web, "/stats")
    assert status == 200 and kind == "application/json"
    wait_for(lambda: json.loads(get(web, "/stats")[2])["processed"] == 1, 5, "fresh /stats")
    status, kind, body = get(web, "/metrics")
    assert status == 200 and kind == "text/plain; version=0.0.4"
    assert 'msgd_messages_total{queue="default",outcome="succeeded"}' in body.decode()
    status, kind, body = get(web, "/")
    assert status == 200 and kind.startswith("text/html")
    page = body.decode()
    assert 'new URL("ws", location.href)' in page  # the feed, relative to the page
    assert "src=" not in page and "href=" not in page and "@import" not in page  # all inline
    assert get(web, "/nope")[0] == 404


def test_origin_from_another_site_is_refused(web: Msgd) -> None:
    with pytest.raises(InvalidStatus) as refused:
        client(web, origin="http://evil.example")
    assert refused.value.response.status_code == 403
    with client(web, origin=f"http://{address(web)}") as ws:  # the dashboard's own origin
        subscribe(ws, ["stats"])


# -- the feed -------------------------------------------------------------------------------------


def test_subscribe_gives_a_snapshot_then_events_in_order(web: Msgd) -> None:
    with client(web) as ws:
        subscribe(ws, ["stats", "events"])
        snap = next_frame(ws, lambda f: f.get("topic") == "stats")["snapshot"]
        assert snap["pid"] == web.pid and "default" in snap["queues"]
        ok, fail, reject = (web.send(b) for b in (b"ok", b"fail", b"reject"))
        got = events_until(ws, 4)
    by_id: dict[str, list[tuple[str, int]]] = {}
    for e in got:
        assert e["queue"] == "default" and e["ms"] >= 0
        by_id.setdefault(e["id"], []).append((e["event"], e["attempt"]))
    assert by_id == {
        ok: [("succeeded", 1)],
        fail: [("retried", 1), ("failed", 2)],
        reject: [("failed", 1)],
    }
    errors = {e["id"]: e.get("error") for e in got if e["event"] == "failed"}
    assert errors == {fail: "RuntimeError: failing attempt 2", reject: "Reject: not acceptable"}


def test_a_worker_killed_mid_message_makes_an_event(web: Msgd) -> None:
    with client(web) as ws:
        subscribe(ws, ["events"])
        mid = web.send(b"sleep:60")
        wait_for(lambda: (web.out / "started").exists(), 10, "the handler to start")
        busy = wait_for(lambda: _busy_worker(web), 10, "a busy worker")
        os.kill(busy, signal.SIGKILL)
        event = events_until(ws, 1)[0]
    assert (event["id"], event["event"], event["attempt"]) == (mid, "retried", 1)
    assert event["error"] == "worker killed by signal SIGKILL"


def test_a_timed_out_handler_makes_an_event(daemon: Msgd) -> None:
    daemon.queues = {"default": {"handler": "handlers:by_body", "timeout": 0.3}}
    configure(daemon)
    daemon.start()
    with client(daemon) as ws:
        subscribe(ws, ["events"])
        mid = daemon.send(b"hang")
        event = events_until(ws, 1)[0]
    assert (event["id"], event["event"], event["attempt"]) == (mid, "retried", 1)
    assert event["error"] == "worker killed after its handler ran past 0.3s"


def _busy_worker(daemon: Msgd) -> int | None:
    for pid in daemon.workers():
        try:
            if "busy" in Path(f"/proc/{pid}/cmdline").read_text():
                return pid
        except OSError:
            pass
    return None


def test_events_filtered_by_queue(daemon: Msgd) -> None:
    daemon.queues = {"a": {"handler": "handlers:record"}, "b": {"handler": "handlers:record"}}
    configure(daemon)
    daemon.start()
    with client(daemon) as ws:
        subscribe(ws, ["events"], queues=["b"])
        daemon.send_many([b"x"] * 5, queue="a")
        wanted = daemon.send_many([b"y"] * 3, queue="b")
        got = events_until(ws, 3)
        daemon.wait_processed(8)
        with pytest.raises(AssertionError):  # nothing of queue a comes after
            next_frame(ws, lambda f: f.get("topic") == "event", timeout=0.5)
    assert sorted(e["id"] for e in got) == sorted(wanted) and {e["queue"] for e in got} == {"b"}


STALLED_CLIENT = """
import json, socket, sys
from websockets.sync.client import connect
url, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before the handshake: a small window
sock.connect(("127.0.0.1", port))
with connect(url, sock=sock) as ws:
    ws.send(json.dumps({"op": "subscribe", "topics": ["events"]}))
    ws.recv(timeout=10)
    print("subscribed", flush=True)
    seen = missed = 0
    while seen + missed < n:
        frame = json.loads(ws.recv(timeout=30))
        seen += frame.get("topic") == "event"
        missed += frame.get("count", 0) if frame.get("topic") == "missed" else 0
    print(json.dumps([seen, missed]), flush=True)
"""


def test_a_stalled_subscriber_is_told_what_it_missed(web: Msgd) -> None:
    """One client is stopped (SIGSTOP) while events flow; another keeps up. Once it runs again
    the stalled one learns how many events it missed (at least what the other missed: what the
    listener itself fell behind by), and what it got plus what it missed is everything; the
    workers were not held up by it. (How much of the gap the kernel and the libraries buffer
    varies; test_web_backlog.py pins the listener's own bound.)"""
    n = 10000
    addr = address(web)
    stalled = subprocess.Popen(
        [sys.executable, "-c", STALLED_CLIENT, f"ws://{addr}/ws", addr.rsplit(":", 1)[1], str(n)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert stalled.stdout is not None and stalled.stdout.readline().strip() == "subscribed"
        os.kill(stalled.pid, signal.SIGSTOP)
        with client(web) as live:
            subscribe(live, ["events"])
            web.send_many([b"ok"] * n)
            wait_for(lambda: web.stats().get("processed", 0) >= n, 60, "all messages worked")
            seen, missed = _drain_feed(live, n)  # missed: what the listener could not read
        assert seen + missed == n
        os.kill(stalled.pid, signal.SIGCONT)
        stalled_seen, stalled_missed = json.loads(stalled.stdout.readline())
        assert stalled_seen + stalled_missed == n and stalled_missed >= missed
    finally:
        stalled.kill()
        stalled.wait()


def _drain_feed(ws: Any, n: int) -> tuple[int, int]:
    seen = missed = 0
    while seen + missed < n:
        frame = json.loads(ws.recv(timeout=20))
        if frame.get("topic") == "event":
            seen += 1
        elif frame.get("topic") == "missed":
            missed += frame["count"]
    return seen, missed


# -- sending --------------------------------------------------------------------------------------


def test_send_text_and_bytes_with_the_token(daemon: Msgd) -> None:
    daemon.queues = {"default": {"handler": "handlers:record_body"}}
    configure(daemon)
    daemon.start()
    raw = bytes(range(256)) * 3
    with client(daemon, token=TOKEN) as ws:
        text = ask(ws, {"op": "send", "queue": "default", "body": "héllo", "ref": 7})
        blob = ask(ws, {"op": "send", "body_b64": base64.b64encode(raw).decode(), "ref": 8})
    assert text["op"] == blob["op"] == "sent" and (text["ref"], blob["ref"]) == (7, 8)
    daemon.wait_processed(2)
    bodies = dict(line.split(" ", 1) for line in (daemon.out / "bodies").read_text().splitlines())
    assert bodies[text["id"]] == f"{len('héllo'.encode())} {_sha('héllo'.encode())}"
    assert bodies[blob["id"]] == f"{len(raw)} {_sha(raw)}"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("token", [None, "wrong"])
def test_send_and_actions_without_the_token_are_refused(web: Msgd, token: str | None) -> None:
    with client(web, token=token) as ws:
        sent = ask(ws, {"op": "send", "body": "x", "ref": 1})
        acted = ask(ws, {"op": "action", "action": "stats", "ref": 2})
        subscribe(ws, ["stats"])  # reading is allowed
    assert sent["op"] == acted["op"] == "error"
    assert "Authorization: Bearer" in sent["error"] and "refused" in acted["error"]
    assert web.files("default", "new") == [] and web.stats()["processed"] == 0
    assert web.generation("stats") == 0


def test_no_token_file_means_no_sending_at_all(daemon: Msgd) -> None:
    configure(daemon, token=None)
    daemon.start()
    with client(daemon, token=TOKEN) as ws:
        reply = ask(ws, {"op": "send", "body": "x", "ref": 1})
    assert reply["op"] == "error" and "no http.token_file" in reply["error"]
    assert daemon.files("default", "new") == []


def test_a_client_that_disconnects_mid_send(daemon: Msgd) -> None:
    """Each client sends and drops its connection at once: each message is durably sent or not
    at all (never half), and the daemon and its listener carry on."""
    daemon.queues = {"default": {"handler": "handlers:record_body"}}
    configure(daemon)
    daemon.start()
    bodies = [f"dropped-{i}".encode() for i in range(20)]
    for body in bodies:
        with client(daemon, token=TOKEN) as ws:
            ws.send(json.dumps({"op": "send", "body": body.decode(), "ref": 1}))
            ws.socket.shutdown(socket.SHUT_RDWR)  # gone, without a closing handshake
    with client(daemon, token=TOKEN) as ws:
        last = ask(ws, {"op": "send", "body": "after", "ref": 2})
    assert last["op"] == "sent"
    tmp = daemon.root / "spool/default/tmp"  # a send still under way has its file here
    wait_for(lambda: not os.listdir(tmp), 20, "no message half-written in tmp/")
    wait_for(lambda: last["id"] in (daemon.out / "bodies").read_text(), 20, "the last message")
    wait_for(lambda: daemon.stats().get("pending") == 0, 10, "nothing pending")
    done = [line.split()[2] for line in (daemon.out / "bodies").read_text().splitlines()]
    assert len(done) == len(set(done)) and set(done) <= {_sha(b) for b in [*bodies, b"after"]}
    assert not [e for e in daemon.events() if e.get("level") == "error"]


# -- actions --------------------------------------------------------------------------------------


def test_actions_reload_stats_burst_with_the_token(web: Msgd) -> None:
    with client(web, token=TOKEN) as ws:
        stats = ask(ws, {"op": "action", "action": "stats", "ref": 1})
        burst = ask(ws, {"op": "action", "action": "burst", "ref": 2, "wait": True})
        reload = ask(ws, {"op": "action", "action": "reload", "ref": 3})
        unknown = ask(ws, {"op": "action", "action": "stop", "ref": 4})
    assert stats["op"] == "done" and stats["generation"] == 1 == web.generation("stats")
    assert stats["snapshot"]["generation"] == 1
    assert burst["op"] == "done" and burst["succeeded"] == 0 and web.generation("burst_done") == 1
    assert reload["op"] == "done" and reload["outcome"] == "ok" and reload["config_generation"] == 1
    assert unknown["op"] == "error" and "not one of" in unknown["error"]


def test_a_rejected_reload_is_an_error_frame(web: Msgd) -> None:
    web.config_path.write_text(web.config_path.read_text() + "\n[bogus]\n")
    with client(web, token=TOKEN) as ws:
        reply = ask(ws, {"op": "action", "action": "reload", "ref": 1})
    assert reply["op"] == "error" and "reload rejected: bogus: unknown table" in reply["error"]


# -- bad frames -----------------------------------------------------------------------------------


def test_malformed_frames_get_an_error_and_the_connection_carries_on(web: Msgd) -> None:
    bad = [
        ("{not json", "malformed JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"op": "dance"}', "unknown op"),
        ('{"op": "subscribe", "topics": ["gossip"]}', "topics"),
        ('{"op": "subscribe", "topics": ["events"], "queues": "a"}', "queues"),
        ('{"op": "send", "ref": 1}', "exactly one of body"),
        ('{"op": "send", "body_b64": "!!!", "ref": 1}', "not valid base64"),
        ('{"op": "send", "body": "x", "queue": "nope", "ref": 1}', "no queue 'nope'"),
    ]
    with client(web, token=TOKEN) as ws:
        for frame, error in bad:
            ws.send(frame)
            reply = next_frame(ws, lambda f: "op" in f)
            assert reply["op"] == "error" and error in reply["error"], (frame, reply)
        ws.send(b"\x00binary")
        assert "binary" in next_frame(ws, lambda f: "op" in f)["error"]
        subscribe(ws, ["stats"])
    assert web.files("default", "new") == []


def test_an_oversized_frame_is_refused(daemon: Msgd) -> None:
    daemon.daemon["max_message_size"] = 1000
    configure(daemon)
    daemon.start()
    with client(daemon, token=TOKEN) as ws:
        reply = ask(ws, {"op": "send", "body": "x" * 1001, "ref": 1})
        assert reply["op"] == "error" and "more than daemon.max_message_size" in reply["error"]
        ws.send(json.dumps({"op": "send", "body": "x" * 200_000, "ref": 2}))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009  # message too big
    assert daemon.files("default", "new") == [] and daemon.stats()["processed"] == 0
    with client(daemon, token=TOKEN) as ws:  # the listener carries on
        assert ask(ws, {"op": "send", "body": "x" * 1000, "ref": 3})["op"] == "sent"


# -- config, reload, life cycle -------------------------------------------------------------------


def test_config_rules(daemon: Msgd) -> None:
    configure(daemon, token=None, listen="0.0.0.0:8470")
    check = subprocess.run([str(BIN / "msgd"), "-c", str(daemon.config_path), "--check"],
                           capture_output=True, text=True)  # fmt: skip
    assert check.returncode == 1
    assert "http.listen: 0.0.0.0 is not a loopback address: set http.token_file" in check.stderr
    configure(daemon, listen="localhost")
    assert "http.listen: expected 'host:port'" in daemon.msgctl("check").stderr
    configure(daemon)
    (daemon.root / "token").chmod(0o644)
    daemon.start(wait=False)
    assert daemon.wait_exit() == 1
    assert "http.token_file:" in daemon.stderr() and "readable by others" in daemon.stderr()


def test_reload_follows_listen_and_token(web: Msgd) -> None:
    first, old_pid = address(web), new_listener(web)
    configure(web, token="new-token", listen="127.0.0.1:0")  # same listen: the same socket
    assert web.msgctl("reload").returncode == 0
    assert address(web) == first and new_listener(web, old_pid)
    with client(web, token=TOKEN) as ws:
        assert ask(ws, {"op": "send", "body": "ok", "ref": 1})["op"] == "error"
    with client(web, token="new-token") as ws:
        assert ask(ws, {"op": "send", "body": "ok", "ref": 1})["op"] == "sent"
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        configure(web, token="new-token", listen=f"127.0.0.1:{port}")
        rejected = web.msgctl("reload")
        assert rejected.returncode == 1 and f"http.listen: cannot bind 127.0.0.1:{port}" in (
            rejected.stderr
        )
    assert address(web) == first and get(web, "/stats")[0] == 200  # the old one serves on
    new_port = free_port()
    configure(web, token="new-token", listen=f"127.0.0.1:{new_port}")
    assert web.msgctl("reload").returncode == 0
    assert address(web) == f"127.0.0.1:{new_port}" and get(web, "/stats")[0] == 200
    configure(web, token="new-token", listen="")
    assert web.msgctl("reload").returncode == 0
    assert web.state()["http"] == "" and wait_for(lambda: not listener_pid(web), 10, "no listener")


def test_the_listener_dies_with_the_master_and_is_restarted_if_it_dies_alone(web: Msgd) -> None:
    pid = new_listener(web)
    os.kill(pid, signal.SIGKILL)
    pid = new_listener(web, pid)
    assert get(web, "/stats")[0] == 200
    web.kill(signal.SIGKILL)
    web.wait_exit()
    wait_for(lambda: not alive(pid), 10, "the listener to die with the master")


def test_stop_takes_the_listener_down_after_the_drain(web: Msgd) -> None:
    pid = new_listener(web)
    with client(web) as ws:
        subscribe(ws, ["events"])
        web.send(b"sleep:0.5")
        wait_for(lambda: (web.out / "started").exists(), 10, "the handler to start")
        web.kill(signal.SIGTERM)
        assert events_until(ws, 1)[0]["event"] == "succeeded"  # the drain is still watched
    assert web.wait_exit() == 0
    wait_for(lambda: not alive(pid), 10, "the listener to exit")


def test_a_host_that_is_not_loopback_is_refused(web: Msgd) -> None:
    """DNS rebinding: a page of evil.example whose name now points at 127.0.0.1 reaches the
    listener with `Host: evil.example`; only loopback names, the listen address and [http] hosts
    are served."""
    port = address(web).rpartition(":")[2]
    for host, status in (("evil.example", 403), (f"localhost:{port}", 200), ("[::1]", 200)):
        request = urllib.request.Request(f"http://{address(web)}/stats", headers={"Host": host})
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                assert (host, r.status) == (host, status)
        except urllib.error.HTTPError as e:
            assert (host, e.code) == (host, status)
    upgrade = {
        "Host": "evil.example",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(
            urllib.request.Request(f"http://{address(web)}/ws", headers=upgrade), timeout=10
        )
    assert refused.value.code == 403
    configure(web, hosts=["evil.example"])  # a proxy's public name, say
    assert web.msgctl("reload").returncode == 0
    named = urllib.request.Request(f"http://{address(web)}/stats", headers={"Host": "evil.example"})
    with urllib.request.urlopen(named, timeout=10) as r:
        assert r.status == 200
