"""The master: one asyncio process that owns the config, the pool, and the signal table's actions.

Life cycle: lock the pidfile, repair what a previous master left in cur/, start the pool, say
READY, then wait. Each action of the signal table (signals.py) has one task that awaits its Event
and runs the action; a signal that arrives while its action runs sets the Event again, so it
causes exactly one more run. The master is never on a message's path: workers claim, run and
settle messages themselves; the master watches them, keeps time (retries, timeouts) and reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import multiprocessing
import multiprocessing.connection  # these three multiprocessing would load on first use, and
import multiprocessing.popen_fork  # the interpreter's files may be unreadable for daemon.user
import multiprocessing.sharedctypes  # noqa: F401 - once privileges are dropped: load them now
import os
import pwd
import resource  # noqa: F401 - the same, for the workers
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import setproctitle
import structlog

from msgd import handlers, logs
from msgd.config import MAX_QUEUES, Config, ConfigError, QueueConfig
from msgd.config import load as load_config
from msgd.http import HttpListener
from msgd.notify import Notifier
from msgd.pidfile import Pidfile, StateFile, state_path
from msgd.pool import Pool
from msgd.signals import Action, SignalWatcher
from msgd.spool import Spool, split_deferred, split_name
from msgd.stats import Counters, Rates, snapshot, summary
from msgd.sysutil import atomic_write, make_dirs
from msgd.worker import Bursts

TICK = 0.05  # seconds between checks of timeouts and due retries
BURST_POLL = 0.01  # how often a burst looks whether its messages are all worked
STATUS_EVERY = 5.0  # seconds between STATUS= lines to systemd


class StartError(Exception):
    """The daemon cannot start; the message is the one line the operator sees."""


class Master:
    def __init__(self, config: Config, on_ready: Callable[[], None] | None = None) -> None:
        self.config = config
        self.on_ready = on_ready
        self.log = structlog.get_logger()
        self.notify = Notifier()
        self.spool = Spool.from_config(config)
        self.pidfile = Pidfile(config.daemon.pidfile)
        self.counters = Counters()
        self.queue_index: dict[str, int] = {}
        self.rates = Rates()
        self.started = time.time()
        self.reloads = 0
        self.stats_generation = 0
        self.draining = False
        self.burst_names: dict[str, set[str]] = {}  # every file name the burst must see worked
        self.burst_waiting: dict[str, list[str]] = {}  # those maybe still in new/, oldest last
        self.burst_marks: dict[str, str] = {}  # Redis queues: the newest stream id at the burst
        self.burst_counts: dict[str, dict[str, int]] = {}  # per-queue outcomes when it began
        self.burst_upto = 0
        self.burst_task: asyncio.Task[None] | None = None
        self.duty_errors: dict[str, str] = {}  # keep_time's failing duties, logged once each
        self.depth_watcher: Any = None  # redisq.DepthWatcher, once a Redis queue is configured

    # -- life cycle ------------------------------------------------------------------------------

    def run(self) -> int:
        return asyncio.run(self.main())

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        self.signals = SignalWatcher()
        self.signals.install(loop)  # first: a signal during start-up must not kill us
        self.start()
        self.log.info(
            "started",
            pid=os.getpid(),
            workers=self.pool.size,
            config=self.config.path,
            queues=sorted(self.config.queues),
        )
        self.state.write()  # after "started" is logged: its appearance is what "ready" means
        self.notify.ready(self.summary())
        if self.on_ready:
            self.on_ready()
        actions = {
            Action.RELOAD: self.reload,
            Action.STATS: self.dump_stats,
            Action.BURST: self.burst,
            Action.SCALE_UP: lambda: self.scale(+1),
            Action.SCALE_DOWN: lambda: self.scale(-1),
        }
        tasks = [asyncio.create_task(self.serve(a, f)) for a, f in actions.items()]
        tasks.append(asyncio.create_task(self.keep_time()))
        stop = asyncio.create_task(self.signals.events[Action.STOP].wait())
        quit_ = asyncio.create_task(self.signals.events[Action.QUIT].wait())
        await asyncio.wait({stop, quit_}, return_when=asyncio.FIRST_COMPLETED)
        await self.shutdown(now=quit_.done())
        for task in [*tasks, stop, quit_]:
            task.cancel()
        self.signals.close()
        return 0

    def start(self) -> None:
        d = self.config.daemon
        self.pidfile.acquire()
        if self.pidfile.stale_pid:
            self.log.warning(
                "stale pidfile taken over", pidfile=d.pidfile, stale_pid=self.pidfile.stale_pid
            )
        self.drop_privileges()
        try:
            self.spool.ensure_root()
            for name in self.config.queues:
                self.spool.ensure(name)
            make_dirs(os.path.dirname(d.stats_file), 0o755)
        except OSError as e:
            raise StartError(f"daemon.spool: {e}") from None
        for slot in sorted(self.spool.slots_in_use()):
            returned = self.spool.recover(slot, self.spool.queues())
            if returned:
                self.log.warning(
                    "recovered messages left in flight by a previous master",
                    slot=slot,
                    **{f"{q}_{s}": n for (q, s), n in returned.items()},
                )
        self.index_queues(self.config)
        self.bursts = Bursts()
        close_in_workers = [self.pidfile.fd]  # http: the listening socket joins it
        self.http = HttpListener(close_in_workers, lambda: [self.pidfile.fd])  # http
        try:  # http
            self.http.check(self.config.http)
        except ConfigError as e:
            raise StartError(str(e)) from None
        self.pool = Pool(
            config=self.config,
            spool=self.spool,
            counters=self.counters,
            queue_index=self.queue_index,
            bursts=self.bursts,
            close_in_child=close_in_workers,
            events=self.http.writer,  # http
        )
        self.http.apply(self.config, self.queue_index)  # http: before the workers fork
        self.pool.start()
        self.state = StateFile(
            state_path(self.config.daemon.pidfile),
            {"pid": os.getpid(), "started_at": self.started, "config": self.config.path},
        )
        self.state.data["http"] = self.http.address  # http
        self.publish()

    def drop_privileges(self) -> None:
        """As root, become daemon.user/group once the pidfile and log are open; or refuse."""
        d = self.config.daemon
        if os.geteuid() != 0:
            return
        if not d.user:
            if d.allow_root:
                return
            raise StartError(
                "daemon.user: refusing to run as root without a user to become "
                "(set daemon.user, or daemon.allow_root = true)"
            )
        try:
            user = pwd.getpwnam(d.user)
            gid = grp.getgrnam(d.group).gr_gid if d.group else user.pw_gid
        except KeyError as e:
            raise StartError(f"daemon.user/group: no such user or group: {e}") from None
        for fd in (self.pidfile.fd, *logs.log_fds()):  # ours to rewrite, remove and reopen
            if fd > 2:
                os.fchown(fd, user.pw_uid, gid)
        os.setgroups([])
        os.setgid(gid)
        os.setuid(user.pw_uid)

    async def shutdown(self, now: bool) -> None:
        """TERM: drain within the grace period (a second TERM/QUIT cuts it short); QUIT: now."""
        self.draining = True
        grace = 0.0 if now else self.config.daemon.grace_period
        self.log.info(
            "stopping",
            mode="now" if now else "graceful",
            grace_period=grace,
            in_flight=sum(len(self.in_flight(h.slot)) for h in self.pool.live()),
        )
        self.notify.stopping()
        for event in (Action.STOP, Action.QUIT):
            self.signals.events[event].clear()
        drain = asyncio.create_task(self.pool.stop(grace))
        cut_short = asyncio.create_task(self.second_stop())
        while not drain.done():
            done_before = self.processed()
            await asyncio.wait(
                {drain, cut_short}, timeout=STATUS_EVERY, return_when=asyncio.FIRST_COMPLETED
            )
            if cut_short.done() and not drain.done():
                self.log.info("stopping", mode="now", reason="second stop signal")
                for handle in self.pool.live():
                    handle.kill_reason = "killed by an immediate stop"
                    handle.signal(signal.SIGKILL)
                await drain
            elif not drain.done() and self.processed() > done_before:
                self.notify.extend_timeout(2 * STATUS_EVERY)
        cut_short.cancel()
        self.publish()
        self.log.info("stopped", **self.current_snapshot()["totals"])
        self.http.stop()  # http
        self.state.remove()
        self.pidfile.release()

    async def second_stop(self) -> None:
        stop, quit_ = self.signals.events[Action.STOP], self.signals.events[Action.QUIT]
        await asyncio.wait(
            {asyncio.create_task(stop.wait()), asyncio.create_task(quit_.wait())},
            return_when=asyncio.FIRST_COMPLETED,
        )

    async def serve(self, action: Action, run: Callable[[], None]) -> None:
        """One action's task: wait for its signal, run it, repeat. Repeats coalesce."""
        event = self.signals.events[action]
        while True:
            await event.wait()
            event.clear()
            if self.draining:
                continue
            self.state.began = time.monotonic()
            try:
                run()
            except Exception:
                self.log.exception(action.value, outcome="error")
            finally:
                self.state.began = None

    # -- actions ---------------------------------------------------------------------------------

    def reload(self) -> None:
        """HUP: reopen the log, load and check the whole config, and only then apply it.

        Whatever happens, systemd (waiting in "reloading") gets READY=1 and msgctl an answer.
        """
        self.notify.reloading()
        try:
            new = self.checked_config()
        except Exception as e:
            reason = str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
            self.http.discard_pending()  # http
            self.log.error("reload", outcome="rejected", error=reason)
            self.state.record("reload", ok=False, error=reason)
            self.notify.ready(f"reload rejected: {reason}")
            return
        self.index_queues(new)
        self.config = new
        self.http.apply(new, self.queue_index)  # http: before new workers fork
        self.state.data["http"] = self.http.address  # http
        self.pool.replace_all(new)
        self.reloads += 1
        self.log.info(
            "reload",
            outcome="ok",
            generation=self.reloads,
            workers=new.daemon.workers,
            queues=sorted(new.queues),
        )
        self.state.record("reload", ok=True, config_generation=self.reloads)
        self.notify.ready(self.summary())

    def checked_config(self) -> Config:
        """The config file as it is now, fully validated, with logging set up its way."""
        try:
            logs.reopen(self.config.daemon.log_file)
        except OSError as e:
            raise ConfigError(f"daemon.log_file: cannot reopen: {e}") from None
        new = load_config(self.config.path)
        self.check_reloadable(new)
        handlers.check(new)
        self.http.check(new.http)  # http: binds a changed address
        d = new.daemon
        try:
            logs.setup(d.log_file, d.log_format, d.log_level)
        except OSError as e:
            raise ConfigError(f"daemon.log_file: {e}") from None
        return new

    def check_reloadable(self, new: Config) -> None:
        """What cannot change under a running daemon, and a spool we cannot write."""
        for key in ("pidfile", "spool", "user", "group"):
            if getattr(new.daemon, key) != getattr(self.config.daemon, key):
                raise ConfigError(f"daemon.{key}: cannot change on reload (restart msgd)")
        if len(set(self.queue_index) | set(new.queues)) > MAX_QUEUES:
            raise ConfigError(f"queues: more than {MAX_QUEUES} queue names since start (restart)")
        try:
            for name in new.queues:
                self.spool.ensure(name)
                probe = os.path.join(self.spool.dir(name, "tmp"), f".probe.{os.getpid()}")
                atomic_write(probe, b"")
                os.unlink(probe)
        except OSError as e:
            raise ConfigError(f"daemon.spool: not writable: {e}") from None

    def dump_stats(self) -> None:
        """USR1: one `stats` log event and a fresh stats file, both with the same generation."""
        self.stats_generation += 1
        self.log_stats(self.publish())
        self.state.record("stats", generation=self.stats_generation)

    def log_stats(self, snap: dict[str, Any]) -> None:
        self.log.info("stats", **{k: v for k, v in snap.items() if k != "histogram_bounds_s"})

    def burst(self) -> None:
        """USR2: deferred retries become due now and burst-mode queues run until drained."""
        for name in self.spool_queues():
            self.spool.release_due(name, force=True)
            names = {*self.spool.names(name, "new"), *self.spool.claimed(name)}
            self.burst_names.setdefault(name, set()).update(names)
            self.burst_waiting[name] = sorted(self.burst_names[name], reverse=True)
        for name, policy in self.redis_queues().items():
            from msgd import redisq

            try:
                self.burst_marks[name] = redisq.burst_mark(name, policy)
            except redisq.RedisQueueError as e:
                self.log.warning("burst", queue=name, outcome="not waited for", error=str(e))
        if not self.burst_counts:  # this host's outcomes so far, for the Redis queues' report
            self.burst_counts = self.queue_outcomes()
        self.pool.burst()
        size = sum(len(names) for names in self.burst_names.values())
        self.log.info("burst", outcome="started", pending=size)
        self.burst_upto = self.state.record("burst", pending=size)
        if self.burst_task is None or self.burst_task.done():
            self.burst_task = asyncio.create_task(self.finish_burst())

    async def finish_burst(self) -> None:
        """Wait until every message pending at the signal(s) has been worked, then report.

        A spool message counts as worked once it has left new/ and cur/: unlinked (succeeded),
        in defer/ (retried) or in failed/. A Redis queue is worked once its group has settled
        every entry up to the stream's newest at the signal; its outcomes are this host's
        counters. Bursts that overlap are reported together.
        """
        while any(self.burst_unfinished(q) for q in self.burst_names):
            await asyncio.sleep(BURST_POLL)
        while not await asyncio.to_thread(self.redis_bursts_worked):
            await asyncio.sleep(10 * BURST_POLL)
        ids = {q: {split_name(n)[0] for n in names} for q, names in self.burst_names.items()}
        outcome = {"succeeded": 0, "retried": 0, "failed": 0}
        for queue, queue_ids in ids.items():
            failed = len(queue_ids & set(self.spool.names(queue, "failed")))
            deferred = {split_deferred(n)[0] for n in self.spool.names(queue, "defer")}
            retried = len(queue_ids & deferred)
            outcome["succeeded"] += len(queue_ids) - failed - retried
            outcome["retried"] += retried
            outcome["failed"] += failed
        now = self.queue_outcomes()
        for queue in self.burst_marks:
            for key in outcome:
                outcome[key] += now[queue][key] - self.burst_counts.get(queue, {}).get(key, 0)
        self.burst_names.clear()
        self.burst_waiting.clear()
        self.burst_marks.clear()
        self.burst_counts = {}
        self.bursts.finished.value = self.burst_upto
        self.log.info("burst", outcome="done", **outcome)
        self.state.record("burst_done", generation=self.burst_upto, **outcome)

    def redis_bursts_worked(self) -> bool:
        """In a thread: a Redis that is slow or down must not stall the master's loop."""
        from msgd import redisq

        queues = self.redis_queues()
        return all(
            redisq.worked_up_to(q, queues[q], mark)
            for q, mark in self.burst_marks.items()
            if q in queues
        )

    def queue_outcomes(self) -> dict[str, dict[str, int]]:
        snap = self.current_snapshot()["queues"]
        return {q: {k: snap[q][k] for k in ("succeeded", "retried", "failed")} for q in snap}

    def burst_unfinished(self, queue: str) -> bool:
        """Whether any of the burst's messages of `queue` is still in new/ or cur/.

        Workers claim oldest first, so it is enough to look at the oldest name still waiting (one
        stat per poll, not a listing of a directory that may hold thousands) until new/ has none
        of them left; then at the few files in cur/.
        """
        waiting = self.burst_waiting[queue]
        new = self.spool.dir(queue, "new")
        while waiting and not os.path.exists(os.path.join(new, waiting[-1])):
            waiting.pop()
        if waiting:
            return True
        names = self.burst_names[queue]
        return any(n in names for n in self.spool.claimed(queue))

    def scale(self, delta: int) -> None:
        size = self.pool.scale(delta)
        self.log.info("scale", outcome="ok", workers=size, change=delta)
        self.state.record("scale", workers=size)

    # -- keeping time ----------------------------------------------------------------------------

    async def keep_time(self) -> None:
        """Timeouts and due retries every tick; stats file every second; systemd's clocks."""
        next_second = next_status = next_watchdog = next_log = time.monotonic()
        while True:
            await asyncio.sleep(TICK)
            if self.draining:
                continue
            with self.duty("timeouts and retries"):
                self.pool.check_timeouts()
                for name in self.spool_queues():
                    self.spool.release_due(name)
            now = time.monotonic()
            if now >= next_second:
                next_second = now + 1.0
                with self.duty("stats file"):
                    snap = self.publish()
                    title = f"msgd: master -c {self.config.path} {summary(snap)}"
                    setproctitle.setproctitle(title)
                    interval = self.config.daemon.stats_log_interval
                    if interval and now >= next_log:
                        next_log = now + interval
                        self.log_stats(snap)
            if now >= next_status:
                next_status = now + STATUS_EVERY
                with self.duty("status"):
                    self.notify.status(self.summary())
            if self.notify.watchdog_interval and now >= next_watchdog and self.healthy():
                next_watchdog = now + self.notify.watchdog_interval
                self.notify.watchdog()

    @contextlib.contextmanager
    def duty(self, what: str) -> Iterator[None]:
        """One of keep_time's duties: an error (a full /run, a spool gone read-only) is logged
        once, while it lasts, and never ends the task; timeouts and retries must keep running."""
        try:
            yield
        except Exception as e:
            if self.duty_errors.get(what) != str(e):
                self.duty_errors[what] = str(e)
                self.log.exception("periodic duty failed", duty=what)
        else:
            if self.duty_errors.pop(what, None) is not None:
                self.log.info("periodic duty recovered", duty=what)

    def healthy(self) -> bool:
        """Watchdog pings only while the pool has the workers it should (or is getting them)."""
        return bool(self.pool.workers) or self.pool.size == 0

    # -- reporting -------------------------------------------------------------------------------

    def current_snapshot(self) -> dict[str, Any]:
        spool_queues = self.spool_queues()
        return snapshot(
            slots=self.counters.read(),
            queue_index=self.queue_index,
            workers=[(h.slot, h.pid, self.in_flight(h.slot)) for h in self.pool.live()],
            depths={**{q: self.spool.depths(q) for q in spool_queues}, **self.redis_depths()},
            rates=self.rates,
            info={
                "generation": self.stats_generation,
                "time": time.time(),
                "pid": os.getpid(),
                "uptime": round(time.time() - self.started, 3),
                "config": self.config.path,
                "reloads": self.reloads,
                "workers_target": self.pool.size,
                "draining": self.draining,
            },
        )

    def publish(self) -> dict[str, Any]:
        """Rewrite the stats file (atomically) and return what was written."""
        snap = self.current_snapshot()
        atomic_write(self.config.daemon.stats_file, json.dumps(snap).encode(), 0o644)
        return snap

    def summary(self) -> str:
        return summary(self.current_snapshot())

    def processed(self) -> int:
        return self.current_snapshot()["processed"]

    def in_flight(self, slot: int) -> list[str]:
        names = []
        for queue in self.spool_queues():
            names += self.spool.names(queue, f"cur/{slot}")
        return names

    def redis_depths(self) -> dict[str, dict[str, int]]:
        """Read from a cache a thread refreshes: a Redis that is down never stalls this loop."""
        queues = self.redis_queues()
        if not queues:
            return {}
        if self.depth_watcher is None:
            from msgd.redisq import DepthWatcher  # redis-py only in a master that needs it

            self.depth_watcher = DepthWatcher()
        return self.depth_watcher.depths(queues)

    def redis_queues(self) -> dict[str, QueueConfig]:
        return {n: q for n, q in self.config.queues.items() if q.backend == "redis"}

    def spool_queues(self) -> list[str]:
        return [n for n, q in self.config.queues.items() if q.backend == "spool"]

    def index_queues(self, config: Config) -> None:
        for name in config.queues:
            self.queue_index.setdefault(name, len(self.queue_index))
