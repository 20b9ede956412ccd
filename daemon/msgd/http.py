"""The master's side of the optional HTTP and WebSocket listener ([http]): socket, token, process.

The listener (web.py) runs in a process of its own, forked by the master, so serving pages and
feeding subscribers never costs the master's loop or a worker anything. The master binds the
socket itself, at start and while it checks a reload: a port that cannot be bound rejects the
reload and the old listener keeps serving. The listener process dies with the master (parent
death signal) and gets each reloaded config through a pipe; a changed address or token starts
a new process on the new socket and stops the old one.

Nothing here imports `websockets`: only the listener process does, and only when [http] is set.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import socket
from collections.abc import Callable
from typing import Any

import msgspec
import setproctitle
import structlog

from msgd.config import Config, ConfigError, HttpConfig, split_listen
from msgd.counters import QueueIndex
from msgd.events import NullWriter, Rings

_fork = multiprocessing.get_context("fork")
STOP_WAIT = 3.0  # seconds a stopping listener gets to close its connections before SIGKILL
CLOSE_WAIT = 1.0  # seconds a reload waits for the old listener to stop accepting
RESPAWN_DELAY = 1.0  # seconds before a listener that died unasked is started again


class Settings(msgspec.Struct):
    """What the listener process needs, sent again on every reload."""

    config: Config
    token: str
    queue_index: dict[str, int]


def read_token(path: str) -> str:
    """The bearer token: the file's content without surrounding whitespace. The file must not be
    readable by others, and must not be empty."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            if os.fstat(f.fileno()).st_mode & 0o004:
                raise ConfigError(f"http.token_file: {path} is readable by others (chmod o-r)")
            token = f.read(4096).decode(errors="strict").strip()
    except OSError as e:
        raise ConfigError(f"http.token_file: {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"http.token_file: {path} is not text") from None
    if not token:
        raise ConfigError(f"http.token_file: {path} is empty")
    return token


def bind(listen: str) -> socket.socket:
    """A listening TCP socket on `host:port`; ConfigError naming the address if it cannot be."""
    host, port = split_listen(listen)
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = info[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise ConfigError(f"http.listen: {listen}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise ConfigError(f"http.listen: cannot bind {listen}: {e.strerror}") from None
    return sock


def address(sock: socket.socket) -> str:
    """The bound address as `host:port` (port 0 in the config becomes the port chosen)."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class HttpListener:
    """The master's handle on the listener: check a config, apply it, stop.

    `close_in_workers` is the list of descriptors the pool closes in each new worker; the
    listening socket is kept in it so that workers never hold a port open.
    """

    def __init__(self, close_in_workers: list[int], child_fds: Callable[[], list[int]]) -> None:
        self.close_in_workers = close_in_workers
        self.child_fds = child_fds
        self.log = structlog.get_logger()
        self.rings: Rings | None = None
        self.sock: socket.socket | None = None
        self.listen = ""
        self.token = ""
        self.pending: tuple[socket.socket | None, str, str] | None = None
        self.settings: Settings | None = None
        self.process: Any = None
        self.conn: Any = None
        self.stopping = False

    # -- config ----------------------------------------------------------------------------------

    def check(self, http: HttpConfig) -> None:
        """Before a config is applied: read its token and bind its address if it changed.
        Raises ConfigError (the reload is rejected, the running listener untouched)."""
        self.discard_pending()
        token = read_token(http.token_file) if http.token_file else ""
        same = http.listen == self.listen
        sock = self.sock if same else (bind(http.listen) if http.listen else None)
        if sock is not None:  # a reload's new workers fork before apply(): they need both
            self.rings = self.rings or Rings()
            if sock is not self.sock:
                self.close_in_workers.append(sock.fileno())
        self.pending = (sock, http.listen, token)

    def discard_pending(self) -> None:
        if self.pending and self.pending[0] not in (None, self.sock):
            self.close_in_workers.remove(self.pending[0].fileno())
            self.pending[0].close()
        self.pending = None

    def apply(self, config: Config, index: QueueIndex) -> None:
        """Make the checked config current: a new listener for a new socket or token, else the
        running one is told the new config."""
        assert self.pending is not None, "check() first"
        sock, listen, token = self.pending
        self.pending = None
        self.settings = Settings(config, token, {name: index[name] for name in index})
        if sock is not self.sock or token != self.token:
            self.stop_process()
            self._swap_socket(sock)
            self.listen, self.token = listen, token
            if sock is not None:
                self.spawn()
        elif self.conn is not None:
            with contextlib.suppress(OSError):
                self.conn.send(self.settings)

    def _swap_socket(self, sock: socket.socket | None) -> None:
        if self.sock is not None and self.sock is not sock:
            self.close_in_workers.remove(self.sock.fileno())
            self.sock.close()
        self.sock = sock

    @property
    def address(self) -> str:
        return address(self.sock) if self.sock is not None else ""

    def writer(self, slot: int) -> NullWriter:
        """A worker's event writer: a real one only while a listener can read it (during a
        reload's trial, the checked config's listener)."""
        sock = self.pending[0] if self.pending else self.sock
        if self.rings is None or sock is None:
            return NullWriter()
        return self.rings.writer(slot)

    # -- the process -----------------------------------------------------------------------------

    def spawn(self) -> None:
        ours, theirs = _fork.Pipe()
        process = _fork.Process(target=self._child, args=(theirs,), name="http", daemon=False)
        process.start()
        theirs.close()
        self.process, self.conn = process, ours
        loop = _running_loop()
        if loop is not None:
            loop.add_reader(process.sentinel, self._on_exit, process, ours)
        self.log.info("http listening", address=self.address, pid=process.pid)

    def _child(self, conn: Any) -> None:
        setproctitle.setproctitle(f"msgd: http {self.address}")
        for fd in self.child_fds():
            with contextlib.suppress(OSError):
                os.close(fd)
        from msgd import web  # websockets is imported here, in the listener process only

        assert self.sock is not None and self.settings is not None and self.rings is not None
        web.run(self.sock, self.settings, conn, self.rings)

    def _on_exit(self, process: Any, conn: Any) -> None:
        loop = _running_loop()
        if loop is not None:
            loop.remove_reader(process.sentinel)
        process.join()
        conn.close()
        if process is not self.process:
            return  # an old listener, stopped on purpose
        self.process = self.conn = None
        if not self.stopping and loop is not None:
            self.log.warning("http listener exited", how=process.exitcode, restart_in=RESPAWN_DELAY)
            loop.call_later(RESPAWN_DELAY, self._respawn)

    def _respawn(self) -> None:
        if self.process is None and self.sock is not None and not self.stopping:
            self.spawn()

    def stop_process(self, wait: bool = False) -> None:
        """Stop the running listener. Wait until it no longer accepts connections (a new one
        may take over its socket: no client must land on the old one), or, with `wait`, until
        it has delivered its last events and exited."""
        process, conn = self.process, self.conn
        self.process = self.conn = None
        if process is None:
            return
        process.terminate()
        if not wait:
            with contextlib.suppress(EOFError, OSError):
                if conn.poll(CLOSE_WAIT):
                    conn.recv()
            return  # _on_exit reaps it
        process.join(STOP_WAIT)
        if process.is_alive():
            process.kill()
            process.join()

    def stop(self) -> None:
        """The daemon is exiting: the listener's last events go out before it ends."""
        self.stopping = True
        self.discard_pending()
        self.stop_process(wait=True)
        self._swap_socket(None)


def _running_loop() -> Any:
    import asyncio

    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
