"""embedft's errors: one base class, one subclass per stage.

Each message names the file, row, option or setting at fault and the fix. The CLI catches
`EmbedftError` and prints the message on one line, with no traceback; anything else is a bug.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class EmbedftError(Exception):
    """Base of every error embedft raises for bad input or a setting that cannot work."""


class ConfigError(EmbedftError, ValueError):
    """A config value or key is invalid; the message names the field and the fix.

    `keys`: the dotted keys the error is about, so that `load_config` can name the -o option
    that set one of them.
    """

    def __init__(self, message: str, keys: tuple[str, ...] = ()):
        super().__init__(message)
        self.keys = tuple(keys)


class TrackingError(EmbedftError, RuntimeError):
    """The tracking store cannot be used; the message says how to fix it."""


class ExportError(EmbedftError, ValueError):
    """An export cannot be made or does not match its adapter; the message has the figures and the fix."""


class SearchError(EmbedftError, ValueError):
    """Bad input to `embedft index`: the message names the file, column or option and the fix."""


class DataError(EmbedftError, ValueError):
    """Bad input data; the message names the file, the rows and the fix."""


class EvalError(EmbedftError, ValueError):
    """The evaluation cannot run as asked; the message says why and what to change."""


class ModelError(EmbedftError, ValueError):
    """A model cannot be resolved, recognised or matched; the message says what to set."""


class WriteError(EmbedftError, OSError):
    """An artifact could not be written (no space, no permission, a read-only disk): the message names
    the path and the fix, and what was kept (nothing half-written stays)."""
