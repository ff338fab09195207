"""Scoring with an exported ONNX model and onnxruntime (or OpenVINO), without torch.

Only NumPy, Pillow and the runtime are imported (not torch, not iadkit's training code), so a
production image can ship without PyTorch. Preprocessing is iadkit's own
(:class:`~iadkit.data.preprocess.Preprocess`, NumPy), and the decision is
:func:`~iadkit.calibration.decide` with the calibration saved at export (the threshold from
held-out normal images).

Example:
    >>> inferencer = OnnxInferencer("exported/tiles")
    >>> result = inferencer.predict_file("part_0042.png")
    >>> result.score, result.anomalous
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..calibration import Calibration, Decision, decide
from ..data.image_io import read_image
from ..data.preprocess import Preprocess, predict_by_units
from ..errors import CheckpointError, ConfigError
from ..files import read_json_record

#: An export's files (written by :func:`iadkit.deploy.export.export_onnx`) and format tag.
MODEL_FILE, CONFIG_FILE, INFERENCE_FORMAT = "model.onnx", "inference.json", "iadkit-onnx"
#: The INT8 OpenVINO model an export may also hold (:func:`iadkit.deploy.quantize.quantize_export`).
INT8_MODEL_FILE = "model_int8.xml"
#: The fit record's entries an export keeps, for the service's ``GET /model``.
TRAINING_SUMMARY_KEYS = ("n_train_images", "n_validation_images", "backbone_weights",
                         "seconds_fit")
RUNTIMES = ("onnxruntime", "openvino")
PRECISIONS = ("f32", "bf16", "int8")


@dataclass
class InferenceResult:
    """One image's prediction.

    Attributes:
        anomaly_map: float32 map at the evaluation shape (``preprocess.evaluation_shape``;
            ``preprocess.map_to_original`` maps it onto the original image).
        decision: the score and, when the model was calibrated, the decision.
    """

    anomaly_map: np.ndarray
    decision: Decision

    @property
    def score(self) -> float:
        return self.decision.score

    @property
    def anomalous(self) -> bool | None:
        """score > threshold, or None when the model has no calibration."""
        return self.decision.anomalous


class OnnxInferencer:
    """An exported detector (``model.onnx`` + ``inference.json``) run by onnxruntime or OpenVINO.

    Args:
        folder: what :func:`iadkit.deploy.export.export_onnx` wrote.
        threads: intra-op threads of the runtime (None: its default, all cores).
        runtime: "onnxruntime" (``pip install 'iadkit[onnx]'``) or "openvino"
            (``pip install 'iadkit[openvino]'``; compiles the same ONNX file for Intel/AMD CPUs).
        precision: OpenVINO's inference precision, "f32" (default: the scores match PyTorch, so
            the exported threshold holds), "bf16" (faster on CPUs with bfloat16 units, scores
            off by about 0.2%; OpenVINO's own default there) or "int8" (the export's INT8
            model, ``iadkit export --precision int8``: INT8 convolutions, the rest float32).
            Ignored by onnxruntime, which runs "f32" only.
    """

    def __init__(self, folder: str | Path, threads: int | None = None,
                 runtime: str = "onnxruntime", precision: str = "f32") -> None:
        if runtime not in RUNTIMES:
            raise ConfigError(f"unknown runtime {runtime!r}; choose from {RUNTIMES}")
        if precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {precision!r}; choose from {PRECISIONS}")
        if precision == "int8" and runtime != "openvino":
            raise ConfigError("precision 'int8' runs on the runtime 'openvino' only")
        folder = Path(folder)
        config_path = folder / CONFIG_FILE
        model_path = folder / (INT8_MODEL_FILE if precision == "int8" else MODEL_FILE)
        for needed in (config_path, model_path):
            if not needed.is_file():
                hint = (" with an INT8 model (iadkit export --precision int8)"
                        if needed.name == INT8_MODEL_FILE else "")
                raise CheckpointError(f"{needed}: missing; {folder} is not an exported model"
                                      f"{hint}")
        self.config: dict[str, Any] = read_json_record(config_path, {"preprocess": dict})
        if self.config.get("format") != INFERENCE_FORMAT:
            raise CheckpointError(f"{config_path}: not an iadkit ONNX export")
        try:
            self.preprocess = Preprocess(**self.config["preprocess"])
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{config_path}: damaged, field 'preprocess': {error}"
                                  ) from None
        try:
            self.calibration = Calibration.from_dict(self.config.get("calibration"))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise CheckpointError(f"{config_path}: damaged, field 'calibration': "
                                  f"{type(error).__name__} {error}") from None
        self.runtime = runtime
        try:
            self._run = (_openvino_runner(model_path, threads, precision)
                         if runtime == "openvino" else _onnxruntime_runner(model_path, threads))
        except ImportError:
            raise
        except Exception as error:  # noqa: BLE001 (the runtimes share no exception base)
            raise CheckpointError(f"{model_path}: not a readable ONNX model ({error})"
                                  ) from None

    def predict(self, images: list[np.ndarray], batch_size: int = 16) -> list[InferenceResult]:
        """Score (H, W, 3) uint8 RGB images, their units (one each, or their tiles) run
        ``batch_size`` at a time."""
        units = ((index, self.preprocess.units(image, eager=False))
                 for index, image in enumerate(images))
        return [InferenceResult(anomaly_map, decide(score, self.calibration))
                for _, anomaly_map, score in predict_by_units(
                    self.preprocess, units, lambda batch, _: self.run(batch), batch_size)]

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, 3, S, S) float32 units -> maps (B, S, S) and scores (B,)."""
        return self._run(np.ascontiguousarray(batch, dtype=np.float32))

    def predict_file(self, path: str | Path) -> InferenceResult:
        """Read (with iadkit's conversions and errors) and score one image file."""
        return self.predict([read_image(path)])[0]


def _onnxruntime_runner(model_path: Path, threads: int | None) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(model_path), options,
                                           providers=["CPUExecutionProvider"])

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = session.run(None, {"images": batch})
        return maps, scores

    return run


def _openvino_runner(model_path: Path, threads: int | None, precision: str) -> Any:
    try:
        import openvino
    except ImportError:
        raise ImportError("runtime 'openvino' needs OpenVINO: pip install 'iadkit[openvino]'"
                          ) from None
    # OpenVINO computes in bfloat16 by default where the CPU has it; f32 is asked for explicitly
    # (an INT8 model's layers left in floating point included).
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32" if precision == "int8"
                              else precision}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = openvino.Core().compile_model(str(model_path), "CPU", config)

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        outputs = compiled([batch])
        return outputs[compiled.output(0)], outputs[compiled.output(1)]

    return run
