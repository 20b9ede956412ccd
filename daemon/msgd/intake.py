"""The intake: a durable single send in one flush, by appending to a log the daemon empties.

A message file costs its producer two flushes (the new file, then new/), and flushing a newly
created file commits metadata (so does growing a file). So a single durable send writes one
framed record into its queue's intake log, a file made with zeros in advance, and flushes that
file once; the daemon's converter turns the record into a message file at once.

    <spool>/<queue>/intake/log        header, records, zeros (SIZE bytes when made)
                          /staged/    a record's file while it is written, before its rename

    header  b"msgdint2", durable, end, cursor (u64 LE), instance (24 bytes)
    record  b"MSGR", body length (u32 LE), name length (u8), name, body, crc32 of all before

A record carries the message's whole spool file name (spoolname.py: id, priority, expiry, a
delayed send's time), so every send option takes this path: the file is made under that name in
new/, or in defer/ for a delayed send.

Producing (`append`): take the log's flock, write the records at `end`, then the new `end`,
release the lock, fdatasync, return the ids. The flush is outside the lock, so concurrent
producers (any number of processes) share it instead of queueing for one each.

Converting (`convert`, the daemon's thread, woken by inotify on the producer's write): read the
records past `cursor` under a shared lock; write each to staged/<name>; write `cursor` past them
with this mount's `instance`; rename the files into new/ (or defer/). Nothing is flushed on that
path, so a message starts about as soon as it was written. A flusher thread makes it durable in
batches, ~FLUSH_AFTER later: syncfs, then `durable` := the cursor it flushed.

Recovery (`recover`, at the daemon's start) reads `instance`:
- the same boot and mount of the filesystem (a process crash: the page cache kept every write):
  `cursor` is trusted. The records past it are staged again (same name: written once however
  often replayed), and every staged file is renamed into place. Each record becomes exactly one
  message, and a message a worker finished is never made again.
- another (a power loss, or the filesystem mounted anew): what was not flushed may be gone or
  torn, including files in new/ past `durable` and a `cursor` that a producer's fdatasync wrote
  early. The records past `durable` are written again over the file of their id wherever it is
  (new/, defer/, failed/), or made anew in new/ if there is none: a message that had finished
  since the last batch flush may run again, the same at-least-once as for finishes a power loss
  undid. Then everything is flushed and the cursors moved.

A producer killed inside its write has not moved `end`: the next one writes over its record. A
record torn by a power loss (`end` reached the disk, the record did not) fails its checksum and is
skipped; the next record is found by its marker and checksum. Neither was acknowledged.

A log that fills up grows by SIZE more zeros (one metadata commit, for that send only). Once the
durable cursor is past ROTATE_BYTES the log is replaced by a fresh one holding what follows it
(records not yet converted or flushed move along with their cursors).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import select
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

from msgd.backend import BackendError
from msgd.sysutil import (
    IN_MODIFY,
    drain,
    fsync_dir,
    link_count,
    make_dirs,
    mount_instance,
    syncfs,
    watch_arrivals,
)

MAGIC = b"msgdint2"
HEADER = struct.Struct("<8sQQQ24s")  # magic, durable, end, cursor, instance
DURABLE_AT, END_AT, CURSOR_AT = 8, 16, 24
OFFSET = struct.Struct("<Q")
CONVERTED = struct.Struct("<Q24s")  # cursor and instance, written together
MARK = b"MSGR"
RECORD = struct.Struct("<4sIB")  # mark, body length, name length
CRC = struct.Struct("<I")
NAME = re.compile(rb"[0-9a-f]{24}(?:@[0-9a-z]+)*")  # spoolname.py's, for msgd's own ids
SIZE = 1 << 18  # a log is created this large, zeros after its header (256 KiB a queue)
ROTATE_BYTES = SIZE // 2  # replace a converted log once this much of it is used
LARGEST = SIZE // 4  # larger bodies are sent as files: written twice, they would cost more
FLUSH_AFTER = 0.05  # seconds between a conversion and the batch flush that makes it durable

Record = tuple[str, bytes]  # (spool file name, body)


# A flock belongs to the open file, which a forked child shares: a fork while this process holds
# a log's lock (released by closing it) would leave the lock held by the child (a worker) long
# after we let go, and every producer waiting. Forks wait while a lock is held here.
_no_fork = threading.Lock()
_converting = threading.Lock()  # one pass at a time in this process: two would move one file
_durable = threading.Lock()  # one make_durable at a time in this process (see there)
os.register_at_fork(
    before=_no_fork.acquire, after_in_parent=_no_fork.release, after_in_child=_no_fork.release
)


class IntakeError(BackendError):
    """A record that cannot be framed (a name that is not msgd's) or a log that is not one."""


def directory(queue_dir: str) -> str:
    return os.path.join(queue_dir, "intake")


def ensure(queue_dir: str, dir_mode: int, file_mode: int) -> None:
    """The intake's directories and log. The daemon makes them at its start, so they belong to
    its user even when the first message comes from another (root's) producer."""
    make_dirs(os.path.join(directory(queue_dir), "staged"), dir_mode)
    with _no_fork:
        fd = _open_locked(queue_dir, file_mode)
        try:
            _room(fd, queue_dir, 0)
        finally:
            os.close(fd)


# -- producing ------------------------------------------------------------------------------------


def frame(name: str, body: bytes) -> bytes:
    """One record: what `parse` reads back, checksummed."""
    key = name.encode()
    if len(key) > 255 or not NAME.fullmatch(key):
        raise IntakeError(f"not a msgd spool name: {name!r}")
    head = RECORD.pack(MARK, len(body), len(key)) + key + body
    return head + CRC.pack(zlib.crc32(head))


def append(queue_dir: str, records: Sequence[Record], file_mode: int) -> None:
    """Add `records` at the end of the queue's log; durable when this returns.

    The log is written with zeros when created, so a record overwrites blocks the file already
    has: its flush writes the record's block and the header's and commits no metadata.
    """
    data = b"".join(frame(name, body) for name, body in records)
    with _no_fork:
        fd = _open_locked(queue_dir, file_mode)
        try:
            end = _room(fd, queue_dir, len(data))
            _write_at(fd, data, end)  # a failed write leaves `end` where it was: overwritten
            _write_at(fd, OFFSET.pack(end + len(data)), END_AT)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(fd)
            raise
    try:  # outside both locks: concurrent producers, threads of one process too, share it
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _open_locked(queue_dir: str, file_mode: int) -> int:
    """The current log, exclusively locked. A log replaced while we waited for its lock is
    closed and the new one opened: nothing may be appended to a file nobody will read."""
    path = os.path.join(directory(queue_dir), "log")
    while True:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, file_mode)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if link_count(fd):
            return fd
        os.close(fd)


