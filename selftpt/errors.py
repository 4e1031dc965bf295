"""User-facing errors: ``train.py`` prints them as one line (no traceback) and exits 2."""


class UserError(Exception):
    """A problem in the user's input (config, flags, files) with a message that says the fix."""
