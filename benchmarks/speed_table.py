"""Every method's speed on one table: fit, training throughput, inference in PyTorch, ONNX
Runtime and OpenVINO (float32 and INT8), against the backbone alone, and peak memory.

For each registered method (or ``--methods``), in a fresh process of its own (so that its peak
RSS is its own; resumable: a method with a result under ``--out`` is not run again):

1. ``iadkit fit`` at the cpu preset on the data's training images (``--schedule preset``), or
   with every training schedule cut to one epoch (``--schedule one-epoch``: a quick table of
   per-epoch costs; EfficientAD 2 distillation and 10 training steps): the whole command's
   seconds (training and calibration) and the training's images per second (images x epochs
   over the training's seconds);
2. the fitted model on ``--test`` preprocessed test images (decoding excluded), batches of 16
   and single images: PyTorch ``predict``, the backbone alone (the floor), and the ONNX export
   on ONNX Runtime and OpenVINO in float32 and in INT8 (NNCF, calibrated on training normals;
   its held-out drift is reported, never used to refuse here);
3. the process's peak RSS.

One JSON line per method; the markdown table between the ``speed-table`` markers of
docs/performance.md is rewritten from all the results under ``--out`` (a method measured again
replaces its row only). ``--precision bf16`` fits and predicts with the networks in bfloat16
(the backbone alone timed in it too) and skips the exports (their graphs are float32);
``--torch-only`` skips them in float32 too. Either leaves the table alone and keeps its results
in a folder of their own. Usage (repository root)::

    .venv/bin/python benchmarks/speed_table.py [--schedule one-epoch] [--methods rd patchcore]
        [--data ../shared/data/magnetic_tile] [--out /tmp/iadkit-speed] [--precision bf16]
        [--torch-only]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from onnx_vs_torch import rate
from records import cpu_model, peak_rss_gb

from iadkit.cli import main as iadkit
from iadkit.data import SampleSet, load_dataset, make_loader
from iadkit.deploy.export import export_onnx
from iadkit.deploy.inferencer import OnnxInferencer
from iadkit.deploy.quantize import quantize_export
from iadkit.engine import resolve_model_dir
from iadkit.errors import IadkitError
from iadkit.methods import Detector, available_methods
from iadkit.nn.precision import PRECISIONS

REPO = Path(__file__).resolve().parents[1]
TEXTURES = REPO.parent / "shared" / "data" / "textures"
#: Schedules cut to one epoch (``--schedule one-epoch``).
ONE_EPOCH: dict[str, dict[str, Any]] = {
    "rd": {"epochs": 1}, "aand": {"epochs": 1, "amplify_epochs": 1},
    "recontrast": {"epochs": 1}, "stfpm": {"epochs": 1}, "simplenet": {"epochs": 1},
    "adapted_moe": {"epochs": 1}, "uniad": {"epochs": 1}, "lafite": {"epochs": 1},
    "cse": {"epochs": 1, "min_steps": 0}, "cada": {"base_params": {"epochs": 1}},
    "efficientad": {"distillation_steps": 2, "max_steps": 10}}
#: Image folders some methods need whatever the schedule.
RESOURCES = {"aand": {"texture_dir": str(TEXTURES)},
             "efficientad": {"distillation_dir": str(TEXTURES)}}
MARKERS = ("<!-- speed-table:start -->", "<!-- speed-table:end -->")


def inference_costs(prefix: str, function: Any, images: torch.Tensor) -> dict[str, float]:
    """Milliseconds per image of ``function`` in batches of 16 and one by one."""
    return {f"{prefix}_ms_batch16": round(1000 / rate(function, list(images.split(16))), 2),
            f"{prefix}_ms_batch1": round(1000 / rate(function, list(images.split(1))[:16]), 2)}


def measure(method: str, data: str, schedule: str, n_test: int, work: Path,
            precision: str, exports: bool) -> dict[str, Any]:
    """Fit, time and export one method (run in a process of its own)."""
    params = {**RESOURCES.get(method, {}),
              **(ONE_EPOCH.get(method, {}) if schedule == "one-epoch" else {})}
    run = work / f"run_{method}"
    arguments = ["fit", "--method", method, "--preset", "cpu", "--data", data, "--out",
                 str(run), "--quiet", "--precision", precision]
    for key, value in params.items():
        arguments += ["--param", f"{key}={json.dumps(value)}"]
    started = time.perf_counter()
    if iadkit(arguments) != 0:
        raise SystemExit(f"fitting {method} failed")
    fit_seconds = time.perf_counter() - started
    detector = Detector.load(resolve_model_dir(run), device="cpu", precision=precision)
    info = detector.fit_info_ or {}
    n_train = int(info.get("n_train_images", 0))
    epochs = sum(len(losses) for losses in info.get("loss_history", {}).values()) or 1
    training_seconds = info.get("seconds_training") or info.get("seconds_fit")
    line: dict[str, Any] = {
        "benchmark": "speed_table", "method": method, "schedule": schedule,
        "precision": precision, "params": params,
        "n_train": n_train, "fit_seconds": round(fit_seconds, 1),
        "train_images_per_second": round(n_train * epochs / training_seconds, 2)
        if training_seconds else None}
    test = load_dataset(data).where(split="test")
    spread = SampleSet(list(test)[::max(1, len(test) // n_test)][:n_test])
    images = torch.cat([batch["image"] for batch in
                        make_loader(spread, detector.preprocess, batch_size=16)])
    with torch.inference_mode():
        line.update(inference_costs("torch", detector.predict, images))
        extractor = getattr(detector, "extractor", None)
        if extractor is not None:
            with detector.networks_in_precision():
                line.update(inference_costs("backbone", extractor, images))
    if not exports:
        return line
    with tempfile.TemporaryDirectory() as folder:
        try:
            export_onnx(detector, folder)
        except IadkitError as error:
            line["export_error"] = str(error)
            return line
        runtimes = [("onnxruntime", "onnxruntime", "f32")]
        if importlib.util.find_spec("openvino"):
            runtimes.append(("openvino_f32", "openvino", "f32"))
            if importlib.util.find_spec("nncf"):
                training = [s.image_path for s in load_dataset(data).where(split="train")]
                try:
                    record = quantize_export(folder, training, tolerance=float("inf"))
                    line["int8_held_out_drift"] = record["drift"]
                    runtimes.append(("openvino_int8", "openvino", "int8"))
                except IadkitError as error:
                    line["int8_error"] = str(error)
        for column, runtime, runtime_precision in runtimes:
            inferencer = OnnxInferencer(folder, runtime=runtime, precision=runtime_precision)
            line.update(inference_costs(column, lambda x, i=inferencer: i.run(x.numpy()),
                                        images))
    return line


TABLE_COLUMNS = [("method", "method"), ("schedule", "schedule"), ("fit_seconds", "fit s"),
                 ("train_images_per_second", "train img/s"),
                 ("torch_ms_batch16", "torch ms (16)"), ("torch_ms_batch1", "torch ms (1)"),
                 ("onnxruntime_ms_batch16", "ORT ms (16)"),
                 ("openvino_f32_ms_batch16", "OV f32 ms (16)"),
                 ("openvino_int8_ms_batch16", "OV int8 ms (16)"),
                 ("backbone_ms_batch16", "backbone ms (16)"), ("peak_rss_gb", "peak GiB")]


def markdown_table(lines: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(title for _, title in TABLE_COLUMNS) + " |"
    rule = "|" + "---|" * len(TABLE_COLUMNS)
    rows = ["| " + " | ".join("–" if line.get(key) is None else str(line[key])
                              for key, _ in TABLE_COLUMNS) + " |" for line in lines]
    return "\n".join([head, rule, *rows])


def write_table(lines: list[dict[str, Any]], page: Path) -> None:
    """Replace the table between the markers of ``page`` (the page keeps its prose)."""
    text = page.read_text()
    start, end = (text.index(marker) for marker in MARKERS)
    machine = f"{cpu_model()}, {torch.get_num_threads()} torch threads"
    table = (f"{MARKERS[0]}\n\n_{machine}; written by benchmarks/speed_table.py_\n\n"
             f"{markdown_table(lines)}\n\n")
    page.write_text(text[:start] + table + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=available_methods())
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "magnetic_tile"))
    parser.add_argument("--schedule", choices=("preset", "one-epoch"), default="preset")
    parser.add_argument("--test", type=int, default=64, help="test images timed")
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "iadkit-speed"))
    parser.add_argument("--page", default=str(REPO / "docs" / "performance.md"))
    parser.add_argument("--precision", choices=PRECISIONS, default="f32")
    parser.add_argument("--torch-only", action="store_true", help="no exports, no table")
    parser.add_argument("--cell", help=argparse.SUPPRESS)  # one method, in this process
    args = parser.parse_args()
    exports = args.precision == "f32" and not args.torch_only
    out = Path(args.out) / (args.schedule if exports else f"{args.schedule}-{args.precision}")
    out.mkdir(parents=True, exist_ok=True)
    if args.cell:
        line = measure(args.cell, args.data, args.schedule, args.test, out, args.precision,
                       exports)
        line.update(peak_rss_gb=peak_rss_gb(), cpu=cpu_model(),
                    torch_threads=torch.get_num_threads())
        (out / f"{args.cell}.json").write_text(json.dumps(line))
        return
    lines = []
    for method in args.methods:
        result = out / f"{method}.json"
        if not result.is_file():
            subprocess.run([sys.executable, __file__, "--cell", method, "--data", args.data,
                            "--schedule", args.schedule, "--test", str(args.test),
                            "--out", args.out, "--precision", args.precision]
                           + (["--torch-only"] if args.torch_only else []), check=False)
        if result.is_file():
            lines.append(json.loads(result.read_text()))
            print(json.dumps(lines[-1]), flush=True)
        else:
            print(json.dumps({"benchmark": "speed_table", "method": method,
                              "schedule": args.schedule, "error": "the cell failed (above)"}),
                  flush=True)
    # The table shows every method measured under --out, not only this call's --methods.
    measured = [json.loads(path.read_text()) for path in sorted(out.glob("*.json"))]
    if measured and Path(args.page).is_file() and exports:
        write_table(measured, Path(args.page))


if __name__ == "__main__":
    main()
