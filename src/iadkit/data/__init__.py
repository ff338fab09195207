"""Datasets: layout readers, samples, evaluation settings, loaders and generated test data.

The names below load their module on first use, so that ``iadkit.data.image_io`` (Pillow and
NumPy only) can be imported without torch, as the ONNX inferencer does.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Batch": "dataset", "ImageDataset": "dataset", "Preprocess": "preprocess",
    "make_loader": "dataset", "generate_dataset": "generate", "read_image": "image_io",
    "read_mask": "image_io", "LAYOUTS": "layouts", "detect_layout": "layouts",
    "load_dataset": "layouts", "read_folder": "layouts", "ANOMALOUS": "samples",
    "NORMAL": "samples", "Sample": "samples", "SampleSet": "samples", "SETTINGS": "settings",
    "Task": "settings", "make_tasks": "settings",
}

__all__ = sorted(_EXPORTS)  # noqa: PLE0605 (names resolved lazily)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
