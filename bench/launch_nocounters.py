"""Start msgd with its per-message counter updates turned into no-ops (the counters-off run).

    python bench/launch_nocounters.py -c CONFIG     # runs msgd in the foreground, like `msgd -c`
    python bench/launch_nocounters.py --control -c CONFIG  # the same launch, nothing patched
    python bench/launch_nocounters.py --check-names # exit 0 if the patched names exist, else 3

The patch is made in the master before it forks its workers, so the workers inherit it.
"""

from __future__ import annotations

import sys

PATCHED = ("start", "intend", "finish")  # the SlotWriter methods a worker calls per message


def main() -> int:
    try:
        from msgd import counters as stats
    except ImportError as e:
        print(f"cannot import msgd.counters: {e}", file=sys.stderr)
        return 3
    writer = getattr(stats, "SlotWriter", None)
    missing = [n for n in PATCHED if not callable(getattr(writer, n, None))]
    if missing:
        print(
            f"msgd.counters.SlotWriter lacks {missing}: counters-off run skipped", file=sys.stderr
        )
        return 3
    args = sys.argv[1:]
    if args == ["--check-names"]:
        return 0
    control = args[:1] == ["--control"]

    def nothing(self, *args, **kwargs):
        return 0  # start()'s value is the start time handed back to finish()

    for name in () if control else PATCHED:  # all of them: a runner marked busy by one and
        setattr(writer, name, nothing)  # never cleared by another would look hung to the master
    from msgd.cli import main as msgd_main

    return msgd_main(args[1:] if control else args)


if __name__ == "__main__":
    sys.exit(main())
