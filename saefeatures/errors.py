"""The error type for bad input: a config, a file or an argument the user can fix.

The command line prints a `UserError` as one line (``error: ...``) and exits 2; every other
exception is a bug and keeps its traceback under ``--debug``. Loaders raise it (or a subclass)
with the file and the fix in the message.
"""


class UserError(ValueError):
    """Bad input from the user: the message names what is wrong, where, and the fix."""


class ConfigError(UserError):
    """A config has an unknown key or a value of the wrong type."""


def one_line(e: BaseException) -> str:
    """An error as the command line prints it: one line, naming the file of an OSError."""
    text = " ".join(str(e).split())
    if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    return text
