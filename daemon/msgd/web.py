"""The listener process: /metrics, /stats, the dashboard and the /ws feed, on `websockets`.

It runs alone (forked by the master, http.py), at nice 19, the lowest priority short of
SCHED_IDLE: a burst of subscribers or events slows the feed, never the message path. (Not
SCHED_IDLE: it did no better for the drain in bench/subscribers.py, and with the workers
saturated by CPU-bound handlers it made a /metrics scrape take 0.1-0.2 s instead of ms.)
Stats come from the stats file the master rewrites every second; outcome events from the
workers' rings (events.py), polled every POLL seconds (only skipped past while nobody subscribes
to events).
Each subscriber has its own bounded backlog and its own sending task: one that stalls loses its
oldest events (and is told how many), and nobody else waits for it. Sending and actions run on
threads, with the same code msgd.send and msgctl use.

What the feed costs is per frame and per subscriber, so that is where it is kept small
(bench/subscribers.py measures it): a frame is encoded once for every subscriber, the frames of
one look at the rings are joined once for every subscriber (its share of a look is one append and
one write: one system call, one wakeup of its reader), and frames are not compressed
(permessage-deflate cost more CPU than all the rest of the feed, for frames of a few hundred
bytes).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import hmac
import importlib.resources
import json
import multiprocessing
import os
import signal
import socket
import threading
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import msgspec
import structlog
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response

from msgd import stats
from msgd.backend import Store, open_store
from msgd.events import Event, Reader, Rings
from msgd.http import Settings
from msgd.sysutil import read_json, set_parent_death_signal
from msgd.when import SendOptions, send_options

POLL = 0.05  # seconds between looks at the event rings (each look costs every subscriber a write)
STATS_POLL = 0.25  # seconds between looks at the stats file
STATS_EVERY = 1.0  # at most one stats frame a second per subscriber
LOOPBACK_NAMES = {
    "localhost",
    "127.0.0.1",
    "::1",
}  # what a Host header may name without [http] hosts
BACKLOG = 2000  # frames a subscriber may fall behind before its oldest are dropped (> a look's)
BATCH = 200  # frames written at once to one subscriber, unless one chunk alone has more
SEND_BUFFER = 65536  # bytes of kernel send buffer per connection (no autotuning to megabytes)
FLUSH_WAIT = 1.0  # seconds a stopping listener gives subscribers to take their backlog
NICE = 19  # the listener takes the CPU the workers leave (see the module's docstring)
ACTIONS = ("reload", "stats", "burst")
encode_json = msgspec.json.Encoder().encode  # a feed frame's JSON: as json.dumps, ~8x faster


class BadFrame(Exception):
    """A frame the client must be told about; the connection carries on."""


def run(sock: Any, settings: Settings, conn: Any, rings: Rings) -> None:
    """The process body."""
    set_parent_death_signal(signal.SIGKILL)
    master = multiprocessing.parent_process()
    if master is None or os.getppid() != master.pid:
        return  # the master died before we got here
    os.nice(NICE)
    asyncio.run(Listener(settings, rings).serve(sock, conn))


class Chunk(NamedTuple):
    """Feed frames pushed together (one look at the rings' events, or a stats frame) as they go
    on the wire: framed and joined once for every subscriber that takes them all. Measured with
    50 subscribers and 575 events a look: ~1 ms of appends and joins frame by frame, 25 µs as one
    chunk."""

    frames: list[bytes]
    data: bytes  # the frames joined
    events: bool  # event frames (one dropped is an event missed), not a stats frame

    @classmethod
    def of(cls, frames: list[bytes], events: bool) -> Chunk:
        return cls(frames, b"".join(frames), events)


def wire(payload: bytes) -> bytes:
    """A text frame's bytes on the wire, made by websockets as the connection's protocol would
    (a server does not mask; no extension is ever negotiated: compression is off)."""
    return Frame(Opcode.TEXT, payload).serialize(mask=False)


class Batches:
    """Writes a list of ready frames to one connection in one go, where `ws.send` would frame
    each again for every subscriber and make a system call per frame (most of the feed's cost)."""

    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws

    async def send(self, frames: list[bytes]) -> None:
        """Raises ConnectionClosed as ws.send does; waits while the socket is full, as it does.
        (send_context is websockets' own, not documented: the web suites pass with 13.0, the
        oldest version pyproject allows, and with 17.)"""
        async with self.ws.send_context():  # checks the state; afterwards waits for the socket
            self.ws.transport.write(b"".join(frames))


class Subscriber:
    """One WebSocket connection's outgoing feed: a bounded backlog drained by its own task."""

    def __init__(self, out: Batches) -> None:
        self.out = out
        self.topics: set[str] = set()
        self.queues: set[str] | None = None
        self.backlog: collections.deque[Chunk] = collections.deque()
        self.waiting = 0  # frames in the backlog
        self.missed = 0
        self.last_stats = 0.0
        self.wake = asyncio.Event()
        self.task = asyncio.create_task(self.pump())

    def push(self, chunk: Chunk) -> None:
        """Queue frames; past BACKLOG the oldest go, and the events among them are counted as
        missed (a stats frame dropped is not an event missed)."""
        self.backlog.append(chunk)
        self.waiting += len(chunk.frames)
        while self.waiting > BACKLOG:
            self.drop_oldest(self.waiting - BACKLOG)
        self.wake.set()

    def drop_oldest(self, excess: int) -> None:
        """Drop the oldest chunk, or its first `excess` frames if it holds more."""
        oldest = self.backlog.popleft()
        gone = min(excess, len(oldest.frames))
        if gone < len(oldest.frames):
            self.backlog.appendleft(Chunk.of(oldest.frames[gone:], oldest.events))
        self.waiting -= gone
        self.missed += gone if oldest.events else 0

    def lost(self, n: int) -> None:
        """Events the listener itself could not read (a ring overwritten): tell this one."""
        self.missed += n
        self.wake.set()

    async def pump(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await self.wake.wait()
                self.wake.clear()
                while self.backlog or self.missed:
                    await self.out.send(self.take())

    def take(self) -> list[bytes]:
        """The next write: how many were missed (if any) before the frames that follow the gap,
        then whole chunks up to BATCH frames (at least one)."""
        out = []
        if self.missed:
            out.append(wire(encode_json({"topic": "missed", "count": self.missed})))
            self.missed = 0
        taken = 0
        while self.backlog and (not taken or taken + len(self.backlog[0].frames) <= BATCH):
            chunk = self.backlog.popleft()
            taken += len(chunk.frames)
            out.append(chunk.data)
        self.waiting -= taken
        return out


class Listener:
    """The listener process's state: the settings of the last reload, the rings' reader, the
    subscribers, the last stats snapshot, the stores sends go to."""

    def __init__(self, settings: Settings, rings: Rings) -> None:
        self.settings = settings
        self.reader = Reader(rings)
        self.subscribers: set[Subscriber] = set()
        self.snapshot: stats.Snapshot | None = None
        self.snapshot_json = b""  # the stats file as it is: what /stats and stats frames carry
        self.stats_frame: Chunk | None = None  # made once per snapshot for every subscriber
        self.stores: dict[str, Store] = {}  # opened on first send, per settings
        self.store_lock = threading.Lock()  # a store (a broker's channel) is used by one thread
        self.stats_mtime = 0
        self.page = importlib.resources.files("msgd").joinpath("dashboard.html").read_bytes()
        self.log = structlog.get_logger().bind(component="http")

    async def serve(self, sock: Any, conn: Any) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_reader(conn.fileno(), self.on_settings, conn, stop)
        self.read_stats()
        d = self.settings.config.daemon
        limit = max(d.max_message_size * 4 // 3 + 4096, 65536)  # a message, base64-encoded
        async with serve(
            self.session,
            sock=sock,
            process_request=self.route,
            max_size=limit,
            server_header="msgd",
            compression=None,  # see the module's docstring
        ) as server:
            tasks = [
                asyncio.create_task(self.feed_events()),
                asyncio.create_task(self.feed_stats()),
            ]
            await stop.wait()
            for task in tasks:
                task.cancel()
            server.server.close()  # no new connections: a new listener may be taking over
            with contextlib.suppress(OSError):
                conn.send("closed")
            await self.last_words()
            server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 2.0)

    def on_settings(self, conn: Any, stop: asyncio.Event) -> None:
        """The master sent a reloaded config, or went away (EOF)."""
        try:
            self.settings = conn.recv()
            asyncio.get_running_loop().run_in_executor(None, self.close_stores)
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(conn.fileno())
            stop.set()

    # -- plain HTTP ------------------------------------------------------------------------------

    def route(self, connection: ServerConnection, request: Request) -> Response | None:
        if not self.host_allowed(request.headers.get("Host", "")):
            return connection.respond(403, "Host not allowed (see [http] hosts)\n")
        path = urlsplit(request.path).path
        if path == "/ws":
            origin = request.headers.get("Origin")
            if (
                origin
                and urlsplit(origin).netloc.lower() != request.headers.get("Host", "").lower()
            ):
                return connection.respond(403, "Origin not allowed\n")
            return None  # on to the WebSocket handshake
        if path == "/":
            return _typed(connection.respond(200, ""), self.page, "text/html; charset=utf-8")
        if path not in ("/metrics", "/stats"):
            return connection.respond(404, "Not found\n")
        self.read_stats()
        if self.snapshot is None:
            return connection.respond(503, "No stats yet\n")
        if path == "/metrics":
            text = stats.prometheus(self.snapshot).encode()
            return _typed(connection.respond(200, ""), text, "text/plain; version=0.0.4")
        return _typed(connection.respond(200, ""), self.snapshot_json, "application/json")

    def host_allowed(self, host: str) -> bool:
        """A loopback name, or one of `[http] hosts`: a page on another site that rebinds its
        own name to 127.0.0.1 (DNS rebinding) still sends its own name in Host, and is refused."""
        http = self.settings.config.http
        name = urlsplit(f"//{host}").hostname or ""
        listening = urlsplit(f"//{http.listen}").hostname
        return name in LOOPBACK_NAMES or name == listening or name in http.hosts

    # -- the feed --------------------------------------------------------------------------------

    def read_stats(self) -> None:
        """Take the stats file again if it changed since the last look."""
        try:
            mtime = os.stat(self.settings.config.daemon.stats_file).st_mtime_ns
        except OSError:
            return
        if mtime == self.stats_mtime:
            return
        try:
            with open(self.settings.config.daemon.stats_file, "rb") as f:
                raw = f.read()
            snap = msgspec.json.decode(raw, type=stats.Snapshot)
        except (OSError, msgspec.DecodeError):
            return  # half a rename away: the next look takes it
        self.snapshot, self.snapshot_json, self.stats_mtime = snap, raw, mtime
        payload = b'{"topic": "stats", "snapshot": ' + raw + b"}"
        self.stats_frame = Chunk.of([wire(payload)], events=False)

    async def feed_stats(self) -> None:
        while True:
            await asyncio.sleep(STATS_POLL)
            self.read_stats()
            now = asyncio.get_running_loop().time()
            for sub in self.subscribers:
                if "stats" in sub.topics and now - sub.last_stats >= STATS_EVERY:
                    self.send_stats(sub, now)

    def send_stats(self, sub: Subscriber, now: float) -> None:
        if self.stats_frame is not None:
            sub.last_stats = now
            sub.push(self.stats_frame)

    async def feed_events(self) -> None:
        while True:
            await asyncio.sleep(POLL)
            self.fan_out()

    def fan_out(self) -> None:
        """Hand every new event to the subscribers that want it, in one push each. While
        nobody subscribes to events the rings are only skipped to their heads, not read."""
        listening = [sub for sub in self.subscribers if "events" in sub.topics]
        if not listening:
            self.reader.skip()
            return
        missed = self.reader.missed
        frames = self.event_frames()
        lost = self.reader.missed - missed
        every = Chunk.of([frame for _, frame in frames], events=True)
        for sub in listening:
            if lost:
                sub.lost(lost)
            wanted = every
            if sub.queues is not None:
                wanted = Chunk.of([f for q, f in frames if q in sub.queues], events=True)
            if wanted.frames:
                sub.push(wanted)

    def event_frames(self) -> list[tuple[str, bytes]]:
        """(queue name, frame) of every new event, in order, each frame made once."""
        names = {i: n for n, i in self.settings.queue_index.items()}
        frames = []
        for event in self.reader.poll():
            queue = names.get(event.queue, "?")
            frames.append((queue, wire(encode_json(_event_frame(event, queue)))))
        return frames

    async def last_words(self) -> None:
        """Stopping (the daemon drained, or a reload replaced us): the outcomes of the last
        moments still go out, for up to FLUSH_WAIT seconds."""
        self.fan_out()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flushed(), FLUSH_WAIT)

    async def flushed(self) -> None:
        while any(sub.backlog or sub.missed for sub in self.subscribers):
            await asyncio.sleep(POLL)

    # -- one connection --------------------------------------------------------------------------

    async def session(self, ws: ServerConnection) -> None:
        sock = ws.transport.get_extra_info("socket")
        if sock is not None:  # a fixed kernel buffer: what a stalled client holds stays bounded
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        sub = Subscriber(Batches(ws))
        self.subscribers.add(sub)
        authorized = self.authorized(ws.request)
        try:
            async for frame in ws:
                reply = await self.answer(frame, sub, authorized)
                await ws.send(json.dumps(reply))
        except ConnectionClosed:
            pass
        finally:
            self.subscribers.discard(sub)
            sub.task.cancel()

    def authorized(self, request: Request | None) -> str:
        """Why this connection may not send or act, or "" if it may."""
        token = self.settings.token
        if not token:
            return "no http.token_file is configured: sending and actions are disabled"
        given = request.headers.get("Authorization", "") if request else ""
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return "needs Authorization: Bearer <token> on the WebSocket upgrade request"
        return ""

    async def answer(self, frame: str | bytes, sub: Subscriber, refused: str) -> dict[str, Any]:
        """The reply to one client frame; errors become error frames, never exceptions."""
        ref = None
        try:
            request = _parse(frame)
            ref = request.get("ref")
            op = request.get("op")
            if op == "subscribe":
                return self.subscribe(sub, request)
            if op not in ("send", "action"):
                raise BadFrame(f"unknown op {op!r} (subscribe, send, action)")
            if refused:
                raise BadFrame(f"{op} refused: {refused}")
            if op == "send":
                mid = await asyncio.to_thread(self.send, request)
                return {"op": "sent", "ref": ref, "id": mid}
            return {"op": "done", "ref": ref, **await asyncio.to_thread(self.act, request)}
        except BadFrame as e:
            return {"op": "error", "ref": ref, "error": str(e)}
        except Exception as e:  # a spool that cannot be written, a daemon that does not answer
            self.log.warning("ws request failed", error=f"{type(e).__name__}: {e}")
            return {"op": "error", "ref": ref, "error": str(e) or type(e).__name__}

    def subscribe(self, sub: Subscriber, request: dict[str, Any]) -> dict[str, Any]:
        topics, queues = request.get("topics", []), request.get("queues")
        if not isinstance(topics, list) or not set(topics) <= {"stats", "events"}:
            raise BadFrame('topics: a list of "stats" and "events"')
        if queues is not None and not (
            isinstance(queues, list) and all(isinstance(q, str) for q in queues)
        ):
            raise BadFrame("queues: a list of queue names")
        sub.topics, sub.queues = set(topics), None if queues is None else set(queues)
        if "stats" in sub.topics:
            self.send_stats(sub, asyncio.get_running_loop().time())
        return {"op": "subscribed", "ref": request.get("ref"), "topics": sorted(sub.topics)}

    def send(self, request: dict[str, Any]) -> str:
        """On a thread: enqueue one message through its queue's store, as msgd.send does
        (durable on return), with the config the daemon runs."""
        config = self.settings.config
        queue = request.get("queue", "default")
        if not isinstance(queue, str) or queue not in config.queues:
            raise BadFrame(f"queue: no queue {queue!r}")
        body = _body(request)
        options = _send_options(request)
        limit = config.daemon.max_message_size
        if limit and len(body) > limit:
            raise BadFrame(f"body: {len(body)} bytes, more than daemon.max_message_size ({limit})")
        with self.store_lock:
            if queue not in self.stores:
                self.stores[queue] = open_store(queue, config.queues[queue], config.daemon)
            return self.stores[queue].send_many([body], options)[0]

    def close_stores(self) -> None:
        """On a thread, after a reload: the next send opens its store with the new config."""
        with self.store_lock:
            for store in self.stores.values():
                store.close()
            self.stores.clear()

    def act(self, request: dict[str, Any]) -> dict[str, Any]:
        """On a thread: signal the master and wait for its acknowledgement, as msgctl does."""
        from msgctl.daemon import Daemon

        from msgd.pidfile import state_path
        from msgd.signals import SIGNAL_OF, Action

        action = request.get("action")
        if action not in ACTIONS:
            raise BadFrame(f"action: {action!r} is not one of reload, stats, burst")
        pidfile = self.settings.config.daemon.pidfile
        daemon = Daemon(pidfile, state_path(pidfile))
        result = daemon.ask(SIGNAL_OF[Action(action)], action, timeout=30.0)
        if action == "reload" and result.get("outcome") == "rejected":
            raise BadFrame(f"reload rejected: {result.get('error')}")
        if action == "burst" and request.get("wait"):
            result = daemon.await_generation("burst_done", result["generation"], 3600.0)
        if action == "stats":
            result["snapshot"] = read_json(self.settings.config.daemon.stats_file)
        return {"action": action, **result}


def _parse(frame: str | bytes) -> dict[str, Any]:
    if isinstance(frame, bytes):
        raise BadFrame("expected a JSON text frame, got a binary one")
    try:
        request = json.loads(frame)
    except ValueError as e:
        raise BadFrame(f"malformed JSON: {e}") from None
    if not isinstance(request, dict):
        raise BadFrame("expected a JSON object")
    return request


def _send_options(request: dict[str, Any]) -> SendOptions:
    """A send frame's "delay", "at" (ISO 8601 or epoch seconds), "ttl" and "priority", as
    msgd.send takes them."""
    try:
        return send_options(
            delay=request.get("delay"),
            at=request.get("at"),
            ttl=request.get("ttl"),
            priority=request.get("priority", 0),
        )
    except ValueError as e:
        raise BadFrame(str(e)) from None


def _body(request: dict[str, Any]) -> bytes:
    text, b64 = request.get("body"), request.get("body_b64")
    if (text is None) == (b64 is None):
        raise BadFrame("send: give exactly one of body (text) or body_b64")
    if text is not None:
        if not isinstance(text, str):
            raise BadFrame("body: expected a string")
        return text.encode()
    if not isinstance(b64, str):
        raise BadFrame("body_b64: expected a base64 string")
    try:
        return base64.b64decode(b64, validate=True)
    except binascii.Error:
        raise BadFrame("body_b64: not valid base64") from None


def _event_frame(event: Event, queue: str) -> dict[str, Any]:
    frame = {
        "topic": "event",
        "event": event.outcome,
        "queue": queue,
        "id": event.id,
        "attempt": event.attempt,
        "ms": event.ms,
        "worker": event.slot,
    }
    if event.error:
        frame["error"] = event.error
    return frame


def _typed(response: Response, body: bytes, content_type: str) -> Response:
    del response.headers["Content-Type"]
    del response.headers["Content-Length"]
    response.headers["Content-Type"] = content_type
    response.headers["Content-Length"] = str(len(body))
    response.headers["Cache-Control"] = "no-store"
    response.body = body
    return response
