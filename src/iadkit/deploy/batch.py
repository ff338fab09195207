"""Batch prediction over many image files: streaming, resumable, CSV or JSON lines.

Images are read, scored and written batch by batch, so memory stays bounded whatever the number
of files; every row is flushed as it is written. With ``resume``, the files already in the
output are skipped and new rows are appended (a row cut short by a crash is dropped first), so a
run over 100k images killed halfway continues where it stopped.

Example:
    >>> summary = predict_files(detector, paths, Path("out"), output_format="jsonl")
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from ..calibration import decide
from ..data.image_io import read_image
from ..data.preprocess import Preprocess
from ..errors import ConfigError, ImageReadError
from ..methods import Detector
from ..overlay import save_overlay
from ..progress import progress
from ..regions import find_regions

FIELDS = ("path", "score", "normalised_score", "threshold", "anomalous", "regions", "heatmap",
          "error")
FORMATS = ("csv", "jsonl")


@dataclass
class FilePrediction:
    """The prediction for one image file, or why there is none."""

    path: Path
    score: float | None
    anomaly_map: np.ndarray | None  # in the detector's input geometry
    original_size: tuple[int, int] | None = None  # the file's (height, width)
    error: str | None = None


def iter_predictions(detector: Detector, paths: Sequence[Path], batch_size: int = 16
                     ) -> Iterator[FilePrediction]:
    """Predictions for image files, batch by batch, in bounded memory.

    A file that cannot be read yields a prediction with ``error`` set (naming the file and the
    problem); the other files are still scored.
    """
    preprocess = detector.preprocess
    for start in range(0, len(paths), batch_size):
        readable, images, sizes = [], [], []
        for path in paths[start:start + batch_size]:
            try:
                image = read_image(path)
            except ImageReadError as error:
                yield FilePrediction(Path(path), None, None, error=str(error))
                continue
            images.append(preprocess.image(image))
            sizes.append(image.shape[:2])
            readable.append(path)
        if not images:
            continue
        prediction = detector.predict(torch.stack(images))
        for path, score, anomaly_map, size in zip(readable, prediction.scores,
                                                  prediction.anomaly_maps, sizes):
            yield FilePrediction(Path(path), float(score), anomaly_map.numpy(), size)


@dataclass
class BatchSummary:
    """What a batch prediction did."""

    output: Path
    scored: int
    failed: int
    skipped: int  # already in the output (resume)


def predict_files(detector: Detector, paths: Sequence[Path], out_dir: Path,
                  output_format: str = "csv", resume: bool = False, heatmaps: bool = True,
                  batch_size: int = 16, show_progress: bool = False) -> BatchSummary:
    """Score ``paths`` into ``out_dir/scores.<format>`` (and ``out_dir/heatmaps/``).

    Each row: path, score, normalised score, threshold, anomalous (0/1; empty without a
    calibration), regions (JSON list of the anomalous regions' bounding boxes, area and peak
    in the file's own pixel coordinates; empty without a calibration), heatmap file (the map
    over the original image, at its size), error (why an unreadable file has no score).
    """
    if output_format not in FORMATS:
        raise ConfigError(f"output format must be one of {FORMATS}, got {output_format!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    output = out_dir / f"scores.{output_format}"
    done = _completed_rows(output, output_format) if resume and output.is_file() else None
    # Heatmaps are numbered by the file's position in the full list: files of the same name in
    # different folders never collide, and a resumed run numbers the same way.
    numbers = {str(path): number for number, path in enumerate(paths)}
    todo = [path for path in paths if done is None or str(path) not in done]
    calibration = detector.calibration
    scored = failed = 0
    with output.open("a" if done is not None else "w", newline="") as handle:
        write = _row_writer(handle, output_format, header=done is None)
        items = iter_predictions(detector, todo, batch_size)
        for item in progress(items, "predict", show_progress, total=len(todo)):
            row: dict[str, Any] = dict.fromkeys(FIELDS, "")
            row["path"] = str(item.path)
            if item.error is not None:
                failed += 1
                row["error"] = item.error
            else:
                scored += 1
                decision = decide(item.score, calibration)
                row["score"] = f"{decision.score:.6g}"
                if decision.anomalous is not None:
                    row["normalised_score"] = f"{decision.normalised_score:.4f}"
                    row["threshold"] = f"{decision.threshold:.6g}"
                    row["anomalous"] = int(decision.anomalous)
                    row["regions"] = _regions(item, detector.preprocess,
                                              calibration.pixel_threshold)
                if heatmaps:
                    name = f"heatmaps/{numbers[str(item.path)]:06d}_{item.path.stem}.png"
                    save_overlay(item.path, item.anomaly_map, detector.preprocess, calibration,
                                 out_dir / name)
                    row["heatmap"] = name
            write(row)
            handle.flush()
    return BatchSummary(output, scored, failed, len(paths) - len(todo))


def _regions(item: FilePrediction, preprocess: Preprocess, threshold: float
             ) -> list[dict[str, Any]]:
    """The anomalous regions of a prediction, in the file's own pixel coordinates."""
    assert item.anomaly_map is not None and item.original_size is not None
    full = preprocess.map_to_original(item.anomaly_map, *item.original_size)
    return [region.to_dict() for region in find_regions(full, threshold)]


def _row_writer(handle: TextIO, output_format: str, header: bool) -> Any:
    if output_format == "csv":
        writer = csv.DictWriter(handle, fieldnames=list(FIELDS))
        if header:
            writer.writeheader()
        # a CSV cell holds the regions as JSON text
        return lambda row: writer.writerow(
            {**row, "regions": json.dumps(row["regions"]) if row["regions"] != "" else ""})
    return lambda row: handle.write(json.dumps(row) + "\n")


def _completed_rows(output: Path, output_format: str) -> set[str]:
    """The paths already in ``output``; rewrites it without a last row cut short by a crash."""
    text = output.read_text()
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):  # the last write never finished
        lines = lines[:-1]
        output.write_text("".join(lines))
    if output_format == "csv":
        return {row["path"] for row in csv.DictReader(lines) if row.get("path")}
    return {json.loads(line)["path"] for line in lines if line.strip()}
