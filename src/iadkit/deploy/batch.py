"""Batch prediction over many image files: streaming, resumable, JSON lines and CSV.

Images are read, scored and written batch by batch, so memory stays bounded whatever the number
of files. The durable record is ``scores.jsonl``: one ASCII JSON line per file, flushed as it is
written, so a kill at any byte loses at most the line being written. With ``resume`` that torn
line is dropped, the files the log has finished (matched by their exact names, never by
re-parsing what was written for people) are skipped, and the rest are appended; a run over
100k images killed halfway continues where it stopped. ``scores.csv`` is written from the log,
whole and atomically, at the end of each run.

Example:
    >>> summary = predict_files(detector, paths, Path("out"), output_format="jsonl")
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import unicodedata
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import distributed
from ..calibration import decide
from ..data.image_io import read_image
from ..data.preprocess import Preprocess, Units, predict_by_units
from ..errors import ConfigError, ImageReadError
from ..fanout import check_executor
from ..files import write_text_atomic
from ..methods import Detector
from ..overlay import save_overlay
from ..progress import progress
from ..regions import regions_in_original

FIELDS = ("path", "path_encoding", "score", "normalised_score", "threshold", "anomalous",
          "regions", "heatmap", "error")
#: The durable record of a batch prediction (always written; the CSV is made from it).
LOG_FILE = "scores.jsonl"
FORMATS = ("csv", "jsonl")


@dataclass
class FilePrediction:
    """The prediction for one image file, or why there is none."""

    path: Path
    score: float | None
    anomaly_map: np.ndarray | None  # at the evaluation shape (Preprocess.evaluation_shape)
    original_size: tuple[int, int] | None = None  # the file's (height, width)
    error: str | None = None


def iter_predictions(detector: Detector, paths: Sequence[Path], batch_size: int = 16
                     ) -> Iterator[FilePrediction]:
    """Predictions for image files, batch by batch, in bounded memory.

    A file that cannot be read yields a prediction with ``error`` set (naming the file and the
    problem); the other files are still scored.
    """
    preprocess = detector.preprocess

    def readable() -> Iterator[tuple[tuple[Path, tuple[int, int]], Units]]:
        for path in paths:
            try:
                image = read_image(path)
            except ImageReadError as error:
                failed.append(FilePrediction(Path(path), None, None, error=str(error)))
                continue
            yield (Path(path), image.shape[:2]), preprocess.units(image, eager=False)

    def predict(units: np.ndarray, _: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        prediction = detector.predict(units)
        return prediction.anomaly_maps.numpy(), prediction.scores.numpy()

    failed: list[FilePrediction] = []
    for (path, size), anomaly_map, score in predict_by_units(preprocess, readable(), predict,
                                                             batch_size):
        yield from failed
        failed.clear()
        yield FilePrediction(path, score, anomaly_map, size)
    yield from failed


@dataclass
class BatchSummary:
    """What a batch prediction did."""

    output: Path
    scored: int
    failed: int
    skipped: int  # already in the output (resume)


def predict_files(detector: Detector, paths: Sequence[Path], out_dir: Path,
                  output_format: str = "csv", resume: bool = False, heatmaps: bool = True,
                  batch_size: int = 16, show_progress: bool = False,
                  executor: str = "local", address: str | None = None, actors: int = 2,
                  model_dir: Path | None = None) -> BatchSummary:
    """Score ``paths`` into ``out_dir/scores.jsonl`` (the durable record), ``scores.csv`` when
    asked, and ``out_dir/heatmaps/``.

    Each record: path, path_encoding, score, normalised score, threshold, anomalous (0/1; empty
    without a calibration), regions (the anomalous regions' bounding boxes, area and peak in the
    file's own pixel coordinates; empty without a calibration), heatmap file (the map over the
    original image, at its size), error (why an unreadable file has no score). A name that is
    not clean text (bytes that are not UTF-8, control or line-separator characters) is
    percent-encoded, with ``path_encoding`` "percent" (:func:`decode_path` reverses it).

    ``scores.jsonl`` gets one line per file, flushed as it is written; a kill at any byte loses
    at most the line being written, which ``resume`` detects and drops. The CSV is written
    from it, whole and atomically, at the end of every run (resumed or not), with a header and
    text cells that a spreadsheet would read as a formula neutralised.

    With ``executor="ray"``, ``actors`` Ray actors each load the saved detector of
    ``model_dir`` once and score chunks of the files (writing their heatmaps); this process
    writes their records in the files' order, so the outputs are the local path's.
    """
    if output_format not in FORMATS:
        raise ConfigError(f"output format must be one of {FORMATS}, got {output_format!r}")
    check_executor(executor, address)
    if executor == "ray" and model_dir is None:
        raise ConfigError("prediction on Ray needs the saved detector's folder (model_dir)")
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / LOG_FILE
    # Under torchrun rank 0 prepares and writes the log; every rank reads what is done.
    if distributed.is_main():
        done = _finished(log_path) if resume and log_path.is_file() else set()
        if not resume:
            log_path.write_text("")
    distributed.barrier()
    if not distributed.is_main():
        done = _finished(log_path) if resume and log_path.is_file() else set()
    # Heatmaps are numbered by the file's position in the full list: files of the same name in
    # different folders never collide, and a resumed run numbers the same way.
    numbers = {str(path): number for number, path in enumerate(paths)}
    todo = [(path, numbers[str(path)]) for path in paths if str(path) not in done]
    if executor == "ray":
        assert model_dir is not None
        records = _records_on_ray(model_dir, todo, out_dir, heatmaps, batch_size, address,
                                  actors, detector.device, detector.precision)
    elif distributed.is_distributed():
        records = _records_over_ranks(detector, todo, out_dir, heatmaps, batch_size)
    else:
        records = file_records(detector, todo, out_dir, heatmaps, batch_size)
    scored = failed = 0
    writing = log_path.open("a", encoding="ascii", newline="\n") if distributed.is_main() \
        else contextlib.nullcontext()
    with writing as log:
        for record in progress(records, "predict", show_progress, total=len(todo)):
            if record["error"]:
                failed += 1
            else:
                scored += 1
            if log is not None:
                # ASCII JSON (ensure_ascii): no character of a name can break the line.
                log.write(json.dumps(record) + "\n")
                log.flush()
    output = log_path
    if output_format == "csv" and distributed.is_main():
        output = out_dir / "scores.csv"
        _write_csv(log_path, output)
    return BatchSummary(output, scored, failed, len(paths) - len(todo))


def file_records(detector: Detector, files: Sequence[tuple[Path, int]], out_dir: Path,
                 heatmaps: bool, batch_size: int) -> Iterator[dict[str, Any]]:
    """The log records of ``files`` (path, its number in the whole list), in order; writes
    their heatmaps under ``out_dir``."""
    numbers = {str(path): number for path, number in files}
    calibration = detector.calibration
    for item in iter_predictions(detector, [path for path, _ in files], batch_size):
        record: dict[str, Any] = dict.fromkeys(FIELDS, "")
        record["path"], record["path_encoding"] = encode_path(str(item.path))
        if item.error is not None:
            record["error"] = item.error
            yield record
            continue
        decision = decide(item.score, calibration)
        record["score"] = f"{decision.score:.6g}"
        if decision.anomalous is not None:
            record["normalised_score"] = f"{decision.normalised_score:.4f}"
            record["threshold"] = f"{decision.threshold:.6g}"
            record["anomalous"] = int(decision.anomalous)
            record["regions"] = _regions(item, detector.preprocess, calibration.pixel_threshold)
        if heatmaps:
            name = f"heatmaps/{numbers[str(item.path)]:06d}_{_safe_stem(item.path.stem)}.png"
            save_overlay(item.path, item.anomaly_map, detector.preprocess, calibration,
                         out_dir / name)
            record["heatmap"] = name
        yield record


def _records_over_ranks(detector: Detector, files: Sequence[tuple[Path, int]], out_dir: Path,
                        heatmaps: bool, batch_size: int) -> Iterator[dict[str, Any]]:
    """The records of ``files`` under torchrun, in order: each chunk of files is split over
    the ranks (each writes its heatmaps) and its records gathered on every rank."""
    size = 4 * batch_size * distributed.world_size()
    for start in range(0, len(files), size):
        chunk = files[start:start + size]
        mine = [chunk[i] for i in distributed.shard(torch.arange(len(chunk))).tolist()]
        local = list(file_records(detector, mine, out_dir, heatmaps, batch_size))
        for part in distributed.all_gather_json(local):
            yield from part


class PredictionActor:
    """A Ray actor's work: one saved detector, loaded once, scoring chunks of files."""

    def __init__(self, model_dir: str, device: str, precision: str) -> None:
        self.detector = Detector.load(model_dir, device=device, precision=precision)

    def score(self, files: list[tuple[str, int]], out_dir: str, heatmaps: bool,
              batch_size: int) -> list[dict[str, Any]]:
        return list(file_records(self.detector, [(Path(p), n) for p, n in files],
                                 Path(out_dir), heatmaps, batch_size))


