"""A throw-away systemd machine for tests: this machine's own OS, booted by systemd-nspawn.

The container's root is an overlay whose lower dir is `/`, so it runs the systemd, Python and
tools installed here, and every write lands in a tmpfs. Both mounts are made inside `unshare -m`:
they exist only in that private mount namespace and vanish with its last process, even when the
test run is killed. nspawn runs with --register=no --keep-unit (no machined, no D-Bus, no host
systemd needed: this machine's PID 1 need not be systemd) and SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1
(a clean cgroup2 tree, whatever the host mounted). The services this machine enables for itself
(a Redis server on the host's port, a message broker, ...) would start in the container too, so
they are masked on the container's command line. Commands run inside with
`nsenter -t <container's PID 1> -a`: all its namespaces, its root, a clean environment.

nspawn reports through the notify socket its caller gives it: the container's PID 1
(X_NSPAWN_LEADER_PID=), then READY=1 once systemd in the container finished booting
(--notify-ready=yes). The boot is awaited on that socket, waking only to notice nspawn dying.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from msgd.sysutil import set_parent_death_signal

BOOT_TIMEOUT = 60.0  # seconds: a boot takes about 0.5 s here; a machine this slow is broken
STOP_TIMEOUT = 20.0
# What a root shell in the container sees (this process's own environment stays outside).
ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}
UNIT_DIRS = tuple(
    Path(d) for d in ("/etc/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system")
)
SYSTEMD = (Path("/usr/lib/systemd/systemd"), Path("/lib/systemd/systemd"))
TOOLS = ("systemd-nspawn", "unshare", "nsenter", "mount")

# Runs in the private mount namespace: $1 the tmpfs mount point, $2 a new machine id, then
# systemd-nspawn's arguments. nspawn keeps a lock and a mount propagation directory in
# /run/systemd/nspawn: a tmpfs there keeps them off the host too.
BOOT_SCRIPT = """
set -e
mount --make-rprivate /
mount -t tmpfs -o mode=0700 msgd-test "$1"
mkdir "$1/upper" "$1/work" "$1/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$1/upper,workdir=$1/work" "$1/root"
printf '%s\\n' "$2" > "$1/root/etc/machine-id"
mkdir -p /run/systemd/nspawn
mount -t tmpfs -o mode=0700 tmpfs /run/systemd/nspawn
root=$1/root
shift 2
exec systemd-nspawn --directory="$root" "$@"
"""


def unavailable() -> str | None:
    """Why this machine cannot boot a test container, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (mounts, systemd-nspawn)"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} not installed (systemd-nspawn: Debian's systemd-container)"
    if not any(p.exists() for p in SYSTEMD):
        return "systemd is not installed on this machine: nothing to boot"
    built_in = "overlay" in Path("/proc/filesystems").read_text().split()
    module = any(Path("/lib/modules", os.uname().release).glob("kernel/fs/overlayfs/overlay.ko*"))
    if not (built_in or module):  # a module is loaded by the first overlay mount
        return "this kernel has no overlayfs (not in /proc/filesystems, no module)"
    return None


def host_services() -> list[str]:
    """Units this machine's own configuration starts at boot, to be masked in the container.

    What the administrator or a package enabled (links in /etc/systemd/system/*.wants and
    *.requires), and SysV init scripts started in runlevels 2-5 that have no native unit
    (systemd runs those through its sysv generator).
    """
    etc = Path("/etc/systemd/system")
    enabled = {p.name for p in [*etc.glob("*.wants/*"), *etc.glob("*.requires/*")]}
    native = {p.name for d in UNIT_DIRS for p in d.glob("*.service")}
    sysv = set()
    for link in Path("/etc").glob("rc[2-5].d/S*"):
        found = re.fullmatch(r"S\d\d(.+)", link.name)
        if found and f"{found.group(1)}.service" not in native:
            sysv.add(f"{found.group(1)}.service")
    return sorted(enabled | sysv)


class Machine:
    """A booted container: run commands in it, read its console, stop it."""

    def __init__(self, nspawn: subprocess.Popen[bytes], leader: int, console: Path) -> None:
        self.nspawn = nspawn
        self.leader = leader
        self.console = console

    def run(
        self, *argv: str, input: str | None = None, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` as root in the container; with `check`, fail on a non-zero exit."""
        result = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", "--", *argv],
            input=input,
            capture_output=True,
            text=True,
            env=ENV,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"in the container, {' '.join(argv)!r} exited {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result

    def sh(
        self, script: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-ec", script, input=input, check=check)

    def stop(self) -> None:
        """Power the container off (SIGTERM to nspawn halts it); SIGKILL if it hangs."""
        if self.nspawn.poll() is None:
            self.nspawn.send_signal(signal.SIGTERM)
            try:
                self.nspawn.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait()


def nspawn_args(binds: Sequence[tuple[Path, str]]) -> list[str]:
    """systemd-nspawn's options (after --directory) and the container's systemd's own."""
    return [
        f"--machine=msgd-test-{os.getpid()}",
        "--register=no",
        "--keep-unit",
        "--link-journal=no",
        "--console=pipe",
        "--notify-ready=yes",
        "--quiet",
        *(f"--bind-ro={host}:{inside}" for host, inside in binds),
        "--boot",
        "--",
        *(f"systemd.mask={unit}" for unit in host_services()),
    ]


def boot(workdir: Path, binds: Sequence[tuple[Path, str]] = ()) -> Machine:
    """Boot a container under `workdir` with `binds` (host path, container path) read-only."""
    mountpoint = workdir / "machine"
    mountpoint.mkdir()
    console = workdir / "console.log"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(workdir / "notify"))
    script = ["sh", "-c", BOOT_SCRIPT, "boot", str(mountpoint), uuid.uuid4().hex]
    env = {
        **os.environ,
        "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1",
        "NOTIFY_SOCKET": notify.getsockname(),
    }
    with notify, console.open("wb") as log:
        nspawn = subprocess.Popen(
            ["unshare", "--mount", "--", *script, *nspawn_args(binds)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            # A killed test run takes its container down with it (SIGTERM halts it).
            preexec_fn=lambda: set_parent_death_signal(signal.SIGTERM),
        )
        try:
            leader = _await_ready(notify, nspawn, console)
        except BaseException:
            Machine(nspawn, 0, console).stop()
            raise
    return Machine(nspawn, leader, console)


def _await_ready(notify: socket.socket, nspawn: subprocess.Popen[bytes], console: Path) -> int:
    """The container's PID 1, once nspawn says READY=1; fails if nspawn exits or hangs."""
    deadline = time.monotonic() + BOOT_TIMEOUT
    leader = None
    notify.settimeout(0.1)
    while True:
        try:
            fields = dict(
                line.partition("=")[::2] for line in notify.recv(4096).decode().splitlines()
            )
        except TimeoutError:
            fields = {}
        leader = int(fields.get("X_NSPAWN_LEADER_PID", leader or 0)) or None
        if fields.get("READY") == "1" and leader:
            return leader
        if nspawn.poll() is not None or time.monotonic() > deadline:
            what = f"exited {nspawn.returncode}" if nspawn.poll() is not None else "timed out"
            raise AssertionError(
                f"the test container did not boot (nspawn {what}):\n{console.read_text()[-3000:]}"
            )
