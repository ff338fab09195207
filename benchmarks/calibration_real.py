"""Decision thresholds on real data: the false-positive rate the calibration promises against
the rate the test normals show, before (a plain quantile of 10% held-out normals) and after
(an order-statistic threshold on out-of-sample normal scores, iadkit.engine.calibrate).

Prints one JSON line per (set, method, target rate, variant). Usage (repository root, after
``make test``)::

    .venv/bin/python benchmarks/calibration_real.py [--methods patchcore rd]
        [--sets magnetic_tile deeppcb elpv-mono elpv-poly] [--targets 0.01 0.05]

Variants:

- ``before``: the calibration of iadkit up to 0.2: the model fitted on 90% of the training
  normals, the threshold the (1 - target) quantile of the other 10%'s scores, an image anomalous
  when its score reaches it. It promised "the 0.99 quantile" and stated no error rate.
- ``after``: ``calibration auto``: for PatchCore the model fitted on every training normal and
  calibrated on all of them, each scored without its own memory-bank entries; for RD the 10%
  holdout; the threshold the order statistic that bounds the false-positive rate at the target
  with 90% confidence (the largest score, with a warning, when there are too few). Its line
  carries the predicted interval of the rate on this many test normals (beta-binomial, 90%)
  and whether the realised rate fell inside.

ELPV (``pip install elpv-dataset``) is split by cell type: ``elpv-mono`` and ``elpv-poly`` each
train and test on one kind of cell. No threshold is chosen on test images; the test set only
measures the realised rates.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from iadkit.calibration import Calibration
from iadkit.data import load_dataset, make_tasks
from iadkit.data.samples import SampleSet
from iadkit.data.settings import Task
from iadkit.engine import RunConfig, fit_detector, predict_samples
from iadkit.engine.evaluation import decision_statistics
from iadkit.metrics import auroc

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def _task(name: str, elpv_root: Path) -> tuple[Task, str]:
    if name.startswith("elpv-"):
        if not (elpv_root / "elpv").is_dir():
            from iadkit.data.elpv import prepare_elpv

            prepare_elpv(elpv_root)
        kind = name.split("-", 1)[1]
        samples = load_dataset(elpv_root).where(subclass=kind)
        return make_tasks(samples, "one-class")[0], str(elpv_root)
    root = DATA / name
    return make_tasks(load_dataset(root), "one-class")[0], str(root)


def _peak_rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def _line(**record: object) -> None:
    print(json.dumps(record), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["patchcore", "rd"])
    parser.add_argument("--sets", nargs="+",
                        default=["magnetic_tile", "deeppcb", "elpv-mono", "elpv-poly"])
    parser.add_argument("--targets", nargs="+", type=float, default=[0.01, 0.05])
    parser.add_argument("--elpv", default=str(Path(tempfile.gettempdir()) / "iadkit-elpv"))
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="hyperparameter override (e.g. epochs=2 for a quick check)")
    args = parser.parse_args()
    params = {k: yaml.safe_load(v) for k, v in (p.split("=", 1) for p in args.param)}
    for set_name in args.sets:
        task, data = _task(set_name, Path(args.elpv))
        test = sum(task.test_groups.values(), start=SampleSet([]))
        for method in args.methods:
            base = dict(method=method, data=data, params=params, show_progress=False)
            holdout = RunConfig(**base, calibration="holdout")
            started = time.perf_counter()
            held_model = fit_detector(holdout, task)
            held_seconds = time.perf_counter() - started
            fitted = {"before": held_model}
            if held_model.supports_leave_one_out:
                started = time.perf_counter()
                fitted["after"] = fit_detector(RunConfig(**base), task)
                after_seconds = time.perf_counter() - started
            else:
                fitted["after"], after_seconds = held_model, held_seconds
            predictions = {name: predict_samples(model, test, 16)
                           for name, model in {id(m): m for m in fitted.values()}.items()}
            for target in args.targets:
                for variant, model in fitted.items():
                    scored = predictions[id(model)]
                    labels, scores = scored.labels, scored.scores
                    reference = np.asarray(model.calibration.scores)
                    common = dict(set=set_name, method=method, target_fpr=target,
                                  variant=variant, n_train=len(task.train),
                                  n_fit=model.fit_info_["n_train_images"],
                                  n_calibration=int(reference.size),
                                  n_test_normal=int((labels == 0).sum()),
                                  n_test_anomalous=int((labels == 1).sum()),
                                  image_auroc=round(float(auroc(labels, scores)), 4))
                    if variant == "before":
                        threshold = float(np.quantile(reference, 1.0 - target))
                        flagged = scores >= threshold
                        _line(**common, calibration="quantile of held-out (earlier iadkit)",
                              threshold=threshold,
                              fpr=round(float(flagged[labels == 0].mean()), 4),
                              recall=round(float(flagged[labels == 1].mean()), 4),
                              fit_seconds=round(held_seconds, 1), peak_rss_gb=_peak_rss_gb())
                        continue
                    calibration = Calibration.fit(reference, reference, model.calibration.source,
                                                  target, 0.9, model.calibration.method)
                    decision = decision_statistics(labels, scores, calibration)
                    low, high = decision["predicted_fpr_interval"]
                    _line(**common, calibration=calibration.method,
                          threshold=calibration.image_threshold, rank=calibration.rank,
                          predicted_fpr=round(calibration.fpr_expected, 4),
                          predicted_fpr_interval=[round(low, 4), round(high, 4)],
                          fpr=round(decision["fpr"], 4),
                          fpr_interval=[round(v, 4) for v in decision["fpr_interval"]],
                          recall=round(decision["recall"], 4),
                          inside=low <= decision["fpr"] <= high,
                          warning=calibration.warning is not None,
                          fit_seconds=round(after_seconds, 1), peak_rss_gb=_peak_rss_gb())


if __name__ == "__main__":
    sys.exit(main())