def _records_on_ray(model_dir: Path, files: Sequence[tuple[Path, int]], out_dir: Path,
                    heatmaps: bool, batch_size: int, address: str | None, actors: int,
                    device: str, precision: str) -> Iterator[dict[str, Any]]:
    """The records of ``files`` scored by a pool of Ray actors, in the files' order."""
    from ..fanout import start_ray

    ray = start_ray(address)
    from ray.util import ActorPool

    remote = ray.remote(num_gpus=1 if device.startswith("cuda") else 0)(PredictionActor)
    pool = ActorPool([remote.remote(str(model_dir), device, precision)
                      for _ in range(max(1, actors))])
    # Chunks of a few batches: large enough to keep an actor busy, small enough that a
    # killed run loses little (the log is written as chunks come back, in order).
    size = 4 * batch_size
    chunks = [[(str(path), number) for path, number in files[start:start + size]]
              for start in range(0, len(files), size)]
    for records in pool.map(lambda actor, chunk: actor.score.remote(
            chunk, str(out_dir), heatmaps, batch_size), chunks):
        yield from records
def encode_path(name: str) -> tuple[str, str]:
    """(text, encoding) of a file name: itself when it is clean text, else its bytes
    percent-encoded (every byte outside printable ASCII, and ``%``) with encoding "percent"."""
    if _clean(name):
        return name, ""
    return urllib.parse.quote(os.fsencode(name), safe=_PRINTABLE_SAFE), "percent"


