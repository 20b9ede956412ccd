"""Queues kept in Redis Streams, so that several msgd daemons (on several hosts) share them.

    <stream>          entries {id, body[, attempts][, expires]}: waiting, or pending in the group
    <stream>:defer    sorted set of retries, scored by their not-before time (ms)
    <stream>:scheduled  sorted set of delayed sends, scored by their time (ms): like :defer, but
                      a burst leaves it alone; the master moves what is due into the stream
    <stream>:failed   dead letters: the entry's fields and the reason (error, traceback...)

Only workers and producers of a Redis queue import this module (and redis-py with it): a daemon
that only has spool queues stays small.

Each worker slot is one consumer of the group, `<host>:<master pid>:<slot>` (or `<consumer>:<slot>`
when configured). A worker replacing a dead one in the same slot reads that consumer's pending
entries first, so a daemon recovers its own crashed worker's messages at once; a consumer whose
whole daemon (or host) died is recovered by the other daemons with XAUTOCLAIM after `claim_idle`.
Both are redeliveries that Redis counts: a message's attempt number is the attempts done before
it was (re)added plus its delivery count, so a message that kills every worker it meets ends in
the dead letters after `max_attempts` deliveries, as on the spool. Reclaimed entries are taken
one at a time, so such a message takes no innocent neighbours with it.

An entry is acknowledged (XACK, and deleted, so the stream length is the backlog) only after its
handler returned; a failure moves it to `:defer` or `:failed` in one Lua script that acknowledges
it in the same step, so nothing is acknowledged before its next home holds it. Due retries move
back to the stream in another script, run by any worker that is reading the queue. The stream
belongs to msgd's group alone (entries are deleted once acknowledged).

Time: an entry's `expires` (ms, from a TTL) is checked by the worker that reads it, and once a
second by the master over the first SWEEP_LIMIT entries not yet delivered, so a queue nobody
works still expires them; either makes a dead letter whose error_type is "Expired". A stream
keeps arrival order: priorities are refused, not ignored.

`claim_idle` must be longer than the queue's `timeout` (config.py refuses it otherwise): an entry
whose handler still ran after `claim_idle` seconds could be claimed by another daemon and run twice.
"""

from __future__ import annotations

import collections
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import msgspec
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.typing import EncodableT, FieldT

from msgd.backend import BackendError, BurstMark, Death, Depths, Expired, Inbox, Outcome, Settled
from msgd.config import DaemonConfig, QueueConfig
from msgd.handlers import Message
from msgd.spool import id_time, new_id
from msgd.when import NOW, SendOptions

T = TypeVar("T")
BLOCK = 0.5  # seconds a blocking read waits, so that a stop is noticed promptly
MAX_BATCH = 100  # entries per XREADGROUP at most
BATCH_SECONDS = 0.5  # a fetched batch should be worked within this (and within claim_idle / 4)
RELEASE_EVERY = 0.1  # seconds between moves of due retries back to the stream
RELEASE_LIMIT = 100  # due retries moved per script run
SWEEP_EVERY = 1.0  # seconds between looks for expired entries (the master's)
SWEEP_LIMIT = 1000  # entries not yet delivered looked at per look, oldest first
CLEAN_EVERY = 60.0  # seconds between removals of consumers with nothing pending
BACKOFF = (0.1, 5.0)  # first and longest wait between attempts to reach Redis