def _room(fd: int, queue_dir: str, length: int) -> int:
    """Under the lock: give a new log its header and zeros, add zeros to a log that has no room
    for `length` more bytes; returns the end."""
    size = _size(fd)
    if size < HEADER.size:  # new (or its creator died before the header)
        _write_at(fd, fresh_log(), 0)
        os.fdatasync(fd)
        fsync_dir(directory(queue_dir))  # the new file's name must survive too
        return HEADER.size
    end = read_header(fd, size).end
    if end + length > size:  # no daemon emptied it: grow it (this send's flush commits that)
        _write_at(fd, bytes(max(SIZE, length)), size)
    return end


def fresh_log() -> bytes:
    """A new log's content: its header (nothing converted, nothing written), then zeros."""
    start = HEADER.size
    return HEADER.pack(MAGIC, start, start, start, bytes(24)).ljust(SIZE, b"\0")


def _size(fd: int) -> int:
    """The file's size, by seeking to its end: os.fstat would read its timestamps too, making a
    producer's next flush cost a journal commit (see sysutil.link_count)."""
    return os.lseek(fd, 0, os.SEEK_END)


def _write_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


class Header(NamedTuple):
    """A log's header as read; offsets no further than the file (after a power loss)."""

    durable: int
    end: int
    cursor: int
    instance: bytes


def read_header(fd: int, size: int | None = None) -> Header:
    """The header of the log open at `fd` (whose size is `size`, if the caller knows it)."""
    magic, durable, end, cursor, instance = HEADER.unpack(os.pread(fd, HEADER.size, 0))
    if magic != MAGIC:
        raise IntakeError("intake log: bad header")
    end = min(end, _size(fd) if size is None else size)
    durable = min(durable, end)
    return Header(durable, end, min(max(cursor, durable), end), instance)


