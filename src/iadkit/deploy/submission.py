"""Anomaly maps in the form the MVTec AD 2 evaluation server takes (benchmark.mvtec.com).

The layout and file types follow MVTec's own pre-upload checker
(``check_and_prepare_data_for_upload.py`` and ``utils.py`` of ``MVTecAD2_public_code_utils``,
2025): for every object and unlabelled test set,

- ``anomaly_images/<object>/<test set>/<image stem>.tiff``: the continuous map at the image's
  own size, one channel, float16;
- ``anomaly_images_thresholded/<object>/<test set>/<image stem>.png``: the segmentation, one
  channel, 0 (normal) or 255 (anomalous).

The object and test set are the image's grandparent and parent folders
(``can/test_private/000_regular.png``). The segmentation threshold is the detector's calibrated
pixel threshold (chosen on validation normals, never on test images). Pixels the model never saw
(outside a centre crop) take the map's lowest value.

Example:
    >>> summary = write_mvtec_ad2_submission(detector, paths, Path("submission"))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from ..errors import ConfigError
from ..methods import Detector
from ..progress import progress
from .batch import iter_predictions

#: The unlabelled test sets of MVTec AD 2 that the server scores.
SUBMISSION_TEST_SETS = ("test_private", "test_private_mixed")


@dataclass
class SubmissionSummary:
    """What a submission run wrote."""

    output: Path
    written: int
    failed: list[str]  # one line per unreadable image


def submission_paths(image: Path) -> tuple[Path, Path]:
    """The ``(map, segmentation)`` paths of ``image`` relative to the submission folder.

    Raises:
        ConfigError: the image is not in ``<object>/<test set>/``.
    """
    test_set, category = image.parent.name, image.parent.parent.name
    if test_set not in SUBMISSION_TEST_SETS or not category:
        raise ConfigError(f"{image}: an MVTec AD 2 submission scores the images of "
                          f"<object>/{{{','.join(SUBMISSION_TEST_SETS)}}}/; this one is in "
                          f"{image.parent}")
    relative = Path(category) / test_set / image.stem
    return (Path("anomaly_images") / relative.with_suffix(".tiff"),
            Path("anomaly_images_thresholded") / relative.with_suffix(".png"))


def write_mvtec_ad2_submission(detector: Detector, paths: Sequence[Path], out_dir: Path,
                               batch_size: int = 16, show_progress: bool = False
                               ) -> SubmissionSummary:
    """Score ``paths`` and write their maps and segmentations under ``out_dir`` (see the
    module's docstring). Every path is checked before anything is scored.

    Raises:
        ConfigError: the detector is not calibrated (no segmentation threshold), or an image is
            outside ``<object>/test_private*/``.
    """
    calibration = detector.calibration
    if calibration is None:
        raise ConfigError("an MVTec AD 2 submission needs the segmentation threshold of a "
                          "calibrated model (fit with --calibration auto or holdout)")
    targets = {str(path): submission_paths(Path(path)) for path in paths}
    written, failed = 0, []
    for item in progress(iter_predictions(detector, list(paths), batch_size), "predict",
                         show_progress, total=len(paths)):
        if item.error is not None:
            failed.append(item.error)
            continue
        assert item.anomaly_map is not None and item.original_size is not None
        full = detector.preprocess.map_to_original(item.anomaly_map, *item.original_size)
        # Pixels the model never saw (outside a centre crop) get the map's lowest score: the
        # server's files hold numbers, and float16 tops out at 65504.
        full = np.clip(np.nan_to_num(full, nan=float(np.nanmin(full))), None,
                       float(np.finfo(np.float16).max))
        map_path, mask_path = (out_dir / part for part in targets[str(item.path)])
        map_path.parent.mkdir(parents=True, exist_ok=True)
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(map_path, full.astype(np.float16))
        segmentation = (full > calibration.pixel_threshold).astype(np.uint8) * 255
        Image.fromarray(segmentation).save(mask_path)
        written += 1
    return SubmissionSummary(out_dir, written, failed)
