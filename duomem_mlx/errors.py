import click


class DuomemError(click.ClickException):
    """A user-facing failure: click prints 'Error: <message>' on one line and exits 1."""
