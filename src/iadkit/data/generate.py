"""Procedural datasets with pixel masks, in the folder layouts of the public benchmarks, for
tests, for quick experiments and for checking that iadkit reads a layout before downloading it.

Normal images are a seeded, category-specific texture (oriented stripes plus fine noise) with
small random variations; anomalous images carry a defect (a dark or bright blob or a scratch) whose
pixels form the ground-truth mask. The same images are written in any of :data:`GENERATED_LAYOUTS`
(file names, folders, mask conventions and split files as the real dataset has them; see
docs/usage.md, "Benchmarks and their protocols", for the sources they were checked against).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

DEFECTS = ("blob", "scratch")


def _texture(rng: np.random.Generator, size: int, style: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = 0.6 * style + rng.normal(0, 0.05)
    frequency = 0.35 + 0.1 * style
    phase = rng.uniform(0, 2 * np.pi)
    wave = np.sin(frequency * (np.cos(angle) * x + np.sin(angle) * y) + phase)
    base = 0.5 + 0.25 * wave + rng.normal(0, 0.04, (size, size))
    tint = np.array([1.0, 0.9 - 0.1 * (style % 3), 0.8 + 0.1 * (style % 2)], dtype=np.float32)
    return np.clip(base[:, :, None] * tint, 0, 1)


def _defect_mask(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    cy, cx = rng.uniform(0.25, 0.75, 2) * size
    if kind == "blob":
        ry, rx = rng.uniform(0.08, 0.16, 2) * size
        return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0
    angle = rng.uniform(0, np.pi)
    distance = np.abs((x - cx) * np.sin(angle) - (y - cy) * np.cos(angle))
    along = np.abs((x - cx) * np.cos(angle) + (y - cy) * np.sin(angle))
    return (distance <= max(1.0, 0.03 * size)) & (along <= 0.3 * size)


@dataclass
class CategoryImages:
    """One category's generated images, float RGB in [0, 1]."""

    train: list[np.ndarray]
    test_good: list[np.ndarray]
    defects: list[tuple[str, np.ndarray, np.ndarray]]  # (kind, image, bool mask)
    validation: list[np.ndarray]


def category_images(style: int, n_train: int, n_test_good: int, n_test_defect: int,
                    n_validation: int, size: int, seed: int) -> CategoryImages:
    """The images of the ``style``-th category (the same for every layout)."""
    rng = np.random.default_rng(seed * 1000 + style)
    train = [_texture(rng, size, style) for _ in range(n_train)]
    good = [_texture(rng, size, style) for _ in range(n_test_good)]
    defects = []
    for i in range(n_test_defect):
        kind = DEFECTS[i % len(DEFECTS)]
        image = _texture(rng, size, style)
        mask = _defect_mask(rng, size, kind)
        shade = 0.05 if i % 4 < 2 else 0.95
        image[mask] = shade + rng.normal(0, 0.02, (int(mask.sum()), 3))
        defects.append((kind, np.clip(image, 0, 1), mask))
    # Drawn last, so that the images above do not depend on whether a layout has validation.
    validation = [_texture(rng, size, style) for _ in range(n_validation)]
    return CategoryImages(train, good, defects, validation)


def _save_image(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((image * 255).astype(np.uint8)).save(path)


def _save_mask(mask: np.ndarray, path: Path, value: int = 255) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * value).save(path)


def _write_mvtec(root: Path, category: str, images: CategoryImages, extension: str) -> None:
    base = root / category
    for i, image in enumerate(images.train):
        _save_image(image, base / "train" / "good" / f"{i:03d}.{extension}")
    for i, image in enumerate(images.test_good):
        _save_image(image, base / "test" / "good" / f"{i:03d}.{extension}")
    for i, (kind, image, mask) in enumerate(images.defects):
        _save_image(image, base / "test" / kind / f"{i:03d}.{extension}")
        _save_mask(mask, base / "ground_truth" / kind / f"{i:03d}_mask.png")