# -- reading --------------------------------------------------------------------------------------


def parse(data: bytes) -> list[Record]:
    """The valid records in `data`. A record that fails its checksum or is cut off is skipped:
    no producer is writing while the lock is held, so it can only be a torn one."""
    records: list[Record] = []
    pos = 0
    while (start := data.find(MARK, pos)) >= 0:
        record = _record_at(data, start)
        if record is None:
            pos = start + 1
            continue
        records.append(record[0])
        pos = record[1]
    return records


def _record_at(data: bytes, start: int) -> tuple[Record, int] | None:
    """The record starting at `start` and the offset after it, or None if there is none."""
    if start + RECORD.size > len(data):
        return None
    _, length, name_length = RECORD.unpack_from(data, start)
    name_at = start + RECORD.size
    body_end = name_at + name_length + length
    if body_end + CRC.size > len(data):
        return None
    (crc,) = CRC.unpack_from(data, body_end)
    name = data[name_at : name_at + name_length]
    if crc != zlib.crc32(data[start:body_end]) or not NAME.fullmatch(name):
        return None
    return (name.decode(), data[name_at + name_length : body_end]), body_end + CRC.size


def pending(queue_dir: str) -> list[str]:
    """The names of the records not yet turned into messages (they count as waiting)."""
    read = _read(queue_dir, durable=False)
    return [] if read is None else [name for name, _ in parse(read[2])]


def _read(queue_dir: str, durable: bool) -> tuple[Header, int, bytes] | None:
    """(header, offset read from, the bytes from there to the end) of the queue's log, read under
    a shared lock, from its cursor (from its durable cursor with `durable`); None when there is
    no log yet."""
    with _shared(queue_dir) as fd:
        if fd is None:
            return None
        header = read_header(fd)
        start = header.durable if durable else header.cursor
        return header, start, os.pread(fd, header.end - start, start)


def _header(queue_dir: str) -> Header | None:
    """The log's header, read under a shared lock; None when there is no log yet."""
    with _shared(queue_dir) as fd:
        return None if fd is None else read_header(fd)


