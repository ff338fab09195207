"""ONNX export of a fitted detector's whole inference: images in, anomaly maps and scores out.

The exported graph is the detector's ``_predict`` traced at the detector's input size, with the
batch dimension left free; everything learned (a memory bank, a student, a bank of centres, a
calibration regressor) is inside it. ``export_onnx`` checks the graph against PyTorch with
onnxruntime on random images and refuses to write a model whose outputs differ by more than the
tolerance. Next to ``model.onnx`` it writes ``inference.json`` with everything the torch-free
:class:`~iadkit.deploy.inferencer.OnnxInferencer` needs: the preprocessing, the calibration
(threshold and its origin) and the measured parity.

Example:
    >>> export_onnx(Detector.load("runs/pc/models/tiles"), "exported/tiles")
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..backbones.same_padding import without_padded_copies
from ..errors import IadkitError
from ..methods import Detector
from .inferencer import CONFIG_FILE, INFERENCE_FORMAT, MODEL_FILE, TRAINING_SUMMARY_KEYS

#: Largest absolute difference allowed between onnxruntime and PyTorch, relative to the
#: outputs' range (maps and scores separately).
DEFAULT_TOLERANCE = 1e-4


class _PredictGraph(nn.Module):
    """The detector's inference as a module; its networks are registered so that tracing sees
    their weights as parameters, not as constants."""

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.detector = detector
        self.networks = nn.ModuleDict(_networks(detector))
        self.networks.requires_grad_(False)
        # The whole module in eval mode: the exporter restores the root's mode afterwards,
        # which would otherwise put every BatchNorm back into training.
        self.eval()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prediction = self.detector._predict(images)
        return prediction.anomaly_maps, prediction.scores


def _networks(detector: Detector, prefix: str = "") -> dict[str, nn.Module]:
    """Every module a detector holds, including those of a detector it wraps (CADA's base)."""
    found: dict[str, nn.Module] = {}
    for name, value in vars(detector).items():
        if isinstance(value, nn.Module):
            found[prefix + name] = value
        elif isinstance(value, Detector):
            found.update(_networks(value, f"{prefix}{name}__"))
    return found


def export_onnx(detector: Detector, folder: str | Path, opset: int = 17,
                tolerance: float = DEFAULT_TOLERANCE, check_batch: int = 2) -> dict[str, Any]:
    """Write ``folder/model.onnx`` and ``folder/inference.json``; returns the JSON record.

    Raises:
        IadkitError: the method's inference cannot be traced, or the exported graph's outputs
            differ from PyTorch's by more than ``tolerance`` (relative to their range).
    """
    import onnxruntime

    if not detector.is_fitted:
        raise IadkitError(f"{detector.name}: fit or load the detector before exporting it")
    if detector.needs_categories:
        raise IadkitError(f"{detector.name}: a detector that needs each image's category at "
                          "prediction cannot be exported as one graph")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:  # a CPU copy, whatever the device
        cpu_detector = Detector.load(detector.save(Path(scratch) / "model"), device="cpu")
    graph = _PredictGraph(cpu_detector)
    side = cpu_detector.preprocess.output_size
    example = torch.rand(check_batch, 3, side, side, generator=torch.Generator().manual_seed(0))
    # The graph only ever sees this size: a trained network's same padding (STFPM's student)
    # becomes a constant padding, not a copy with its size computed in the graph.
    without_padded_copies(graph, [example])
    with torch.no_grad():  # builds lazy caches (pooling weights, map operators) as constants
        graph(example)
    started = time.perf_counter()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about Python values
            torch.onnx.export(graph, (example,), str(folder / MODEL_FILE), dynamo=False,
                              opset_version=opset, input_names=["images"],
                              output_names=["anomaly_maps", "scores"],
                              dynamic_axes={"images": {0: "batch"}, "anomaly_maps": {0: "batch"},
                                            "scores": {0: "batch"}})
    except (RuntimeError, torch.onnx.errors.OnnxExporterError) as error:
        raise IadkitError(f"{detector.name}: its inference could not be exported to ONNX "
                          f"({type(error).__name__}: {str(error).splitlines()[0][:300]})") from None
    export_seconds = time.perf_counter() - started
    parity = _check_parity(graph, folder / MODEL_FILE, side, check_batch + 1, onnxruntime)
    worst = max(parity["maps_relative"], parity["scores_relative"])
    if not worst <= tolerance:
        (folder / MODEL_FILE).unlink()
        raise IadkitError(f"{detector.name}: the ONNX graph differs from PyTorch by {worst:.3g} "
                          f"(relative), more than the tolerance {tolerance:g}; not exported")
    record = {
        "format": INFERENCE_FORMAT,
        "version": 1,
        "method": detector.name,
        "preset": detector.preset,
        "params": detector.get_params(),
        "training_data": {key: value for key, value in (detector.fit_info_ or {}).items()
                          if key in TRAINING_SUMMARY_KEYS},
        "preprocess": asdict(detector.preprocess),
        "calibration": (detector.calibration.without_scores().to_dict()
                        if detector.calibration else None),
        "parity": parity,
        "tolerance": tolerance,
        "opset": opset,
        "export_seconds": round(export_seconds, 2),
    }
    (folder / CONFIG_FILE).write_text(json.dumps(record, indent=2))
    return record


def _check_parity(graph: _PredictGraph, model_path: Path, side: int, batch: int,
                  onnxruntime: Any) -> dict[str, float]:
    """Largest differences between onnxruntime and PyTorch on random images of another batch
    size than the traced one (so a wrongly fixed batch dimension fails)."""
    session = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    images = torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        maps, scores = graph(images)
    try:
        onnx_maps, onnx_scores = session.run(None, {"images": images.numpy()})
    except Exception as error:  # noqa: BLE001 (onnxruntime's own error types)
        raise IadkitError(f"the exported graph fails on a batch of {batch} images: "
                          f"{str(error).splitlines()[0][:300]}") from None
    result = {}
    for name, ours, theirs in (("maps", maps.numpy(), onnx_maps),
                               ("scores", scores.numpy(), onnx_scores)):
        if ours.shape != theirs.shape:
            raise IadkitError(f"ONNX {name} have shape {theirs.shape}, PyTorch's {ours.shape}")
        difference = float(np.abs(ours - theirs).max())
        span = float(ours.max() - ours.min()) or 1.0
        result[f"{name}_max_abs"] = difference
        result[f"{name}_relative"] = difference / max(span, abs(float(ours.max())), 1e-12)
    return result
