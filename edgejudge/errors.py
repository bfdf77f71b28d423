"""The one exception type that means "the user gave us something we cannot use"."""


class InputError(ValueError):
    """Bad input: a missing file, a corrupt video, an over-long prompt.

    The CLI prints its message on one line and exits with code 2; library callers catch it like
    any ValueError.
    """
