"""The one exception type for a bad checkpoint source (the CLI turns it into exit code 2)."""


class CheckpointError(ValueError):
    """A checkpoint file or folder is missing, corrupt or inconsistent; the message names it."""
