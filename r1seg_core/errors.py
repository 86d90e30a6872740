"""Errors every entry point raises, so that the CLI, Slicer and training can show a clear message."""


class R1SegError(Exception):
    """Base class: the message is meant for the user, as it is."""


class InvalidInputError(R1SegError, ValueError):
    """A volume, question or argument the engine cannot work with (2D/4D, NaN, absurd spacing, empty question...)."""


class CheckpointError(R1SegError):
    """A model folder or weight file that is missing, truncated, corrupt or does not match its config."""


class OutOfMemoryError(R1SegError, MemoryError):
    """The device ran out of memory even after the engine retried with less."""


class CancelledError(R1SegError):
    """The user cancelled a running question."""
