"""A self-contained HTML report and heatmap overlays.

The page holds the metrics table, ROC and precision-recall curves, per-group score histograms with
the decision threshold and where it came from, the categories' score distributions on one axis
(unified models), and a gallery of test images with their anomaly maps and ground-truth contours,
worst false positives and false negatives first, each map drawn on the original image at its own
aspect ratio (the area the model did not see hatched). Every figure is an embedded PNG, so the page is
one file that can be mailed or archived.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from ..calibration import Calibration
from ..data.image_io import read_image, read_mask
from ..overlay import heatmap_overlay, map_scale

GALLERY_PER_KIND = 6
#: Gallery images are shown at most this many pixels on their long side.
THUMBNAIL = 400
ALIGNMENT_ALT = "image scores per category, on one axis"


def _figure_png(figure: plt.Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def _array_png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _curves(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, ...]:
    order = np.argsort(-scores, kind="stable")
    sorted_labels = labels[order]
    tp = np.cumsum(sorted_labels)
    fp = np.cumsum(1 - sorted_labels)
    positives, negatives = max(tp[-1], 1), max(fp[-1], 1)
    tpr, fpr = np.r_[0, tp / positives], np.r_[0, fp / negatives]
    precision = tp / np.maximum(tp + fp, 1)
    return fpr, tpr, tp / positives, precision


def _group_figures(name: str, predictions: Any, calibration: Calibration | None
                   ) -> list[tuple[str, str]]:
    """(alt text, base64 PNG) of the group's score histogram (with the calibration's normal
    scores and the threshold, when calibrated) and its ROC/PR curves."""
    labels, scores = predictions.labels, predictions.scores
    reference = np.asarray(calibration.scores if calibration is not None else ())
    everything = np.concatenate([scores, reference])
    figures = []
    figure, axis = plt.subplots(figsize=(4.6, 3.2))
    bins = (np.linspace(everything.min(), everything.max(), 40)
            if everything.max() > everything.min() else 10)
    if reference.size:
        axis.hist(reference, bins=bins, density=True, histtype="step", linewidth=1.5,
                  color="tab:green", label=f"calibration normals ({reference.size})")
    axis.hist(scores[labels == 0], bins=bins, alpha=0.5, density=True, label="test normal",
              color="tab:blue")
    axis.hist(scores[labels == 1], bins=bins, alpha=0.5, density=True, label="test anomalous",
              color="tab:red")
    if calibration is not None:
        axis.axvline(calibration.image_threshold, color="black", linestyle="--",
                     label="threshold")
    axis.set(title=f"{name}: image scores", xlabel="score", ylabel="density")
    axis.legend(fontsize=7)
    figures.append((f"{name}: histogram of image scores, normal against anomalous"
                    + (", with the calibration's normal scores and the decision threshold"
                       if calibration is not None else ""), _figure_png(figure)))
    if 0 < labels.sum() < labels.size:
        fpr, tpr, recall, precision = _curves(labels, scores)
        figure, axes = plt.subplots(1, 2, figsize=(7.4, 3.2))
        axes[0].plot(fpr, tpr, color="tab:red")
        axes[0].plot([0, 1], [0, 1], color="grey", linestyle=":")
        axes[0].set(title="ROC", xlabel="false positive rate", ylabel="true positive rate")
        axes[1].plot(recall, precision, color="tab:purple")
        axes[1].set(title="precision-recall", xlabel="recall", ylabel="precision", ylim=(0, 1.02))
        figures.append((f"{name}: ROC and precision-recall curves of the image scores",
                        _figure_png(figure)))
    return figures


def score_alignment_figure(models: dict[str, Any]) -> str:
    """Per-category histograms of normal and anomalous image scores, one row per model, every
    row on one shared score axis: how far the categories' score scales are from one another
    (CADA's Fig. 5). ``models`` maps a model's name to its :class:`engine.TaskEvaluation`."""
    categories = sorted({name for e in models.values() for name in e.predictions})
    figure, axes = plt.subplots(len(models), len(categories), squeeze=False,
                                figsize=(2.6 * len(categories), 2.2 * len(models)))
    for row, (model, evaluation) in enumerate(models.items()):
        scores = np.concatenate([p.scores for p in evaluation.predictions.values()])
        bins = np.linspace(scores.min(), scores.max(), 30) if np.ptp(scores) > 0 else 10
        for column, category in enumerate(categories):
            axis = axes[row, column]
            predictions = evaluation.predictions.get(category)
            if predictions is not None:
                for label, colour, name in ((0, "tab:blue", "normal"), (1, "tab:red", "anomalous")):
                    axis.hist(predictions.scores[predictions.labels == label], bins=bins,
                              alpha=0.6, color=colour, label=name, density=True)
            axis.set_yticks([])
            if row == 0:
                axis.set_title(category, fontsize=9)
            if column == 0:
                axis.set_ylabel(model, fontsize=9)
    axes[0, 0].legend(fontsize=7)
    figure.suptitle("image scores per category on one axis per model", fontsize=10)
    return _figure_png(figure)


def _thumbnail(image: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray | None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Image, map and mask shrunk together to at most THUMBNAIL pixels on the long side (the
    aspect ratio kept), so that a page of large images stays small."""
    height, width = image.shape[:2]
    factor = THUMBNAIL / max(height, width)
    if factor >= 1:
        return image, anomaly_map, mask
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    small = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    small_map = np.asarray(Image.fromarray(anomaly_map.astype(np.float32), "F").resize(
        size, Image.Resampling.NEAREST))
    small_mask = None if mask is None else np.asarray(
        Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))
    return small, small_map, small_mask


