"""The life inside one worker process: claim a message, run its handler, settle it, count it.

The master is not on this path. Each queue gets `threads` runner threads per worker, and each
runner loops over its queue's inbox: claim the oldest message, run the handler, then settle it
through the inbox (a spool inbox renames into cur/<slot>/ to claim, unlinks on background threads
on success, renames into defer/ or failed/ on failure; a Redis inbox reads from its consumer group
and settles with XACK). The main thread only listens to the master: "stop" (or EOF, or SIGTERM)
means stop claiming, finish what is in hand, and exit 0; "burst" wakes the burst-mode queues.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import resource
import select
import signal
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any, Protocol

import setproctitle
import structlog

from msgd import handlers
from msgd.config import Config, QueueConfig
from msgd.events import NullWriter
from msgd.handlers import CommandFailed, Handler, Message, Reject
from msgd.spool import Acker, Spool, SpoolError, SpoolInbox
from msgd.stats import FAILED, RETRIED, SUCCEEDED, SlotWriter
from msgd.sysutil import set_parent_death_signal

DUMP_SIGNAL = signal.SIGRTMIN + 1  # master -> worker: write all threads' tracebacks (timeouts)


@dataclass
class Bursts:
    """Burst generations shared by master and workers: USR2 bumps `started`; `finished` catches
    up once everything pending at the signal is worked. A burst-mode queue runs while they
    differ, so a worker (re)started in the middle of a burst joins it."""

    started: Any = field(default_factory=lambda: multiprocessing.Value("Q", 0, lock=False))
    finished: Any = field(default_factory=lambda: multiprocessing.Value("Q", 0, lock=False))


class Inbox(Protocol):
    """What a runner needs from a queue, whatever keeps it (the spool, or redisq.RedisInbox)."""

    queue: str

    def claim(self) -> str | None: ...
    def wait(self) -> None: ...
    def read(self, name: str, max_size: int) -> Message: ...
    def label(self, name: str) -> tuple[str, int]: ...
    def done(self, name: str) -> None: ...
    def fail(self, name: str, error: dict[str, Any], permanent: bool) -> str: ...
    def burst(self) -> None: ...


class Worker:
    def __init__(
        self,
        *,
        slot: int,
        config: Config,
        queue_index: dict[str, int],
        counters: SlotWriter,
        conn: Any,
        bursts: Bursts,
        events: Any = None,  # http: events.EventWriter, or None for no outcome events
    ) -> None:
        self.slot = slot
        self.config = config
        self.queue_index = queue_index
        self.counters = counters
        self.conn = conn
        self.bursts = bursts
        self.events = events or NullWriter()
        self.spool = Spool.from_config(config)
        self.log = structlog.get_logger().bind(worker=slot)
        self.stopping = threading.Event()
        self.stop_r, self.stop_w = os.pipe()
        self.burst = threading.Condition()
        self.handlers: dict[str, Handler] = {}
        self.inboxes: list[Inbox] = []
        self.max_rss_kb = config.daemon.max_rss_mb * 1024

    def run(self) -> None:
        """The process body; returns when the worker has stopped cleanly."""
        set_parent_death_signal()
        if os.getppid() != multiprocessing.parent_process().pid:  # the master died first: it
            # was reaped by init or by a subreaper, so not "ppid 1" (containers, systemd --user)
            return
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        self.title("starting")
        for name, q in self.config.queues.items():
            self.handlers[name] = handlers.load(name, q, self.config.daemon.pythonpath)
        self.acker = Acker(self.spool.root, self.slot)
        dump_path = os.path.join(self.spool.root, ".msgd", f"dump.{self.slot}")
        dump = os.fdopen(  # tracebacks may show message data: private like the spool
            os.open(dump_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), "w"
        )
        faulthandler.register(DUMP_SIGNAL, file=dump, all_threads=True)
        runners = []
        runner_no = 0
        for name, q in self.config.queues.items():
            inbox = self.inbox(name, q)
            self.inboxes.append(inbox)
            for _ in range(q.threads):
                runners.append(
                    threading.Thread(
                        target=self.serve, args=(inbox, runner_no), name=f"{name}-{runner_no}"
                    )
                )
                runner_no += 1
        if len(runners) > 1:
            self.counters.shared_by_threads()
        for t in runners:
            t.start()
        self.title("idle")
        self.listen()
        for t in runners:
            t.join()
        self.acker.close()

    def inbox(self, name: str, q: QueueConfig) -> Inbox:
        """redis-py is imported only by workers that have a Redis queue."""
        if q.backend == "redis":
            from msgd.redisq import RedisInbox, consumer_name

            consumer = consumer_name(q, self.slot, os.getppid())
            return RedisInbox(name, q, consumer, self.stop_r, self.log)
        return SpoolInbox(self.spool, name, self.slot, self.stop_r, self.acker, q)

    def listen(self) -> None:
        """Main thread: wait for the master's word, EOF (master gone) or our own SIGTERM."""
        conn_fd = self.conn.fileno()
        while not self.stopping.is_set():
            ready, _, _ = select.select([conn_fd, self.stop_r], [], [])
            if conn_fd not in ready:
                continue
            try:
                word = self.conn.recv()
            except (EOFError, OSError):
                word = "stop"
            if word == "stop":
                self.stop()
            elif word == "burst":
                for inbox in self.inboxes:
                    inbox.burst()
                with self.burst:
                    self.burst.notify_all()

    def stop(self) -> None:
        if not self.stopping.is_set():
            self.stopping.set()
            os.write(self.stop_w, b"x")  # wakes every runner blocked in select
            with self.burst:
                self.burst.notify_all()

    def serve(self, inbox: Inbox, runner: int) -> None:
        """A runner thread's body. An error it cannot settle (a name it cannot parse, a spool it
        cannot write) ends the whole worker, loudly: the master then settles what it held and
        replaces it. A runner that died alone would leave its message in cur/ and the queue
        stalled while the worker looked healthy."""
        try:
            self.serve_queue(inbox, runner)
        except BaseException:
            self.log.exception("runner crashed", queue=inbox.queue, runner=runner)
            os._exit(70)  # EX_SOFTWARE; the ack log covers the unlinks still queued

    def serve_queue(self, inbox: Inbox, runner: int) -> None:
        """One runner: work the queue until told to stop. Burst-mode queues work only in bursts."""
        policy = self.config.queues[inbox.queue]
        bursty = policy.mode == "burst"
        seen_burst = self.bursts.finished.value  # a burst under way when we start: join it
        while not self.stopping.is_set():
            if bursty and self.bursts.started.value == seen_burst:
                self.await_burst(seen_burst)
                continue
            name = inbox.claim()
            if name is not None:
                self.work(inbox, name, runner)
            elif bursty:
                seen_burst = self.bursts.started.value  # drained: wait for the next burst
            else:
                inbox.wait()

    def await_burst(self, seen: int) -> None:
        with self.burst:
            self.burst.wait_for(lambda: self.stopping.is_set() or self.bursts.started.value != seen)

    def work(self, inbox: Inbox, name: str, runner: int) -> None:
        queue = inbox.queue
        index = self.queue_index[queue]
        started = self.counters.start(runner, index, name)
        mid, attempt = inbox.label(name)
        self.events.begin(runner, index, mid, attempt, started)  # http
        self.title(f"{queue} busy {mid}")
        try:
            message = inbox.read(name, self.config.daemon.max_message_size)
        except (OSError, SpoolError) as e:  # unreadable, not a file, too large: quarantine
            self.settle(inbox, name, runner, started, e, permanent=True)
            return
        try:
            self.handlers[queue](message)
        except Reject as e:
            self.settle(inbox, name, runner, started, e, permanent=True)
        except Exception as e:
            self.settle(inbox, name, runner, started, e, permanent=False)
        else:
            self.counters.intend(runner, index, SUCCEEDED)  # counted even if killed right here
            inbox.done(name)
            self.counters.finish(runner, index, SUCCEEDED, started)
            self.events.end(runner, SUCCEEDED)  # http
        self.title("idle")
        if self.max_rss_kb and resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > self.max_rss_kb:
            self.log.warning(
                "worker recycled",
                reason="max_rss_mb exceeded",
                max_rss_mb=self.config.daemon.max_rss_mb,
            )
            self.stop()

    def settle(
        self,
        inbox: Inbox,
        name: str,
        runner: int,
        started: int,
        error: BaseException,
        permanent: bool,
    ) -> None:
        queue = inbox.queue
        mid, attempt = inbox.label(name)
        record: dict[str, Any] = {
            "error_type": type(error).__name__,
            "error": str(error),
            "traceback": "".join(traceback.format_exception(error))[-8000:],
        }
        if isinstance(error, CommandFailed | Reject) and str(error).startswith(("exit", "killed")):
            record["exit_status"] = str(error).split(":")[0]
        outcome = inbox.fail(name, record, permanent)
        done = FAILED if outcome == "failed" else RETRIED
        self.counters.finish(
            runner, self.queue_index[queue], done, started, rejected=isinstance(error, Reject)
        )
        self.events.end(runner, done, f"{record['error_type']}: {record['error']}")  # http
        self.log.warning(
            "message " + outcome,
            queue=queue,
            id=mid,
            attempt=attempt,
            error=f"{record['error_type']}: {record['error']}",
        )

    def title(self, state: str) -> None:
        setproctitle.setproctitle(f"msgd: worker {self.slot} {state}")
