"""User-facing errors: raised at the boundary with a message that says what to do."""


class LarosaError(Exception):
    """An error caused by user input or environment; the CLI prints it as one line."""
