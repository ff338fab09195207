"""iadkit: unsupervised industrial visual anomaly detection.

Train a detector on images of good parts only, then score new images and localise defects
with a pixel anomaly map::

    >>> import tempfile
    >>> from iadkit import create_detector, generate_dataset, load_dataset, make_loader
    >>> root = generate_dataset(tempfile.mkdtemp(), categories=("tile",), n_train=8, size=64)
    >>> samples = load_dataset(root)
    >>> detector = create_detector("patchcore", image_size=64, device="cpu")
    >>> detector = detector.fit(make_loader(samples.where(split="train"), detector.preprocess))
    >>> batch = next(iter(make_loader(samples.where(split="test"), detector.preprocess)))
    >>> prediction = detector.predict(batch["image"])  # one map and one score per image
    >>> tuple(prediction.anomaly_maps.shape[1:]), len(prediction.scores) == len(batch["label"])
    ((64, 64), True)

(The map covers the whole 64-pixel image: the cpu preset has no centre crop.)

The names below load their module on first use, so that importing :mod:`iadkit.deploy.inferencer`
needs no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "create_detector": "methods", "available_methods": "methods", "Detector": "methods",
    "load_dataset": "data", "make_loader": "data", "generate_dataset": "data",
    "RunConfig": "engine", "fit_run": "engine", "test_run": "engine",
}

__all__ = sorted(_EXPORTS)  # noqa: PLE0605 (names resolved lazily)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
