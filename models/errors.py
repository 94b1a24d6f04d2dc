"""The errors a stage turns into one clear message and exit status 2 (``stages/_cli.py``).

They live here, apart from the code that raises them, so a stage's CLI can catch them without
importing (and so depending on, see ``models.identity``) the training and data code.
"""

from __future__ import annotations

from models.config.base import ConfigError


class DataError(RuntimeError):
    """A data problem (missing file, wrong checksum), with the path and what to do."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (missing, corrupt, or made by another run identity)."""


class GuardStop(RuntimeError):
    """Raised when the live guard sees a fatal condition; the previous checkpoint stays valid."""


__all__ = ["CheckpointError", "ConfigError", "DataError", "GuardStop"]
