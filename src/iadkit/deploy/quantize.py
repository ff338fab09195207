"""INT8 post-training quantisation of an ONNX export for OpenVINO, with NNCF.

:func:`quantize_export` turns the float32 graph that :func:`~iadkit.deploy.export.export_onnx`
wrote into an OpenVINO model whose convolutions run in INT8. The quantisation ranges are
calibrated on **training normals only** (never test images). Matrix products stay float32: they
are where the methods compare features (PatchCore's distances to its memory bank, attention,
linear heads), and a distance computed from rounded inputs loses exactly the small differences
an anomaly score is made of.

The quantised model's scores must not drift: on held-out normals (training images *not* used
for calibration) every image score of the INT8 model must lie within ``tolerance`` times the
spread (standard deviation) of the float32 model's scores of the same images. When the plain
quantisation misses that, NNCF's accuracy-controlled quantisation returns the layers that
matter most for the drift to float32 until it holds; the export is refused when it cannot hold,
or only with every layer in float32, or when finding those layers would take too long (NNCF
ranks every quantised operation by scoring the held-out images again).
A threshold calibrated on the float32 scores then still separates normal from anomalous images
as it did (a drift of a tenth of the normal spread moves a threshold set three spreads
above the normal mean by a thirtieth of its margin).

Example:
    >>> export_onnx(detector, "exported/tiles")
    >>> quantize_export("exported/tiles", training_image_paths)
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data.image_io import image_shape, read_image
from ..data.preprocess import Preprocess
from ..errors import IadkitError
from ..files import read_json_record
from .inferencer import CONFIG_FILE, INT8_MODEL_FILE, MODEL_FILE

#: Largest image-score drift allowed on held-out normals, in standard deviations of their
#: float32 scores.
DEFAULT_DRIFT_TOLERANCE = 0.1
#: Longest expected ranking of the quantised operations by NNCF's accuracy control, in minutes,
#: before an export that needs it is refused instead.
DEFAULT_MAX_RESTORE_MINUTES = 30.0
#: Most rounds of returning layers to float32 (each re-ranks the remaining layers on the held-out
#: images: about two minutes for PatchCore on 64 images): the export's time stays bounded.
MAX_RESTORE_STEPS = 8


def quantize_export(folder: str | Path, images: Sequence[str | Path],
                    tolerance: float = DEFAULT_DRIFT_TOLERANCE, max_calibration: int = 300,
                    n_check: int = 64, seed: int = 0,
                    max_restore_minutes: float = DEFAULT_MAX_RESTORE_MINUTES) -> dict[str, Any]:
    """Write ``folder/model_int8.xml`` (+ ``.bin``) next to an ONNX export and record it in
    ``inference.json``; returns the quantisation record.

    Args:
        folder: an export written by :func:`~iadkit.deploy.export.export_onnx`.
        images: normal training images; a seeded ``n_check`` of them (at most a quarter) are
            held out for the drift check, at most ``max_calibration`` of the others calibrate.
        tolerance: largest score drift on the held-out normals, in standard deviations of their
            float32 scores.
        max_restore_minutes: when the drift is beyond ``tolerance``, the longest that NNCF's
            ranking of the quantised operations may be expected to take (estimated from the
            time of one drift check) before the export is refused instead.

    Raises:
        IadkitError: NNCF or OpenVINO missing, too few images, the drift beyond
            ``tolerance``, or its repair expected to take longer than ``max_restore_minutes``
            (then nothing is written).
    """
    try:
        import nncf
        import openvino
    except ImportError:
        raise IadkitError("INT8 export needs OpenVINO and NNCF: pip install 'iadkit[openvino]'"
                          ) from None
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    record = read_json_record(config_path, {"preprocess": dict})
    preprocess = Preprocess(**record["preprocess"])
    paths = [Path(path) for path in images]
    if len(paths) < 8:
        raise IadkitError(f"INT8 export: calibration needs at least 8 normal training images, "
                          f"got {len(paths)}")
    held_out, calibration = _held_out_and_calibration(paths, n_check, max_calibration, seed)

    started = time.perf_counter()
    core = openvino.Core()
    float_model = _constants_folded(core.read_model(str(folder / MODEL_FILE)))
    # Every compilation of the model and its quantised copies (NNCF's own included) computes in
    # float32 wherever it is not INT8: OpenVINO's bfloat16 default would blur the drift check.
    float_model.set_rt_info("f32", ["runtime_options", "INFERENCE_PRECISION_HINT"])
    held_out_units = _Units(held_out, preprocess)
    float_scores = _scores(core.compile_model(float_model, "CPU", _F32), held_out_units)
    spread = float(np.std(float_scores)) or 1.0

    def drift_of(compiled: Any, units: Any) -> float:
        """The largest score change from float32 on the held-out units, in spreads."""
        return float(np.abs(_scores(compiled, units) - float_scores).max()) / spread

    def closeness(compiled: Any, units: Any) -> float:
        """NNCF's validation metric (higher is better): 1 - the drift (NNCF divides by the
        float32 model's value, so it must not be 0)."""
        return 1.0 - drift_of(compiled, units)

    settings = _nncf_settings(calibration, preprocess)
    quantized = nncf.quantize(float_model, nncf.Dataset(_Units(calibration, preprocess)),
                              **settings)
    checking = time.perf_counter()
    drift = drift_of(core.compile_model(quantized, "CPU", _F32), held_out_units)
    check_seconds = time.perf_counter() - checking
    if not drift <= tolerance:
        # NNCF's accuracy control first ranks every quantised operation by compiling the model
        # with that operation back in float32 and scoring the held-out normals: as long as
        # the check just run, once per operation. A graph of thousands (LaFitE's unrolled
        # diffusion steps) would rank for hours: refused now, with the estimate.
        n_operations = _n_quantised_operations(quantized)
        ranking_minutes = n_operations * check_seconds / 60
        if ranking_minutes > max_restore_minutes:
            raise IadkitError(
                f"INT8 export refused: on {len(held_out)} held-out normal images the quantised "
                f"scores drift by {drift:.3g} standard deviations of their float32 scores, more "
                f"than the tolerance {tolerance:g}, and finding the layers to return to float32 "
                f"would score those images again for each of the {n_operations} quantised "
                f"operations: about {ranking_minutes:,.1f} minutes, more than the limit "
                f"{max_restore_minutes:g} (--int8-max-minutes); keep the float32 export (or "
                "raise --int8-tolerance or --int8-max-minutes)")
        # NNCF's accuracy control returns layers to float32, the most sensitive first, until
        # the held-out normals' drift is within the tolerance.
        quantized = nncf.quantize_with_accuracy_control(
            float_model, nncf.Dataset(_Units(calibration, preprocess)),
            nncf.Dataset(held_out_units), closeness, max_drop=tolerance,
            drop_type=nncf.DropType.ABSOLUTE,
            advanced_accuracy_restorer_parameters=nncf.quantization.advanced_parameters
            .AdvancedAccuracyRestorerParameters(max_num_iterations=MAX_RESTORE_STEPS),
            **settings)
        drift = drift_of(core.compile_model(quantized, "CPU", _F32), held_out_units)
    quantize_seconds = time.perf_counter() - started
    n_int8 = sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ops())
    if n_int8 == 0:
        raise IadkitError(
            f"INT8 export refused: every layer had to stay in float32 to keep the drift on "
            f"{len(held_out)} held-out normal images within {tolerance:g} standard deviations of "
            "their float32 scores; keep the float32 export (or raise --int8-tolerance)")
    result = {
        "precision": "int8",
        "model": INT8_MODEL_FILE,
        "n_calibration_images": len(calibration),
        "n_held_out_images": len(held_out),
        "drift": round(drift, 5),
        "n_quantized_inputs": n_int8,
        "tolerance": tolerance,
        "held_out_score_std": spread,
        "quantize_seconds": round(quantize_seconds, 2),
        "nncf": nncf.__version__,
        "openvino": openvino.__version__,
    }
    if not drift <= tolerance:
        raise IadkitError(
            f"INT8 export refused: on {len(held_out)} held-out normal images the quantised "
            f"scores drift by {drift:.3g} standard deviations of their float32 scores, more than "
            f"the tolerance {tolerance:g}; keep the float32 export (or raise --int8-tolerance)")
    openvino.save_model(quantized, str(folder / INT8_MODEL_FILE), compress_to_fp16=False)
    record["openvino_int8"] = result
    config_path.write_text(json.dumps(record, indent=2))
    return result


