"""sd_notify: tell systemd we are ready, reloading, stopping, alive. Silent without systemd.

The protocol is one datagram of KEY=VALUE lines to $NOTIFY_SOCKET (a path, or an abstract socket
when it starts with '@'): a few lines of socket code, no dependency.
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.sock: socket.socket | None = None
        if self.address:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and mine else 0.0

    def send(self, **fields: object) -> None:
        if self.sock is None:
            return
        # One line per field: a newline inside a value (an error message) would end it early.
        lines = (f"{k.upper()}={v}".replace("\n", " ") for k, v in fields.items())
        message = "\n".join(lines)
        try:  # never block the event loop on a busy service manager: a full queue drops this one
            self.sock.sendto(message.encode(), socket.MSG_DONTWAIT, self.address)
        except OSError:
            pass  # systemd gone or socket full: nothing useful to do about it

    def ready(self, status: str) -> None:
        self.send(ready=1, mainpid=os.getpid(), status=status)

    def reloading(self) -> None:
        self.send(reloading=1, monotonic_usec=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self) -> None:
        self.send(stopping=1)

    def status(self, status: str) -> None:
        self.send(status=status)

    def watchdog(self) -> None:
        self.send(watchdog=1)

    def extend_timeout(self, seconds: float) -> None:
        self.send(extend_timeout_usec=int(seconds * 1e6))

    def failed(self, reason: str, errno: int = 1) -> None:
        self.send(status=reason, errno=errno)
