"""A disk that keeps only what was flushed: the rig for the power-loss tests.

Filesystem developers test crash consistency with a block device that forgets every write the
filesystem did not flush (dm-flakey, dm-log-writes). Device-mapper is not in every kernel, so this
builds one from parts that are: a FUSE file server exposing one file, `disk`, that backs a loop
device with ext4 on it.

    ext4 (mounted at <work>/fs) → /dev/loopN (--direct-io=on) → <work>/fuse/disk → this server

The server keeps written blocks in a volatile cache; an fsync on the file (which is what the loop
device does for a flush, and for a FUA write, which the block layer turns into write + flush)
writes the cache to the durable image, a plain file on the host. Writing `cut` to
<work>/fuse/ctl cuts the power: from then on nothing reaches the durable image, while the running
kernel still reads back what it wrote, so it carries on undisturbed until it is unmounted. What
the disk holds after the cut is the durable image; `mounted` mounts it (or any image) to look.

The server also records every write before the cut, with a mark at each flush, in a journal:
`flush_points` replays it onto the fresh filesystem and yields the disk as it was at each flush,
so a test can cut the power after every flush of a run, not only at one instant.

Run as a script (`powercut.py serve IMAGE JOURNAL MOUNTPOINT`), it is the server; imported, it
gives the tests `PowerCutDisk`, `mounted`, `flush_points` and `unavailable`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import wait_for

BLOCK = 4096
RECORD = struct.Struct("<cqI")  # kind (W write, F flush), offset or time in ns, data length
CTL_SIZE = 4096

# -- the server ----------------------------------------------------------------------------------


class Disk:
    """The disk's contents: flushed blocks in the durable image, written ones in a cache."""

    def __init__(self, image: str, journal: str) -> None:
        self.fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        self.size = os.fstat(self.fd).st_size
        self.journal = open(journal, "wb")  # noqa: SIM115 (closed by close())
        self.cache: dict[int, bytes] = {}
        self.lock = threading.Lock()
        self.cut_ns = 0
        self.writes = self.flushes = 0

    def _block(self, n: int) -> bytes:
        cached = self.cache.get(n)
        return cached if cached is not None else os.pread(self.fd, BLOCK, n * BLOCK)

    def read(self, offset: int, size: int) -> bytes:
        size = max(0, min(size, self.size - offset))
        if not size:
            return b""
        first, last = offset // BLOCK, (offset + size - 1) // BLOCK
        with self.lock:
            data = b"".join(self._block(n) for n in range(first, last + 1))
        skip = offset - first * BLOCK
        return data[skip : skip + size]

    def write(self, offset: int, data: bytes) -> int:
        """Into the cache, block by block (a partial block is merged with what it covers)."""
        if offset + len(data) > self.size:
            raise OSError(errno.ENOSPC, "write past the end of the disk")
        with self.lock:
            self.writes += 1
            if not self.cut_ns:
                self.journal.write(RECORD.pack(b"W", offset, len(data)) + data)
            pos = 0
            while pos < len(data):
                n, skip = divmod(offset + pos, BLOCK)
                take = min(BLOCK - skip, len(data) - pos)
                block = bytearray(self._block(n)) if take < BLOCK else bytearray(BLOCK)
                block[skip : skip + take] = data[pos : pos + take]
                self.cache[n] = bytes(block)
                pos += take
        return len(data)

    def flush(self) -> None:
        """Make every cached block durable, unless the power is cut (then nothing ever is)."""
        with self.lock:
            self.flushes += 1
            if self.cut_ns:
                return
            for n, block in sorted(self.cache.items()):
                os.pwrite(self.fd, block, n * BLOCK)
            self.cache.clear()
            self.journal.write(RECORD.pack(b"F", time.monotonic_ns(), 0))

    def cut(self) -> None:
        with self.lock:
            if not self.cut_ns:
                self.cut_ns = time.monotonic_ns()
                self.journal.flush()

    def status(self) -> bytes:
        with self.lock:
            state = {"writes": self.writes, "flushes": self.flushes, "cut_ns": self.cut_ns}
        return json.dumps(state).encode().ljust(CTL_SIZE)

    def close(self) -> None:
        self.journal.close()
        os.close(self.fd)


