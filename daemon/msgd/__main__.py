"""`python -m msgd`: the same as the msgd command."""

import sys

from msgd.cli import main

sys.exit(main())
