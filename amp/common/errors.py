"""The one exception type the CLI turns into a one-line error and a non-zero exit."""


class AmpError(Exception):
    """Bad input or an impossible request, with a message meant for the user."""