def _write_mvtec_ad2(root: Path, category: str, images: CategoryImages, extension: str) -> None:
    """MVTec AD 2: validation normals; public test ``good``/``bad`` with
    ``ground_truth/bad/<stem>_mask.png``; the unlabelled private sets named ``NNN_regular`` and
    ``NNN_mixed`` (the test images again, shuffled)."""
    base = root / category
    for i, image in enumerate(images.train):
        _save_image(image, base / "train" / "good" / f"{i:03d}_regular.png")
    for i, image in enumerate(images.validation):
        _save_image(image, base / "validation" / "good" / f"{i:03d}_regular.png")
    public = base / "test_public"
    for i, image in enumerate(images.test_good):
        _save_image(image, public / "good" / f"{i:03d}_regular.png")
    for i, (_, image, mask) in enumerate(images.defects):
        _save_image(image, public / "bad" / f"{i:03d}_regular.png")
        _save_mask(mask, public / "ground_truth" / "bad" / f"{i:03d}_regular_mask.png")
    unlabelled = images.test_good + [image for _, image, _ in images.defects]
    order = np.random.default_rng(len(unlabelled)).permutation(len(unlabelled))
    for folder, suffix in (("test_private", "regular"), ("test_private_mixed", "mixed")):
        for i, index in enumerate(order):
            _save_image(unlabelled[index], base / folder / f"{i:03d}_{suffix}.png")


#: The miniature's LOCO defects: (folder, name, pixel value, saturation, relative).
LOCO_DEFECTS = {"blob": ("logical_anomalies", "missing_part", 251, 0.5, True),
                "scratch": ("structural_anomalies", "scratch", 242, 60, False)}


