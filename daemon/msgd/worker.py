"""The life inside one worker process: claim a message, run its handler, settle it, count it.

The master is not on this path. Each queue gets `threads` runner threads per worker, and each
runner loops over its queue's inbox (backend.Inbox, from the queue's store): claim the next
message, run the handler, then settle it through the inbox. The main thread only listens to the
master: STOP (or EOF, or SIGTERM) means stop claiming, finish what is in hand, and exit 0; BURST
wakes the burst-mode queues.
"""

from __future__ import annotations

import contextlib
import enum
import faulthandler
import multiprocessing
import os
import resource
import select
import signal
import threading
import traceback
from typing import Any

import setproctitle
import structlog

from msgd import handlers
from msgd.backend import BackendError, Expired, Inbox, Outcome, open_store
from msgd.burst import BurstFlags
from msgd.config import Config, ConfigError
from msgd.counters import QueueIndex, SlotWriter
from msgd.events import NullWriter
from msgd.handlers import CommandFailed, Handler, Reject
from msgd.ratelimit import RateLimits
from msgd.sysutil import set_parent_death_signal

AMONG: dict[type[BaseException], Outcome] = {  # failures also counted as these
    Reject: Outcome.REJECTED,
    Expired: Outcome.EXPIRED,
}
DUMP_SIGNAL = signal.SIGRTMIN + 1  # master -> worker: write all threads' tracebacks (timeouts)


class Word(enum.Enum):
    """What master and worker say on their pipe (a worker on trial also sends an error line)."""

    STOP = "stop"  # finish what is in hand, claim nothing more, exit 0
    BURST = "burst"  # a burst began: wake the burst-mode queues, due retries now
    LOADED = "loaded"  # (a worker on trial) my handlers are imported; I wait for GO
    GO = "go"  # (to a worker on trial) the reload is applied: start claiming