def _gallery(predictions: Any, calibration: Calibration | None) -> str:
    labels, scores = predictions.labels, predictions.scores
    normal, anomalous = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    worst_fp = normal[np.argsort(-scores[normal])][:GALLERY_PER_KIND]
    worst_fn = anomalous[np.argsort(scores[anomalous])][:GALLERY_PER_KIND]
    scale = map_scale(calibration, predictions.maps)
    preprocess = predictions.preprocess
    cells = []
    for kind, indices in (("highest-scored normal images (false-positive candidates)", worst_fp),
                          ("lowest-scored anomalous images (false-negative candidates)", worst_fn)):
        if len(indices) == 0:
            continue
        cells.append(f"<h4>{kind}</h4><div class='gallery'>")
        for index in indices:
            sample = predictions.samples[int(index)]
            image = read_image(sample.image_path)
            height, width = image.shape[:2]
            full = preprocess.map_to_original(predictions.maps[index], height, width)
            mask = read_mask(sample.mask_path) if sample.mask_path is not None else None
            image, full, mask = _thumbnail(image, full, mask)
            overlay = heatmap_overlay(image, full, scale, mask)
            caption = html.escape(f"{sample.defect_type} · {Path(sample.image_path).name} · "
                                  f"score {scores[index]:.4g}")
            cells.append(f"<figure><img alt='test image' src='data:image/png;base64,"
                         f"{_array_png(image)}'><img alt='anomaly map over the image, ground "
                         f"truth outlined' src='data:image/png;base64,{_array_png(overlay)}'>"
                         f"<figcaption>{caption}</figcaption></figure>")
        cells.append("</div>")
    return "".join(cells)


def _decision_table(evaluation: Any) -> str:
    """The decision at the stored threshold per group: confusion matrix, realised rates with
    intervals, and the false-positive rate the calibration predicted."""
    groups = {name: values for name, values in evaluation.per_group.items()}
    if evaluation.pooled:
        groups["all pooled"] = evaluation.pooled
    rows, warnings = [], []

    def rate(value: float | None, interval: list[float] | None) -> str:
        if value is None or interval is None:
            return "<td>–</td>"
        return f"<td>{value:.1%} ({interval[0]:.1%}–{interval[1]:.1%})</td>"

    for name, values in groups.items():
        decision = values.get("decision")
        if not decision:
            continue
        counts = "".join(f"<td>{decision[k]}</td>" for k in (
            "true_positives", "false_positives", "true_negatives", "false_negatives"))
        rows.append(f"<tr><th>{html.escape(name)}</th><td>{decision['threshold']:.5g}</td>"
                    f"{counts}{rate(decision['fpr'], decision['fpr_interval'])}"
                    f"{rate(decision['predicted_fpr'], decision['predicted_fpr_interval'])}"
                    f"{rate(decision['recall'], decision['recall_interval'])}</tr>")
        if decision["shift_warning"]:
            warnings.append(f"<p class='note'>{html.escape(name)}: "
                            f"{html.escape(decision['shift_warning'])}</p>")
    if not rows:
        return ""
    head = ("<tr><th>group</th><th>threshold</th><th>TP</th><th>FP</th><th>TN</th><th>FN</th>"
            "<th>false-positive rate</th><th>predicted by the calibration</th><th>recall</th>"
            "</tr>")
    return f"<table>{head}{''.join(rows)}</table>{''.join(warnings)}"


def _metrics_table(results: dict[str, Any]) -> str:
    keys = ("n_images", "image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap",
            "pixel_aupro")

    def cell(value: Any) -> str:
        if value is None:
            return "<td>–</td>"
        return f"<td>{value:.4f}</td>" if isinstance(value, float) else f"<td>{value}</td>"

    rows = [f"<tr><th>{html.escape(name)}</th>{''.join(cell(values.get(k)) for k in keys)}</tr>"
            for name, values in results["per_category"].items()]
    headline = results.get("pooled") or results
    label = "all pooled" if results.get("pooled") else "mean"
    rows.append(f"<tr class='total'><th>{label}</th>"
                f"{''.join(cell(headline.get(k)) for k in keys)}</tr>")
    head = "".join(f"<th>{k}</th>" for k in keys)
    return f"<table><tr><th>group</th>{head}</tr>{''.join(rows)}</table>"


