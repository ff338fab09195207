"""Arrange the ELPV solar-cell dataset (PyPI ``elpv-dataset``) into the MVTec AD layout.

ELPV holds 2624 electroluminescence images (300x300, 8-bit grey) of mono- and polycrystalline
solar cells, each with an expert defect probability in {0, 1/3, 2/3, 1}. Cells with probability 0
are normal, probability 1 anomalous; the uncertain ones are left out. Labels are image-level only
(no masks), so the category has no ground_truth folder. The cell type is written to
``subclasses.csv`` (mono/poly) for unseen-subclass experiments.
"""

from __future__ import annotations

import csv
import random
import shutil
from pathlib import Path

from ..errors import DatasetError

CATEGORY = "elpv"


def elpv_source() -> tuple[Path, list[tuple[str, float, str]]]:
    """The installed package's image folder and its (file, probability, type) rows."""
    try:
        import elpv_dataset
    except ImportError:
        raise DatasetError(
            "the ELPV data comes from the PyPI package 'elpv-dataset': pip install elpv-dataset "
            "(or pip install 'iadkit[demo]')"
        ) from None
    data = Path(elpv_dataset.__file__).parent / "data"
    rows = []
    with (data / "labels.csv").open() as handle:
        for line in handle:
            parts = line.split()
            if len(parts) == 3:
                rows.append((parts[0], float(parts[1]), parts[2]))
    if not rows:
        raise DatasetError(f"{data / 'labels.csv'}: no rows")
    return data, rows


def prepare_elpv(destination: str | Path, test_fraction: float = 0.25, seed: int = 0,
                 max_train: int | None = None) -> Path:
    """Write ``destination/elpv/{train/good, test/good, test/defective, subclasses.csv}``.

    Args:
        destination: dataset root to create (existing ``elpv`` inside it is replaced).
        test_fraction: share of the normal cells moved to the test split.
        seed: seeds the split.
        max_train: keep at most this many training images (a quicker demo), chosen at random.

    Returns:
        The category folder.
    """
    source, rows = elpv_source()
    normal = [r for r in rows if r[1] == 0.0]
    anomalous = [r for r in rows if r[1] == 1.0]
    rng = random.Random(seed)
    rng.shuffle(normal)
    n_test = round(test_fraction * len(normal))
    test_normal, train = normal[:n_test], normal[n_test:]
    if max_train is not None:
        train = train[:max_train]
    category = Path(destination) / CATEGORY
    if category.exists():
        shutil.rmtree(category)
    subclasses = []
    for folder, items in (("train/good", train), ("test/good", test_normal),
                          ("test/defective", anomalous)):
        target = category / folder
        target.mkdir(parents=True)
        for name, _, cell_type in items:
            file = target / Path(name).name
            shutil.copyfile(source / name, file)
            subclasses.append((f"{folder}/{file.name}", cell_type))
    with (category / "subclasses.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "subclass"])
        writer.writerows(subclasses)
    return category
