"""The one exception type for user mistakes (config, data, shapes, checkpoints).

The command line turns it into a single line on stderr and a non-zero exit; anything else
is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: the message names the problem in one line."""


class ConfigError(UserError):
    """Unknown config key, wrong value type or bad preset: exit code 2."""
