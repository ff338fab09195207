"""Procedural MVTec-layout datasets with pixel masks, for tests and quick experiments.

Normal images are a seeded, category-specific texture (oriented stripes plus fine noise) with
small random variations; anomalous images carry a defect (a dark or bright blob or a scratch) whose
pixels form the ground-truth mask.
"""

from __future__ import annotations

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


def generate_dataset(
    root: str | Path,
    categories: tuple[str, ...] = ("texture",),
    n_train: int = 20,
    n_test_good: int = 6,
    n_test_defect: int = 6,
    size: int = 64,
    seed: int = 0,
    image_format: str = "png",
) -> Path:
    """Write a small MVTec AD layout dataset under ``root`` and return ``root``.

    Example:
        >>> generate_dataset("/tmp/toy", categories=("a", "b"), n_train=10)
    """
    root = Path(root)
    for style, category in enumerate(categories):
        rng = np.random.default_rng(seed * 1000 + style)
        base = root / category

        def write(folder: Path, name: str, image: np.ndarray) -> None:
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((image * 255).astype(np.uint8)).save(folder / f"{name}.{image_format}")

        for i in range(n_train):
            write(base / "train" / "good", f"{i:03d}", _texture(rng, size, style))
        for i in range(n_test_good):
            write(base / "test" / "good", f"{i:03d}", _texture(rng, size, style))
        for i in range(n_test_defect):
            kind = DEFECTS[i % len(DEFECTS)]
            image = _texture(rng, size, style)
            mask = _defect_mask(rng, size, kind)
            shade = 0.05 if i % 4 < 2 else 0.95
            image[mask] = shade + rng.normal(0, 0.02, (int(mask.sum()), 3))
            write(base / "test" / kind, f"{i:03d}", np.clip(image, 0, 1))
            mask_folder = base / "ground_truth" / kind
            mask_folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(mask_folder / f"{i:03d}_mask.png")
    return root