# KEYS: stream, defer. ARGV: group, entry id, not before (ms), defer member.
_RETRY = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
  redis.call('XDEL', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
# KEYS: stream, failed. ARGV: group, entry id, the dead letter's fields and values.
_DEAD = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
  redis.call('XDEL', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
# KEYS: stream, defer (or scheduled). ARGV: up to this score (ms, or +inf), how many. Members
# are "<attempts>[x<expires, ms>]:<length of id>:<id><body>" (see _defer_member).
_RELEASE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, m in ipairs(due) do
  local a = string.find(m, ':', 1, true)
  local b = string.find(m, ':', a + 1, true)
  local n = tonumber(string.sub(m, a + 1, b - 1))
  local head = string.sub(m, 1, a - 1)
  local fields = {'id', string.sub(m, b + 1, b + n), 'attempts', string.match(head, '^%d+'),
                  'body', string.sub(m, b + n + 1)}
  local expires = string.match(head, 'x(%d+)')
  if expires then
    table.insert(fields, 'expires')
    table.insert(fields, expires)
  end
  redis.call('XADD', KEYS[1], '*', unpack(fields))
  redis.call('ZREM', KEYS[2], m)
end
return #due
"""
# KEYS: stream, failed. ARGV: group, now (ms), how many entries to look at, the time (s), the
# queue. The entries not yet delivered to the group whose `expires` has passed: dead letters.
_EXPIRE = """
local last = '0-0'
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
if not ok then return 0 end
for _, g in ipairs(groups) do
  local name, delivered = nil, nil
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1] end
    if g[i] == 'last-delivered-id' then delivered = g[i + 1] end
  end
  if name == ARGV[1] then last = delivered end
end
local expired = 0
for _, entry in ipairs(redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', ARGV[3])) do
  local fields, record = entry[2], {}
  local at = nil
  for i = 1, #fields, 2 do
    if fields[i] == 'expires' then at = tonumber(fields[i + 1]) end
    if fields[i] == 'id' or fields[i] == 'body' then
      table.insert(record, fields[i])
      table.insert(record, fields[i + 1])
    end
  end
  if at and at <= tonumber(ARGV[2]) then
    redis.call('XADD', KEYS[2], '*', 'queue', ARGV[5], 'attempts', '0', 'failed_at', ARGV[4],
               'error_type', 'Expired', 'error', 'not started within its TTL (expired at ' ..
               at .. ' ms)', unpack(record))
    redis.call('XDEL', KEYS[1], entry[1])
    expired = expired + 1
  end
end
return expired
"""
# KEYS: failed, stream. ARGV: dead letters' entry ids. Each goes back to the stream with its id
# and body only (no attempts: a fresh start) and leaves :failed in the same step.
_REVIVE = """
local moved = {}
for _, entry in ipairs(ARGV) do
  local found = redis.call('XRANGE', KEYS[1], entry, entry)
  if #found == 1 then
    local fields, id, body = found[1][2], nil, nil
    for i = 1, #fields, 2 do
      if fields[i] == 'id' then id = fields[i + 1] end
      if fields[i] == 'body' then body = fields[i + 1] end
    end
    if id and body then
      redis.call('XADD', KEYS[2], '*', 'id', id, 'body', body)
      redis.call('XDEL', KEYS[1], entry)
      table.insert(moved, id)
    end
  end
end
return moved
"""
# KEYS: stream. ARGV: group, consumer. Removes the consumer only if nothing is pending for it
# (a consumer removed with pending entries would orphan them).
_FORGET = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
  return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
return -1
"""


class RedisQueueError(BackendError):
    """A Redis queue that cannot be used right now, or an entry that cannot be worked."""


DEFAULT_URL = "redis://127.0.0.1:6379/0"


def url_of(policy: QueueConfig) -> str:
    return policy.url or DEFAULT_URL


def stream_name(queue: str, policy: QueueConfig) -> str:
    return policy.stream or f"msgd:{queue}"


def consumer_name(policy: QueueConfig, slot: int, master_pid: int) -> str:
    return f"{policy.consumer or f'{socket.gethostname()}:{master_pid}'}:{slot}"


def connect(url: str, timeout: float) -> redis.Redis:
    """A client that fails fast: msgd does its own retrying, with logging and backoff."""
    return redis.Redis.from_url(
        url, socket_connect_timeout=timeout, socket_timeout=timeout, retry=Retry(NoBackoff(), 0)
    )


def safe_url(url: str) -> str:
    """The URL without a password, for logs."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}"


def _defer_member(mid: bytes, attempts: int, body: bytes, expires_ms: int = 0) -> bytes:
    expires = b"x%d" % expires_ms if expires_ms else b""
    return b"%d%s:%d:%s%s" % (attempts, expires, len(mid), mid, body)


Entry = tuple[str, dict[bytes, bytes]]  # a stream entry: its id and its fields


def _text(value: object) -> str:
    """A reply's bytes as text. redis-py declares its replies as unions of what RESP2 and RESP3
    could return; what this module reads is converted here and in _entries, once."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _entries(reply: Any) -> list[Entry]:
    """XRANGE's entries, or those of XREADGROUP's one stream ([[stream, entries]])."""
    if (
        reply
        and isinstance(reply[0], list | tuple)
        and len(reply[0]) == 2
        and (isinstance(reply[0][1], list))
    ):
        reply = reply[0][1]
    return [(_text(eid), fields or {}) for eid, fields in reply or []]


def _enqueued_at(mid: str, entry_id: str) -> float:
    """msgd's ids carry the enqueue time; a foreign producer's entry has its stream time."""
    when = id_time(mid)
    return int(entry_id.partition("-")[0]) / 1e3 if when is None else when


# -- the store ----------------------------------------------------------------------------------


class RedisStore:
    """One Redis queue: producing (one pipelined round trip per batch), inspecting, bursts.

    Guarantees: `send_many` returns once Redis has the entries (as durable as the server's
    `appendfsync` makes them); order is the stream's, oldest first, with retries re-added at the
    end; a priority is refused. Due retries are moved back by the workers (RedisInbox); delayed
    sends and expiry are the master's (release_due).
    """

    local = False

    def __init__(self, queue: str, policy: QueueConfig, daemon: DaemonConfig) -> None:
        self.queue, self.policy = queue, policy
        self.stream = stream_name(queue, policy)
        self.url = url_of(policy)
        self._client: redis.Redis | None = None
        self._next_sweep = 0.0  # time.monotonic() of the next look for expired entries

    def _redis(self) -> redis.Redis:
        if self._client is None:
            self._client = connect(self.url, 5.0)
        return self._client

    def _call(self, operation: Callable[[redis.Redis], T]) -> T:
        """One operation; a Redis that cannot be reached is a BackendError naming the queue."""
        try:
            return operation(self._redis())
        except redis.RedisError as e:
            raise RedisQueueError(f"{self.queue}: {safe_url(self.url)}: {e}") from None

    def send_many(self, bodies: Sequence[bytes], options: SendOptions = NOW) -> list[str]:
        """To the stream; a delayed batch to the `:scheduled` sorted set until its time. A
        priority is refused: a stream keeps arrival order."""
        if options.priority:
            raise RedisQueueError(
                f"{self.queue}: a Redis stream keeps arrival order: priority is not supported"
            )
        ids = [new_id() for _ in bodies]
        expires = int(options.expires * 1000)

        def add(client: redis.Redis) -> None:
            pipe = client.pipeline(transaction=False)
            for mid, body in zip(ids, bodies, strict=True):
                if options.due:
                    member = _defer_member(mid.encode(), 0, body, expires)
                    pipe.zadd(f"{self.stream}:scheduled", {member: int(options.due * 1000)})
                else:
                    fields: dict[FieldT, EncodableT] = {"id": mid, "body": body}
                    if expires:
                        fields["expires"] = expires
                    pipe.xadd(self.stream, fields)
            pipe.execute()

        if ids:
            self._call(add)
        return ids

    def check(self) -> None:
        """Nothing to prepare: a Redis that is down at start or reload is waited for."""

    def depths(self) -> Depths:
        """The spool's depth keys (new = not yet delivered, cur = pending) and the stream's own."""
        return self._call(lambda client: depths(client, self.stream, self.policy.group))

    def release_due(self, force: bool) -> int:
        """Delayed sends whose time has come into the stream, at once (the workers may be
        blocked reading, and move retries only between reads); once a second, the entries not
        yet delivered whose TTL passed become dead letters: returns how many. Retries are the
        workers' (RedisInbox.burst for `force`)."""

        def release(client: redis.Redis) -> int:
            now_ms = int(time.time() * 1000)
            keys = [self.stream, f"{self.stream}:scheduled"]
            while client.eval(_RELEASE, 2, *keys, now_ms, RELEASE_LIMIT) >= RELEASE_LIMIT:
                pass
            if force or time.monotonic() < self._next_sweep:  # the periodic call counts them
                return 0
            self._next_sweep = time.monotonic() + SWEEP_EVERY
            keys = [self.stream, f"{self.stream}:failed"]
            args: list[EncodableT] = [
                self.policy.group,
                now_ms,
                SWEEP_LIMIT,
                time.time(),
                self.queue,
            ]
            return int(client.eval(_EXPIRE, 2, *keys, *args))

        return self._call(release)

    def burst_mark(self) -> BurstMark:
        """The id of the stream's newest entry ("0-0" if none) and how many entries it holds."""

        def newest(client: redis.Redis) -> tuple[str, int]:
            entry = _entries(client.xrevrange(self.stream, count=1))
            return (entry[0][0] if entry else "0-0"), int(client.xlen(self.stream))

        mark, length = self._call(newest)
        return BurstMark(length, mark)

    def burst_worked(self, mark: BurstMark) -> bool:
        """Whether the group has been handed, and has settled, every entry up to the mark.

        False while Redis cannot be reached: nothing counts as worked that is not acknowledged.
        """
        if mark.state == "0-0":
            return True
        try:
            client = self._redis()
            groups = client.xinfo_groups(self.stream)
            ours = next((g for g in groups if _text(g["name"]) == self.policy.group), None)
            if ours is None or _id(ours["last-delivered-id"]) < _id(mark.state):
                return False
            return not client.xpending_range(
                self.stream, self.policy.group, min="-", max=mark.state, count=1
            )
        except redis.RedisError:
            return False

    def retry_failed(self, ids: Sequence[str] | None) -> list[str]:
        """Dead letters (all, or those with these ids) back to the stream with no attempts
        counted; returns the ids moved.

        Only the dead letters there at the start are looked at: a retried message that fails again
        at once is a new dead letter, and must not be moved a second time.
        """
        failed = f"{self.stream}:failed"
        wanted = set(ids) if ids else None

        def revive_all(client: redis.Redis) -> list[str]:
            moved: list[str] = []
            revive = client.register_script(_REVIVE)
            newest = _entries(client.xrevrange(failed, count=1))
            start, end = "-", newest[0][0] if newest else None
            while end and (page := _entries(client.xrange(failed, min=start, max=end, count=1000))):
                chosen = [
                    entry
                    for entry, fields in page
                    if wanted is None or _text(fields.get(b"id", b"")) in wanted
                ]
                if chosen:
                    moved += map(_text, revive(keys=[failed, self.stream], args=list(chosen)))
                start = "(" + page[-1][0]
            return moved

        moved = self._call(revive_all)
        missing = (wanted or set()) - set(moved)
        if missing:
            raise RedisQueueError(f"{self.queue}: no failed message {sorted(missing)[0]}")
        return moved

    def recover(self) -> Settled:
        """Nothing: a restarted daemon's workers read their consumers' pending entries first."""
        return Settled()

    def settle(self, death: Death) -> Settled:
        """Nothing moves: the slot's next worker reads what its predecessor held, and Redis
        counts the redelivery. An outcome the worker intended is counted (its XACK may not have
        landed; then it runs again and is counted again: at-least-once)."""
        return Settled(uncounted=[outcome for _, outcome in death.intended])

    def inbox(self, slot: int, stop_fd: int, log: Any) -> Inbox:
        consumer = consumer_name(self.policy, slot, os.getppid())
        return RedisInbox(self.queue, self.policy, consumer, stop_fd, log)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def depths(client: redis.Redis, stream: str, group: str) -> Depths:
    """New = not yet delivered, cur = pending in the group, and the stream's own figures."""
    pipe = client.pipeline(transaction=False)
    pipe.xlen(stream)
    pipe.zcard(f"{stream}:defer")
    pipe.xlen(f"{stream}:failed")
    pipe.xinfo_groups(stream)
    pipe.zcard(f"{stream}:scheduled")
    length, deferred, failed, groups, scheduled = pipe.execute(raise_on_error=False)
    for result in (length, deferred, failed, scheduled):
        if isinstance(result, Exception):
            raise result
    if isinstance(groups, Exception):  # no stream yet: nothing sent, no daemon started
        groups = []
    ours: dict[str, Any] = next((g for g in groups if _text(g["name"]) == group), {})
    pending = int(ours.get("pending", 0))
    return Depths(
        new=max(0, length - pending),
        cur=pending,
        defer=deferred,
        scheduled=scheduled,
        failed=failed,
        detail=f"redis stream {stream}: length {length}, pending {pending}, "
        f"consumers {int(ours.get('consumers', 0))}",
    )


def _id(entry_id: bytes | str) -> tuple[int, int]:
    ms, _, seq = _text(entry_id).partition("-")
    return int(ms), int(seq or 0)


# -- working --------------------------------------------------------------------------------------


class Held(msgspec.Struct):
    """An entry delivered to this worker and not yet settled."""

    fields: dict[bytes, bytes]
    attempt: int
    taken: float = 0.0  # monotonic time the handler started


class RedisInbox:
    """A worker's view of one Redis queue, the backend.Inbox of a Redis queue.

    `claim` returns an entry id without blocking (from the local batch, this slot's own pending
    entries, an XAUTOCLAIM scan, or a non-blocking read); `wait` blocks in XREADGROUP for at most
    BLOCK seconds. Shared by the queue's runner threads in one worker. A fetched batch is sized so
    that it is worked within BATCH_SECONDS at the measured handler speed: entries waiting in it
    count as delivered, and must not sit long enough to look abandoned to other daemons.
    """

    def __init__(
        self, queue: str, policy: QueueConfig, consumer: str, stop_fd: int, log: Any
    ) -> None:
        self.queue, self.policy, self.consumer = queue, policy, consumer
        self.stream = stream_name(queue, policy)
        self.group = policy.group
        self.log = log.bind(queue=queue, consumer=consumer)
        self.redis = connect(url_of(policy), BLOCK + 5.0)
        self._retry = self.redis.register_script(_RETRY)
        self._dead = self.redis.register_script(_DEAD)
        self._release = self.redis.register_script(_RELEASE)
        self._forget = self.redis.register_script(_FORGET)
        self._stop_fd = stop_fd
        self._lock = threading.Lock()
        self._fetching = threading.Lock()
        self._fetched = threading.Condition(self._lock)
        self._batch: collections.deque[tuple[str, dict[bytes, bytes]]] = collections.deque()
        self._held: dict[str, Held] = {}
        self._history: str | None = "0"  # where the scan of our own pending entries is
        self._cursor = "0-0"
        self._next_claim = self._next_release = self._next_clean = 0.0
        self._force_release = False
        self._group_ready = False
        self._down = False
        self._backoff = BACKOFF[0]
        self._budget = min(BATCH_SECONDS, policy.claim_idle / 4) * policy.threads
        self._cost = self._budget  # seconds per message, a moving average: first batches of 1

    # -- the runner's side ---------------------------------------------------------------------

    def claim(self) -> str | None:
        """An entry to work now, or None when there is none (or Redis cannot be reached)."""
        local = self._claim_local()
        if local is not None:
            return local
        if not self._group_ready and not self._attempt(self._ensure_group, pause=True):
            return None
        now = time.monotonic()
        if self._force_release or now >= self._next_release:
            self._next_release = now + RELEASE_EVERY
            force, self._force_release = self._force_release, False
            self._attempt(lambda: self._release_due(force), pause=True)
        reclaimed = self._attempt(self._reclaim, pause=True)
        if reclaimed:
            return reclaimed
        if now >= self._next_clean:
            self._next_clean = now + CLEAN_EVERY
            self._attempt(self._clean, pause=True)
        return self._fetch(block=False)

    def wait(self) -> None:
        """Block until entries arrive (at most BLOCK s); one thread reads, the others wait."""
        if self._fetching.acquire(blocking=False):
            try:
                self._fetch(block=True)
            finally:
                self._fetching.release()
        else:
            with self._fetched:
                self._fetched.wait(BLOCK)

    def read(self, name: str, max_size: int) -> Message:
        held = self._held[name]
        held.taken = time.monotonic()
        fields = held.fields
        mid = self.label(name)[0]
        if b"body" not in fields:
            raise RedisQueueError("stream entry without a body field")
        if held.attempt > self.policy.max_attempts:
            raise RedisQueueError(
                f"delivered {held.attempt} times without being settled (its workers died)"
            )
        expires = int(fields.get(b"expires", 0))
        if expires and expires <= time.time() * 1000:
            raise Expired(f"not started within its TTL (expired at {expires} ms)")
        body = fields[b"body"]
        if max_size and len(body) > max_size:
            raise RedisQueueError(f"message of {len(body)} bytes exceeds max_message_size")
        return Message(
            id=mid,
            queue=self.queue,
            body=body,
            attempt=held.attempt,
            enqueued_at=_enqueued_at(mid, name),
        )

    def label(self, name: str) -> tuple[str, int]:
        held = self._held[name]
        return _text(held.fields.get(b"id", name)), held.attempt

    def done(self, name: str) -> None:
        """Acknowledge after success; retried through an outage (a give-up would mean a rerun).

        The entry stays held until Redis has the acknowledgement, so that a rescan of this
        consumer's pending entries (after an outage) does not hand it out again meanwhile.
        """

        def ack() -> bool:
            pipe = self.redis.pipeline(transaction=True)
            pipe.xack(self.stream, self.group, name)
            pipe.xdel(self.stream, name)
            pipe.execute()
            return True

        self._until_done(ack)
        self._settled(name)

    def fail(self, name: str, error: dict[str, Any], permanent: bool) -> Outcome:
        """Defer for a retry or dead-letter, acknowledging in the same script step."""
        mid, attempt = self.label(name)
        body = self._held[name].fields.get(b"body", b"")
        if permanent or attempt >= self.policy.max_attempts:
            record = {
                "id": mid,
                "queue": self.queue,
                "attempts": attempt,
                "failed_at": time.time(),
                **error,
                "body": body,
            }
            args: list[Any] = [self.group, name]
            for key, value in record.items():
                args += [key, value if isinstance(value, bytes) else str(value)]
            self._until_done(lambda: self._dead(keys=self._keys("failed"), args=args) is not None)
            outcome = Outcome.FAILED
        else:
            not_before = int((time.time() + self.policy.delay(attempt)) * 1000)
            args = [self.group, name, not_before, _defer_member(mid.encode(), attempt, body)]
            self._until_done(lambda: self._retry(keys=self._keys("defer"), args=args) is not None)
            outcome = Outcome.RETRIED
        self._settled(name)
        return outcome

    def burst(self) -> None:
        """USR2: deferred retries are due now (on the next claim, in a runner thread)."""
        self._force_release = True

    def close(self) -> None:
        self.redis.close()

    # -- Redis operations ----------------------------------------------------------------------

    def _keys(self, companion: str) -> list[str]:
        return [self.stream, f"{self.stream}:{companion}"]

    def _ensure_group(self) -> bool:
        try:
            self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._group_ready = True
        return True

    def _release_due(self, force: bool) -> int:
        """Due retries back into the stream (all of them after USR2)."""
        limit = "+inf" if force else str(int(time.time() * 1000))
        moved = 0
        while True:
            n = int(self._release(keys=self._keys("defer"), args=[limit, RELEASE_LIMIT]))
            moved += n
            if n < RELEASE_LIMIT:
                return moved

    def _fetch(self, block: bool) -> str | None:
        """Read new entries into the local batch; return one of them when not blocking."""
        count = max(1, min(MAX_BATCH, int(self._budget / max(self._cost, 1e-5))))
        read = self._attempt(
            lambda: self.redis.xreadgroup(
                self.group,
                self.consumer,
                {self.stream: ">"},
                count=count,
                block=int(BLOCK * 1000) if block else None,
            ),
            pause=True,
        )
        if not read:
            return None
        entries = _entries(read)
        with self._lock:
            self._batch.extend(entries)
            self._fetched.notify_all()
        return None if block else self._claim_local()

    def _claim_local(self) -> str | None:
        with self._lock:
            if not self._batch:
                return None
            entry_id, fields = self._batch.popleft()
            self._held[entry_id] = Held(fields, int(fields.get(b"attempts", 0)) + 1)
            return entry_id

    def _reclaim(self) -> str:
        """One entry delivered before and never settled: ours first, then anyone's idle ones.

        Returns "" when there is none right now (None means Redis could not be asked).
        """
        while self._history is not None:
            read = self.redis.xreadgroup(
                self.group, self.consumer, {self.stream: self._history}, count=1
            )
            entries = _entries(read)
            if not entries:
                self._history = None
                break
            entry_id, fields = entries[0]
            self._history = entry_id
            if not fields:  # deleted from the stream while pending: nothing left to work
                self.redis.xack(self.stream, self.group, entry_id)
            elif (taken := self._take_reclaimed(entry_id, fields)) is not None:
                return taken
        now = time.monotonic()
        while now >= self._next_claim:
            reply: Any = self.redis.xautoclaim(
                self.stream,
                self.group,
                self.consumer,
                int(self.policy.claim_idle * 1000),
                start_id=self._cursor,
                count=1,
            )
            self._cursor = _text(reply[0])
            if self._cursor == "0-0":
                self._next_claim = now + min(max(self.policy.claim_idle / 2, 0.2), 5.0)
            for entry_id, fields in _entries(reply[1]):
                taken = self._take_reclaimed(entry_id, fields)
                if taken is not None:
                    self.log.info("reclaimed", id=_text(fields.get(b"id", entry_id)))
                    return taken
        return ""

    def _take_reclaimed(self, entry_id: str, fields: dict[bytes, bytes]) -> str | None:
        """Hold a redelivered entry with its delivery count; None if this worker has it already."""
        info = self.redis.xpending_range(
            self.stream, self.group, min=entry_id, max=entry_id, count=1
        )
        delivered = int(info[0]["times_delivered"]) if info else 1
        with self._lock:
            if entry_id in self._held or any(e == entry_id for e, _ in self._batch):
                return None
            self._held[entry_id] = Held(fields, int(fields.get(b"attempts", 0)) + delivered)
        return entry_id

    def _clean(self) -> bool:
        """Forget consumers long idle with nothing pending (those of daemons gone for good)."""
        idle_ms = max(3 * self.policy.claim_idle, CLEAN_EVERY) * 1000
        for c in self.redis.xinfo_consumers(self.stream, self.group):
            if int(c.get("pending", 0)) == 0 and int(c.get("idle", 0)) > idle_ms:
                self._forget(keys=[self.stream], args=[self.group, c["name"]])
        return True

    def _settled(self, name: str) -> Held:
        held = self._held.pop(name)
        if held.taken:
            self._cost = 0.9 * self._cost + 0.1 * (time.monotonic() - held.taken)
        return held

    # -- outages -------------------------------------------------------------------------------

    def _attempt(self, operation: Callable[[], T], pause: bool) -> T | None:
        """Run one Redis operation; on failure log the outage once, back off, return None."""
        try:
            result = operation()
        except redis.RedisError as e:
            if "NOGROUP" in str(e):  # Redis lost its data (restarted without persistence)
                self._group_ready = False
            self._outage(e, pause)
            return None
        if self._down:
            self._down = False
            self._backoff = BACKOFF[0]
            self._history = "0"  # replies lost in the outage may have left entries pending
            self.log.info("redis back", url=safe_url(url_of(self.policy)))
        return result

    def _until_done(self, operation: Callable[[], bool]) -> None:
        while not self._attempt(operation, pause=False):
            pass

    def _outage(self, error: Exception, pause: bool) -> None:
        if not self._down:
            self._down = True
            self.log.warning(
                "redis unavailable",
                url=safe_url(url_of(self.policy)),
                error=f"{type(error).__name__}: {error}",
            )
        delay, self._backoff = self._backoff, min(self._backoff * 2, BACKOFF[1])
        if pause:  # a runner between messages: a stop cuts the wait short
            select.select([self._stop_fd], [], [], delay)
        else:  # settling a message: keep trying until Redis is back (or the master kills us)
            time.sleep(delay)
