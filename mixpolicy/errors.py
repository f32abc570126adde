"""Errors that are the user's to fix: the CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """Bad input (missing file, unknown key, wrong shape, ...); the message names it."""
