"""Choosing inference parameters without test data: a staged grid search on a pseudo-validation
set (synthetic anomalies pasted into normal images held out from training).

Example:
    >>> settings = SearchSettings(stages=[{"param": "tau", "values": [100, 300]}])
    >>> search_on_held_out_normals(detector, held_out_normals, settings)["chosen"]
    {'tau': 300}
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..data.samples import SampleSet
from ..errors import ConfigError, IadkitError
from ..methods import Detector
from ..synthesis.pseudo_validation import PSEUDO_VALIDATION_SYNTHESES, build_pseudo_validation
from ..synthesis.textures import TextureSource
from .evaluation import METRIC_KEYS, predict_samples, score_predictions

STAGE_KEYS = ("param", "values", "fixed", "metric")


@dataclass
class SearchSettings:
    """How inference parameters are chosen after fitting.

    Attributes:
        stages: "default" (the method's own :attr:`Detector.default_search`) or a list of
            stages ``{"param": name, "values": [...], "fixed": {name: value}, "metric": key}``
            (``fixed`` and ``metric`` optional); names from the detector's inference
            parameters.
        metric: the metric the search maximises (mean over categories), unless a stage names
            its own.
        synthesis: the synthetic anomalies of the pseudo-validation set (one of
            :data:`~iadkit.synthesis.PSEUDO_VALIDATION_SYNTHESES`); None: the method's own
            (:attr:`Detector.search_synthesis`: "fragments" as in LafitE, "mixed" for
            PatchCore).
        textures: a texture folder (e.g. DTD ``images/``) for the syntheses that paste
            textures; procedural textures when None.
    """

    stages: str | list[dict[str, Any]] = "default"
    metric: str = "image_auroc"
    synthesis: str | None = None
    textures: str | None = None

    @classmethod
    def from_value(cls, value: Any, **overrides: Any) -> SearchSettings:
        """From what a run file or the command line says: "default", a list of stages, a
        mapping of these fields, or settings already made."""
        if isinstance(value, SearchSettings):
            settings = value
        elif isinstance(value, dict):
            unknown = sorted(set(value) - set(cls.__dataclass_fields__))
            if unknown:
                raise ConfigError(f"unknown search settings {unknown}; known: "
                                  f"{sorted(cls.__dataclass_fields__)}")
            settings = cls(**value)
        elif value == "default" or isinstance(value, list):
            settings = cls(stages=value)
        else:
            raise ConfigError(f"search must be 'default', a list of stages or a mapping of "
                              f"search settings, got {value!r}")
        return replace(settings, **overrides)

    def stages_for(self, detector: Detector) -> list[dict[str, Any]]:
        """The stages to run on ``detector``."""
        if self.stages == "default":
            if not detector.default_search:
                raise ConfigError(f"{detector.name} has no default search; give the stages "
                                  f"(inference parameters: {list(detector.inference_params)})")
            return [dict(stage) for stage in detector.default_search]
        if not isinstance(self.stages, list):
            raise ConfigError(f"search stages must be 'default' or a list, got {self.stages!r}")
        return self.stages

    def synthesis_for(self, detector: Detector) -> str:
        return self.synthesis or detector.search_synthesis

    def check(self, detector: Detector) -> None:
        """Refuse a search that could not run, before any training: bad stages, an unknown
        synthesis, a missing texture folder, a geometry other than ``resize``."""
        check_search_stages(detector, self.stages_for(detector), self.metric)
        if detector.preprocess.geometry != "resize":
            # Pseudo-anomalies are drawn on whole images squashed to the input square; a
            # letterboxed or tiled detector learnt other units (undistorted, or native-scale
            # tiles), so the search would judge it on images unlike its own.
            raise ConfigError(f"the inference-parameter search works with geometry=resize "
                              f"only; this detector uses geometry={detector.preprocess.geometry}")
        if self.synthesis_for(detector) not in PSEUDO_VALIDATION_SYNTHESES:
            raise ConfigError(f"unknown search synthesis {self.synthesis_for(detector)!r}; "
                              f"choose from {PSEUDO_VALIDATION_SYNTHESES}")
        if self.textures:
            TextureSource(self.textures)


def check_search_stages(detector: Detector, stages: Sequence[dict[str, Any]],
                        metric: str) -> None:
    """Raise :class:`ConfigError` for a stage :func:`search_inference_params` cannot run."""
    for stage in stages:
        if (not isinstance(stage, dict) or set(stage) - set(STAGE_KEYS) or "param" not in stage
                or not stage.get("values")):
            raise ConfigError(f"a search stage needs 'param' and a non-empty 'values' list "
                              f"(and optionally 'fixed' and 'metric'), got {stage}")
        if stage.get("metric", metric) not in METRIC_KEYS:
            raise ConfigError(f"unknown search metric {stage.get('metric', metric)!r}; "
                              f"choose from {METRIC_KEYS}")
        names = [stage["param"], *stage.get("fixed", {})]
        wrong = [n for n in names if n not in detector.inference_params]
        if wrong:
            raise ConfigError(f"{detector.name} cannot search {wrong}: only inference "
                              f"parameters can, {list(detector.inference_params)}")


def search_on_held_out_normals(detector: Detector, normals: SampleSet,
                               settings: SearchSettings, seed: int = 0, batch_size: int = 16,
                               workers: int = 0, show_progress: bool = False) -> dict[str, Any]:
    """:func:`search_inference_params` on a pseudo-validation set made from ``normals``.

    ``normals`` must be images the detector was not fitted on. The set is written to a
    temporary folder and removed afterwards.

    Returns:
        The search result, with ``"source"`` saying what the set was made of.
    """
    synthesis = settings.synthesis_for(detector)
    textures = TextureSource(settings.textures) if settings.textures else None
    with tempfile.TemporaryDirectory(prefix="iadkit-pseudo-") as folder:
        pseudo = build_pseudo_validation(normals, folder, synthesis,
                                         detector.preprocess.output_size, textures, seed=seed)
        search = search_inference_params(detector, pseudo, settings.stages_for(detector),
                                         settings.metric, batch_size, workers, show_progress)
    search["source"] = (f"{synthesis} pseudo-validation set made from {len(normals)} normal "
                        "images held out from training")
    return search


def search_inference_params(detector: Detector, validation: SampleSet,
                            stages: Sequence[dict[str, Any]], metric: str = "image_auroc",
                            batch_size: int = 16, workers: int = 0, show_progress: bool = False
                            ) -> dict[str, Any]:
    """Choose inference parameters of a fitted detector by a staged grid search.

    Each stage tries every value of one parameter (with the stage's ``fixed`` parameters set
    for the stage only), scores ``validation`` (a labelled set made without test data, e.g. by
    :func:`iadkit.synthesis.build_pseudo_validation`), and keeps the value with the best
    ``metric`` (mean over categories; the first on ties; a stage's own ``"metric"`` overrides
    it) for the following stages. The detector is left with the chosen values.

    Args:
        detector: a fitted detector.
        validation: labelled samples; pixel metrics are recorded where they have masks.
        stages: ``{"param": name, "values": [...], "fixed": {name: value}, "metric": key}``
            each (``fixed`` and ``metric`` optional), names from ``detector.inference_params``.
        metric: a key of :func:`score_predictions`' result (higher is better).

    Returns:
        ``{"metric", "chosen": {param: value}, "stages": [{"param", "fixed", "chosen",
        "curve": [{"value", "image_auroc", "pixel_auroc", ...}]}]}`` (JSON-friendly).

    Example:
        >>> search_inference_params(detector, pseudo, [{"param": "tau", "values": [100, 300]}])
    """
    check_search_stages(detector, stages, metric)
    groups = {c: validation.where(category=c) for c in validation.categories}
    result: dict[str, Any] = {"metric": metric, "n_images": len(validation), "stages": [],
                              "chosen": {}}
    for stage in stages:
        param, fixed = stage["param"], dict(stage.get("fixed", {}))
        stage_metric = stage.get("metric", metric)
        restore = {name: getattr(detector, name) for name in fixed}
        detector.set_inference_params(**fixed)
        curve = []
        for value in stage["values"]:
            detector.set_inference_params(**{param: value})
            point: dict[str, Any] = {"value": value}
            per_group = [score_predictions(
                predict_samples(detector, group, batch_size, workers, show_progress,
                                f"search {param}={value}"), group.has_masks)
                for group in groups.values()]
            for key in dict.fromkeys(("image_auroc", "image_ap", "pixel_auroc", stage_metric)):
                values = [g[key] for g in per_group if g.get(key) is not None]
                point[key] = round(float(np.mean(values)), 5) if values else None
            if point[stage_metric] is None:
                raise IadkitError(f"the search metric {stage_metric} needs masks, and the "
                                  "validation set has none")
            curve.append(point)
        best = max(curve, key=lambda p: p[stage_metric])  # max keeps the first of equal values
        detector.set_inference_params(**restore, **{param: best["value"]})
        result["stages"].append({"param": param, "fixed": fixed, "metric": stage_metric,
                                 "chosen": best["value"], "curve": curve})
        result["chosen"][param] = best["value"]
    return result
