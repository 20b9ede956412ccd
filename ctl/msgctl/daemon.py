"""Finding the running msgd, proving it is msgd, signalling it, and waiting for its answer.

A pid in a file proves nothing (pids are reused). msgctl signals only when three things agree:
the pidfile is locked, the lock's holder (per /proc/locks) is the pid the file names, and that
process calls itself msgd. It opens a pidfd before checking, and signals through it, so the
process checked is the process signalled.

Under systemd, msgctl may be unable to look at msgd at all: msgd.service's ExecReload= runs in
a user namespace of its own (PrivateUsers=: one per process systemd starts), and /proc, mounted
with ProtectProc=invisible, hides every process the reader could not ptrace, which across user
namespaces is all of them. Then, and only then, systemd's word stands in for the name: the unit
passes `--main-pid $MAINPID`, and a pid that holds the pidfile's lock, is the service's main
process, and cannot be seen in /proc is msgd.
"""

from __future__ import annotations

import os
import select
import signal
import time
from typing import Any

from msgd.pidfile import is_locked, read_pid
from msgd.sysutil import read_json

POLL = 0.005  # seconds between looks at the state file while waiting for an acknowledgement


class CtlError(Exception):
    """A failure msgctl reports as one line; `status` is the exit code."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class NotRunning(CtlError):
    def __init__(self, message: str) -> None:
        super().__init__(message, 3)


class Daemon:
    """A verified, running msgd: its pid, a pidfd on it, and its state file."""

    def __init__(self, pidfile: str, state_file: str, main_pid: int | None = None) -> None:
        self.pidfile = pidfile
        self.state_file = state_file
        pid = read_pid(pidfile)
        if pid is None:
            raise NotRunning(f"not running (no pidfile at {pidfile})")
        if not is_locked(pidfile):
            raise CtlError(
                f"not running: stale pidfile {pidfile} names pid {pid}, which does "
                f"not hold its lock",
                1,
            )
        try:
            self.pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise CtlError(f"not running: pid {pid} from {pidfile} is gone", 1) from None
        holder = lock_holder(pidfile)
        if holder is not None and holder != pid:
            raise CtlError(f"refusing: {pidfile} names pid {pid} but pid {holder} holds its lock")
        command = cmdline(pid)
        if not is_msgd(command) and not vouched_for(pid, holder, main_pid):
            raise CtlError(f"refusing to signal pid {pid}: it is not msgd ({command[:60]!r})")
        self.pid = pid

    def state(self) -> dict[str, Any]:
        return read_json(self.state_file) or {"generations": {}, "last": {}}

    def generation(self, action: str) -> int:
        return self.state()["generations"].get(action, 0)

    def signal(self, sig: int) -> None:
        signal.pidfd_send_signal(self.pidfd, sig)

    def ask(self, sig: int, action: str, timeout: float) -> dict[str, Any]:
        """Send `sig` and wait until the daemon's `action` generation moves; its last outcome."""
        before = self.generation(action)
        self.signal(sig)
        return self.await_generation(action, before + 1, timeout)

    def await_generation(self, action: str, at_least: int, timeout: float) -> dict[str, Any]:
        """The action's outcome once its generation reaches `at_least`; CtlError if the action
        failed in msgd (its reason), if msgd exited, or after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.state()
            if state["generations"].get(action, 0) >= at_least:
                last = state["last"].get(action, {})
                if last.get("outcome") == "error":
                    raise CtlError(f"{action} failed in msgd: {last.get('error')}")
                return {"generation": state["generations"][action], **last}
            if self.exited(0):
                raise CtlError(f"msgd (pid {self.pid}) exited before acknowledging {action}")
            if time.monotonic() > deadline:
                raise CtlError(f"timed out after {timeout:g}s waiting for msgd to {action}")
            time.sleep(POLL)

    def exited(self, timeout: float) -> bool:
        """Whether the process has ended (a pidfd turns readable when it does)."""
        ready, _, _ = select.select([self.pidfd], [], [], timeout)
        return bool(ready)


def lock_holder(path: str) -> int | None:
    """The pid holding a flock on `path`, from /proc/locks (None if it cannot be told)."""
    try:
        st = os.stat(path)
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == dev:
            return int(fields[4])
    return None


def is_msgd(command: str) -> bool:
    """msgd's master title, or a command line that runs msgd (before the title is set)."""
    words = command.split()
    return command.startswith("msgd: master") or any(
        os.path.basename(w) == "msgd" for w in words[:3]
    )


def vouched_for(pid: int, holder: int | None, main_pid: int | None) -> bool:
    """Whether the service manager names `pid`, which holds the pidfile's lock but is hidden
    from this process, as msgd's main process (a pid that can be seen must call itself msgd)."""
    return pid == main_pid == holder and not os.path.exists(f"/proc/{pid}")


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""
