"""A handler module (`slow_import:record`) whose first import after the flag file
`$MSGD_TEST_OUT/slow` appears is slow: that process takes the flag, writes its pid to `importing`,
and does not return until the test creates `release` (or 20 s have passed). Every other import is
instant."""

import os
import time

from handlers import record  # noqa: F401 - the handler

_out = os.environ.get("MSGD_TEST_OUT", "/nonexistent")
try:
    os.unlink(os.path.join(_out, "slow"))
except FileNotFoundError:
    pass
else:
    with open(os.path.join(_out, "importing"), "w") as f:
        f.write(str(os.getpid()))
    deadline = time.monotonic() + 20
    while not os.path.exists(os.path.join(_out, "release")) and time.monotonic() < deadline:
        time.sleep(0.01)  # the slow import under test: it lasts until the test releases it
