"""What one training step of the reverse-distillation family costs, and where it goes.

For RD, AAND (its distillation stage) and ReContrast at the cpu preset: the seconds of one
optimisation step on a batch of the preset's size (teacher features already cached, as every
epoch after the first has them), and for ReContrast its parts: the trainable encoder's forward
and backward, and the cross reconstruction (the shared student on the stacked batch of both
encoders' features, both head sets, their losses, backward). Timing only: the images are random
and the weights the preset's. ``--precision bf16`` runs the steps with the detector's networks
in bfloat16, as ``precision="bf16"`` trains them (the lines of 2026-12-02 in
docs/reverse_distillation.md, ``"fp32"``/``"bf16"``, predate the option: they ran whole steps,
losses included, under autocast). One JSON line per method, median of ``--repeats`` steps after
one warm-up::

    .venv/bin/python benchmarks/training_step_costs.py [--repeats 10] [--precision bf16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from iadkit.methods import create_detector
from iadkit.methods.reverse_distillation.networks import hard_mined_cosine_loss
from iadkit.nn.precision import PRECISIONS


def median_seconds(step: Callable[[], None], repeats: int) -> float:
    step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times), 4)


def measure(name: str, repeats: int, precision: str) -> dict[str, object]:
    """The step's seconds of method ``name`` (and ReContrast's parts)."""
    detector = create_detector(name, "cpu", device="cpu", precision=precision)

    def timed(step: Callable[[], None]) -> float:
        with detector.networks_in_precision():
            return median_seconds(step, repeats)

    detector._build_networks()
    images = torch.rand(detector.batch_size, 3, detector.image_size, detector.image_size)
    with torch.no_grad():  # AAND's advanced teacher, RD's and ReContrast's frozen one
        teacher = [f.detach() for f in detector.teacher_features(images)] \
            if hasattr(detector, "teacher_features") else \
            [f.detach() for f in detector.extractor(images)]
    optimizer = detector._make_optimizers()["recontrast" if name == "recontrast" else "distill"]
    line: dict[str, object] = {
        "benchmark": "training_step_costs", "method": name, "batch_size": detector.batch_size,
        "image_size": detector.image_size, "precision": precision,
        "torch_threads": torch.get_num_threads()}
    if name != "recontrast":
        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            detector._distillation_loss(teacher, detector.student_(teacher)).backward()
            optimizer.step()

        line["step_seconds"] = timed(step)
        return line
    encoder = detector.encoder_

    def cross_loss(trained: list[torch.Tensor]) -> torch.Tensor:
        rebuilt_frozen, rebuilt_trained, _ = detector._cross_reconstruction(teacher, trained)
        return (hard_mined_cosine_loss(teacher, rebuilt_frozen, 0.0, 0.0)
                + hard_mined_cosine_loss(trained, rebuilt_trained, 0.0, 0.0)) / 2

    def recontrast_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        cross_loss(encoder(images)).backward()
        optimizer.step()

    def encoder_only() -> None:
        encoder.zero_grad(set_to_none=True)
        sum(level.square().mean() for level in encoder(images)).backward()

    def cross_only() -> None:
        detector.student_.zero_grad(set_to_none=True)
        cross_loss([level.clone() for level in teacher]).backward()

    line.update(encoder_seconds=timed(encoder_only),
                cross_reconstruction_seconds=timed(cross_only),
                step_seconds=timed(recontrast_step))
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--precision", choices=PRECISIONS, default="f32")
    args = parser.parse_args()
    for name in ("rd", "aand", "recontrast"):
        print(json.dumps(measure(name, args.repeats, args.precision)), flush=True)


if __name__ == "__main__":
    main()
