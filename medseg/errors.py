"""Error hierarchy. The CLI prints a :class:`MedsegError` without a traceback and exits with code 2."""

from __future__ import annotations


class MedsegError(Exception):
    """Base class for errors caused by the user's input (config, data, arguments)."""


class ConfigError(MedsegError, ValueError):
    """A configuration file or override is invalid."""


class DataError(MedsegError, ValueError):
    """A file cannot be read, or its content is not what was expected."""


class ShapeError(DataError):
    """A shape mismatch; keeps the expected and actual shapes."""

    def __init__(self, msg: str, *, expected: tuple, actual: tuple) -> None:
        super().__init__(f"{msg}: expected {expected}, got {actual}")
        self.expected, self.actual = expected, actual