def _protocol_table(protocol: dict[str, Any]) -> str:
    """The benchmark's own table: its columns in its order, a row per category, the mean."""
    columns = protocol["columns"]

    def row(name: str, values: dict[str, Any], total: bool = False) -> str:
        cells = "".join("<td>–</td>" if values[c] is None else f"<td>{values[c]:.4f}</td>"
                        for c in columns)
        return f"<tr{' class=total' if total else ''}><th>{html.escape(name)}</th>{cells}</tr>"

    rows = [row(name, entry["metrics"]) for name, entry in protocol["per_category"].items()]
    rows.append(row("mean", protocol["metrics"], total=True))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    return f"<table><tr><th>category</th>{head}</tr>{''.join(rows)}</table>"


STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;
text-align:right}th:first-child{text-align:left}tr.total{font-weight:bold;background:#f4f4f4}
.gallery{display:flex;flex-wrap:wrap;gap:10px}figure{margin:0;width:260px}
figure img{width:125px;margin-right:2px}figcaption{font-size:11px;color:#555}
.note{background:#fffbe6;border:1px solid #e6d97a;padding:6px 10px}
"""


def write_report(results: dict[str, Any], evaluations: Sequence[Any], folder: str | Path,
                 title: str = "iadkit report") -> Path:
    """Write ``folder/index.html`` for the results and evaluations of :func:`engine.test_run`."""
    folder = Path(folder)
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p>setting: <b>{html.escape(str(results.get('setting')))}</b></p>",
             "<h2>Metrics</h2>", _metrics_table(results)]
    if results.get("protocol"):
        parts += [f"<h2>Protocol {html.escape(results['protocol']['name'])}</h2>",
                  _protocol_table(results["protocol"])]
    for evaluation in evaluations:
        calibration = evaluation.calibration
        parts.append(f"<h2>Model: {html.escape(evaluation.task)}</h2>")
        if len(evaluation.predictions) > 1:
            parts.append(f"<img alt='{ALIGNMENT_ALT}' src='data:image/png;base64,"
                         f"{score_alignment_figure({evaluation.task: evaluation})}'>")
        if calibration is not None:
            parts.append(f"<p class='note'>Decision {html.escape(calibration.summary())}; "
                         f"target {calibration.target_fpr:.2%}. From the "
                         f"{html.escape(calibration.source)}; no test image was used to "
                         "choose it.</p>")
            if calibration.warning:
                parts.append(f"<p class='note'>{html.escape(calibration.warning)}</p>")
            parts.append(_decision_table(evaluation))
        else:
            parts.append("<p class='note'>No decision threshold: this model was fitted without "
                         "calibration (calibration none, or no held-out normals).</p>")
        for name, predictions in evaluation.predictions.items():
            group_calibration = calibration
            if calibration is not None and not evaluation.pooled and \
                    len(predictions.samples.categories) == 1:
                group_calibration = calibration.for_category(predictions.samples.categories[0])
            parts.append(f"<h3>{html.escape(name)}</h3>")
            parts += [f"<img alt='{html.escape(alt, quote=True)}' src='data:image/png;base64,{png}'>"
                      for alt, png in _group_figures(name, predictions, group_calibration)]
            parts.append(_gallery(predictions, group_calibration))
    return _write_page(folder, title, parts)


def write_comparison_report(results: dict[str, dict[str, Any]], evaluations: dict[str, Any],
                            folder: str | Path, title: str = "iadkit comparison") -> Path:
    """Write ``folder/index.html`` comparing models evaluated on the same test groups: each
    model's metrics table, then the categories' score distributions, one row per model.

    Args:
        results: model name -> the results object of :func:`engine.summarise`.
        evaluations: model name -> its :class:`engine.TaskEvaluation`.
    """
    parts = [f"<h1>{html.escape(title)}</h1>"]
    for name, result in results.items():
        parts += [f"<h2>{html.escape(name)}</h2>",
                  f"<p>setting: <b>{html.escape(str(result.get('setting')))}</b></p>",
                  _metrics_table(result)]
    parts += ["<h2>Score distributions</h2>",
              (f"<img alt='{ALIGNMENT_ALT}' src='data:image/png;base64,"
               f"{score_alignment_figure(evaluations)}'>")]
    return _write_page(Path(folder), title, parts)


def _write_page(folder: Path, title: str, parts: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    page = folder / "index.html"
    page.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>"
                    f"{html.escape(title)}</title><style>{STYLE}</style></head><body>"
                    f"{''.join(parts)}</body></html>")
    return page
