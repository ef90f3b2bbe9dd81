"""Errors a user can act on; the CLI prints them as one line without a traceback."""


class ConfigError(ValueError):
    """A configuration, flag or search space that cannot work."""


class RunError(RuntimeError):
    """A run that cannot go on: actors failing past the budget, a hung learner, nothing to resume."""


class TrainingHalted(RunError):
    """A run stopped because training went wrong (non-finite loss, no learning signal left); the CLI exits 3."""
