"""The life inside one worker process: claim a message, run its handler, settle it, count it.

The master is not on this path. Each queue gets `threads` runner threads per worker; a runner
claims the oldest message by renaming it into the worker's cur/<slot>/, runs the handler, and
on success hands the file to the Acker (background unlink); on failure moves it to defer/ or
failed/ itself. The main thread only listens to the master: "stop" (or EOF, or SIGTERM) means
stop claiming, finish what is in hand, and exit 0; "burst" wakes the burst-mode queues.
"""

from __future__ import annotations

import faulthandler
import os
import queue as queue_mod
import resource
import select
import signal
import threading
import traceback
from typing import Any

import setproctitle
import structlog

from msgd import handlers
from msgd.config import Config
from msgd.handlers import CommandFailed, Handler, Reject
from msgd.spool import AckLog, Spool, SpoolError, SpoolInbox, settle_failure, split_name
from msgd.stats import FAILED, RETRIED, SUCCEEDED, SlotWriter
from msgd.sysutil import set_parent_death_signal

DUMP_SIGNAL = signal.SIGRTMIN + 1  # master -> worker: write all threads' tracebacks (timeouts)
ACK_THREADS = 4  # concurrent unlinks: the filesystem overlaps their waits


class Acker:
    """Unlinks finished messages on background threads, with a crash-proof record of each."""

    def __init__(self, acklog: AckLog) -> None:
        self.acklog = acklog
        self.free: queue_mod.SimpleQueue[int] = queue_mod.SimpleQueue()
        for i in range(AckLog.RECORDS):
            self.free.put(i)
        self.todo: queue_mod.SimpleQueue[tuple[str, int] | None] = queue_mod.SimpleQueue()
        self.threads = [
            threading.Thread(target=self._run, name=f"ack-{i}", daemon=True)
            for i in range(ACK_THREADS)
        ]
        for t in self.threads:
            t.start()

    def done(self, queue: str, name: str, path: str) -> None:
        index = self.free.get()  # blocks only if 1,024 unlinks are outstanding
        if self.acklog.write(index, queue, name):
            self.todo.put((path, index))
        else:
            self.free.put(index)
            os.unlink(path)

    def _run(self) -> None:
        while (item := self.todo.get()) is not None:
            path, index = item
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            self.acklog.clear(index)
            self.free.put(index)

    def close(self) -> None:
        for _ in self.threads:
            self.todo.put(None)
        for t in self.threads:
            t.join()


class Worker:
    def __init__(
        self,
        *,
        slot: int,
        config: Config,
        queue_index: dict[str, int],
        counters: SlotWriter,
        conn: Any,
        burst_generation: Any,
    ) -> None:
        self.slot = slot
        self.config = config
        self.queue_index = queue_index
        self.counters = counters
        self.conn = conn
        self.burst_generation = burst_generation  # shared Value: bumped by the master on USR2
        self.spool = Spool.from_config(config)
        self.log = structlog.get_logger().bind(worker=slot)
        self.stopping = threading.Event()
        self.stop_r, self.stop_w = os.pipe()
        self.burst = threading.Condition()
        self.handlers: dict[str, Handler] = {}
        self.max_rss_kb = config.daemon.max_rss_mb * 1024

    def run(self) -> None:
        """The process body; returns when the worker has stopped cleanly."""
        set_parent_death_signal()
        if os.getppid() == 1:  # the master died before we could ask to follow it
            return
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        self.title("starting")
        for name, q in self.config.queues.items():
            self.handlers[name] = handlers.load(name, q, self.config.daemon.pythonpath)
        acklog = AckLog(self.spool.root, self.slot)
        acklog.open()
        self.acker = Acker(acklog)
        dump = open(os.path.join(self.spool.root, ".msgd", f"dump.{self.slot}"), "w")  # noqa: SIM115
        faulthandler.register(DUMP_SIGNAL, file=dump, all_threads=True)
        runners = []
        runner_no = 0
        for name, q in self.config.queues.items():
            if q.backend != "spool":
                continue
            inbox = SpoolInbox(self.spool, name, self.slot, self.stop_r)
            for _ in range(q.threads):
                runners.append(
                    threading.Thread(
                        target=self.serve, args=(inbox, runner_no), name=f"{name}-{runner_no}"
                    )
                )
                runner_no += 1
        for t in runners:
            t.start()
        self.title("idle")
        self.listen()
        for t in runners:
            t.join()
        self.acker.close()

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
                with self.burst:
                    self.burst.notify_all()

    def stop(self) -> None:
        if not self.stopping.is_set():
            self.stopping.set()
            os.write(self.stop_w, b"x")  # wakes every runner blocked in select
            with self.burst:
                self.burst.notify_all()

    def serve(self, inbox: SpoolInbox, runner: int) -> None:
        """One runner: work the queue until told to stop. Burst-mode queues work only in bursts."""
        policy = self.config.queues[inbox.queue]
        bursty = policy.mode == "burst"
        seen_burst = self.burst_generation.value
        while not self.stopping.is_set():
            if bursty and self.burst_generation.value == seen_burst:
                self.await_burst(seen_burst)
                continue
            name = inbox.claim()
            if name is not None:
                self.work(inbox, name, runner)
            elif bursty:
                seen_burst = self.burst_generation.value  # drained: wait for the next burst
            else:
                inbox.wait()

    def await_burst(self, seen: int) -> None:
        with self.burst:
            self.burst.wait_for(
                lambda: self.stopping.is_set() or self.burst_generation.value != seen
            )

    def work(self, inbox: SpoolInbox, name: str, runner: int) -> None:
        queue = inbox.queue
        index = self.queue_index[queue]
        path = inbox.cur + name
        started = self.counters.start(runner, index, name)
        self.title(f"{queue} busy {split_name(name)[0]}")
        try:
            message = inbox.read(name, self.config.daemon.max_message_size)
        except (OSError, SpoolError) as e:  # unreadable, not a file, too large: quarantine
            self.settle(queue, path, name, runner, started, e, permanent=True)
            return
        try:
            self.handlers[queue](message)
        except Reject as e:
            self.settle(queue, path, name, runner, started, e, permanent=True)
        except Exception as e:
            self.settle(queue, path, name, runner, started, e, permanent=False)
        else:
            self.acker.done(queue, name, path)
            self.counters.finish(runner, index, SUCCEEDED, started)
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
        queue: str,
        path: str,
        name: str,
        runner: int,
        started: int,
        error: BaseException,
        permanent: bool,
    ) -> None:
        mid, done = split_name(name)
        record: dict[str, Any] = {
            "error_type": type(error).__name__,
            "error": str(error),
            "traceback": "".join(traceback.format_exception(error))[-8000:],
        }
        if isinstance(error, CommandFailed | Reject) and str(error).startswith(("exit", "killed")):
            record["exit_status"] = str(error).split(":")[0]
        policy = self.config.queues[queue]
        outcome = settle_failure(self.spool, queue, path, mid, done + 1, policy, record, permanent)
        self.counters.finish(
            runner,
            self.queue_index[queue],
            FAILED if outcome == "failed" else RETRIED,
            started,
            rejected=isinstance(error, Reject),
        )
        self.log.warning(
            "message " + outcome,
            queue=queue,
            id=mid,
            attempt=done + 1,
            error=f"{record['error_type']}: {record['error']}",
        )

    def title(self, state: str) -> None:
        setproctitle.setproctitle(f"msgd: worker {self.slot} {state}")
