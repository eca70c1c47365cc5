"""The one exception type users see: a one-line message naming the bad value and what would be valid."""


class ToolkitError(Exception):
    """Bad input or a missing prerequisite; `toolkit-train` prints the message alone and exits with 2."""
