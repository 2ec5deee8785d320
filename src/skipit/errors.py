"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class SkipitError(Exception):
    """An error caused by the user's input (path, data, model); its message says what to fix."""
