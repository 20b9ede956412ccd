"""The master: one asyncio process that owns the config, the pool, and the signal table's actions.

Life cycle: lock the pidfile, drop privileges, settle what a previous master left claimed, start
the pool, say READY, then wait. Each action of the signal table (signals.py) has one task that
awaits its Event and runs the action; a signal that arrives while its action runs sets the Event
again, so it causes exactly one more run. Every action and periodic duty is supervised: an
exception is logged once, recorded in the state file for msgctl, and the next signal runs the
action again. Nothing here blocks the loop: whatever touches a queue's store (a directory listing,
a broker), or imports handler code, runs in a thread with a deadline.

The master is never on a message's path: workers claim, run and settle messages themselves; the
master watches them, keeps time (retries, timeouts) and reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection  # these three multiprocessing would load on first use, and
import multiprocessing.popen_fork  # the interpreter's files may be unreadable for daemon.user
import multiprocessing.sharedctypes  # noqa: F401 - once privileges are dropped: load them now
import os
import resource  # noqa: F401 - the same, for the workers
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import structlog

from msgd import handlers, logs, stats
from msgd.backend import BackendError, Store, close_all, open_store
from msgd.burst import Burst, BurstFlags
from msgd.clock import Clock
from msgd.config import Config, ConfigError, check_reloadable
from msgd.config import load as load_config
from msgd.counters import Counters, QueueIndex
from msgd.http import HttpListener
from msgd.notify import Notifier
from msgd.pidfile import Pidfile, StateFile, state_path
from msgd.pool import Pool
from msgd.ratelimit import RateLimits
from msgd.reporter import Reporter
from msgd.schedule import Scheduler
from msgd.signals import Action, SignalWatcher
from msgd.stats import DaemonInfo, Snapshot, daemon_info, summary
from msgd.supervise import Duties, off_loop
from msgd.sysutil import PrivilegeError, drop_privileges, make_dirs

STATUS_EVERY = 5.0  # seconds between STATUS= lines to systemd
CHECK_DEADLINE = 35.0  # seconds a reload may take to load and check its config (brokers too)
RECORDED_AS = {Action.SCALE_UP: "scale", Action.SCALE_DOWN: "scale"}  # state file action names


class StartError(Exception):
    """The daemon cannot start; the message is the one line the operator sees."""


def open_stores(config: Config) -> dict[str, Store]:
    return {name: open_store(name, q, config.daemon) for name, q in config.queues.items()}


def reopen_stores(
    old: Config, new: Config, stores: dict[str, Store]
) -> tuple[dict[str, Store], dict[str, Store]]:
    """A reload's stores, and the old ones to close: a queue whose settings (and the daemon's)
    did not change keeps its store, connections and all. Closing costs: a spool's close flushes
    its filesystem, and HUPs in a row queued those flushes ahead of the next reload's work."""
    same = old.daemon == new.daemon
    kept = {n: s for n, s in stores.items() if same and old.queues.get(n) == new.queues.get(n)}
    fresh = {n: kept.get(n) or open_store(n, q, new.daemon) for n, q in new.queues.items()}
    return fresh, {n: s for n, s in stores.items() if n not in kept}


