"""The configuration file: a typed schema, loading, and errors that name the key.

The schema is declared once with msgspec, which checks types, bounds and unknown keys; the few rules
a schema cannot say (paths, handler specs, queue names) live in `_check`. Every error message starts
with the dotted key it is about, so an operator editing the file knows where to look.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import re
import tomllib
from typing import Annotated, Literal, TypeVar

import msgspec

from msgd.backend import missing_library

DEFAULT_PATH = "/etc/msgd/msgd.toml"
QUEUE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
HANDLER_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
MAX_QUEUES = 32  # fixed by the shared counter layout (stats.py)
MAX_RUNNERS = 32  # handler threads per worker, summed over queues (stats.py)
MAX_RATE = 100_000  # rate_limit: its shared ring holds this many start times (ratelimit.py)

Seconds = Annotated[float, msgspec.Meta(ge=0)]
Positive = Annotated[float, msgspec.Meta(gt=0)]
T = TypeVar("T")


class ConfigError(Exception):
    """A config file that cannot be used; the message says which key and why."""


class _Table(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class DaemonConfig(_Table):
    pidfile: str = "/run/msgd/msgd.pid"
    spool: str = "/var/spool/msgd"
    workers: Annotated[int, msgspec.Meta(ge=0, le=256)] = 2
    grace_period: Seconds = 30.0
    import_timeout: Positive = 30.0
    log_file: str = ""
    log_format: Literal["console", "json"] = "console"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    stats_file: str = "/run/msgd/stats.json"
    stats_log_interval: Seconds = 0.0
    user: str = ""
    group: str = ""
    allow_root: bool = False
    fsync: bool = True
    pythonpath: list[str] = []
    max_message_size: Annotated[int, msgspec.Meta(ge=0)] = 16 * 1024 * 1024
    max_rss_mb: Annotated[int, msgspec.Meta(ge=0)] = 0
    worker_nice: Annotated[int, msgspec.Meta(ge=0, le=19)] = 5  # workers below the master
    file_mode: Annotated[int, msgspec.Meta(ge=0, le=0o777)] = 0o600
    dir_mode: Annotated[int, msgspec.Meta(ge=0, le=0o777)] = 0o700


class QueueConfig(_Table):
    handler: str = ""
    command: list[str] = []
    mode: Literal["continuous", "burst"] = "continuous"
    timeout: Positive = 30.0
    max_attempts: Annotated[int, msgspec.Meta(ge=1)] = 5
    backoff: list[Seconds] = msgspec.field(default_factory=lambda: [1.0, 5.0, 30.0, 300.0])
    threads: Annotated[int, msgspec.Meta(ge=1, le=MAX_RUNNERS)] = 1
    backend: Literal["spool", "redis", "amqp"] = "spool"
    url: str = ""  # redis: default redis://127.0.0.1:6379/0; amqp: required
    stream: str = ""  # redis: default msgd:<queue>
    group: str = "msgd"  # redis
    consumer: str = ""  # redis: default <host>:<master pid>; ":<worker slot>" is appended
    claim_idle: Positive = 60.0  # redis
    amqp_queue: str = ""  # amqp: default msgd.<queue>
    prefetch: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0  # amqp: 0 = the queue's threads
    schedule: str = ""  # burst mode: cron (local time) or "@every 30s" (schedule.py)
    rate_limit: Annotated[int, msgspec.Meta(ge=0, le=MAX_RATE)] = 0  # starts/s; 0 = none

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt `attempt + 1` (the last backoff value repeats)."""
        if not self.backoff:
            return 0.0
        return self.backoff[min(attempt, len(self.backoff)) - 1]


class HttpConfig(_Table):
    """The optional HTTP and WebSocket listener (msgd.http); `listen = ""` is none."""

    listen: str = ""  # "host:port"; port 0 picks a free one (the state file says which)
    token_file: str = ""  # a file holding the bearer token that sending and actions need
    hosts: list[str] = []  # names clients may use in Host besides loopback (a proxy's name)


DEFAULT_QUEUE = QueueConfig(handler="-")
BACKEND_KEYS = {  # the keys one backend reads and the others would silently ignore
    "url": ("redis", "amqp"),
    "stream": ("redis",),
    "group": ("redis",),
    "consumer": ("redis",),
    "claim_idle": ("redis",),
    "amqp_queue": ("amqp",),
    "prefetch": ("amqp",),
}


class Config(msgspec.Struct, kw_only=True):
    path: str
    daemon: DaemonConfig
    queues: dict[str, QueueConfig]
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)


def default_path() -> str:
    return os.environ.get("MSGD_CONFIG") or DEFAULT_PATH


def load(path: str | os.PathLike[str]) -> Config:
    """Read, validate and resolve a config file; raise ConfigError naming the key at fault."""
    path = os.path.abspath(path)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: TOML syntax error: {e}") from None
    unknown = set(raw) - {"daemon", "queues", "http"}
    if unknown:
        raise ConfigError(
            f"{sorted(unknown)[0]}: unknown table (expected [daemon], [http] or [queues.NAME])"
        )
    daemon = _convert(raw.get("daemon", {}), DaemonConfig, "daemon")
    tables = raw.get("queues", {})
    if not isinstance(tables, dict) or not tables:
        raise ConfigError("queues: define at least one [queues.NAME] table")
    queues = {
        name: _convert(table, QueueConfig, f"queues.{name}") for name, table in tables.items()
    }
    http = _convert(raw.get("http", {}), HttpConfig, "http")
    base = os.path.dirname(path)
    if http.token_file:
        http = msgspec.structs.replace(http, token_file=os.path.join(base, http.token_file))
    config = Config(path=path, daemon=_resolve(daemon, base), queues=queues, http=http)
    _check(config)
    _check_http(config.http)
    return config