def _write_loco(root: Path, category: str, images: CategoryImages, extension: str) -> None:
    """MVTec LOCO AD: blobs are the logical anomalies, scratches the structural ones; each
    defect's mask is its own file in ``ground_truth/<type>/<stem>/`` carrying the defect's
    pixel value, and the first structural image's scratch is split into two region files."""
    base = root / category
    for i, image in enumerate(images.train):
        _save_image(image, base / "train" / "good" / f"{i:03d}.png")
    for i, image in enumerate(images.validation):
        _save_image(image, base / "validation" / "good" / f"{i:03d}.png")
    for i, image in enumerate(images.test_good):
        _save_image(image, base / "test" / "good" / f"{i:03d}.png")
    split_done = False
    for i, (kind, image, mask) in enumerate(images.defects):
        folder, _, value, _, _ = LOCO_DEFECTS[kind]
        _save_image(image, base / "test" / folder / f"{i:03d}.png")
        regions = base / "ground_truth" / folder / f"{i:03d}"
        rows = np.nonzero(mask.any(axis=1))[0]
        if kind == "scratch" and not split_done and rows.size > 1:
            middle = rows[rows.size // 2]
            upper, lower = mask.copy(), mask.copy()
            upper[middle:], lower[:middle] = False, False
            _save_mask(upper, regions / "000.png", value)
            _save_mask(lower, regions / "001.png", value)
            split_done = True
        else:
            _save_mask(mask, regions / "000.png", value)
    config = [{"defect_name": name, "pixel_value": value, "saturation_threshold": saturation,
               "relative_saturation": relative}
              for name, value, saturation, relative in
              (entry[1:] for entry in LOCO_DEFECTS.values())]
    (base / "defects_config.json").write_text(json.dumps(config, indent=2))


#: Real-IAD photographs every object from five cameras (C1-C5).
REAL_IAD_VIEWS = 5
#: The miniature's Real-IAD defect codes (the dataset's abbreviations: pit, scratch).
REAL_IAD_CODES = {"blob": "AK", "scratch": "HS"}


def _write_real_iad(root: Path, category: str, images: CategoryImages, extension: str) -> None:
    """Real-IAD: ``realiad_<size>/<category>/OK/S<object>/<category>_<object>_OK_C<view>_<time>
    .jpg`` and ``NG/<code>/S<object>/..._NG_C<view>_<time>.jpg`` with ``<image stem>_mask.png``;
    consecutive images form the five views of one object; the split files list every image
    (``realiad_jsons/realiad_jsons`` and, the same images, ``realiad_jsons/realiad_jsons_sv``)."""
    size = images.train[0].shape[0]
    image_root = root / f"realiad_{size}" / category
    entries: dict[str, list[dict[str, object]]] = {"train": [], "test": []}

    def add(split: str, number: int, image: np.ndarray, mask: np.ndarray | None,
            code: str | None) -> None:
        object_number, view = divmod(number, REAL_IAD_VIEWS)
        state = "OK" if code is None else "NG"
        folder = f"OK/S{object_number:04d}" if code is None else f"NG/{code}/S{object_number:04d}"
        stem = f"{category}_{object_number:04d}_{state}_C{view + 1}_20240101{number:06d}"
        _save_image(image, image_root / folder / f"{stem}.jpg")
        mask_path = None
        if mask is not None:
            mask_path = f"{folder}/{stem}_mask.png"
            _save_mask(mask, image_root / mask_path)
        entries[split].append({"category": category, "anomaly_class": code or "OK",
                               "image_path": f"{folder}/{stem}.jpg", "mask_path": mask_path})

    for number, image in enumerate(images.train):
        add("train", number, image, None, None)
    offset = len(images.train) + (-len(images.train)) % REAL_IAD_VIEWS  # a fresh object
    for number, image in enumerate(images.test_good):
        add("test", offset + number, image, None, None)
    for number, (_, image, mask) in enumerate(images.defects):
        # Every view of a defective object shows a defect of its own; the object's code (its
        # NG/<code> folder) alternates object by object.
        object_number = number // REAL_IAD_VIEWS
        code = REAL_IAD_CODES[DEFECTS[object_number % len(DEFECTS)]]
        add("test", number, image, mask, code)
    record = {"meta": {"prefix": "", "normal_class": "OK"}, **entries}
    for folder in ("realiad_jsons", "realiad_jsons_sv"):
        path = root / "realiad_jsons" / folder / f"{category}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1))


def _write_visa(root: Path, category: str, images: CategoryImages, extension: str) -> None:
    """VisA: ``<category>/Data/Images/{Normal,Anomaly}/*.JPG``, ``Data/Masks/Anomaly/*.png``,
    and the rows of ``split_csv/1cls.csv`` (written by :func:`generate_dataset`)."""
    data = root / category / "Data"
    rows = []
    normals = [("train", image) for image in images.train] + \
        [("test", image) for image in images.test_good]
    for i, (split, image) in enumerate(normals):
        name = f"Images/Normal/{i:04d}.JPG"
        _save_image(image, data / name)
        rows.append([category, split, "normal", f"{category}/Data/{name}", ""])
    for i, (_, image, mask) in enumerate(images.defects):
        name, mask_name = f"Images/Anomaly/{i:03d}.JPG", f"Masks/Anomaly/{i:03d}.png"
        _save_image(image, data / name)
        _save_mask(mask, data / mask_name)
        rows.append([category, "test", "anomaly", f"{category}/Data/{name}",
                     f"{category}/Data/{mask_name}"])
    table = root / "split_csv" / "1cls.csv"
    table.parent.mkdir(parents=True, exist_ok=True)
    new = not table.exists()
    with table.open("a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)


LAYOUT_WRITERS: dict[str, Callable[[Path, str, CategoryImages, str], None]] = {
    "mvtec": _write_mvtec, "mvtec-ad2": _write_mvtec_ad2, "loco": _write_loco,
    "real-iad": _write_real_iad, "visa": _write_visa}
#: The layouts :func:`generate_dataset` writes (``iadkit data generate --layout``).
GENERATED_LAYOUTS = tuple(LAYOUT_WRITERS)


def generate_dataset(
    root: str | Path,
    categories: tuple[str, ...] = ("texture",),
    n_train: int = 20,
    n_test_good: int = 6,
    n_test_defect: int = 6,
    size: int = 64,
    seed: int = 0,
    image_format: str = "png",
    layout: str = "mvtec",
) -> Path:
    """Write a small dataset in ``layout`` under ``root`` and return ``root``.

    Layouts with a validation split (``mvtec-ad2``, ``loco``) get ``max(5, n_train // 4)``
    validation normals besides the ``n_train`` training images. ``image_format`` applies to
    the ``mvtec`` layout; the others use their dataset's own formats.

    Example:
        >>> generate_dataset("/tmp/toy", categories=("a", "b"), n_train=10)
        >>> generate_dataset("/tmp/loco", layout="loco")
    """
    if layout not in LAYOUT_WRITERS:
        raise ValueError(f"unknown layout {layout!r}; choose from {GENERATED_LAYOUTS}")
    root = Path(root)
    n_validation = max(5, n_train // 4) if layout in ("mvtec-ad2", "loco") else 0
    for style, category in enumerate(categories):
        images = category_images(style, n_train, n_test_good, n_test_defect, n_validation,
                                 size, seed)
        LAYOUT_WRITERS[layout](root, category, images, image_format)
    return root
