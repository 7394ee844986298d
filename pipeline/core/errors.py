"""The one exception type a user acts on."""


class LayertapError(Exception):
    """An error a user can act on: its message names the input and the fix."""
