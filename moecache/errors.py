"""The project's error types. Every error a user can cause derives from ``MoecacheError``."""

from __future__ import annotations


class MoecacheError(Exception):
    """Base class of every error that moecache raises on bad input or an unsupported setup."""


class TraceFormatError(MoecacheError, ValueError):
    """A routing trace (ours or an imported source) is malformed.

    ``path`` and ``line`` name where, when known, so the message can point at the fix.
    """

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.path = path
        self.line = line


class UnsupportedModelError(MoecacheError):
    """A model whose MoE layout moecache does not know (or that has no MoE layers)."""


class ConfigError(MoecacheError, ValueError):
    """An argument or configuration value is invalid (unknown name, budget too small, ...)."""
