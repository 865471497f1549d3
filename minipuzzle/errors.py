"""User-facing errors.

Anything the user can fix (a bad path, an unknown preset, a corrupt file) raises `UserError`; the CLI prints its
message as one line on stderr and exits with code 2. A launched process that failed otherwise raises
`LaunchError` in its launcher: one line naming it and its log (exit 1), the traceback being in that log.
Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input; the message is shown as is, in one line."""


class LaunchError(Exception):
    """A launched process (a distillation's child or rank) failed for a cause that is not the user's input (a
    crash, a bug): the CLI shows the message, one line naming the process and its log, and exits with code 1;
    the traceback stays in that log."""
