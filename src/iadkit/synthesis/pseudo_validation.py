"""Pseudo-validation sets: labelled test-like data made from normal images only.

LafitE §3.4 selects hyperparameters on synthetic anomalies instead of the test set; iadkit
generalises it to any method. :func:`build_pseudo_validation` takes normal images, keeps half of
them normal and gives the other half a synthetic anomaly, writes them as PNG files with masks, and
returns a :class:`SampleSet` that the engine evaluates like any test set::

    pseudo = build_pseudo_validation(held_out_normals, "pseudo_val", synthesis="fragments")
    metrics = score_predictions(predict_samples(detector, pseudo), pixel=True)
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.dataset import to_uint8_image
from ..data.preprocess import Preprocess
from ..data.samples import ANOMALOUS, NORMAL, Sample, SampleSet
from ..errors import ConfigError, DatasetError
from .cse_defects import CseDefectSynthesizer
from .cutpaste import CutPasteSynthesizer, FragmentSynthesizer
from .draem import DraemSynthesizer, SyntheticSample
from .textures import TextureSource

#: The synthetic anomalies ("syntheses") one generator makes.
SYNTHESES = ("fragments", "draem", "cse", "cutpaste", "scar")
#: The synthesis of :func:`build_pseudo_validation` that cycles through every one of SYNTHESES.
MIXED = "mixed"
PSEUDO_VALIDATION_SYNTHESES = (*SYNTHESES, MIXED)

#: synthesize(image, donor, generator) -> SyntheticSample; donor: another normal image.
Synthesize = Callable[[torch.Tensor, torch.Tensor, torch.Generator], SyntheticSample]


def make_synthesizer(synthesis: str, textures: TextureSource | None = None,
                     anomaly_probability: float = 1.0) -> Synthesize:
    """One calling convention over every generator of this package (``synthesis``: one of
    :data:`SYNTHESES`)."""
    if synthesis == "fragments":
        fragments = FragmentSynthesizer(anomaly_probability=anomaly_probability)
        return lambda image, donor, generator: fragments(image, donor, generator)
    if synthesis == "draem":
        single = DraemSynthesizer(textures, anomaly_probability)
    elif synthesis == "cse":
        single = CseDefectSynthesizer(textures, anomaly_probability)
    elif synthesis in ("cutpaste", "scar"):
        single = CutPasteSynthesizer("normal" if synthesis == "cutpaste" else "scar",
                                     anomaly_probability)
    else:
        raise ConfigError(f"unknown synthesis {synthesis!r}; choose from {SYNTHESES}")
    return lambda image, donor, generator: single(image, generator)


def _save(image: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(to_uint8_image(image))).save(path)


def build_pseudo_validation(normals: SampleSet, folder: str | Path, synthesis: str = "fragments",
                            size: int = 256, textures: TextureSource | None = None,
                            seed: int = 0, max_attempts: int = 10) -> SampleSet:
    """Write half of ``normals`` unchanged and half with a synthetic anomaly under ``folder``.

    Each category gets ``<folder>/<category>/test/{good,<synthesis>}/`` and
    ``ground_truth/<synthesis>/<stem>_mask.png``. ``synthesis="mixed"`` gives the anomalous
    images every generator of :data:`SYNTHESES` in turn (equal shares, each under its own defect type): the
    choice when nothing is known of the real defects, since single generators can favour
    opposite settings (Perlin-shaped texture patches a sharp anomaly map, faint CutPaste patches
    a smooth one). Donor images for fragments come from the same category. Images are stored at
    ``size`` x ``size``.

    Returns:
        The written samples (split "test"), anomalous ones with masks.
    """
    if synthesis not in PSEUDO_VALIDATION_SYNTHESES:
        raise ConfigError(f"unknown pseudo-validation synthesis {synthesis!r}; choose from "
                          f"{PSEUDO_VALIDATION_SYNTHESES}")
    if len(normals) < 2:
        raise DatasetError("a pseudo-validation set needs at least two normal images")
    syntheses = SYNTHESES if synthesis == MIXED else (synthesis,)
    synthesizers = [make_synthesizer(s, textures) for s in syntheses]
    preprocess = Preprocess(size)
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    written: list[Sample] = []
    for category in normals.categories:
        pool = list(normals.where(category=category))
        if len(pool) < 2:
            raise DatasetError(f"category {category!r} has fewer than two normal images")
        order = list(range(len(pool)))
        rng.shuffle(order)
        base = Path(folder) / category
        for rank, index in enumerate(order):
            sample = pool[index]
            image = preprocess.load(sample.image_path)
            name = f"{rank:05d}_{sample.image_path.stem}"
            if rank % 2 == 0:
                path = base / "test" / "good" / f"{name}.png"
                _save(image, path)
                written.append(Sample(path, NORMAL, category, "good", "test"))
                continue
            donor_sample = pool[order[(rank + 1) % len(order)]]
            donor = preprocess.load(donor_sample.image_path)
            which = (rank // 2) % len(syntheses)
            for _ in range(max_attempts):
                synthetic = synthesizers[which](image, donor, generator)
                if synthetic.mask.any():
                    break
            else:
                raise DatasetError(f"{syntheses[which]} synthesis produced no anomaly for "
                                   f"{sample.image_path}")
            path = base / "test" / syntheses[which] / f"{name}.png"
            mask_path = base / "ground_truth" / syntheses[which] / f"{name}_mask.png"
            _save(synthetic.image, path)
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((synthetic.mask.numpy() * 255).astype(np.uint8)).save(mask_path)
            written.append(Sample(path, ANOMALOUS, category, syntheses[which], "test", mask_path))
    return SampleSet(written)


def preview_grid(normals: SampleSet, destination: str | Path, synthesis: str = "draem",
                 count: int = 6, size: int = 192, textures: TextureSource | None = None,
                 seed: int = 0) -> Path:
    """Write a PNG grid with one row per image: normal | synthetic | mask, to ``destination``
    (an image path, or a folder to hold ``preview.png``); returns the file written."""
    destination = Path(destination)
    if destination.is_dir() or not destination.suffix:  # a folder: the grid goes inside
        destination = destination / "preview.png"
    elif destination.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
        raise ConfigError(f"{destination}: the preview is an image; give a .png path or a "
                          "folder")
    if len(normals) == 0:
        raise DatasetError("no normal images to preview")
    synthesize = make_synthesizer(synthesis, textures)
    preprocess = Preprocess(size)
    generator = torch.Generator().manual_seed(seed)
    pool = list(normals)
    rows = []
    for index in range(min(count, len(pool))):
        image = preprocess.load(pool[index].image_path)
        donor = preprocess.load(pool[(index + 1) % len(pool)].image_path)
        synthetic = synthesize(image, donor, generator)
        mask = synthetic.mask.unsqueeze(0).expand(3, -1, -1)
        gap = torch.ones(3, size, 4)
        rows.append(torch.cat([image, gap, synthetic.image, gap, mask], dim=2))
    grid = torch.cat([torch.cat([row, torch.ones(3, 4, row.shape[2])], dim=1) for row in rows],
                     dim=1)
    _save(grid, destination)
    return destination
