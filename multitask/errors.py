"""Exceptions a person can act on; the CLI prints their message and exits with status 2."""


class MultitaskError(Exception):
    """Base class: the message says what was found, where, and what to do."""


class TaxonomyError(MultitaskError):
    """A taxonomy table is malformed."""


class DataError(MultitaskError):
    """Images, folders or manifests are missing or unusable."""


class ModelError(MultitaskError):
    """A model cannot be built (e.g. ImageNet weights unavailable)."""


class RunError(MultitaskError):
    """A run directory is missing, incomplete, or incompatible."""


class ConfigError(MultitaskError):
    """A training setting is invalid (e.g. an unknown task in --loss-weights)."""
