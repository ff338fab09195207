"""Readers for the dataset layouts users have, all producing a :class:`SampleSet`.

Supported layouts (``layout=`` argument of :func:`load_dataset`):

- ``mvtec``: MVTec AD and MPDD. ``<category>/train/good``, ``<category>/test/<defect>``,
  ``<category>/ground_truth/<defect>/<stem>_mask.png``.
- ``btad``: BTAD. Normal folders are named ``ok``; images ``.bmp`` or ``.png``; masks
  ``ground_truth/ko/<stem>.png`` (no ``_mask`` suffix).
- ``visa``: VisA with ``split_csv/1cls.csv`` (columns object, split, label, image, mask).
- ``mvtec3d``: MVTec 3D-AD, RGB part: images in ``<defect>/rgb/``, masks in ``<defect>/gt/``,
  the ``validation/good`` images become split ``"val"``.
- ``texture-ad``: Texture AD (Adapted-MoE's benchmark): ``<category>/<subclass>/`` folders, each
  in the MVTec layout; the subclass folder's name becomes every image's subclass.
- ``mvtec-ad2``: MVTec AD 2: ``train/good``, ``validation/good`` (split ``"val"``),
  ``test_public/{good,bad}`` with masks ``test_public/ground_truth/bad/<stem>_mask.png``. The
  unlabelled ``test_private`` and ``test_private_mixed`` folders are for prediction only
  (``iadkit predict --format mvtec-ad2``).
- ``loco``: MVTec LOCO AD: ``train/good``, ``validation/good``,
  ``test/{good,logical_anomalies,structural_anomalies}``; an anomalous image's ground truth is
  the folder ``ground_truth/<type>/<stem>/`` of one mask per defect (their union is its mask;
  ``defects_config.json`` gives each defect's saturation for sPRO).
- ``real-iad`` / ``real-iad-sv``: Real-IAD through its JSON split files: ``root`` is one image
  folder (``realiad_256``, ``realiad_1024``, ...) with ``<category>/OK|NG/...`` inside, and the
  JSON files are in ``realiad_jsons/realiad_jsons/`` (multi-view) or
  ``realiad_jsons/realiad_jsons_sv/`` (single-view) beside it or inside it. Images of one
  physical sample share an ``object_id`` (their folder, e.g. ``NG/HS/S0012``).
- ``folder``: a generic normal folder, optional abnormal and mask folders (see :func:`read_folder`).

A category folder may hold ``subclasses.csv`` (columns ``path,subclass``; paths relative to the
category folder) to give each image a subclass for unseen-subclass experiments.
Mask files are matched by image stem, with or without a ``_mask`` suffix, in any image format,
or are a folder named by the stem (MVTec LOCO).
A category without a ground-truth folder gives image-level evaluation only.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from ..errors import DatasetError
from .image_io import is_image_file
from .samples import ANOMALOUS, NORMAL, Sample, SampleSet

log = logging.getLogger("iadkit")

LAYOUTS = ("auto", "mvtec", "mpdd", "btad", "visa", "mvtec3d", "texture-ad", "mvtec-ad2",
           "loco", "real-iad", "real-iad-sv", "folder")
#: Where each Real-IAD layout's JSON split files are, under ``realiad_jsons/``.
REAL_IAD_JSON_FOLDERS = {"real-iad": "realiad_jsons", "real-iad-sv": "realiad_jsons_sv"}
NORMAL_FOLDER_NAMES = ("good", "ok")


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def _find_mask(folder: Path, stem: str) -> Path | None:
    if (folder / stem).is_dir():  # MVTec LOCO: one mask per defect region
        return folder / stem
    for candidate_stem in (f"{stem}_mask", stem):
        for path in sorted(folder.glob(f"{candidate_stem}.*")):
            if is_image_file(path):
                return path
    return None


def _read_subclasses(category_dir: Path) -> dict[Path, str]:
    table = category_dir / "subclasses.csv"
    if not table.exists():
        return {}
    with table.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"path", "subclass"} <= set(reader.fieldnames):
            raise DatasetError(f"{table}: needs the columns 'path' and 'subclass'")
        return {(category_dir / row["path"]).resolve(): row["subclass"] for row in reader}


def _category_dirs(root: Path, categories: Sequence[str] | None) -> list[Path]:
    """The category folders under ``root`` (or ``root`` itself when it is one category)."""
    if (root / "train").is_dir():
        found = {root.name: root}
    else:
        found = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and (p / "train").is_dir()}
    if not found:
        raise DatasetError(
            f"{root}: no category found (expected '<category>/train/' folders, or 'train/' here)"
        )
    if categories is None or list(categories) == ["all"]:
        return list(found.values())
    missing = [c for c in categories if c not in found]
    if missing:
        raise DatasetError(f"{root}: no category {missing}; available: {sorted(found)}")
    return [found[c] for c in categories]


def _subfolders_with_train(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.iterdir()) if p.is_dir() and (p / "train").is_dir()]


def read_texture_ad(root: Path, categories: Sequence[str] | None) -> list[Sample]:
    """Read Texture AD: ``root/<category>/<subclass>/`` MVTec-like folders, or ``root`` itself
    when it is one category (its subfolders are the subclasses)."""
    if _subfolders_with_train(root):
        found = {root.name: root}
    else:
        found = {p.name: p for p in sorted(root.iterdir())
                 if p.is_dir() and _subfolders_with_train(p)}
    if not found:
        raise DatasetError(f"{root}: no Texture AD category found (expected "
                           "'<category>/<subclass>/train/' folders)")
    if categories is not None and list(categories) != ["all"]:
        missing = [c for c in categories if c not in found]
        if missing:
            raise DatasetError(f"{root}: no category {missing}; available: {sorted(found)}")
        found = {c: found[c] for c in categories}
    return [replace(sample, category=category, subclass=subclass_dir.name)
            for category, category_dir in found.items()
            for subclass_dir in _subfolders_with_train(category_dir)
            for sample in read_mvtec_like(subclass_dir)]


def _image_folder(folder: Path, rgb_subfolder: bool) -> Path:
    return folder / "rgb" if rgb_subfolder else folder


def read_mvtec_like(category_dir: Path, rgb_subfolder: bool = False,
                    test_folder: str = "test") -> list[Sample]:
    """Read one category folder of the MVTec AD / MPDD / BTAD / MVTec 3D-AD / LOCO family;
    MVTec AD 2 has its test images and ground truth in ``test_folder="test_public"``."""
    category = category_dir.name
    subclasses = _read_subclasses(category_dir)
    samples: list[Sample] = []

    def add(path: Path, label: int, defect: str, split: str, mask: Path | None) -> None:
        subclass = subclasses.get(path.resolve())
        samples.append(Sample(path, label, category, defect, split, mask, subclass))

    train_dirs = [d for d in sorted((category_dir / "train").iterdir()) if d.is_dir()]
    normal_train = [d for d in train_dirs if d.name in NORMAL_FOLDER_NAMES]
    if not normal_train:
        raise DatasetError(
            f"{category_dir / 'train'}: no normal folder (expected one of {NORMAL_FOLDER_NAMES})"
        )
    for folder in normal_train:
        images = list_images(_image_folder(folder, rgb_subfolder))
        if not images:
            raise DatasetError(f"{_image_folder(folder, rgb_subfolder)}: no training images found")
        for path in images:
            add(path, NORMAL, "good", "train", None)
    for folder in (category_dir / "validation").glob("*"):
        if folder.name in NORMAL_FOLDER_NAMES:
            for path in list_images(_image_folder(folder, rgb_subfolder)):
                add(path, NORMAL, "good", "val", None)

    test_root = category_dir / test_folder
    ground_truth = (test_root if test_folder != "test" else category_dir) / "ground_truth"
    has_pixel_labels = rgb_subfolder or ground_truth.is_dir()
    test_folders = sorted(p for p in test_root.iterdir() if p.is_dir() and p != ground_truth) \
        if test_root.is_dir() else []
    for folder in test_folders:
        normal = folder.name in NORMAL_FOLDER_NAMES
        mask_folder = folder / "gt" if rgb_subfolder else ground_truth / folder.name
        for path in list_images(_image_folder(folder, rgb_subfolder)):
            mask = None
            if not normal and has_pixel_labels:
                mask = _find_mask(mask_folder, path.stem)
                if mask is None:
                    # Training never reads test masks: say so now, refuse only where pixel
                    # metrics need it (engine.evaluation).
                    log.warning("%s: anomalous test image has no mask in %s (expected %s_mask.png"
                                " or %s.png); pixel metrics of %s cannot be computed", path,
                                mask_folder, path.stem, path.stem, category)
            label = NORMAL if normal else ANOMALOUS
            add(path, label, "good" if normal else folder.name, "test", mask)
    return samples


def read_visa(root: Path, categories: Sequence[str] | None = None) -> list[Sample]:
    """Read VisA through its ``split_csv/1cls.csv`` table.

    Raises:
        DatasetError: the table missing or without its columns, or files it lists that are
            absent (a half-downloaded copy), naming the first and counting them.
    """
    table = root / "split_csv" / "1cls.csv"
    if not table.is_file():
        raise DatasetError(f"{table}: VisA's split table is missing (the layout reads the "
                           "official one-class split; a VisA converted to the MVTec form reads "
                           "with --layout mvtec)")
    samples: list[Sample] = []
    with table.open(newline="") as handle:
        reader = csv.DictReader(handle)
        needed = {"object", "split", "label", "image", "mask"}
        if reader.fieldnames is None or not needed <= set(reader.fieldnames):
            raise DatasetError(f"{table}: needs the columns {sorted(needed)}")
        for row in reader:
            if categories and list(categories) != ["all"] and row["object"] not in categories:
                continue
            label = NORMAL if row["label"].strip().lower() == "normal" else ANOMALOUS
            mask = root / row["mask"] if label == ANOMALOUS and row["mask"].strip() else None
            defect = "good" if label == NORMAL else "anomaly"
            split = "train" if row["split"].strip().lower() == "train" else "test"
            samples.append(Sample(root / row["image"], label, row["object"], defect, split, mask))
    if categories and list(categories) != ["all"]:
        found = {s.category for s in samples}
        missing = [c for c in categories if c not in found]
        if missing:
            raise DatasetError(f"{table}: no category {missing}")
    absent = [path for s in samples for path in (s.image_path, s.mask_path)
              if path is not None and not path.is_file()]
    if absent:
        raise DatasetError(f"{absent[0]}: listed in {table} but not found ({len(absent)} listed "
                           f"files are missing under {root}: an incomplete download?)")
    return samples


def real_iad_json_folder(root: Path, layout: str = "real-iad") -> Path | None:
    """The folder of a Real-IAD layout's JSON split files, inside ``root`` or beside it."""
    for base in (root, root.parent):
        folder = base / "realiad_jsons" / REAL_IAD_JSON_FOLDERS[layout]
        if folder.is_dir():
            return folder
    return None


