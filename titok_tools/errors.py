"""The library's own exception: every stage raises it for input it cannot use.

The library never turns an error into an exit: the click face (cli.command) prints a TitokError
as one line and exits 1, and Python callers catch it like any other exception.
"""


class TitokError(Exception):
    """A problem with the input, named in one line (file:line: field: what is wrong)."""

    @property
    def message(self):
        return str(self)
