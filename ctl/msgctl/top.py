"""`msgctl top`: the stats file, redrawn every second, like top(1).

On a terminal it redraws until q or Ctrl-C; otherwise it prints plain frames (one by default,
like `top -b -n 1`) so that it can be piped or logged.
"""

from __future__ import annotations

import contextlib
import select
import sys
import termios
import time
import tty
from collections.abc import Iterator

from msgd import stats

REFRESH = 1.0


def top(stats_file: str, frames: int | None) -> int:
    interactive = sys.stdout.isatty() and sys.stdin.isatty()
    limit = frames if frames is not None else (None if interactive else 1)
    with _keys() if interactive else contextlib.nullcontext():
        shown = 0
        while limit is None or shown < limit:
            frame = _frame(stats_file)
            if interactive:
                print("\033[H\033[2J" + frame.replace("\n", "\r\n"), end="\r\n", flush=True)
            else:
                print(frame + "\n", flush=True)
            shown += 1
            if limit is not None and shown >= limit:
                break
            if _wait_for_quit(interactive, REFRESH):
                break
    return 0


def _frame(stats_file: str) -> str:
    snap = stats.read(stats_file)
    if snap is None:
        return f"msgd: no stats at {stats_file} (not running?)"
    age = time.time() - snap.time
    stale = f"   (stats are {age:.0f}s old: is msgd running?)" if age > 5 else ""
    return time.strftime("%H:%M:%S ") + stats.summary(snap) + stale + "\n" + stats.table(snap)


def _wait_for_quit(interactive: bool, seconds: float) -> bool:
    """Sleep until the next frame; True if the user pressed q."""
    if not interactive:
        time.sleep(seconds)  # pacing between frames, not synchronisation
        return False
    ready, _, _ = select.select([sys.stdin], [], [], seconds)
    return bool(ready) and sys.stdin.read(1) in ("q", "Q")


@contextlib.contextmanager
def _keys() -> Iterator[None]:
    """Single keypresses without echo; the terminal is restored whatever happens."""
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    except KeyboardInterrupt:
        pass
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
