"""The examples in the docstrings a newcomer reads first run as written."""

from __future__ import annotations

import doctest
import importlib

import pytest


@pytest.mark.parametrize("module", ["iadkit", "iadkit.methods", "iadkit.validation",
                                    "iadkit.calibration", "iadkit.data.preprocess",
                                    "iadkit.data.tiling", "iadkit.metrics", "iadkit.nn.coreset",
                                    "iadkit.nn.anomaly_maps", "iadkit.backbones.same_padding"])
def test_the_docstring_examples_run(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
