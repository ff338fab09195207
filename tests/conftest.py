"""Shared fixtures: small generated datasets so the suite needs nothing but the package."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

# Tests never download anything: missing weights must fail fast with our error.
os.environ.setdefault("IADKIT_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Under pytest-xdist (`make test` runs two workers on a two-core machine), each worker and the
# processes it starts compute on one thread: two threads each would oversubscribe the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server or a rendezvous)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def predict_all(detector, samples) -> tuple:
    """(maps, scores, masks, labels) as NumPy arrays for every sample, in order."""
    import torch

    from iadkit.data import make_loader

    maps, scores, masks, labels = [], [], [], []
    for batch in make_loader(samples, detector.preprocess, batch_size=8):
        prediction = detector.predict(batch["image"])
        maps.append(prediction.anomaly_maps)
        scores.append(prediction.scores)
        masks.append(batch["mask"])
        labels.append(batch["label"])
    return (torch.cat(maps).numpy(), torch.cat(scores).numpy(), torch.cat(masks).numpy(),
            torch.cat(labels).numpy())


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two generated categories in the MVTec AD layout, 64 px, with masks."""
    from iadkit.data import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("toy"), categories=("alpha", "beta"),
                            n_train=16, n_test_good=6, n_test_defect=6, size=64, seed=0)


@pytest.fixture(scope="session")
def fitted_patchcore(toy_root: Path):
    """A PatchCore fitted on the 'alpha' category of the toy data (shared: fitting costs time)."""
    from iadkit.data import load_dataset, make_loader
    from iadkit.methods import create_detector

    samples = load_dataset(toy_root, ["alpha"])
    # A centre crop (the cpu preset has none), so the tests also meet pixels the model never saw.
    detector = create_detector("patchcore", "cpu", image_size=64, crop_size=56,
                               coreset_ratio=0.25, device="cpu")
    detector.fit(make_loader(samples.where(split="train"), detector.preprocess, batch_size=8))
    return detector, samples


@pytest.fixture
def interrupt_training(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], Callable[[], None]]:
    """``undo = interrupt_training(n)``: after n training epochs, the next one raises
    KeyboardInterrupt (as a user's Ctrl-C would); ``undo()`` lets training run again."""
    from iadkit.methods.training import TrainingImages

    original = TrainingImages.epoch_batches

    def arm(epochs_before_stop: int) -> Callable[[], None]:
        calls = {"n": 0}

        def epoch_batches(self, batch_size, seed, epoch):
            calls["n"] += 1
            if calls["n"] > epochs_before_stop:
                raise KeyboardInterrupt
            return original(self, batch_size, seed, epoch)

        monkeypatch.setattr(TrainingImages, "epoch_batches", epoch_batches)
        return lambda: monkeypatch.setattr(TrainingImages, "epoch_batches", original)

    return arm
