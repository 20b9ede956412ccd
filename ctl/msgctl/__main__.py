"""`python -m msgctl`: the same as the msgctl command."""

import sys

from msgctl.cli import main

sys.exit(main())