def _convert(table: object, kind: type[T], where: str) -> T:
    try:
        return msgspec.convert(table, kind)
    except msgspec.ValidationError as e:
        message, _, at = str(e).rpartition(" - at `$")
        key = where + at.rstrip("`") if message else where
        raise ConfigError(f"{key}: {message or e}") from None


def _resolve(daemon: DaemonConfig, base: str) -> DaemonConfig:
    """Relative paths are relative to the config file, so a copied examples/ is self-contained."""

    def absolute(p: str) -> str:
        return os.path.normpath(os.path.join(base, p)) if p else p

    return msgspec.structs.replace(
        daemon,
        pidfile=absolute(daemon.pidfile),
        spool=absolute(daemon.spool),
        log_file=absolute(daemon.log_file),
        stats_file=absolute(daemon.stats_file),
        pythonpath=[absolute(p) for p in daemon.pythonpath],
    )


def _check(config: Config) -> None:
    d = config.daemon
    for key in ("pidfile", "spool", "stats_file"):
        if not getattr(d, key):
            raise ConfigError(f"daemon.{key}: must not be empty")
    if len(config.queues) > MAX_QUEUES:
        raise ConfigError(f"queues: at most {MAX_QUEUES} queues")
    if sum(q.threads for q in config.queues.values()) > MAX_RUNNERS:
        raise ConfigError(f"queues: the threads of all queues add up to more than {MAX_RUNNERS}")
    for name, q in config.queues.items():
        where = f"queues.{name}"
        if not valid_queue_name(name):
            raise ConfigError(f"{where}: bad queue name (letters, digits, _ . -, no leading dot)")
        if bool(q.handler) == bool(q.command):
            raise ConfigError(f"{where}: set exactly one of handler or command")
        if q.handler and not HANDLER_SPEC.fullmatch(q.handler):
            raise ConfigError(f"{where}.handler: expected 'package.module:function'")
        if q.command and not os.path.isabs(q.command[0]) and "/" in q.command[0]:
            raise ConfigError(f"{where}.command: a program path must be absolute or a bare name")
        _check_backend(where, q)
        _check_schedule(where, q)


def _check_backend(where: str, q: QueueConfig) -> None:
    """Only the backend's own keys are set, they make sense, and its library is installed."""
    for key, backends in BACKEND_KEYS.items():
        if q.backend not in backends and getattr(q, key) != getattr(DEFAULT_QUEUE, key):
            raise ConfigError(f"{where}.{key}: only for backend = {' or '.join(backends)}")
    if q.backend == "amqp" and not q.url:
        raise ConfigError(f'{where}.url: required for backend = "amqp" (amqp://user:pass@host/)')
    if q.backend == "redis" and q.claim_idle <= q.timeout:
        raise ConfigError(
            f"{where}.claim_idle: must be longer than timeout ({q.timeout:g} s), or another "
            "host takes over a message whose handler is still running"
        )
    missing = missing_library(q.backend)
    if missing:
        raise ConfigError(f"{where}.backend: {missing}")


def split_listen(listen: str) -> tuple[str, int]:
    """`host:port` or `[v6 address]:port` -> (host, port); ValueError says what is wrong."""
    host, colon, port = listen.rpartition(":")
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError("expected 'host:port', e.g. '127.0.0.1:8470'")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine only (a literal loopback address, or localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_http(http: HttpConfig) -> None:
    """A listener past loopback must have a token; its library must be installed."""
    if not http.listen:
        return
    try:
        host, _ = split_listen(http.listen)
    except ValueError as e:
        raise ConfigError(f"http.listen: {e}") from None
    if not is_loopback(host) and not http.token_file:
        raise ConfigError(
            f"http.listen: {host} is not a loopback address: set http.token_file as well"
        )
    if importlib.util.find_spec("websockets") is None:
        raise ConfigError("http.listen: needs websockets: pip install 'msgd[http]'")


def check_reloadable(old: Config, new: Config, names_since_start: set[str]) -> None:
    """What cannot change under a running daemon (a restart can): raise ConfigError naming it."""
    for key in ("pidfile", "spool", "user", "group"):
        if getattr(new.daemon, key) != getattr(old.daemon, key):
            raise ConfigError(f"daemon.{key}: cannot change on reload (restart msgd)")
    if len(names_since_start | set(new.queues)) > MAX_QUEUES:
        raise ConfigError(f"queues: more than {MAX_QUEUES} queue names since start (restart)")


def _check_schedule(where: str, q: QueueConfig) -> None:
    """A schedule runs bursts: only for burst-mode queues, and only one that parses."""
    if not q.schedule:
        return
    if q.mode != "burst":
        raise ConfigError(
            f'{where}.schedule: only for mode = "burst" (a continuous queue always runs)'
        )
    if not q.schedule.strip().startswith("@") and importlib.util.find_spec("cronsim") is None:
        raise ConfigError(
            f"{where}.schedule: cron expressions need cronsim: pip install 'msgd[cron]'"
        )
    from msgd.schedule import Schedule, ScheduleError

    try:
        Schedule(q.schedule)
    except ScheduleError as e:
        raise ConfigError(f"{where}.schedule: {e}") from None


def valid_queue_name(name: str) -> bool:
    """Queue names become directory names: nothing that could step outside the spool."""
    return bool(QUEUE_NAME.fullmatch(name)) and not name.startswith(".")