class Worker:
    def __init__(
        self,
        *,
        slot: int,
        config: Config,
        index: QueueIndex,
        counters: SlotWriter,
        conn: Any,
        flags: BurstFlags,
        limits: RateLimits,
        events: NullWriter | None = None,  # http: events.EventWriter for the outcome feed
        on_trial: bool = False,  # a reload's first new worker: see load_handlers
    ) -> None:
        self.slot = slot
        self.config = config
        self.index = index
        self.counters = counters
        self.conn = conn
        self.flags = flags
        self.limits = limits
        self.events = events or NullWriter()
        self.on_trial = on_trial
        # Bound on first use, not here: binding runs structlog code, and the pages of every
        # function a forked worker runs become its own copies; idle workers never log.
        self.log = structlog.get_logger(worker=slot)
        self.stopping = threading.Event()
        self.stop_r, self.stop_w = os.pipe()
        self.burst = threading.Condition()
        self.handlers: dict[str, Handler] = {}
        self.inboxes: list[Inbox] = []
        self.max_rss_kb = config.daemon.max_rss_mb * 1024

    def run(self) -> None:
        """The process body; returns when the worker has stopped cleanly."""
        set_parent_death_signal()
        parent = multiprocessing.parent_process()
        if parent is None or os.getppid() != parent.pid:  # the master died first: it
            # was reaped by init or by a subreaper, so not "ppid 1" (containers, systemd --user)
            return
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        self.title("starting")
        if not self.load_handlers():
            return
        self.yield_to_master()  # after the import: a reload waits for it (load_handlers)
        dump_path = os.path.join(self.config.daemon.spool, ".msgd", f"dump.{self.slot}")
        # Tracebacks may show message data: private like the spool. A bare descriptor, as
        # faulthandler writes to one anyway: no file object to build in every worker.
        dump = os.open(dump_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        faulthandler.register(DUMP_SIGNAL, file=dump, all_threads=True)
        runners = []
        runner_no = 0
        for name, q in self.config.queues.items():
            store = open_store(name, q, self.config.daemon)  # its own: never the master's copy
            inbox = store.inbox(self.slot, self.stop_r, self.log)
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
        self.title("idle")  # before the runners: a runner's "busy" must not be overwritten
        for t in runners:
            t.start()
        self.listen()
        for t in runners:
            t.join()
        for inbox in self.inboxes:
            inbox.close()

    def yield_to_master(self) -> None:
        """Run `worker_nice` below the master, so that a signal acts within milliseconds even
        while the handlers keep every core busy: with equal weights the woken master waited for
        a worker's time slice (USR1 -> stats file p99 4.5-6.4 ms, with nice 5: 1.5-4.1). Nice
        weighs processes of one scheduling group against each other (a systemd service's cgroup,
        a session's autogroup), so the workers' share against other programs stays the same;
        the master's CPU is a few milliseconds a second. Not before the handlers' import: a
        reload waits for its first new worker to load, and at nice 5 it loaded behind the old ones
        (HUP -> applied p50 with a stream running, 3 rounds: 12.7-13.1 ms, importing first:
        11.6-12.7). A sandbox that forbids setpriority costs that latency only: the workers keep
        the master's priority, and say so."""
        if self.config.daemon.worker_nice:
            try:
                os.nice(self.config.daemon.worker_nice)
            except OSError as e:
                self.log.warning("worker_nice not applied", error=str(e))

    def load_handlers(self) -> bool:
        """Import every queue's handler. A reload's first new worker is the reload's check: it
        reports how the import went and claims nothing until the master says GO (the reload
        applied). False: it must exit without claiming."""
        if not self.on_trial:
            self.handlers = handlers.load_all(self.config)
            return True
        try:
            self.handlers = handlers.load_all(self.config)
        except ConfigError as e:
            with contextlib.suppress(OSError):
                self.conn.send(str(e))
            return False
        try:
            self.conn.send(Word.LOADED)
            return bool(self.conn.recv() is Word.GO)
        except (EOFError, OSError):  # the master is gone
            return False

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
                word = Word.STOP
            if word is Word.STOP:
                self.stop()
            elif word is Word.BURST:
                for inbox in self.inboxes:
                    index = self.index[inbox.queue]
                    if self.flags.started[index] != self.flags.finished[index]:
                        inbox.burst()  # a burst of this queue is under way
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
        """One runner: work the queue until told to stop. Burst-mode queues work only in bursts
        of their own; a rate-limited queue starts a claimed message only when its gate allows."""
        bursty = self.config.queues[inbox.queue].mode == "burst"
        index = self.index[inbox.queue]
        gate = self.limits.gate(inbox.queue)
        seen_burst = self.flags.finished[index]  # a burst under way when we start: join it
        while not self.stopping.is_set():
            if bursty and self.flags.started[index] == seen_burst:
                self.await_burst(index, seen_burst)
                continue
            name = inbox.claim()
            if name is not None:
                if gate is not None:
                    gate.take_turn()
                self.work(inbox, name, runner)
                continue
            self.title("idle")  # the queue ran dry (work() leaves the title busy until then)
            if bursty:
                seen_burst = self.flags.started[index]  # drained: wait for the next burst
            else:
                inbox.wait()

    def await_burst(self, index: int, seen: int) -> None:
        with self.burst:
            self.burst.wait_for(lambda: self.stopping.is_set() or self.flags.started[index] != seen)

    def work(self, inbox: Inbox, name: str, runner: int) -> None:
        queue = inbox.queue
        index = self.index[queue]
        mid, attempt = inbox.label(name)
        started = self.counters.start(runner, index, name, mid)
        self.events.begin(runner, index, mid, attempt, started)  # http
        self.title(f"{queue} busy {mid}")
        try:
            message = inbox.read(name, self.config.daemon.max_message_size)
        except (BackendError, OSError) as e:  # unreadable, not a file, too large: quarantine
            self.settle(inbox, name, runner, started, e, permanent=True)
            return
        try:
            self.handlers[queue](message)
        except Reject as e:
            self.settle(inbox, name, runner, started, e, permanent=True)
        except Exception as e:
            self.settle(inbox, name, runner, started, e, permanent=False)
        else:
            self.counters.intend(runner, index, Outcome.SUCCEEDED)  # counted even if killed now
            inbox.done(name)
            self.counters.finish(runner, index, Outcome.SUCCEEDED, started)
            self.events.end(runner, Outcome.SUCCEEDED)  # http
        # The title stays "busy" until the queue runs dry (serve_queue): a second setproctitle
        # for every message of a drain costs ~1 us, and the next claim follows within ~50 us.
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
        among = next((o for kind, o in AMONG.items() if isinstance(error, kind)), None)
        self.counters.finish(runner, self.index[queue], outcome, started, among)
        self.events.end(runner, outcome, f"{record['error_type']}: {record['error']}")  # http
        self.log.warning(
            "message " + outcome.label,
            queue=queue,
            id=mid,
            attempt=attempt,
            error=f"{record['error_type']}: {record['error']}",
        )

    def title(self, state: str) -> None:
        setproctitle.setproctitle(f"msgd: worker {self.slot} {state}")
