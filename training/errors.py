"""Errors a user can fix: the CLI prints them as one line and exits with status 2."""


class UsageError(Exception):
    """Bad input (unknown name, missing data, incompatible checkpoint); the message says the fix."""