def decode_path(text: str, encoding: str) -> str:
    """The file name :func:`encode_path` encoded (as ``str(path)`` gives it)."""
    if encoding == "percent":
        return os.fsdecode(urllib.parse.unquote_to_bytes(text))
    return text


_PRINTABLE_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def _clean(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # surrogate-escaped bytes that are not UTF-8
        return False
    return not any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in name)


def _safe_stem(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem)[:80]


def _regions(item: FilePrediction, preprocess: Preprocess, threshold: float
             ) -> list[dict[str, Any]]:
    """The anomalous regions of a prediction, in the file's own pixel coordinates."""
    assert item.anomaly_map is not None and item.original_size is not None
    return [region.to_dict() for region in regions_in_original(
        item.anomaly_map, preprocess, *item.original_size, threshold)]


def _read_log(log_path: Path) -> list[dict[str, Any]]:
    """The complete records of the log; a last line cut short by a kill is dropped (and cut
    from the file, so appending continues on a line boundary)."""
    data = log_path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with log_path.open("r+b") as handle:
            handle.truncate(end)
    return [json.loads(line) for line in data[:end].decode("ascii").splitlines() if line]


def _finished(log_path: Path) -> set[str]:
    """The file names (as ``str(path)``) the log has finished records of."""
    return {decode_path(r["path"], r.get("path_encoding", "")) for r in _read_log(log_path)}


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_TEXT_FIELDS = ("path", "regions", "heatmap", "error")


def _write_csv(log_path: Path, csv_path: Path) -> None:
    """Write the CSV from the log, whole and atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(FIELDS))
    writer.writeheader()
    for record in _read_log(log_path):
        row = {**record, "regions": json.dumps(record["regions"])
               if record["regions"] != "" else ""}
        for field in _TEXT_FIELDS:
            # A spreadsheet would run a cell starting like a formula: make it text.
            if isinstance(row[field], str) and row[field].startswith(_FORMULA_STARTS):
                row[field] = "'" + row[field]
        writer.writerow(row)
    # An error message may name a file whose bytes are not UTF-8: shown escaped.
    write_text_atomic(csv_path, buffer.getvalue(), errors="backslashreplace")
