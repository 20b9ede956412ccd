"""The worker processes: start, notice death at once, settle what they held, replace, resize.

Each worker is a forked `multiprocessing.Process` with a Pipe to the master and a slot number
that names both its counter slot and its cur/<slot>/ directory. A death is seen the moment it
happens (the process sentinel is watched by the event loop), the slot's in-flight messages are
settled, and a replacement takes the same slot. Signals to workers go through pidfds, so a
recycled pid is never hit.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import os
import signal
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from msgd.config import Config
from msgd.events import NullWriter
from msgd.spool import AckLog, Spool, split_name
from msgd.stats import FAILED, RETRIED, TIMED_OUT, Counters, running
from msgd.worker import DUMP_SIGNAL, Bursts, Worker

FAST_DEATH = 1.0  # a worker dying sooner than this after its start is respawned with backoff
DUMP_WAIT = 0.2  # seconds between asking a hung worker for its tracebacks and killing it

_fork = multiprocessing.get_context("fork")


@dataclass(eq=False)
class WorkerHandle:
    slot: int
    process: Any
    conn: Any
    pidfd: int
    config: Config
    started: float = field(default_factory=time.monotonic)
    retiring: bool = False  # asked to stop: not replaced when it exits
    kill_reason: str = ""  # why the master killed it, for the log and the failure record
    timed_out: str = ""  # the cur/ name of the message that ran past its timeout

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, word: str) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(word)

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(self.pidfd, sig)


class Pool:
    def __init__(
        self,
        *,
        config: Config,
        spool: Spool,
        counters: Counters,
        queue_index: dict[str, int],
        bursts: Bursts,
        close_in_child: list[int],
        events: Callable[[int], Any] = NullWriter,  # http: a slot's event writer
    ) -> None:
        self.config = config
        self.spool = spool
        self.counters = counters
        self.queue_index = queue_index
        self.bursts = bursts
        self.close_in_child = close_in_child
        self.events = events
        self.size = config.daemon.workers
        self.workers: dict[int, WorkerHandle] = {}  # slot -> live worker
        self.retired: set[WorkerHandle] = set()  # retiring workers whose slots are being freed
        self.fast_deaths: dict[int, int] = {}
        self.stopping = False
        self.exited = asyncio.Event()  # set while no worker process is alive
        self.log = structlog.get_logger()
        self.loop = asyncio.get_running_loop()

    # -- starting --------------------------------------------------------------------------------

    def start(self) -> None:
        for _ in range(self.size):
            self.spawn(self.free_slot())

    def free_slot(self) -> int:
        used = set(self.workers) | {h.slot for h in self.retired}
        return next(s for s in range(len(used) + 1) if s not in used)

    def spawn(self, slot: int) -> WorkerHandle:
        writer = self.counters.writer(slot)
        ours, theirs = _fork.Pipe()
        process = _fork.Process(
            target=self._child, args=(slot, theirs), name=f"worker-{slot}", daemon=False
        )
        gc.freeze()  # keeps the child's first GC from copying every shared page
        process.start()
        theirs.close()
        writer.set_pid(process.pid)
        handle = WorkerHandle(slot, process, ours, os.pidfd_open(process.pid), self.config)
        self.workers[slot] = handle
        self.exited.clear()
        self.loop.add_reader(process.sentinel, self._on_exit, handle)
        return handle

    def _child(self, slot: int, conn: Any) -> None:
        """Runs in the new process: drop the master's descriptors, then be a worker."""
        for h in [*self.workers.values(), *self.retired]:
            h.conn.close()
            os.close(h.pidfd)
        for fd in self.close_in_child:
            with contextlib.suppress(OSError):
                os.close(fd)
        Worker(
            slot=slot,
            config=self.config,
            queue_index=self.queue_index,
            counters=self.counters.writer(slot),
            conn=conn,
            bursts=self.bursts,
            events=self.events(slot),
        ).run()

    # -- death -----------------------------------------------------------------------------------

    def _on_exit(self, handle: WorkerHandle) -> None:
        self.loop.remove_reader(handle.process.sentinel)
        handle.process.join()
        os.close(handle.pidfd)
        handle.conn.close()
        if self.workers.get(handle.slot) is handle:
            del self.workers[handle.slot]
        self.retired.discard(handle)
        code = handle.process.exitcode
        how = handle.kill_reason or (
            f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        )
        try:
            settled = self.settle(handle, how)
        except Exception:  # a spool the master cannot write: log, keep the pool going; what is
            self.log.exception("settling a dead worker failed", worker=handle.slot)  # left in
            settled = {}  # cur/ is settled by the next death in this slot or the next start
        expected = handle.retiring or self.stopping
        log = self.log.info if expected else self.log.warning
        log(
            "worker exited",
            worker=handle.slot,
            pid=handle.pid,
            how=how,
            **{k: v for k, v in settled.items() if v},
        )
        if not expected:
            self._respawn_later(handle)
        if not self.workers and not self.retired:
            self.exited.set()

    def settle(self, handle: WorkerHandle, how: str) -> dict[str, int]:
        """What the dead worker held: finished files unlinked, in-flight ones retried or returned.

        A death the master did not ask for counts as a failed attempt for what was in flight (the
        handler may be the cause: a message that kills workers must end in failed/, not loop). A
        timeout counts only against the message that timed out. A stop returns messages untouched.
        """
        if handle.timed_out:
            error = {
                "error_type": "Timeout",
                "error": f"handler ran past its timeout; {how}",
                "traceback": self._read_dump(handle.slot),
            }
            queue, name = handle.timed_out.split("/", 1)
            self.log.error(
                "timed-out handler's stack",
                worker=handle.slot,
                queue=queue,
                id=split_name(name)[0],
                traceback=error["traceback"],
            )
            self.counters.writer(handle.slot).count(self.queue_index[queue], TIMED_OUT)
            counts = lambda q, n: (q, n) == (queue, name)  # noqa: E731
        else:
            error = {"error_type": "WorkerDied", "error": f"worker {how}", "traceback": ""}
            dying = not (handle.retiring or self.stopping)
            counts = lambda q, n: dying  # noqa: E731
        uncounted = self._uncounted(handle.slot)  # before recover() empties cur/ and the ack log
        outcome = self.spool.recover(
            handle.slot, self.config.queues, counts, self.config.queues, error
        )
        writer = self.counters.writer(handle.slot)
        counted: dict[int, list[int]] = {}  # http: the outcome events of what is counted here
        for index, done in uncounted:
            writer.count(index, done)
            counted.setdefault(index, []).append(done)
        summary: dict[str, int] = {}
        for (queue, state), n in outcome.items():
            summary[state] = summary.get(state, 0) + n
            if state in ("retried", "failed"):
                done = RETRIED if state == "retried" else FAILED
                writer.count(self.queue_index[queue], done, n)
                counted.setdefault(self.queue_index[queue], []).extend([done] * n)
        self.events(handle.slot).settled(counted, error["error"])  # http
        return summary

    def _uncounted(self, slot: int) -> list[tuple[int, int]]:
        """Outcomes a dead worker made durable but did not count: it was killed between
        SlotWriter.intend() and finish(). Its message has left cur/, or is in the ack log."""
        by_index = {i: n for n, i in self.queue_index.items()}
        acked = AckLog(self.spool.root, slot).entries()
        out = []
        for run in running(self.counters.read()[slot]):
            queue = by_index.get(run.queue)
            if run.intended is None or queue is None:
                continue
            names = self.spool.names(queue, f"cur/{slot}")
            held = [n for n in names if zlib.crc32(n.encode()) == run.crc]
            if not held or f"{queue}/{held[0]}" in acked:
                out.append((run.queue, run.intended))
        return out

    def _read_dump(self, slot: int) -> str:
        try:
            with open(os.path.join(self.spool.root, ".msgd", f"dump.{slot}")) as f:
                return f.read()[-8000:]
        except OSError:
            return ""

    def _respawn_later(self, dead: WorkerHandle) -> None:
        """Replace a dead worker in its slot; a worker that keeps dying at start backs off."""
        if self.stopping or len(self.workers) >= self.size:
            return
        if time.monotonic() - dead.started < FAST_DEATH:
            self.fast_deaths[dead.slot] = self.fast_deaths.get(dead.slot, 0) + 1
        else:
            self.fast_deaths.pop(dead.slot, None)
        deaths = self.fast_deaths.get(dead.slot, 0)
        delay = min(0.05 * 2**deaths, 10.0) if deaths else 0.0  # 0.1 s, 0.2 s ... 10 s
        self.loop.call_later(delay, self._refill, dead.slot)

    def _refill(self, slot: int | None = None) -> None:
        """Spawn up to the pool's size; a dead worker's replacement takes its slot if it is free
        (its counts and its fast-death record stay with it, not with the lowest free slot)."""
        while not self.stopping and len(self.workers) < self.size:
            taken = slot is None or slot in self.workers or slot in {h.slot for h in self.retired}
            self.spawn(self.free_slot() if taken else slot)
            slot = None

    # -- steering --------------------------------------------------------------------------------

    def scale(self, delta: int) -> int:
        self.size = max(0, self.size + delta)
        self._refill()
        while len(self.workers) > self.size:
            self.retire(self.workers[max(self.workers)])
        return self.size

    def retire(self, handle: WorkerHandle) -> None:
        """Ask a worker to finish what it holds and exit; its slot frees when it has."""
        handle.retiring = True
        self.workers.pop(handle.slot, None)
        self.retired.add(handle)
        handle.send("stop")

    def replace_all(self, config: Config) -> None:
        """A reload: new workers (new code, new queues) start now, the old ones finish and go."""
        old = list(self.workers.values())
        self.config = config
        self.size = config.daemon.workers
        for handle in old:
            self.retire(handle)
        self._refill()

    def burst(self) -> None:
        self.bursts.started.value += 1
        for handle in self.workers.values():
            handle.send("burst")

    def check_timeouts(self) -> None:
        """Kill workers whose handler runs past its queue's timeout, after a traceback dump."""
        slots = self.counters.read()
        now = time.monotonic_ns()
        by_index = {i: n for n, i in self.queue_index.items()}
        for handle in list(self.workers.values()) + list(self.retired):
            if handle.timed_out:
                continue
            for run in running(slots[handle.slot]):
                queue = by_index.get(run.queue)
                policy = handle.config.queues.get(queue or "")
                if policy and now - run.started_ns > policy.timeout * 1e9:
                    name = self._name_of(handle.slot, queue, run.crc)
                    handle.timed_out = f"{queue}/{name}"
                    handle.kill_reason = f"killed after its handler ran past {policy.timeout}s"
                    self.log.error(
                        "handler timed out",
                        worker=handle.slot,
                        queue=queue,
                        id=split_name(name)[0],
                        timeout=policy.timeout,
                    )
                    handle.signal(DUMP_SIGNAL)
                    self.loop.call_later(DUMP_WAIT, handle.signal, signal.SIGKILL)
                    break

    def _name_of(self, slot: int, queue: str, crc: int) -> str:
        names = self.spool.names(queue, f"cur/{slot}")
        return next((n for n in names if zlib.crc32(n.encode()) == crc), names[0] if names else "")

    async def stop(self, grace: float) -> None:
        """Stop claiming everywhere, give in-flight work `grace` seconds, then kill the rest."""
        self.stopping = True
        for handle in list(self.workers.values()):
            self.retire(handle)
        if not self.retired:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.exited.wait(), grace)
        for handle in list(self.retired):
            handle.kill_reason = "killed at the end of the grace period"
            handle.signal(signal.SIGKILL)
        await self.exited.wait()

    def live(self) -> list[WorkerHandle]:
        return sorted([*self.workers.values(), *self.retired], key=lambda h: h.slot)
