"""The settings of a run: what ``iadkit fit`` trains, on which data, in which setting; saved as
``run.json`` in the run folder.

Every setting is validated when the configuration is made (a bad value raises
:class:`~iadkit.errors.ConfigError` before any work), and the settings that change what a model
learns are marked on their fields (``model=True``): a resumed run must match them.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from ..data.layouts import LAYOUTS, load_dataset
from ..data.settings import SETTINGS, Task, make_tasks
from ..errors import ConfigError
from ..methods import Detector, create_detector
from ..methods.base import resolve_device
from ..validation import (
    Check,
    Choice,
    Either,
    Flag,
    Items,
    Mapping,
    Number,
    Optional,
    Rule,
    Text,
)
from .search import SearchSettings


def run_setting(rule: Rule | None, default: Any = MISSING, model: bool = False) -> Any:
    """A :class:`RunConfig` field: its rule (None: the value's type checks itself), its default
    (none: required), and whether it changes what the model learns."""
    if isinstance(default, dict):
        return field(default_factory=dict, metadata={"rule": rule, "model": model})
    return field(default=default, metadata={"rule": rule, "model": model})


NAMES = Optional(Items(Text(), min_length=1))


def _is_calibration(value: object) -> bool:
    if value in ("auto", "holdout", "leave-one-out", "none"):
        return True
    return (isinstance(value, str) and value.startswith("cv:") and value[3:].isdigit()
            and int(value[3:]) >= 2)


#: Where calibration scores come from (see :mod:`.calibrate`).
CALIBRATION_RULE = Check(_is_calibration, "'auto', 'holdout', 'leave-one-out', 'none' or "
                         "'cv:K' with K >= 2 folds", ["cv:1", "kfold", "cv:x"])


@dataclass
class RunConfig:
    """Everything that defines a training run.

    Attributes:
        method: registered method name (``iadkit methods`` lists them).
        data: dataset root folder.
        preset: the method's preset ("cpu" or "paper").
        params: hyperparameters overriding the preset.
        categories: categories to use; None = all.
        layout: dataset layout ("auto" detects it).
        setting: evaluation setting (see :mod:`iadkit.data.settings`).
        seen_subclasses, unseen_subclasses: for the unseen-subclass setting.
        calibration: where the normal scores that set the threshold come from: "auto",
            "holdout", "leave-one-out", "cv:K" or "none" (see :mod:`iadkit.engine.calibrate`).
        validation_fraction: share of the training normals held out (for a holdout
            calibration and for a search) when the layout has no validation split; with
            "auto" calibration, 0 leaves a method that cannot leave images out uncalibrated.
        target_fpr: the threshold bounds the false-positive rate on normal images at this.
        fpr_confidence: with this probability (over the draw of the calibration images).
        search: choose inference parameters after fitting, on a pseudo-validation set made
            from the held-out normals (see :class:`SearchSettings`); None keeps them as given.
        reference_normals: unseen-subclass setting, for a detector that adapts to the subclass
            under test (:attr:`Detector.needs_references`): how many of each unseen
            subclass's training normals (seeded draw; never trained on) it is given before
            that subclass is tested.
        batch_size: images per batch when predicting.
        workers: DataLoader worker processes, or "auto" (see :attr:`loader_workers`).
        device: "auto" (CUDA when present), "cpu", "cuda", ...
        seed: seeds the validation split and the detectors.
        show_progress: show progress bars.
    """

    method: str = run_setting(Text(), model=True)
    data: str = run_setting(Text(), model=True)
    preset: str = run_setting(Text(), "cpu", model=True)
    params: dict[str, Any] = run_setting(Mapping(), {}, model=True)
    categories: list[str] | None = run_setting(NAMES, None, model=True)
    layout: str = run_setting(Choice(*LAYOUTS), "auto", model=True)
    setting: str = run_setting(Choice(*SETTINGS), "one-class", model=True)
    seen_subclasses: list[str] | None = run_setting(NAMES, None, model=True)
    unseen_subclasses: list[str] | None = run_setting(NAMES, None, model=True)
    calibration: str = run_setting(CALIBRATION_RULE, "auto", model=True)
    validation_fraction: float = run_setting(Number(float, 0, 1, high_open=True), 0.1, model=True)
    target_fpr: float = run_setting(Number(float, 0, 0.5, low_open=True), 0.01, model=True)
    fpr_confidence: float = run_setting(Number(float, 0.5, 1, high_open=True), 0.9, model=True)
    search: SearchSettings | None = run_setting(None, None, model=True)
    reference_normals: int = run_setting(Number(int, 0), 0)
    batch_size: int = run_setting(Number(int, 1), 16)
    workers: int | str = run_setting(Either(Number(int, 0), Choice("auto")), "auto")
    device: str = run_setting(Text(), "auto")
    seed: int = run_setting(Number(int, 0), 0, model=True)
    show_progress: bool = run_setting(Flag(), True)

    def __post_init__(self) -> None:
        for spec in fields(self):
            rule = spec.metadata["rule"]
            if rule is not None:
                value = rule.check(f"run setting {spec.name}", getattr(self, spec.name))
                setattr(self, spec.name, list(value) if isinstance(value, tuple) else value)
        if self.search is not None and not isinstance(self.search, SearchSettings):
            self.search = SearchSettings.from_value(self.search)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """From a ``run.json`` record or a YAML mapping. The flat search keys of earlier run
        folders (``search_synthesis``, ``search_textures``, ``search_metric``) are read into
        :attr:`search`, their ``threshold_quantile`` q as a holdout calibration with
        ``target_fpr`` 1 - q."""
        values = dict(values)
        if "threshold_quantile" in values:  # run folders before stated error rates
            values.setdefault("target_fpr", round(1.0 - values.pop("threshold_quantile"), 12))
            values.setdefault("calibration", "holdout" if values.get("validation_fraction", 0.1)
                              > 0 else "none")
        legacy = {key: values.pop(f"search_{key}") for key in ("synthesis", "textures", "metric")
                  if f"search_{key}" in values}
        known = {spec.name for spec in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown run settings {unknown}; known: {sorted(known)}")
        if values.get("search") is not None:
            values["search"] = SearchSettings.from_value(values["search"], **{
                k: v for k, v in legacy.items() if v is not None})
        return cls(**values)

    @property
    def loader_workers(self) -> int:
        """The DataLoader worker processes: ``workers``, or for "auto" none when the networks
        run on the CPU (decoding would take their cores) and up to 8 beside a GPU (decoding
        off the GPU's critical path)."""
        if self.workers != "auto":
            return int(self.workers)
        if resolve_device(self.device).type == "cpu":
            return 0
        return min(8, max(1, (os.cpu_count() or 2) - 1))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def model_settings(self) -> dict[str, Any]:
        """The settings that change what a model learns (compared when a run resumes)."""
        record = self.to_dict()
        return {spec.name: record[spec.name] for spec in fields(self) if spec.metadata["model"]}

    def tasks(self, data: str | None = None, categories: list[str] | None = None) -> list[Task]:
        samples = load_dataset(data or self.data, categories or self.categories, self.layout)
        return make_tasks(samples, self.setting, self.seen_subclasses, self.unseen_subclasses)

    def check_references(self, detector: Detector, tasks: list[Task]) -> None:
        """Refuse, before any training, a reference setting the detector or the data cannot
        serve."""
        if not detector.needs_references:
            if self.reference_normals:
                raise ConfigError(f"run setting reference_normals: {detector.name} with these "
                                  "hyperparameters uses no reference images (adapted_moe "
                                  "with expert_choice='references', or with use_tta and "
                                  "tta_statistics='reference', does)")
            return
        if self.setting != "unseen-subclass" or self.reference_normals < 1:
            raise ConfigError(f"{detector.name} with these hyperparameters adapts to each tested "
                              "subclass from a few of its normal images: use the "
                              "unseen-subclass setting with reference_normals >= 1")
        if self.calibration not in ("auto", "none") or self.search is not None:
            raise ConfigError(f"{detector.name} with these hyperparameters scores each subclass "
                              "against its own references, so a threshold or a search on the seen "
                              "subclasses' normals does not carry over: use calibration none "
                              "and no search")
        for task in tasks:
            for name in task.test_groups:
                available = len(task.references.get(name, ()))
                if available < self.reference_normals:
                    raise ConfigError(f"run setting reference_normals={self.reference_normals}: "
                                      f"unseen subclass {name!r} has {available} training "
                                      "normals to draw them from")

    def new_detector(self) -> Detector:
        return create_detector(self.method, self.preset, device=self.device, seed=self.seed,
                               **self.params)
