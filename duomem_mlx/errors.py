class DuomemError(Exception):
    """A user-facing failure, raised by library code that knows nothing of click: the CLI's
    root group (cli.Group) turns it into click's one-line `Error: <message>` and exit code 1."""
