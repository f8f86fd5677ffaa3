"""The one exception type for mistakes a user can make (bad path, bad file, bad option).

The CLI prints its message alone (no traceback) and exits with code 2; library callers catch it.
"""


class LayercakeError(Exception):
    """A user-facing error: the message says what is wrong and what to do."""
