"""The worker processes: start, notice death at once, settle what they held, replace, resize.

Each worker is a forked `multiprocessing.Process` with a Pipe to the master and a slot number
that names both its counter slot and its cur/<slot>/ directory. A death is seen the moment it
happens (its pidfd is watched by the event loop), the slot's in-flight messages are
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
from collections.abc import Callable
from typing import Any

import msgspec
import structlog

from msgd import handlers
from msgd.backend import Death, Outcome, Settled, open_store
from msgd.burst import BurstFlags
from msgd.config import Config, ConfigError
from msgd.counters import Counters, QueueIndex, Running, running
from msgd.events import NullWriter, no_events
from msgd.ratelimit import RateLimits
from msgd.worker import DUMP_SIGNAL, Word, Worker

FAST_DEATH = 1.0  # a worker dying sooner than this after its start is respawned with backoff
DUMP_WAIT = 0.2  # seconds between asking a hung worker for its tracebacks and killing it

_fork = multiprocessing.get_context("fork")


class WorkerHandle(msgspec.Struct, eq=False):
    slot: int
    process: Any
    conn: Any
    pidfd: int
    config: Config
    started: float = msgspec.field(default_factory=time.monotonic)
    retiring: bool = False  # asked to stop: not replaced when it exits
    on_trial: bool = False  # a reload's new worker, not yet admitted (replace_all)
    loaded: asyncio.Future[str] | None = None  # its verdict: "" loaded, or why not
    kill_reason: str = ""  # why the master killed it, for the log and the failure record
    timed_out: Running | None = None  # the run that went past its queue's timeout

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, word: Word) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(word)

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(self.pidfd, sig)


class Pool:
    def __init__(
        self,
        config: Config,
        counters: Counters,
        index: QueueIndex,
        flags: BurstFlags,
        limits: RateLimits,
        close_in_child: list[int],
    ) -> None:
        self.config = config
        self.counters = counters
        self.index = index
        self.flags = flags
        self.limits = limits
        self.close_in_child = close_in_child
        self.events: Callable[[int], NullWriter] = no_events  # http: a slot's event writer
        self.size = config.daemon.workers
        self.workers: dict[int, WorkerHandle] = {}  # slot -> live worker
        self.retired: set[WorkerHandle] = set()  # outside the count: retiring, or on trial
        self.fast_deaths: dict[int, int] = {}
        self.stopping = False
        self.exited = asyncio.Event()  # set while no worker process is alive
        self.log = structlog.get_logger()
        self.loop = asyncio.get_running_loop()

    # -- starting --------------------------------------------------------------------------------

    def start(self) -> None:
        for _ in range(self.size):
            self.spawn(self.free_slot(), self.config, self.limits)

    def free_slot(self) -> int:
        used = set(self.workers) | {h.slot for h in self.retired}
        return next(s for s in range(len(used) + 1) if s not in used)

    def spawn(
        self, slot: int, config: Config, limits: RateLimits, on_trial: bool = False
    ) -> WorkerHandle:
        writer = self.counters.writer(slot)
        ours, theirs = _fork.Pipe()
        process = _fork.Process(
            target=self._child,
            args=(slot, theirs, config, limits, on_trial),
            name=f"worker-{slot}",
            daemon=False,
        )
        gc.freeze()  # keeps the child's first GC from copying every shared page
        process.start()
        theirs.close()
        pid = process.pid
        assert pid is not None  # started
        writer.set_pid(pid)
        handle = WorkerHandle(slot, process, ours, os.pidfd_open(pid), config, on_trial=on_trial)
        if on_trial:  # outside the count until it has loaded (replace_all)
            handle.loaded = self.loop.create_future()
            self.retired.add(handle)
            self.loop.add_reader(ours.fileno(), self._on_loaded, handle)
        else:
            self.workers[slot] = handle
        self.exited.clear()
        # The pidfd turns readable once the whole process is gone and can be reaped. The
        # sentinel pipe closes earlier, while the exit is still under way: join() then held the
        # loop 15-45 ms, delaying every signal (seen on a reload's old workers, asyncio debug).
        self.loop.add_reader(handle.pidfd, self._on_exit, handle)
        return handle

    def _child(
        self, slot: int, conn: Any, config: Config, limits: RateLimits, on_trial: bool
    ) -> None:
        """Runs in the new process: drop the master's descriptors, then be a worker."""
        for h in [*self.workers.values(), *self.retired]:
            h.conn.close()
            os.close(h.pidfd)
        for fd in self.close_in_child:
            with contextlib.suppress(OSError):
                os.close(fd)
        Worker(
            slot=slot,
            config=config,
            index=self.index,
            counters=self.counters.writer(slot),
            conn=conn,
            flags=self.flags,
            limits=limits,
            events=self.events(slot),  # http
            on_trial=on_trial,
        ).run()

    def _on_loaded(self, handle: WorkerHandle) -> None:
        """A worker on trial says how its handlers' import went: LOADED, or the error line."""
        self.loop.remove_reader(handle.conn.fileno())
        try:
            word = handle.conn.recv()
        except (EOFError, OSError):
            word = "a new worker exited while importing its handlers"
        self._verdict(handle, "" if word is Word.LOADED else str(word))

    @staticmethod
    def _verdict(handle: WorkerHandle, failure: str) -> None:
        if handle.loaded is not None and not handle.loaded.done():
            handle.loaded.set_result(failure)

    # -- death -----------------------------------------------------------------------------------

    def _on_exit(self, handle: WorkerHandle) -> None:
        self.loop.remove_reader(handle.pidfd)
        handle.process.join()
        os.close(handle.pidfd)
        if handle.on_trial:
            self.loop.remove_reader(handle.conn.fileno())
            self._verdict(handle, "a new worker exited while importing its handlers")
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
            settled = Settled()  # cur/ is settled by the next death in this slot or the next start
        expected = handle.retiring or handle.on_trial or self.stopping
        log = self.log.info if expected else self.log.warning
        counts = msgspec.structs.asdict(settled)
        del counts["uncounted"]
        log(
            "worker exited",
            worker=handle.slot,
            pid=handle.pid,
            how=how,
            **{k: v for k, v in counts.items() if v},
        )
        if not expected:
            self._respawn_later(handle)
        if not self.workers and not self.retired:
            self.exited.set()

    def settle(self, handle: WorkerHandle, how: str) -> Settled:
        """What the dead worker held, settled by each of its queues' stores, and counted.

        A death the master did not ask for counts as a failed attempt for what was in flight (the
        handler may be the cause: a message that kills workers must end as a dead letter, not
        loop). A timeout counts only against the message that timed out. A stop charges nothing.
        """
        runs = running(self.counters.read_slot(handle.slot))
        writer = self.counters.writer(handle.slot)
        total = Settled()
        counted: dict[int, list[int]] = {}  # http: what is counted here makes outcome events
        for name, policy in handle.config.queues.items():
            index = self.index[name]
            death = self._death(handle, how, [r for r in runs if r.queue == index])
            settled = open_store(name, policy, handle.config.daemon).settle(death)
            for outcome in settled.uncounted:
                writer.count(index, outcome)
            writer.count(index, Outcome.RETRIED, settled.retried)
            writer.count(index, Outcome.FAILED, settled.failed)
            total.add(settled)
            counted[index] = [*settled.uncounted, *[Outcome.RETRIED] * settled.retried,
                              *[Outcome.FAILED] * settled.failed]  # fmt: skip
        self.events(handle.slot).settled(counted, f"worker {how}")  # http
        return total

    def _death(self, handle: WorkerHandle, how: str, runs: list[Running]) -> Death:
        """The death as one queue's store must see it: `runs` are the worker's runs of it."""
        intended = [(r.crc, r.intended) for r in runs if r.intended is not None]
        timed_out = handle.timed_out
        if timed_out is not None and timed_out in runs:
            traceback = self._read_dump(handle.slot)
            self.log.error(
                "timed-out handler's stack",
                worker=handle.slot,
                queue=self.index.name(timed_out.queue),
                id=timed_out.label,
                traceback=traceback,
            )
            self.counters.writer(handle.slot).count(timed_out.queue, Outcome.TIMED_OUT)
            error = {
                "error_type": "Timeout",
                "error": f"handler ran past its timeout; {how}",
                "traceback": traceback,
            }
            return Death(
                slot=handle.slot, charged=True, timed_out=timed_out.crc, intended=intended,
                error=error,
            )  # fmt: skip
        error = {"error_type": "WorkerDied", "error": f"worker {how}", "traceback": ""}
        charged = timed_out is None and not (handle.retiring or self.stopping)
        return Death(slot=handle.slot, charged=charged, intended=intended, error=error)

    def _read_dump(self, slot: int) -> str:
        try:
            with open(os.path.join(self.config.daemon.spool, ".msgd", f"dump.{slot}")) as f:
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
            slot = self.free_slot() if taken or slot is None else slot
            self.spawn(slot, self.config, self.limits)
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
        handle.send(Word.STOP)

    async def replace_all(self, config: Config, limits: RateLimits) -> None:
        """A reload: one worker of the new generation starts and imports its handlers (new code,
        new queues) while the old ones work on. That import is the reload's handler check: if
        it fails, the new worker is killed before claiming anything, the old ones never stopped,
        and ConfigError says why. Once it has loaded, it starts claiming, the old ones finish
        what they hold and go, and the rest of the new generation is forked just after the
        reload is acknowledged: they run the import the first one passed (one that fails now
        is a worker death like any other). Forked before the check, they made it wait for their
        forks too: here a fork takes 1 ms, 2-3 ms while the child before it starts."""
        size = config.daemon.workers
        trial = await self.tried(config, limits) if size else None
        self.config, self.limits, self.size = config, limits, size
        for handle in list(self.workers.values()):
            self.retire(handle)
        if trial is not None:
            self.admit(trial)
        self.loop.call_soon(self._refill)  # the rest, once the reload's caller has its answer

    async def tried(self, config: Config, limits: RateLimits) -> WorkerHandle:
        """A reload's first new worker, once it has imported its handlers; if it cannot (an
        error, an exit, past `import_timeout`), it is killed and ConfigError says why."""
        handle = self.spawn(self.free_slot(), config, limits, on_trial=True)
        assert handle.loaded is not None  # a worker on trial has its verdict to come
        try:
            failure = await asyncio.wait_for(handle.loaded, config.daemon.import_timeout)
        except TimeoutError:
            failure = handlers.import_too_slow(config)
        if failure:
            handle.signal(signal.SIGKILL)
            raise ConfigError(failure)
        return handle

    def admit(self, handle: WorkerHandle) -> None:
        """A worker that passed its trial joins the pool and starts claiming."""
        if handle not in self.retired or handle.retiring:
            return  # it exited (or is stopping) since it loaded
        self.retired.discard(handle)
        handle.on_trial = False
        self.workers[handle.slot] = handle
        handle.send(Word.GO)

    def burst(self, queues: list[str]) -> None:
        """A burst of these queues: their flags move, and every worker is told to look."""
        for name in queues:
            self.flags.started[self.index[name]] += 1
        for handle in self.workers.values():
            handle.send(Word.BURST)

    def check_timeouts(self) -> None:
        """Kill workers whose handler runs past its queue's timeout, after a traceback dump."""
        now = time.monotonic_ns()
        for handle in self.live():
            if handle.timed_out is not None:
                continue  # being killed already
            for run in running(self.counters.read_slot(handle.slot)):
                policy = handle.config.queues.get(self.index.name(run.queue) or "")
                if policy and now - run.started_ns > policy.timeout * 1e9:
                    self.time_out(handle, run, policy.timeout)
                    break

    def time_out(self, handle: WorkerHandle, run: Running, timeout: float) -> None:
        handle.timed_out = run
        handle.kill_reason = f"killed after its handler ran past {timeout}s"
        queue = self.index.name(run.queue)
        self.log.error(
            "handler timed out", worker=handle.slot, queue=queue, id=run.label, timeout=timeout
        )
        handle.signal(DUMP_SIGNAL)
        self.loop.call_later(DUMP_WAIT, handle.signal, signal.SIGKILL)

    async def stop(self, grace: float) -> None:
        """Stop claiming everywhere, give in-flight work `grace` seconds, then kill the rest."""
        self.stopping = True
        for handle in [*self.workers.values(), *self.retired]:
            self.retire(handle)  # a worker on trial too: it exits without claiming
        if not self.retired:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.exited.wait(), grace)
        for handle in list(self.retired):
            handle.kill_reason = "killed at the end of the grace period"
            handle.signal(signal.SIGKILL)
        await self.exited.wait()

    def kill_all(self, reason: str) -> None:
        for handle in self.live():
            handle.kill_reason = reason
            handle.signal(signal.SIGKILL)

    def live(self) -> list[WorkerHandle]:
        return sorted([*self.workers.values(), *self.retired], key=lambda h: h.slot)

    def runs(self) -> list[Running]:
        """The handler runs in progress in the live workers, as their slots say now."""
        return [run for h in self.live() for run in running(self.counters.read_slot(h.slot))]
