"""The one exception type lmcompress raises for bad input; the CLI prints its message and exits 2."""


class UserError(ValueError):
    """Bad input from the user: the message names the problem and what to do about it."""
