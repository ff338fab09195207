"""The sample record every layout reader produces and every setting and detector consumes."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

NORMAL = 0
ANOMALOUS = 1


@dataclass(frozen=True)
class Sample:
    """One image of a dataset and what is known about it. The pixels are loaded lazily.

    Attributes:
        image_path: the image file.
        label: 0 for normal (good), 1 for anomalous.
        mask_path: the ground-truth mask file, or None (normal images, or image-level data).
        category: the object or texture category, e.g. ``"bottle"``.
        defect_type: ``"good"`` for normal images, else the defect folder name.
        split: ``"train"``, ``"val"`` (extra normal images a layout provides) or ``"test"``.
        subclass: optional finer grouping inside a category (unseen-subclass experiments).
        object_id: the physical object the image shows, where a layout photographs one object
            from several cameras (Real-IAD): images with the same ``object_id`` are views of
            one multi-view sample. None elsewhere.
    """

    image_path: Path
    label: int
    category: str
    defect_type: str
    split: str
    mask_path: Path | None = None
    subclass: str | None = None
    object_id: str | None = None

    @property
    def is_normal(self) -> bool:
        return self.label == NORMAL

    def with_subclass(self, subclass: str | None) -> Sample:
        return replace(self, subclass=subclass)


class SampleSet:
    """An ordered, immutable collection of samples with the selections experiments need.

    Example:
        >>> train = samples.where(split="train", category="bottle")
    """

    def __init__(self, samples: Iterable[Sample]) -> None:
        self._samples: tuple[Sample, ...] = tuple(samples)

    def __len__(self) -> int:
        return len(self._samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self._samples)

    def __getitem__(self, index: int) -> Sample:
        return self._samples[index]

    def __add__(self, other: SampleSet) -> SampleSet:
        return SampleSet(self._samples + tuple(other))

    def __repr__(self) -> str:
        return f"SampleSet({len(self)} samples, categories={self.categories})"

    @property
    def categories(self) -> list[str]:
        return sorted({s.category for s in self._samples})

    @property
    def subclasses(self) -> list[str]:
        return sorted({s.subclass for s in self._samples if s.subclass is not None})

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self._samples]

    @property
    def has_masks(self) -> bool:
        """True when every anomalous sample has a ground-truth mask (pixel metrics possible)."""
        anomalous = [s for s in self._samples if s.label == ANOMALOUS]
        return bool(anomalous) and all(s.mask_path is not None for s in anomalous)

    def filter(self, keep: Callable[[Sample], bool]) -> SampleSet:
        return SampleSet(s for s in self._samples if keep(s))

    def where(self, **fields: object) -> SampleSet:
        """Samples whose fields equal the given values; a list or set value means 'any of'."""

        def matches(sample: Sample) -> bool:
            for name, wanted in fields.items():
                value = getattr(sample, name)
                if isinstance(wanted, (list, tuple, set, frozenset)):
                    if value not in wanted:
                        return False
                elif value != wanted:
                    return False
            return True

        return self.filter(matches)
