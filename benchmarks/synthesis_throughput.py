"""Synthetic-sample throughput next to the backbone's, at 256 px (one JSON line per source).

Usage: .venv/bin/python benchmarks/synthesis_throughput.py [--textures ../shared/data/textures]

Synthesis runs on one CPU core per DataLoader worker, so a rate above the backbone's
images/second (measured here on batches of 16, both cores) means synthesis never bottlenecks
training.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from iadkit.backbones import FeatureExtractor
from iadkit.synthesis import KINDS, TextureSource, make_synthesizer, perlin_mask

REPO = Path(__file__).resolve().parents[1]


def rate(function, count: int) -> float:
    function()
    started = time.perf_counter()
    for _ in range(count):
        function()
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--textures", default=str(REPO.parent / "shared" / "data" / "textures"))
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    size, generator = args.size, torch.Generator().manual_seed(0)
    image = torch.rand(3, size, size)
    backbone = FeatureExtractor("lite0", (2, 3))
    batch = torch.rand(16, 3, size, size)
    backbone_rate = 16 * rate(lambda: backbone(batch), 3)
    sources = {"procedural": TextureSource()}
    if Path(args.textures).is_dir():
        sources["folder"] = TextureSource(args.textures)
    mask_rate = rate(lambda: perlin_mask(size, size, generator), 100)
    donor = torch.rand(3, size, size)
    for name, source in sources.items():
        per_kind = {}
        for kind in KINDS:
            synthesize = make_synthesizer(kind, source)
            per_kind[kind] = round(rate(lambda synthesize=synthesize: synthesize(image, donor, generator), 100), 1)
        print(json.dumps({
            "benchmark": "synthesis_throughput", "size": size, "texture_source": name,
            "samples_per_second": per_kind, "perlin_masks_per_second": round(mask_rate, 1),
            "backbone_images_per_second": round(backbone_rate, 1),
        }))


if __name__ == "__main__":
    main()