#: OpenVINO's inference precision for everything left in floating point.
_F32 = {"INFERENCE_PRECISION_HINT": "f32"}


class _Units:
    """Every image's units (its resized square, or its tiles), one (1, 3, S, S) array each,
    read again on every pass (NNCF may pass more than once)."""

    def __init__(self, paths: Sequence[Path], preprocess: Preprocess) -> None:
        self.paths, self.preprocess = paths, preprocess

    def __iter__(self) -> Iterator[np.ndarray]:
        for path in self.paths:
            for unit in self.preprocess.units_array(read_image(path)):
                yield np.ascontiguousarray(unit[None], dtype=np.float32)


def _held_out_and_calibration(paths: Sequence[Path], n_check: int = 64,
                              max_calibration: int = 300, seed: int = 0
                              ) -> tuple[list[Path], list[Path]]:
    """The seeded ``n_check`` held-out images (at most a quarter) and, after them, at most
    ``max_calibration`` calibration images."""
    order = np.random.default_rng(seed).permutation(len(paths))
    n_held_out = min(n_check, len(paths) // 4)
    return ([paths[i] for i in order[:n_held_out]],
            [paths[i] for i in order[n_held_out:n_held_out + max_calibration]])


def _nncf_settings(calibration: Sequence[Path], preprocess: Preprocess) -> dict[str, Any]:
    """``nncf.quantize``'s keyword arguments: every calibration unit, matrix products left out."""
    import nncf

    return dict(subset_size=sum(preprocess.n_units(*image_shape(path)) for path in calibration),
                # Matrix products (distances, attention, heads) stay float32: see the module
                # docstring.
                ignored_scope=nncf.IgnoredScope(types=["MatMul", "Gemm"], validate=False))


def _constants_folded(model: Any) -> Any:
    """``model`` with its constant subgraphs computed once (exactly: reshapes, mostly).

    OpenVINO reads an ONNX depthwise convolution as a grouped one whose weights pass through a
    reshape. Left in the graph, that reshape keeps NNCF from storing those weights as INT8
    constants: it fake-quantises them in float instead, and OpenVINO then runs every depthwise
    convolution in float32, with a layout conversion before and after each. Folded first, the
    depthwise convolutions run as INT8 kernels (STFPM's INT8 model 1.8 times faster at batch
    16, the same accuracy; 2026-12-03, docs/deployment.md).
    """
    from openvino.passes import ConstantFolding, Manager

    manager = Manager()
    manager.register_pass(ConstantFolding())
    manager.run_passes(model)
    return model


def _n_quantised_operations(model: Any) -> int:
    """How many quantisers a quantised OpenVINO model has on activations (one per quantised
    operation's input; its weights' quantisers hang off constants)."""
    return sum(op.get_type_name() == "FakeQuantize"
               and op.input_value(0).get_node().get_type_name() != "Constant"
               for op in model.get_ops())


def _scores(compiled: Any, units: Iterable[np.ndarray]) -> np.ndarray:
    """Each unit's score (a tiled image's tiles are compared one by one)."""
    return np.array([float(compiled([unit])[compiled.output(1)][0]) for unit in units])