def read_real_iad(root: Path, categories: Sequence[str] | None = None,
                  layout: str = "real-iad") -> list[Sample]:
    """Read Real-IAD through its JSON split files (one per category: ``meta``, and ``train`` and
    ``test`` lists of ``{category, anomaly_class, image_path, mask_path}``, paths relative to
    the category's image folder). An image is normal when its ``anomaly_class`` is the
    ``meta.normal_class`` ("OK"); the other classes (e.g. "HS") are its defect type.

    Raises:
        DatasetError: no split files, a malformed one, or files they list that are absent (a
            half-downloaded copy), naming the first and counting them.
    """
    json_folder = real_iad_json_folder(root, layout)
    if json_folder is None:
        raise DatasetError(f"{root}: no realiad_jsons/{REAL_IAD_JSON_FOLDERS[layout]}/ folder of "
                           "split files inside or beside it (point --data at an image folder "
                           "such as Real-IAD/realiad_256)")
    if json_folder.parent.parent == root:  # the dataset's top folder: which resolution?
        resolutions = sorted(p for p in root.glob("realiad_*")
                             if p.is_dir() and p.name != "realiad_jsons")
        if len(resolutions) != 1:
            raise DatasetError(f"{root}: point --data at one of its image folders "
                               f"{[p.name for p in resolutions] or '(none found)'}")
        root = resolutions[0]
    tables = {p.stem: p for p in sorted(json_folder.glob("*.json"))}
    if categories is not None and list(categories) != ["all"]:
        unknown = [c for c in categories if c not in tables]
        if unknown:
            raise DatasetError(f"{json_folder}: no split file for {unknown}; available: "
                               f"{sorted(tables)}")
        tables = {c: tables[c] for c in categories}
    if not tables:
        raise DatasetError(f"{json_folder}: no <category>.json split files")
    samples: list[Sample] = []
    missing: list[Path] = []
    for category, table in tables.items():
        try:
            record = json.loads(table.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DatasetError(f"{table}: not a readable JSON split file ({error})") from error
        if not isinstance(record, dict) or not all(
                isinstance(record.get(split), list) for split in ("train", "test")):
            raise DatasetError(f"{table}: a Real-IAD split file holds 'train' and 'test' lists")
        meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
        normal_class = meta.get("normal_class", "OK")
        for split in ("train", "test"):
            for number, entry in enumerate(record[split]):
                if not isinstance(entry, dict) or not isinstance(entry.get("image_path"), str) \
                        or "anomaly_class" not in entry:
                    raise DatasetError(f"{table}: {split} entry {number} needs 'image_path' and "
                                       "'anomaly_class'")
                image = root / category / entry["image_path"]
                mask = root / category / entry["mask_path"] if entry.get("mask_path") else None
                missing += [path for path in (image, mask)
                            if path is not None and not path.is_file()]
                label = NORMAL if entry["anomaly_class"] == normal_class else ANOMALOUS
                defect = "good" if label == NORMAL else str(entry["anomaly_class"])
                object_id = Path(entry["image_path"]).parent.as_posix()
                samples.append(Sample(image, label, category, defect, split, mask,
                                      object_id=object_id))
    if missing:
        raise DatasetError(f"{missing[0]}: listed in the split files of {json_folder} but not "
                           f"found ({len(missing)} listed files are missing under {root}: an "
                           "incomplete download?)")
    return samples


def read_folder(
    normal_dir: str | Path,
    abnormal_dir: str | Path | None = None,
    mask_dir: str | Path | None = None,
    category: str = "folder",
    test_fraction: float = 0.2,
    seed: int = 0,
) -> SampleSet:
    """A generic dataset: a folder of normal images, optionally abnormal images and masks.

    A seeded ``test_fraction`` of the normal images is held out for testing; every abnormal
    image is a test image; masks are matched by stem in ``mask_dir``.
    """
    normal_dir = Path(normal_dir)
    normals = list_images(normal_dir)
    if not normals:
        raise DatasetError(f"{normal_dir}: no normal images found")
    order = list(range(len(normals)))
    random.Random(seed).shuffle(order)
    n_test = round(test_fraction * len(normals)) if abnormal_dir else 0
    test_ids = set(order[:n_test])
    samples = [
        Sample(p, NORMAL, category, "good", "test" if i in test_ids else "train")
        for i, p in enumerate(normals)
    ]
    if abnormal_dir is not None:
        abnormal_dir = Path(abnormal_dir)
        abnormals = list_images(abnormal_dir)
        if not abnormals:
            raise DatasetError(f"{abnormal_dir}: no abnormal images found")
        for path in abnormals:
            mask = None
            if mask_dir is not None:
                mask = _find_mask(Path(mask_dir), path.stem)
                if mask is None:
                    raise DatasetError(f"{path}: no mask named {path.stem}[_mask].* in {mask_dir}")
            samples.append(Sample(path, ANOMALOUS, category, abnormal_dir.name, "test", mask))
    return SampleSet(samples)


def detect_layout(root: Path) -> str:
    """Guess the layout of ``root`` from its folders."""
    if (root / "split_csv" / "1cls.csv").is_file():
        return "visa"
    if real_iad_json_folder(root) is not None:
        return "real-iad"
    candidates = [root] if (root / "train").is_dir() else [p for p in root.iterdir() if p.is_dir()]
    for category_dir in candidates:
        train = category_dir / "train"
        if (train / "good").is_dir() and (category_dir / "test_public").is_dir():
            return "mvtec-ad2"
        if (train / "good").is_dir() and ((category_dir / "defects_config.json").is_file()
                                          or (category_dir / "test" / "logical_anomalies")
                                          .is_dir()):
            return "loco"
        if (train / "good" / "rgb").is_dir():
            return "mvtec3d"
        if (train / "ok").is_dir():
            return "btad"
        if (train / "good").is_dir():
            return "mvtec"
    if any(_subfolders_with_train(category_dir) for category_dir in candidates):
        return "texture-ad"
    raise DatasetError(
        f"{root}: unknown dataset layout. Expected MVTec AD/MPDD ('<category>/train/good'), "
        "BTAD ('<category>/train/ok'), MVTec 3D-AD ('<category>/train/good/rgb'), MVTec AD 2 "
        "('<category>/test_public'), MVTec LOCO ('<category>/test/logical_anomalies'), VisA "
        "('split_csv/1cls.csv'), Real-IAD ('realiad_jsons/' beside or inside), Texture AD "
        "('<category>/<subclass>/train/good'), or use read_folder() for a plain folder of images"
    )


def load_dataset(
    root: str | Path, categories: Sequence[str] | None = None, layout: str = "auto"
) -> SampleSet:
    """Read every sample of a dataset folder.

    Args:
        root: the dataset folder (several categories) or one category folder.
        categories: category names to read; None or ``["all"]`` reads all of them.
        layout: one of :data:`LAYOUTS`; ``"auto"`` detects it.

    Example:
        >>> samples = load_dataset("mvtec_ad", categories=["bottle"])
        >>> train = samples.where(split="train")
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    if layout not in LAYOUTS or layout == "folder":
        raise DatasetError(
            f"unknown layout {layout!r}; choose from {LAYOUTS[:-1]} (use read_folder() for 'folder')"
        )
    if layout == "auto":
        layout = detect_layout(root)
    if layout == "visa":
        samples = read_visa(root, categories)
    elif layout == "texture-ad":
        samples = read_texture_ad(root, categories)
    elif layout in REAL_IAD_JSON_FOLDERS:
        samples = read_real_iad(root, categories, layout)
    else:
        rgb = layout == "mvtec3d"
        test_folder = "test_public" if layout == "mvtec-ad2" else "test"
        samples = [s for d in _category_dirs(root, categories)
                   for s in read_mvtec_like(d, rgb, test_folder)]
    if not any(s.split == "train" for s in samples):
        raise DatasetError(f"{root}: no training images found")
    return SampleSet(samples)
