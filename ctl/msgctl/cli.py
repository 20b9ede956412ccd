"""msgctl: steer a running msgd and work its spool.

Exit codes: 0 ok, 1 failed / refused / timed out, 2 usage, 3 not running.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import msgspec
from msgd import handlers, schedule, stats
from msgd.backend import BackendError, open_store
from msgd.config import DEFAULT_QUEUE, Config, ConfigError, DaemonConfig, default_path
from msgd.config import load as load_config
from msgd.pidfile import state_path
from msgd.signals import SIGNAL_OF, Action
from msgd.spool import Spool
from msgd.sysutil import atomic_write

from msgctl.daemon import CtlError, Daemon, NotRunning

if TYPE_CHECKING:
    from msgd.when import SendOptions

SEND_BATCH = 1000  # messages made durable per flush by `msgctl send`


class Context:
    """What the command line and the config file say about where msgd lives."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.config_path = os.path.abspath(args.config or default_path())
        self._config: Config | None = None
        self.config_error: ConfigError | None = None
        try:
            self._config = load_config(self.config_path)
        except ConfigError as e:
            self.config_error = e
        daemon = self._config.daemon if self._config else _lenient_daemon(self.config_path)
        self.pidfile = args.pidfile or daemon.pidfile
        self.stats_file = daemon.stats_file
        self.grace_period = daemon.grace_period

    @property
    def config(self) -> Config:
        """The valid config; commands that need one fail here when the file is broken."""
        if self._config is None:
            raise CtlError(str(self.config_error))
        return self._config

    def daemon(self) -> Daemon:
        return Daemon(self.pidfile, state_path(self.pidfile), self.args.main_pid)


