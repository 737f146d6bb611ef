"""User-facing errors: the CLI prints them as one line and exits with status 2 (1 for what the system refuses)."""


class LorqError(Exception):
    """A problem with the user's input (paths, files, options), not a bug in lorq."""


class SystemRefusal(LorqError):
    """A path the system refuses (permissions, a read-only or full disk): exit status 1."""