class Master:
    def __init__(self, config: Config, on_ready: Callable[[], None] | None = None) -> None:
        self.config = config
        self.on_ready = on_ready
        self.log = structlog.get_logger()
        self.notify = Notifier()
        self.pidfile = Pidfile(config.daemon.pidfile)
        self.counters = Counters()
        self.own_counts = self.counters.master()
        self.index = QueueIndex(config.queues)
        self.stores = open_stores(config)
        self.reporter = Reporter(self.counters, self.index)
        self.flags = BurstFlags()
        self.limits = RateLimits(config)
        self.scheduler = Scheduler.of(config)
        self.burst_now = Burst()
        self.burst_task: asyncio.Task[None] | None = None
        self.started = time.time()
        self.reloads = 0
        self.dumps = 0
        self.draining = False
        self.duties = Duties()
        self.clock = Clock(self)

    # -- life cycle ------------------------------------------------------------------------------

    def run(self) -> int:
        return asyncio.run(self.main())

    async def main(self) -> int:
        self.signals = SignalWatcher()
        self.signals.install(asyncio.get_running_loop())  # first: a signal must not kill us
        await self.start()
        self.log.info(
            "started",
            pid=os.getpid(),
            workers=self.pool.size,
            config=self.config.path,
            queues=sorted(self.config.queues),
        )
        self.state.write()  # after "started" is logged: its appearance is what "ready" means
        self.notify.ready(summary(self.snapshot()))
        if self.on_ready:
            self.on_ready()
        actions: dict[Action, Callable[[], Awaitable[dict[str, Any]]]] = {
            Action.RELOAD: self.reload,
            Action.STATS: self.dump_stats,
            Action.BURST: self.burst,
            Action.SCALE_UP: lambda: self.scale(+1),
            Action.SCALE_DOWN: lambda: self.scale(-1),
        }
        tasks = [asyncio.create_task(self.serve(a, f)) for a, f in actions.items()]
        tasks += [asyncio.create_task(t()) for t in self.clock.duties()]
        stop = asyncio.create_task(self.signals.events[Action.STOP].wait())
        quit_ = asyncio.create_task(self.signals.events[Action.QUIT].wait())
        await asyncio.wait({stop, quit_}, return_when=asyncio.FIRST_COMPLETED)
        await self.shutdown(now=quit_.done())
        for task in [*tasks, stop, quit_]:
            task.cancel()
        self.signals.close()
        return 0

    async def start(self) -> None:
        d = self.config.daemon
        self.pidfile.acquire()
        if self.pidfile.stale_pid:
            self.log.warning(
                "stale pidfile taken over", pidfile=d.pidfile, stale_pid=self.pidfile.stale_pid
            )
        try:
            drop_privileges(d.user, d.group, d.allow_root, [self.pidfile.fd, *logs.log_fds()])
            make_dirs(os.path.dirname(d.stats_file), 0o700)
            make_dirs(os.path.join(d.spool, ".msgd"), d.dir_mode)  # ack logs, workers' dumps
            await off_loop(self.recover)
        except (PrivilegeError, BackendError) as e:
            raise StartError(str(e)) from None
        except OSError as e:
            raise StartError(f"daemon.spool: {e}") from None
        close_in_workers = [self.pidfile.fd]  # http: the listening socket joins it
        self.http = HttpListener(close_in_workers, lambda: [self.pidfile.fd])  # http
        try:  # http
            self.http.check(self.config.http)
        except ConfigError as e:
            raise StartError(str(e)) from None
        self.pool = Pool(
            self.config, self.counters, self.index, self.flags, self.limits, close_in_workers
        )
        self.pool.events = self.http.writer  # http
        self.http.apply(self.config, self.index)  # http: before the workers fork
        self.pool.start()
        self.state = StateFile(
            state_path(d.pidfile),
            {"pid": os.getpid(), "started_at": self.started, "config": self.config.path},
        )
        self.state.data["http"] = self.http.address  # http
        self.publish()

    def recover(self) -> None:
        """In a thread, before the pool starts: every queue usable, and what a previous master's
        workers left claimed back where it belongs."""
        for name, store in self.stores.items():
            store.check()
            settled = store.recover()
            if settled.finished or settled.returned:
                self.log.warning(
                    "recovered messages left in flight by a previous master",
                    queue=name,
                    finished=settled.finished,
                    returned=settled.returned,
                )

    async def shutdown(self, now: bool) -> None:
        """TERM: drain within the grace period (a second TERM/QUIT cuts it short); QUIT: now."""
        self.draining = True
        grace = 0.0 if now else self.config.daemon.grace_period
        in_flight = self.reporter.in_flight(h.slot for h in self.pool.live())
        mode = "now" if now else "graceful"
        self.log.info("stopping", mode=mode, grace_period=grace, in_flight=in_flight)
        self.notify.stopping()
        for event in (Action.STOP, Action.QUIT):
            self.signals.events[event].clear()
        drain = asyncio.create_task(self.pool.stop(grace))
        cut_short = asyncio.create_task(self.second_stop())
        while not drain.done():
            done_before = self.snapshot().processed
            await asyncio.wait(
                {drain, cut_short}, timeout=STATUS_EVERY, return_when=asyncio.FIRST_COMPLETED
            )
            if cut_short.done() and not drain.done():
                self.log.info("stopping", mode="now", reason="second stop signal")
                self.pool.kill_all("killed by an immediate stop")
                await drain
            elif not drain.done() and self.snapshot().processed > done_before:
                self.notify.extend_timeout(2 * STATUS_EVERY)
        cut_short.cancel()
        await off_loop(close_all, self.stores, self.log)
        self.log.info("stopped", **msgspec.structs.asdict(self.publish().totals))
        self.http.stop()  # http
        self.state.remove()
        self.pidfile.release()

    async def second_stop(self) -> None:
        stop, quit_ = self.signals.events[Action.STOP], self.signals.events[Action.QUIT]
        await asyncio.wait(
            {asyncio.create_task(stop.wait()), asyncio.create_task(quit_.wait())},
            return_when=asyncio.FIRST_COMPLETED,
        )

    async def serve(self, action: Action, run: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        """One action's task: wait for its signal, run it, record the outcome, repeat."""
        event, name = self.signals.events[action], RECORDED_AS.get(action, action.value)
        while True:
            await event.wait()
            event.clear()
            if self.draining:
                continue
            began = time.monotonic()
            try:
                outcome = {"outcome": "ok", **await run()}
            except Exception as e:
                outcome = self.failed(name, e)
            with self.duties.duty(f"acknowledging {name}"):
                self.state.record(name, outcome, began=began)

    def failed(self, action: str, error: Exception) -> dict[str, Any]:
        """An action that raised: logged once with its traceback, and reported to msgctl."""
        reason = str(error) or type(error).__name__
        self.log.exception("action failed", action=action, error=reason)
        return {"outcome": "error", "error": reason}

    # -- actions ---------------------------------------------------------------------------------

    async def reload(self) -> dict[str, Any]:
        """HUP: reopen the log, load and check the whole config off the loop, start the new
        workers (they are the handler check), then apply it.

        Whatever happens, systemd (waiting in "reloading") gets READY=1 and msgctl an answer.
        """
        self.notify.reloading()
        limits = None
        try:
            new = await off_loop(self.checked_config, deadline=CHECK_DEADLINE)
            logs.setup(new.daemon.log_file, new.daemon.log_format, new.daemon.log_level)
            self.index.add(new.queues)
            limits = RateLimits(new, self.limits)
            await self.pool.replace_all(new, limits)  # old workers serve until a new one loaded
        except Exception as e:
            return self.rejected(e, limits)
        self.stores, old = reopen_stores(self.config, new, self.stores)
        self.config = new
        self.http.apply(new, self.index)  # http
        self.state.data["http"] = self.http.address  # http
        self.limits, old_limits = limits, self.limits
        old_limits.close_unshared(limits)
        self.scheduler = Scheduler.of(new, self.scheduler)
        self.reloads += 1
        self.log.info(
            "reload", outcome="ok", generation=self.reloads, workers=new.daemon.workers,
            queues=sorted(new.queues),
        )  # fmt: skip
        self.notify.ready(summary(self.snapshot()))
        self.clock.close_later(old)
        return {"config_generation": self.reloads}

    def rejected(self, error: Exception, limits: RateLimits | None) -> dict[str, Any]:
        """A reload that cannot be applied leaves everything as it was (logging included)."""
        reason = str(error) if isinstance(error, ConfigError | BackendError) else repr(error)
        self.http.discard_pending()  # http
        if limits is not None:
            limits.close_unshared(self.limits)
        d = self.config.daemon
        with contextlib.suppress(OSError):
            logs.setup(d.log_file, d.log_format, d.log_level)
        self.log.error("reload", outcome="rejected", error=reason)
        self.notify.ready(f"reload rejected: {reason}")
        return {"outcome": "rejected", "error": reason}

    def checked_config(self) -> Config:
        """In a thread: the config file as it is now, validated but for the handlers' import."""
        try:
            logs.reopen(self.config.daemon.log_file)
        except OSError as e:
            raise ConfigError(f"daemon.log_file: cannot reopen: {e}") from None
        new = load_config(self.config.path)
        check_reloadable(self.config, new, set(self.index))
        for store in open_stores(new).values():
            store.check()
        handlers.check_commands(new)
        self.http.check(new.http)  # http: binds a changed address
        return new

    async def dump_stats(self) -> dict[str, Any]:
        """USR1: fresh depths, one `stats` log event and a fresh stats file (same generation)."""
        self.dumps += 1
        await self.reporter.refresh(self.stores)
        self.reporter.log_event(self.publish())
        return {}

    async def burst(self) -> dict[str, Any]:
        """USR2: deferred retries become due now and burst-mode queues run until drained."""
        return {"pending": await self.begin_burst(self.stores, "signal")}

    async def begin_burst(self, stores: dict[str, Store], trigger: str) -> int:
        """Start a burst of these queues (all for USR2, its own for a schedule); returns how many
        messages it waits for. Bursts that overlap are reported together when all are worked."""
        burst = self.burst_now
        if not burst.marks:
            burst.before = self.reporter.queue_totals(self.snapshot())
        pending = await off_loop(burst.begin, stores)
        self.pool.burst(list(stores))
        burst.triggers.add(trigger)
        alone = {"queue": next(iter(stores))} if trigger == "schedule" else {}
        self.log.info("burst", outcome="started", trigger=trigger, pending=pending, **alone)
        if self.burst_task is None or self.burst_task.done():
            self.burst_task = asyncio.create_task(self.finish_burst())
        return pending

    async def finish_burst(self) -> None:
        """Wait until every message pending at the signal(s) has been worked, then report."""
        burst = self.burst_now
        outcome: dict[str, Any]
        try:
            await burst.until_worked(self.stores)
            await burst.until_counted(self.pool.runs)
            counts = burst.report(self.reporter.queue_totals(self.snapshot()))
            trigger = ",".join(sorted(burst.triggers))
            self.log.info("burst", outcome="done", trigger=trigger, **counts)
            outcome = {"outcome": "ok", **counts}
        except Exception as e:
            outcome = self.failed("burst", e)
        self.burst_now = Burst()
        generation = self.state.generation("burst")
        for index in range(len(self.index)):
            self.flags.finished[index] = self.flags.started[index]
        with self.duties.duty("acknowledging burst_done"):
            self.state.record("burst_done", outcome, generation=generation)

    async def scale(self, delta: int) -> dict[str, Any]:
        size = self.pool.scale(delta)
        self.log.info("scale", outcome="ok", workers=size, change=delta)
        return {"workers": size}

    # -- reporting -------------------------------------------------------------------------------

    def info(self) -> DaemonInfo:
        return daemon_info(
            generation=self.dumps, started=self.started, config=self.config.path,
            reloads=self.reloads, target=self.pool.size, draining=self.draining,
            schedules=self.scheduler.report(),
        )  # fmt: skip

    def snapshot(self) -> Snapshot:
        return self.reporter.snapshot(self.info(), [(h.slot, h.pid) for h in self.pool.live()])

    def publish(self) -> Snapshot:
        """Rewrite the stats file (atomically) and return what was written."""
        snap = self.snapshot()
        stats.write(self.config.daemon.stats_file, snap)
        return snap
