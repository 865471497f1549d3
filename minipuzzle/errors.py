"""User-facing errors.

Anything the user can fix (a bad path, an unknown preset, a corrupt file) raises `UserError`; the CLI prints its
message as one line on stderr and exits with code 2. Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input; the message is shown as is, in one line."""