def serve(image: str, journal: str, mountpoint: str) -> None:
    """Serve `disk` (the image, through the cache) and `ctl` at `mountpoint` until unmounted."""
    from fuse import FUSE, FuseOSError, Operations  # type: ignore[import-untyped]

    disk = Disk(image, journal)
    files = {"/disk": disk.size, "/ctl": CTL_SIZE}

    class Server(Operations):
        def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
            if path == "/":
                return {"st_mode": stat.S_IFDIR | 0o700, "st_nlink": 2}
            if path not in files:
                raise FuseOSError(errno.ENOENT)
            return {"st_mode": stat.S_IFREG | 0o600, "st_nlink": 1, "st_size": files[path]}

        def readdir(self, path: str, fh: Any) -> list[str]:
            return [".", "..", "disk", "ctl"]

        def read(self, path: str, size: int, offset: int, fh: Any) -> bytes:
            if path == "/ctl":
                return disk.status()[offset : offset + size]
            return disk.read(offset, size)

        def write(self, path: str, data: bytes, offset: int, fh: Any) -> int:
            if path == "/disk":
                return disk.write(offset, data)
            if data.strip() != b"cut":
                raise FuseOSError(errno.EINVAL)
            disk.cut()
            return len(data)

        def fsync(self, path: str, datasync: int, fh: Any) -> int:
            disk.flush()
            return 0

        def truncate(self, path: str, length: int, fh: Any = None) -> None:
            raise FuseOSError(errno.EPERM)

    try:
        # direct_io: no page cache in front of the server, so every read and write reaches it.
        FUSE(Server(), mountpoint, foreground=True, direct_io=True)
    finally:
        disk.close()


# -- the rig, for the tests ----------------------------------------------------------------------


def unavailable() -> str | None:
    """Why this machine cannot run the rig, or None."""
    if os.geteuid() != 0:
        return "needs root (loop devices, mounts)"
    for dev in ("/dev/fuse", "/dev/loop-control"):
        if not os.path.exists(dev):
            return f"needs {dev}"
    for program in ("losetup", "mkfs.ext4", "mount", "umount"):
        if shutil.which(program) is None:
            return f"needs {program}"
    try:
        import fuse  # noqa: F401
    except (ImportError, OSError) as e:  # OSError: fusepy found no libfuse
        return f"needs fusepy and libfuse2: {e}"
    if "ext4" not in Path("/proc/filesystems").read_text().split():
        return "needs ext4 in the kernel"
    return None


def run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout.strip()


def make_fs(image: Path, size_mb: int) -> None:
    """A fresh ext4 image: 4 KiB blocks, everything initialised now (no lazy init writing later)."""
    with open(image, "wb") as f:
        f.truncate(size_mb << 20)
    options = "nodiscard,lazy_itable_init=0,lazy_journal_init=0"
    run("mkfs.ext4", "-q", "-F", "-b", str(BLOCK), "-E", options, str(image))


@contextlib.contextmanager
def attached(path: Path, *options: str) -> Iterator[str]:
    """A loop device on `path`, detached afterwards."""
    dev = run("losetup", "--find", "--show", *options, str(path))
    try:
        yield dev
    finally:
        run("losetup", "--detach", dev)


