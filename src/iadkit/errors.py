"""Exceptions iadkit raises for bad input. Each message names the file or value and the problem."""

from __future__ import annotations


class IadkitError(Exception):
    """Base class of every error iadkit raises on purpose."""


class ConfigError(IadkitError, ValueError):
    """A hyperparameter or run setting has a value it may not take (named in the message with
    the values it may take). Raised before any work starts."""


class ImageReadError(IadkitError):
    """An image or mask file could not be decoded (missing, corrupt, truncated, odd format)."""


class ImageTooLargeError(ImageReadError):
    """An image has more pixels than allowed (a decompression bomb, or simply too big)."""


class DatasetError(IadkitError):
    """A dataset folder is missing, empty, inconsistent or of an unknown layout."""


class WeightsNotFoundError(IadkitError):
    """Pretrained backbone weights could not be resolved from any source."""


class CheckpointError(IadkitError):
    """A saved detector could not be loaded (missing files, wrong format, version mismatch)."""


class NotFittedError(IadkitError):
    """A detector was used for prediction before ``fit`` (or ``load``)."""


class MetricError(IadkitError):
    """A metric is undefined for the given labels (e.g. only one class present)."""
