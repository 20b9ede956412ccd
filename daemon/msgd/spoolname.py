"""The names of message files in a spool queue: what msgd knows about a message without opening it.

    new/, cur/<slot>/, failed/   <id>                                   never tried, priority 0
                                 <id>@<attempts>[@p<priority>][@x<expires, ms>]
    defer/                       <that>@<not before, ms>                a retry waiting
                                 <that>@t<due, ms>                      a delayed send waiting

`<id>` is msgd's (16 hex digits of enqueue time in ns, 8 random) or a foreign producer's name
(letters, digits, `_ . -`, no `@`). The fields after it are msgd's: they are parsed from the
right, and a name that does not fit the grammar is all id (a foreign `a@b` is message `a@b`,
never an error that stalls a runner). Priority and expiry ride in the name so that a worker can
pick the highest priority from a listing and the master can find expired messages, both without
opening a file.
"""

from __future__ import annotations

import re

import msgspec

_FIELDS = r"(?P<id>.+?)@(?P<attempts>\d+)(?:@p(?P<priority>\d))?(?:@x(?P<expires>\d+))?"
_NAME = re.compile(_FIELDS)
_DEFERRED = re.compile(_FIELDS + r"@(?:(?P<not_before>\d+)|t(?P<due>\d+))")


class SpoolName(msgspec.Struct, frozen=True, kw_only=True):
    """One message file's name, parsed."""

    id: str
    attempts: int = 0  # attempts done
    priority: int = 0  # 0-9, higher first
    expires_ms: int = 0  # epoch ms after which it must not start; 0: never
    not_before_ms: int | None = None  # defer/: when it becomes due (None: now, or unknown)
    scheduled: bool = False  # defer/: a delayed send (`@t`), not a retry

    @classmethod
    def parse(cls, name: str, deferred: bool = False) -> SpoolName:
        """Parse a name of new/, cur/ or failed/ (or of defer/ with `deferred`; one there without
        a time is due now)."""
        if "@" not in name:  # never tried, priority 0, no TTL: most names, and no regex to run
            return cls(id=name)  # (the worker parses each name twice: ~0.4 µs each)
        m = (_DEFERRED if deferred else _NAME).fullmatch(name)
        if m is None:
            return cls.parse(name) if deferred else cls(id=name)
        fields = m.groupdict()
        when = fields.get("due") or fields.get("not_before")
        return cls(
            id=fields["id"],
            attempts=int(fields["attempts"]),
            priority=int(fields["priority"] or 0),
            expires_ms=int(fields["expires"] or 0),
            not_before_ms=int(when) if when else None,
            scheduled=bool(fields.get("due")),
        )

    def ready(self) -> str:
        """The name in new/ (and cur/): what a worker claims."""
        if not (self.attempts or self.priority or self.expires_ms):
            return self.id
        return (
            f"{self.id}@{self.attempts}"
            + (f"@p{self.priority}" if self.priority else "")
            + (f"@x{self.expires_ms}" if self.expires_ms else "")
        )

    def waiting(self) -> str:
        """The name in defer/: until `not_before_ms`, as a delayed send or a retry."""
        base = f"{self.ready()}@0" if self.ready() == self.id else self.ready()
        return f"{base}@{'t' if self.scheduled else ''}{self.not_before_ms or 0}"

    def expired(self, now_ms: float) -> bool:
        return bool(self.expires_ms) and self.expires_ms <= now_ms
