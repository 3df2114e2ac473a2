"""Exceptions a person can act on; the CLI prints their message and exits with status 2.

Messages name settings as ``$name`` (the library parameter, e.g. ``$image_size``): ``str(error)`` shows the
parameter name (``image_size``) for Python users, and :func:`cli_message` shows the flag (``--image-size``).
"""

from __future__ import annotations

import re

_PARAMETER = re.compile(r"\$([a-z][a-z0-9_]*)")


class MultitaskError(Exception):
    """Base class: the message says what was found, where, and what to do."""

    def __str__(self) -> str:
        return _PARAMETER.sub(r"\1", super().__str__())


def cli_message(error: BaseException) -> str:
    """The message of ``error`` with every ``$parameter`` written as its command-line flag."""
    text = Exception.__str__(error) if isinstance(error, MultitaskError) else str(error)
    return _PARAMETER.sub(lambda m: "--" + m[1].replace("_", "-"), text)


class TaxonomyError(MultitaskError):
    """A taxonomy table is malformed."""


class DataError(MultitaskError):
    """Images, folders or manifests are missing or unusable."""


class ModelError(MultitaskError):
    """A model cannot be built or loaded (e.g. weights unavailable, a damaged or unsafe model file)."""


class RunError(MultitaskError):
    """A run directory is missing, incomplete, in use, or incompatible."""


class ConfigError(MultitaskError):
    """A setting or a usage is invalid (e.g. an unknown task in the loss weights, an output folder of the user's)."""


class TrainingError(MultitaskError):
    """Training cannot go on (e.g. the loss became NaN); nothing is saved as a finished run."""


class ExportError(MultitaskError):
    """An export could not be written or does not reproduce the Keras model closely enough."""
