"""User-facing errors: the CLI prints them as one line and exits with status 2."""


class LorqError(Exception):
    """A problem with the user's input (paths, files, options), not a bug in lorq."""
