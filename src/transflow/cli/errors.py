"""The one exception type of the command line."""


class UsageError(Exception):
    """A mistake in how the command was called; printed as one line, exit code 2."""
