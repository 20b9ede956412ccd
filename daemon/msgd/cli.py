"""`msgd [-c PATH] [-D|--daemon] [--check] [--version]`: parse, validate, start."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import setproctitle

from msgd.nossl import import_asyncio_without_ssl

import_asyncio_without_ssl()  # before structlog (in msgd.logs) and msgd.master import asyncio

from msgd import __version__, handlers, logs  # noqa: E402
from msgd.config import Config, ConfigError, default_path  # noqa: E402
from msgd.config import load as load_config  # noqa: E402
from msgd.master import Master, StartError  # noqa: E402
from msgd.notify import Notifier  # noqa: E402
from msgd.pidfile import AlreadyRunning  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="msgd", description=__doc__)
    parser.add_argument(
        "-c", "--config", help=f"config file (default: $MSGD_CONFIG or {default_path()})"
    )
    parser.add_argument(
        "-D", "--daemon", action="store_true", help="detach; exit 0 once the daemon is ready"
    )
    parser.add_argument("--check", action="store_true", help="validate the config and exit")
    parser.add_argument("--version", action="version", version=f"msgd {__version__}")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config or default_path())
        handlers.check(config)
    except ConfigError as e:
        return fail(f"msgd: {e}")
    if args.check:
        print(f"config OK: {config.path}")
        return 0
    if args.daemon:
        return daemonize(config)
    return serve(config)


def serve(
    config: Config,
    on_ready: Callable[[], None] | None = None,
    report: Callable[[str], int] | None = None,
) -> int:
    """Run the master in this process until it stops; returns the exit status."""
    report = report or fail
    d = config.daemon
    try:
        logs.setup(d.log_file, d.log_format, d.log_level)
    except OSError as e:
        return report(f"msgd: daemon.log_file: {e}")
    setproctitle.setproctitle(f"msgd: master -c {config.path}")
    try:
        return Master(config, on_ready).run()
    except (AlreadyRunning, StartError) as e:
        return report(f"msgd: {e}")
    except OSError as e:
        return report(f"msgd: {e.filename or ''}: {e.strerror}")


def fail(message: str) -> int:
    """One line on stderr (and to systemd when it is listening); the exit status is 1."""
    print(message, file=sys.stderr)
    Notifier().failed(message)
    return 1


def daemonize(config: Config) -> int:
    """Detach with python-daemon; this process exits 0 only once the daemon says it is ready."""
    import daemon  # python-daemon: only needed here, so not imported by foreground starts

    read_end, write_end = os.pipe()
    if os.fork():
        os.close(write_end)
        word = os.read(read_end, 4096).decode(errors="replace")
        if word == "READY":
            return 0
        print(word or "msgd: the daemon exited during start-up", file=sys.stderr)
        return 1
    os.close(read_end)
    context = daemon.DaemonContext(
        detach_process=True,
        working_directory="/",
        umask=0o027,
        signal_map={},  # the master installs its own handlers; the default ignores TTIN/TTOU
        files_preserve=[write_end],
    )
    context.open()

    def ready() -> None:
        os.write(write_end, b"READY")

    def report(message: str) -> int:
        os.write(write_end, message.encode())
        return 1

    os._exit(serve(config, ready, report))
