"""Errors of a run that a user can act on (shown without a traceback by the CLI)."""


class RunError(RuntimeError):
    pass