@contextlib.contextmanager
def mounted_on(source: str, mountpoint: Path, *argv: str) -> Iterator[Path]:
    """`mount source mountpoint`, unmounted afterwards: retried while busy (a killed process
    lets go of its files only once its last thread has exited), lazily if it stays busy."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    run("mount", *argv, source, str(mountpoint))
    try:
        yield mountpoint
    finally:

        def unmounted() -> bool:
            umount = subprocess.run(["umount", str(mountpoint)], capture_output=True, check=False)
            return umount.returncode == 0

        try:
            wait_for(unmounted, 10, f"{mountpoint} to be unmounted", interval=0.05)
        except AssertionError:
            run("umount", "--lazy", str(mountpoint))
            raise


@contextlib.contextmanager
def mounted(image: Path, mountpoint: Path) -> Iterator[Path]:
    """An ext4 image mounted read-write (mounting replays its journal, as after a reboot)."""
    with attached(image) as dev, mounted_on(dev, mountpoint, "-t", "ext4") as path:
        yield path


@contextlib.contextmanager
def fuse_server(image: Path, journal: Path, mountpoint: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The server in its own process, serving until unmounted (then killed if it lingers)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    log = open(mountpoint.with_suffix(".log"), "wb")  # noqa: SIM115
    argv = [sys.executable, __file__, "serve", str(image), str(journal), str(mountpoint)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    log.close()

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"the FUSE server exited: {mountpoint.with_suffix('.log')}")
        return (mountpoint / "disk").exists()

    try:
        wait_for(up, 10, "the FUSE server to serve")
        yield proc
    finally:
        subprocess.run(["umount", str(mountpoint)], capture_output=True, check=False)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # still held (by a mount namespace made meanwhile)
            proc.kill()
            proc.wait()
            subprocess.run(["umount", "--lazy", str(mountpoint)], capture_output=True, check=False)


@dataclass
class PowerCutDisk:
    """ext4 on the cache-keeping disk, mounted at `work/fs`. Use as a context manager: leaving
    it unmounts and detaches everything, cut or not; then `durable` holds what survived."""

    work: Path
    size_mb: int = 64

    def __post_init__(self) -> None:
        self.base = self.work / "base.img"  # the fresh filesystem, where replays start
        self.durable = self.work / "durable.img"  # what the disk holds (after the cut too)
        self.journal = self.work / "journal"  # every write and flush, for flush_points
        self.fs = self.work / "fs"
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> PowerCutDisk:
        self.work.mkdir(parents=True, exist_ok=True)
        make_fs(self.base, self.size_mb)
        shutil.copyfile(self.base, self.durable)
        with self._stack as stack:
            stack.enter_context(fuse_server(self.durable, self.journal, self.work / "fuse"))
            dev = stack.enter_context(attached(self.work / "fuse/disk", "--direct-io=on"))
            if Path(f"/sys/block/{Path(dev).name}/loop/dio").read_text().strip() != "1":
                raise RuntimeError(f"{dev}: direct I/O was refused")
            stack.enter_context(mounted_on(dev, self.fs, "-t", "ext4"))
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Unmount the filesystem, detach the loop device, stop the server (again: no-op)."""
        self._stack.close()

    def cut(self) -> int:
        """Cut the power now; returns the instant (CLOCK_MONOTONIC ns) after which nothing that
        was written reached the disk."""
        fd = os.open(self.work / "fuse/ctl", os.O_WRONLY)  # no O_TRUNC: the server refuses it
        try:
            os.write(fd, b"cut")
        finally:
            os.close(fd)
        return int(self.status()["cut_ns"])

    def status(self) -> dict[str, int]:
        """Writes and flushes the server has seen, and the instant of the cut (0: not cut)."""
        result: dict[str, int] = json.loads((self.work / "fuse/ctl").read_bytes())
        return result


def flush_points(base: Path, journal: Path) -> Iterator[tuple[int, bytearray]]:
    """The disk at each flush that followed a write, as (instant of the flush in CLOCK_MONOTONIC
    ns, image). Of flushes with no write between them the last is taken: same disk, later time.
    The image is changed in place for the next point: use it before asking for the next."""
    image = bytearray(base.read_bytes())
    point, wrote = None, False
    with open(journal, "rb") as f:
        while header := f.read(RECORD.size):
            kind, value, length = RECORD.unpack(header)
            if kind == b"W":
                if point is not None:
                    yield point, image
                    point = None
                image[value : value + length] = f.read(length)
                wrote = True
            elif wrote or point is not None:
                point, wrote = value, False
    if point is not None:
        yield point, image


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "serve":
        sys.exit("usage: powercut.py serve IMAGE JOURNAL MOUNTPOINT")
    serve(*sys.argv[2:])