@contextlib.contextmanager
def _shared(queue_dir: str) -> Iterator[int | None]:
    """The queue's log, open and share-locked (no producer amid a record); None if it has no
    log yet (or one whose creator died before its header)."""
    with _no_fork:
        try:
            fd = os.open(os.path.join(directory(queue_dir), "log"), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            yield None
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield fd if _size(fd) >= HEADER.size else None
        finally:
            os.close(fd)


# -- converting (the daemon) ----------------------------------------------------------------------


def convert(queue_dir: str, file_mode: int) -> int:
    """Turn the records past the cursor into messages; returns how many. Nothing is flushed:
    see the module's docstring for why a crash loses nothing."""
    with _converting:
        read = _read(queue_dir, durable=False)
        if read is None or not read[2]:
            return 0
        _, start, data = read
        records = parse(data)
        for name, body in records:
            _write_file(_staged(queue_dir, name), body, file_mode)
        _set_cursor(queue_dir, start + len(data))
        for name, _ in records:
            os.rename(_staged(queue_dir, name), _destination(queue_dir, name))
        return len(records)


def _staged(queue_dir: str, name: str) -> str:
    return os.path.join(directory(queue_dir), "staged", name)


def _destination(queue_dir: str, name: str) -> str:
    """Where a record's message goes: defer/ for a delayed send (`@t`), else new/."""
    return os.path.join(queue_dir, "defer" if "@t" in name else "new", name)


def _write_file(path: str, body: bytes, file_mode: int, flush: bool = False) -> None:
    """A message file, replacing what a replay before a crash may have left."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, file_mode)
    try:
        _write_at(fd, body, 0)
        if flush:
            os.fdatasync(fd)
    finally:
        os.close(fd)


def _set_cursor(queue_dir: str, cursor: int, durable: bool = False) -> None:
    """Write the cursor (and, with `durable`, the durable cursor) with this mount's instance."""
    with _no_fork:
        fd = os.open(os.path.join(directory(queue_dir), "log"), os.O_RDWR | os.O_CLOEXEC)
        try:
            _write_at(fd, CONVERTED.pack(cursor, mount_instance(queue_dir)), CURSOR_AT)
            if durable:
                _write_at(fd, OFFSET.pack(cursor), DURABLE_AT)
                os.fdatasync(fd)
        finally:
            os.close(fd)


def make_durable(queue_dir: str, file_mode: int) -> None:
    """Flush what was converted (files and names), then record it as durable; past
    ROTATE_BYTES, replace the log by a fresh one without the flushed part. One call at a time
    (the flusher's, a stop's or a reload's close): two rotations at once would both write
    log.new, and the second would read the fresh log with the old log's offsets (records lost,
    found by a HUP storm under a stream). (Locks in the converter's order: _converting, then
    _no_fork.)"""
    with _durable:
        _make_durable(queue_dir, file_mode)


def _make_durable(queue_dir: str, file_mode: int) -> None:
    with _converting:  # a pass's renames are done once its cursor is readable here
        header = _header(queue_dir)
    if header is None or header.durable == header.cursor:
        return
    cursor = header.cursor
    syncfs(queue_dir)
    fresh = os.path.join(directory(queue_dir), "log.new")
    rotate = cursor >= ROTATE_BYTES
    if rotate:  # zeros written and flushed before the locks: a new file's metadata commit
        _write_file(fresh, bytes(max(SIZE, 2 * (header.end - cursor))), file_mode, flush=True)
    with _converting, _no_fork:
        fd = os.open(os.path.join(directory(queue_dir), "log"), os.O_RDWR | os.O_CLOEXEC)
        try:
            _write_at(fd, OFFSET.pack(cursor), DURABLE_AT)
            if rotate:
                _rotate(fd, queue_dir, cursor, fresh)
        finally:
            os.close(fd)


def _rotate(fd: int, queue_dir: str, durable: int, fresh: str) -> None:
    """Replace the log by `fresh` holding what follows `durable`: the records written since
    (converted or not, as the cursor says) move to its start. Producers wait for two flushes
    (the fresh log's, its name's), then notice the log was replaced (_open_locked)."""
    fcntl.flock(fd, fcntl.LOCK_EX)
    header = read_header(fd)
    tail = os.pread(fd, header.end - durable, durable)
    start = HEADER.size
    moved = Header(start, start + len(tail), start + header.cursor - durable, header.instance)
    out = os.open(fresh, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _write_at(out, HEADER.pack(MAGIC, *moved) + tail, 0)
        os.fdatasync(out)
    finally:
        os.close(out)
    os.rename(fresh, os.path.join(directory(queue_dir), "log"))
    fsync_dir(directory(queue_dir))


# -- recovering (the daemon, at its start) --------------------------------------------------------


def recover(queue_dir: str, file_mode: int) -> int:
    """Convert what the log holds after a crash or a power loss (see the module's docstring);
    returns how many records were converted now."""
    header = _header(queue_dir)
    if header is not None and header.instance == mount_instance(queue_dir):
        return _after_a_crash(queue_dir, file_mode)
    return _after_a_power_loss(queue_dir, file_mode)


def _after_a_crash(queue_dir: str, file_mode: int) -> int:
    """The cursor is right: convert past it, then rename what a pass left staged."""
    converted = convert(queue_dir, file_mode)
    staged = os.path.join(directory(queue_dir), "staged")
    for name in os.listdir(staged):
        os.rename(os.path.join(staged, name), _destination(queue_dir, name))
    return converted


def _after_a_power_loss(queue_dir: str, file_mode: int) -> int:
    """Write every record past the durable cursor over its message's file, wherever the message
    is now (made anew in new/ or defer/ if it is nowhere), flush, then move both cursors."""
    staged = os.path.join(directory(queue_dir), "staged")
    for name in os.listdir(staged):  # torn, perhaps: their records are replayed below
        os.unlink(os.path.join(staged, name))
    read = _read(queue_dir, durable=True)
    if read is None:
        return 0
    _, start, data = read
    records = parse(data)
    where = _files_by_id(queue_dir)
    for name, body in records:
        _write_file(_staged(queue_dir, name), body, file_mode)
        place = where.get(name[:24]) or _destination(queue_dir, name)
        os.rename(_staged(queue_dir, name), place)
    syncfs(queue_dir)
    _set_cursor(queue_dir, start + len(data), durable=True)
    return len(records)


def _files_by_id(queue_dir: str) -> dict[str, str]:
    """id -> path of every message file in new/, defer/ and failed/ (after the slots' cur/ were
    settled, nothing is elsewhere)."""
    found: dict[str, str] = {}
    for state in ("new", "defer", "failed"):
        path = os.path.join(queue_dir, state)
        for name in os.listdir(path):
            if not name.endswith(".json"):
                found[name.split("@", 1)[0]] = os.path.join(path, name)
    return found


class Converter:
    """The daemon's threads that turn intake records into messages as they arrive, and make
    them durable in batches.

    The converter wakes when a producer writes to a queue's log (inotify), when a queue is added
    (its select must take the new log in), and every SAFETY seconds in case a wake-up was
    missed; the flusher runs FLUSH_AFTER after a conversion (and the master's stop calls
    flush_converted). An error (a full disk) is logged once and retried.
    """

    SAFETY = 1.0

    def __init__(self, file_mode: int) -> None:
        import structlog  # the daemon's: a producer importing this module never needs it

        self.file_mode = file_mode
        self.log = structlog.get_logger()
        self._lock = threading.Lock()
        self._watched: dict[str, int] = {}  # queue dir -> inotify descriptor, kept once made
        self._failing: dict[str, str] = {}
        self._converted = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)  # a queue added
        self._threads = [
            threading.Thread(target=self._convert_loop, name="intake", daemon=True),
            threading.Thread(target=self._flush_loop, name="intake-flush", daemon=True),
        ]

    def watch(self, queue_dir: str) -> None:
        """Convert this queue's intake from now on (cheap when it already is)."""
        if queue_dir in self._watched:
            return
        with self._lock:
            if queue_dir not in self._watched:
                fd = watch_arrivals(directory(queue_dir), also=IN_MODIFY)
                self._watched = {**self._watched, queue_dir: fd}  # replaced, never mutated
                os.write(self._wake_w, b"w")  # the loop's select must take it in now
            if not self._threads[0].is_alive():
                for thread in self._threads:
                    thread.start()

    def _convert_loop(self) -> None:
        while True:
            watched = self._watched
            for queue_dir in watched:
                if self._guarded(convert, queue_dir):
                    self._converted.set()
            fds = [self._wake_r, *watched.values()]
            for fd in select.select(fds, [], [], self.SAFETY)[0]:
                drain(fd)

    def _flush_loop(self) -> None:
        while self._converted.wait():
            time.sleep(FLUSH_AFTER)  # gather a batch
            self.flush()

    def flush(self) -> None:
        """Make every watched queue's converted messages durable now."""
        self._converted.clear()
        for queue_dir in self._watched:
            self._guarded(make_durable, queue_dir)

    def _guarded(self, step: Callable[[str, int], int | None], queue_dir: str) -> int | None:
        """Run one step on a queue; an error is logged once (until the step works again)."""
        try:
            return step(queue_dir, self.file_mode)
        except (OSError, IntakeError) as e:
            if self._failing.get(queue_dir) != str(e):
                self._failing[queue_dir] = str(e)
                self.log.error("intake failed", queue=queue_dir, error=str(e))
        else:
            if self._failing.pop(queue_dir, None) is not None:
                self.log.info("intake recovered", queue=queue_dir)
        return None


_converter: list[Converter] = []
os.register_at_fork(after_in_child=_converter.clear)  # a worker or the listener converts nothing


def flush_converted(queue_dir: str, file_mode: int) -> None:
    """In the master (a process that converts): make the queue's converted messages durable now,
    so that a power loss after a clean stop replays nothing. Elsewhere nothing."""
    if _converter:
        make_durable(queue_dir, file_mode)


def converter(file_mode: int) -> Converter:
    """This process's converter (the master's), made on first use."""
    if not _converter:
        _converter.append(Converter(file_mode))
    return _converter[0]
