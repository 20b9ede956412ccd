"""msgctl: the control tool for msgd (see `msgctl --help`)."""
