"""The daemon's asyncio, imported without the ssl module.

asyncio imports ssl at its own import (`try: import ssl except ImportError: ssl = None`), and ssl
loads OpenSSL: ~5 MB of the master's memory and ~5 ms of its start, for TLS that msgd's event loop
never speaks. Here asyncio is imported while `import ssl` fails, which asyncio takes as "no TLS";
then the block is lifted at once, so any later `import ssl` loads the real module on demand: a
Redis client in the master, or a handler in a forked worker, gets full TLS.

Only the daemon's entry point (msgd.cli) calls this, before anything imports asyncio (structlog
does): a program that merely `import msgd` to send messages keeps its asyncio untouched.
"""

from __future__ import annotations

import sys


def import_asyncio_without_ssl() -> None:
    """Import asyncio with TLS disabled in it alone; a no-op if asyncio or ssl is loaded."""
    if "asyncio" in sys.modules or "ssl" in sys.modules:
        return
    sys.modules["ssl"] = None  # type: ignore[assignment]  # makes `import ssl` raise ImportError
    try:
        import asyncio  # noqa: F401
    finally:
        del sys.modules["ssl"]
