"""Multi-category datasets for the unified benchmarks, assembled from the real data here.

Categories are folders of symbolic links (nothing is copied) in the MVTec layout:

- ``magnetic_tile``: real defects with masks (``../shared/data/magnetic_tile``);
- ``elpv``, or ``elpv_mono`` and ``elpv_poly``: real solar cells from ``elpv-dataset``, one
  category or one per cell type (image labels only: no pixel metrics);
- ``generated``: a procedural texture with masks (:func:`iadkit.data.generate_dataset`).
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def link_file(image: Path, destination: Path) -> None:
    """A symbolic link at ``destination`` (its folders made) to ``image``'s real path."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.symlink_to(image.resolve())


def subsampled_category(source: Path, destination: Path, n_train: int, seed: int,
                        n_test_per_group: int | None = None) -> None:
    """Link a category's test and mask folders, and a seeded subsample of its training normals
    (and, with ``n_test_per_group``, of each test folder)."""
    destination.mkdir(parents=True)
    if n_test_per_group is None:
        for folder in ("test", "ground_truth"):
            if (source / folder).is_dir():
                (destination / folder).symlink_to((source / folder).resolve())
    else:
        for group in sorted(p for p in (source / "test").iterdir() if p.is_dir()):
            images = sorted(group.iterdir())
            random.Random(seed).shuffle(images)
            for image in images[:n_test_per_group]:
                link_file(image, destination / "test" / group.name / image.name)
                for mask in (source / "ground_truth" / group.name).glob(f"{image.stem}_mask.*"):
                    link_file(mask, destination / "ground_truth" / group.name / mask.name)
    if (source / "subclasses.csv").is_file():
        (destination / "subclasses.csv").symlink_to((source / "subclasses.csv").resolve())
    images = sorted((source / "train" / "good").iterdir())
    random.Random(seed).shuffle(images)
    for image in images[:n_train]:
        link_file(image, destination / "train" / "good" / image.name)


def split_by_subclass(category: Path, root: Path) -> list[str]:
    """Make one category ``<name>_<subclass>`` per subclass of ``category/subclasses.csv``."""
    with (category / "subclasses.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    names = set()
    for row in rows:
        name = f"{category.name}_{row['subclass']}"
        names.add(name)
        link_file(category / row["path"], root / name / row["path"])
    return sorted(names)
