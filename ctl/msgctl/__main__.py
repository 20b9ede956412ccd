import sys

from msgctl.cli import main

sys.exit(main())
