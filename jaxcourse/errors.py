"""The one exception type for user mistakes (config, data, shapes, checkpoints).

The command line turns it into a single line on stderr and exits with the error's
`exit_code`; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: the message names the problem in one line."""
    exit_code = 1


class ConfigError(UserError):
    """Unknown config key, wrong value type, value out of range or bad preset: exit code 2."""
    exit_code = 2


class WorkdirBusy(UserError):
    """Another run holds the workdir's lock: refused like a bad argument (exit code 2)."""
    exit_code = 2


class Interrupted(UserError):
    """SIGINT or SIGTERM stopped the run after saving a checkpoint: exit 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + int(signum)
