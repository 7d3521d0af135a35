"""Errors with messages a presenter can read aloud.

Every error the app or the CLI shows to a person is one of these; anything else is a bug.
"""


class LesionError(Exception):
    """Base class: the message is meant for people, not for a traceback."""


class InvalidImage(LesionError, ValueError):
    """The file is not an image we can read, or not one we should classify."""


class InvalidCheckpoint(LesionError, ValueError):
    """The file is not a lesion checkpoint we can trust and use."""


class DataError(LesionError, ValueError):
    """A dataset folder or metadata file is missing, incomplete or inconsistent."""


class ConfigError(LesionError, ValueError):
    """A recipe or a --key=value override is unknown or of the wrong type."""


class WeightsUnavailable(LesionError, RuntimeError):
    """Pretrained weights could not be fetched or read."""