def _lenient_daemon(path: str) -> DaemonConfig:
    """Where the pidfile is, from a config file that does not validate (an edit in progress).

    A file that is not even TOML any more is scanned line by line for the keys msgctl needs.
    """
    base = os.path.dirname(path)
    try:
        with open(path, "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return DaemonConfig()
    try:
        raw = tomllib.loads(text).get("daemon", {})
    except tomllib.TOMLDecodeError:
        raw = {m[0]: m[1] for m in _SIMPLE_KEY.findall(text)}
    picked: dict[str, Any] = {
        k: os.path.join(base, raw[k])
        for k in ("pidfile", "stats_file")
        if isinstance(raw.get(k), str)
    }
    with contextlib.suppress(TypeError, ValueError):
        picked["grace_period"] = float(raw.get("grace_period", 30.0))
    return DaemonConfig(**picked)


_SIMPLE_KEY = re.compile(
    r'^\s*(pidfile|stats_file|grace_period)\s*=\s*"?([^"#\n]*?)"?\s*(?:#.*)?$', re.MULTILINE
)


# -- commands ---------------------------------------------------------------------------------


def cmd_status(ctx: Context) -> int:
    try:
        d = ctx.daemon()
    except NotRunning as e:
        print(e)
        return 3
    except CtlError as e:
        print(e)
        return 1
    state = d.state()
    snap = stats.read(ctx.stats_file)
    uptime = stats.duration(snap.uptime if snap else 0)
    print(
        f"msgd running: pid {d.pid}, up {uptime}, {len(snap.workers) if snap else 0} workers, "
        f"config {state.get('config', ctx.config_path)}"
    )
    for line in schedule.describe(snap.schedules if snap else {}, time.time()):
        print(line)
    return 0


def cmd_pid(ctx: Context) -> int:
    print(ctx.daemon().pid)
    return 0


def cmd_check(ctx: Context) -> int:
    handlers.check(ctx.config)
    print(f"config OK: {ctx.config_path}")
    return 0


def cmd_reload(ctx: Context) -> int:
    handlers.check(ctx.config)  # like `nginx -s reload`: never send a file we know is bad
    result = ctx.daemon().ask(signal.SIGHUP, "reload", ctx.args.timeout)
    if result.get("outcome") == "rejected":
        raise CtlError(f"reload rejected: {result.get('error')}")
    print(f"reloaded (config generation {result.get('config_generation')})")
    return 0


def cmd_stats(ctx: Context) -> int:
    d = ctx.daemon()
    d.ask(SIGNAL_OF[Action.STATS], "stats", ctx.args.timeout)
    snap = stats.read(ctx.stats_file)
    if snap is None:
        raise CtlError(f"cannot read the stats file {ctx.stats_file}")
    if ctx.args.prometheus:
        text = stats.prometheus(snap)
        if ctx.args.output:
            atomic_write(ctx.args.output, text.encode(), 0o644)
        else:
            print(text, end="")
    elif ctx.args.json:
        print(json.dumps(msgspec.to_builtins(snap), indent=1))
    else:
        print(stats.table(snap))
    return 0


def cmd_burst(ctx: Context) -> int:
    d = ctx.daemon()
    started = d.ask(SIGNAL_OF[Action.BURST], "burst", ctx.args.timeout)
    if not ctx.args.wait:
        print(f"burst started: {started.get('pending', 0)} pending")
        return 0
    timeout = ctx.args.timeout if ctx.args.timeout_given else float("inf")
    if sys.stdout.isatty():
        done = _with_progress(
            lambda: d.await_generation("burst_done", started["generation"], 0.5),
            lambda: getattr(stats.read(ctx.stats_file), "pending", 0),
            timeout,
        )
    else:
        done = d.await_generation("burst_done", started["generation"], timeout)
    print(
        f"burst done: {done['succeeded']} succeeded, {done['retried']} retried, "
        f"{done['failed']} failed"
    )
    return 0


def _with_progress(
    step: Callable[[], dict[str, Any]], pending: Callable[[], int], timeout: float
) -> dict[str, Any]:
    """On a terminal: count the pending messages down while waiting."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = step()
            print("\r\033[K", end="")
            return result
        except CtlError:
            if time.monotonic() > deadline:
                raise
            print(f"\r\033[K{pending()} pending", end="", flush=True)


def cmd_stop(ctx: Context) -> int:
    d = ctx.daemon()
    d.signal(signal.SIGQUIT if ctx.args.now else signal.SIGTERM)
    timeout = ctx.args.timeout if ctx.args.timeout_given else ctx.grace_period + 10
    if not d.exited(timeout):
        raise CtlError(f"msgd (pid {d.pid}) still running after {timeout:g}s")
    print(f"stopped (pid {d.pid})")
    return 0


def cmd_scale(ctx: Context) -> int:
    action = Action.SCALE_UP if ctx.args.direction == "up" else Action.SCALE_DOWN
    result = ctx.daemon().ask(SIGNAL_OF[action], "scale", ctx.args.timeout)
    print(f"workers: {result.get('workers')}")
    return 0


def cmd_send(ctx: Context) -> int:
    queue = ctx.args.queue
    if queue not in ctx.config.queues:
        raise CtlError(f"no queue {queue!r} in {ctx.config_path}")
    options = _send_options(ctx.args)
    store = open_store(queue, ctx.config.queues[queue], ctx.config.daemon)
    sources = ctx.args.files or ["-"]
    show = sys.stderr.isatty() and len(sources) > SEND_BATCH
    sent = 0
    for batch in _batches(sources, SEND_BATCH):
        for mid in store.send_many([_read_body(s) for s in batch], options):
            print(mid)
        sent += len(batch)
        if show:
            print(f"\r\033[K{sent}/{len(sources)} sent", end="", file=sys.stderr, flush=True)
    if show:
        print(file=sys.stderr)
    return 0


def _send_options(args: argparse.Namespace) -> SendOptions:
    """--delay/--at/--ttl/--priority as one SendOptions; a bad value is a usage error (exit 2)."""
    from msgd.when import send_options

    try:
        return send_options(delay=args.delay, at=args.at, ttl=args.ttl, priority=args.priority)
    except ValueError as e:
        raise CtlError(f"send --{e}", status=2) from None


def _batches(items: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _read_body(source: str) -> bytes:
    try:
        if source == "-":
            return sys.stdin.buffer.read()
        with open(source, "rb") as f:
            return f.read()
    except OSError as e:
        raise CtlError(f"{source}: {e.strerror}") from None


def cmd_queues(ctx: Context) -> int:
    """Every configured queue, and spool directories no queue names any more. A queue whose
    server cannot be reached is reported on its line, not as a failure of the command."""
    config = ctx.config
    names = sorted(set(config.queues) | set(Spool.from_config(config.daemon).queues()))
    print(f"{'QUEUE':<24} {'NEW':>8} {'CUR':>6} {'DEFER':>7} {'FAILED':>7} {'SCHEDULED':>9}")
    for name in names:
        policy = config.queues.get(name, DEFAULT_QUEUE)
        try:
            d = open_store(name, policy, config.daemon).depths()
        except BackendError as e:
            print(f"{name:<24} unavailable: {e}")
            continue
        line = f"{name:<24} {d.new:>8} {d.cur:>6} {d.defer:>7} {d.failed:>7} {d.scheduled:>9}"
        print(f"{line}  {d.detail}" if d.detail else line)
    return 0


def cmd_retry_failed(ctx: Context) -> int:
    queue = ctx.args.queue
    policy = ctx.config.queues.get(queue, DEFAULT_QUEUE)
    moved = open_store(queue, policy, ctx.config.daemon).retry_failed(ctx.args.ids or None)
    print(f"{len(moved)} message(s) back in {queue}")
    return 0


def cmd_top(ctx: Context) -> int:
    from msgctl.top import top

    return top(ctx.stats_file, ctx.args.frames)


# -- the command line -------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="msgctl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "-c", "--config", help="msgd's config file (default: $MSGD_CONFIG or /etc/msgd/msgd.toml)"
    )
    p.add_argument("--pidfile", help="use this pidfile instead of the config's")
    p.add_argument(
        "--main-pid",
        type=int,
        metavar="PID",
        help="the service manager's main pid for msgd ($MAINPID under systemd): stands in "
        "for msgd's name when /proc hides msgd from msgctl",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds to wait for msgd's acknowledgement (default 10)",
    )
    add_commands(p.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return p


def add_commands(sub: Any) -> None:
    """One subcommand per cmd_* function, with its own options."""

    def add(name: str, run: Callable[[Context], int], text: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.set_defaults(run=run)
        return cmd

    add("status", cmd_status, "is msgd running? (exit 0 yes, 1 dead with a pidfile, 3 no)")
    add("pid", cmd_pid, "print msgd's pid")
    add("check", cmd_check, "validate the config file (like msgd --check)")
    add("reload", cmd_reload, "validate, then HUP; exit 1 if msgd rejects the config")
    s = add("stats", cmd_stats, "USR1, then print the fresh stats")
    s.add_argument("--json", action="store_true", help="the snapshot as JSON")
    s.add_argument("--prometheus", action="store_true", help="Prometheus text format")
    s.add_argument("--output", help="with --prometheus: write this file atomically")
    b = add("burst", cmd_burst, "USR2: work everything pending now")
    b.add_argument("--wait", action="store_true", help="return when all of it is worked")
    s = add("stop", cmd_stop, "TERM (graceful) and wait for msgd to exit")
    s.add_argument("--now", action="store_true", help="QUIT: in-flight messages go back")
    s = add("scale", cmd_scale, "TTIN/TTOU: one worker more or fewer")
    s.add_argument("direction", choices=["up", "down"])
    s = add("send", cmd_send, "enqueue one message per FILE (or stdin); prints the ids")
    s.add_argument("-q", "--queue", default="default")
    when = s.add_mutually_exclusive_group()
    when.add_argument("--delay", type=float, metavar="SECONDS", help="not started before then")
    when.add_argument("--at", metavar="ISO8601", help="not started before then (local time)")
    s.add_argument(
        "--ttl", type=float, metavar="SECONDS", help="dead letter if not started by then"
    )
    s.add_argument("--priority", type=int, default=0, metavar="0-9", help="higher first")
    s.add_argument("files", nargs="*", metavar="FILE")
    add("queues", cmd_queues, "messages per queue and state (works without the daemon)")
    s = add("retry-failed", cmd_retry_failed, "give dead letters a fresh start")
    s.add_argument("queue")
    s.add_argument("ids", nargs="*", metavar="ID")
    s = add("top", cmd_top, "live view of the stats (q or Ctrl-C quits)")
    s.add_argument("-n", dest="frames", type=int, default=None, help="frames, then exit")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.timeout_given = args.timeout is not None
    if args.timeout is None:
        args.timeout = 10.0
    try:
        return args.run(Context(args))
    except (CtlError, ConfigError, BackendError) as e:
        print(f"msgctl: {e}", file=sys.stderr)
        return getattr(e, "status", 1)
    except KeyboardInterrupt:
        return 1
    except OSError as e:
        print(f"msgctl: {e.filename + ': ' if e.filename else ''}{e.strerror}", file=sys.stderr)
        return 1
