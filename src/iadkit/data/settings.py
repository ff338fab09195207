"""Evaluation settings: which model is trained on which images, and how test images are scored.

A setting turns a :class:`SampleSet` into :class:`Task` objects. Each task trains one detector on
its ``train`` samples and evaluates it on one or more test groups. The engine runs tasks without
knowing which setting made them.

- ``one-class``: one model per category, evaluated on that category.
- ``model-unified``: one model on all categories' normal images; metrics per category, then
  averaged (each category has its own threshold sweep).
- ``absolute-unified``: one model trained without labels; all test images of all categories are
  pooled into one metric set (one threshold for everything). Per-category figures are reported
  beside it for information.
- ``unseen-subclass``: train on normal images of the seen subclasses; test only on the unseen
  ones, per subclass, then averaged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import DatasetError
from .samples import SampleSet

SETTINGS = ("one-class", "model-unified", "absolute-unified", "unseen-subclass")


@dataclass
class Task:
    """One detector to train and the test groups to evaluate it on.

    Attributes:
        name: names the model (a category, or ``"unified"``).
        train: normal training samples.
        test_groups: group name -> test samples; metrics are computed per group.
        pooled: also compute one metric set over all groups together (absolute-unified).
        validation: extra normal images the layout provides (used for calibration).
        references: group name -> that group's normal training images, which the task never
            trains on (unseen-subclass: each unseen subclass's); a detector that adapts to
            the subclass under test (run setting ``reference_normals``) draws a few from them.
    """

    name: str
    train: SampleSet
    test_groups: dict[str, SampleSet]
    pooled: bool = False
    validation: SampleSet = field(default_factory=lambda: SampleSet([]))
    references: dict[str, SampleSet] = field(default_factory=dict)


def _split(samples: SampleSet) -> tuple[SampleSet, SampleSet, SampleSet]:
    train = samples.where(split="train", label=0)
    if len(train) == 0:
        raise DatasetError(f"no normal training images among {samples}")
    return train, samples.where(split="val", label=0), samples.where(split="test")


def make_tasks(
    samples: SampleSet,
    setting: str = "one-class",
    seen_subclasses: Sequence[str] | None = None,
    unseen_subclasses: Sequence[str] | None = None,
) -> list[Task]:
    """Turn a dataset into the tasks of an evaluation setting.

    Args:
        samples: every sample of the chosen categories.
        setting: one of :data:`SETTINGS`.
        seen_subclasses, unseen_subclasses: for ``unseen-subclass``; when only one is given the
            other is every remaining subclass.
    """
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; choose from {SETTINGS}")
    if setting == "one-class":
        tasks = []
        for category in samples.categories:
            train, validation, test = _split(samples.where(category=category))
            tasks.append(Task(category, train, {category: test}, validation=validation))
        return tasks
    train, validation, test = _split(samples)
    if setting in ("model-unified", "absolute-unified"):
        groups = {c: test.where(category=c) for c in test.categories}
        return [Task("unified", train, groups, pooled=setting == "absolute-unified",
                     validation=validation)]
    return [_unseen_subclass_task(train, validation, test, seen_subclasses, unseen_subclasses)]


def _unseen_subclass_task(
    train: SampleSet,
    validation: SampleSet,
    test: SampleSet,
    seen: Sequence[str] | None,
    unseen: Sequence[str] | None,
) -> Task:
    everything = (train + test)
    if any(s.subclass is None for s in everything):
        # Several categories mixed: each category is a subclass.
        train = SampleSet(s.with_subclass(s.subclass or s.category) for s in train)
        test = SampleSet(s.with_subclass(s.subclass or s.category) for s in test)
        everything = train + test
    known = everything.subclasses
    if seen is None and unseen is None:
        raise DatasetError(f"unseen-subclass needs seen or unseen subclasses; known: {known}")
    unknown = sorted((set(seen or []) | set(unseen or [])) - set(known))
    if unknown:
        raise DatasetError(f"unknown subclasses {unknown}; known: {known}")
    seen = list(seen) if seen is not None else [s for s in known if s not in (unseen or [])]
    unseen = list(unseen) if unseen is not None else [s for s in known if s not in seen]
    if set(seen) & set(unseen):
        raise DatasetError(f"subclasses {sorted(set(seen) & set(unseen))} are both seen and unseen")
    groups = {s: test.where(subclass=s) for s in unseen}
    empty = [name for name, group in groups.items() if len(group) == 0]
    if empty:
        raise DatasetError(f"unseen subclasses {empty} have no test images")
    return Task("seen-" + "+".join(seen), train.where(subclass=seen), groups,
                validation=validation.filter(lambda s: s.subclass in seen),
                references={s: train.where(subclass=s) for s in unseen})
