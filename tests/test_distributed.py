"""Data-parallel work on torch.distributed (gloo, two processes on the CPU): each piece gives
the single-process result, and torchrun runs of the command line give the one-process run's
files."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_loopback_port
from torch import nn

from iadkit import distributed

REPO = Path(__file__).resolve().parents[1]


def _rank_main(rank: int, world: int, store: str, work: Callable[..., Any], args: tuple,
               out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        result = work(*args)
        torch.save(result, f"{out}.{rank}") if rank == 0 else None
    finally:
        dist.destroy_process_group()


def run_ranks(work: Callable[..., Any], *args: Any, world: int = 2) -> Any:
    """``work(*args)`` on ``world`` gloo ranks; rank 0's return value (tensors, lists...)."""
    with tempfile.TemporaryDirectory() as folder:
        store, out = os.path.join(folder, "store"), os.path.join(folder, "result")
        mp.spawn(_rank_main, args=(world, store, work, args, out), nprocs=world)
        return torch.load(f"{out}.0")


def _gather_ragged() -> dict:
    rank = dist.get_rank()
    mine = [np.full((rank + 1 + k, 3), 10.0 * rank + k, np.float32) for k in range(rank + 1)]
    return {"arrays": [torch.from_numpy(a) for a in distributed.all_gather_arrays(mine)],
            "json": distributed.all_gather_json({"rank": rank, "name": "é"})}


def test_arrays_of_different_shapes_and_json_gather_in_rank_order() -> None:
    """What evaluation gathers maps of images of different sizes with."""
    gathered = run_ranks(_gather_ragged)
    assert [tuple(a.shape) for a in gathered["arrays"]] == [(1, 3), (2, 3), (3, 3)]
    assert [float(a[0, 0]) for a in gathered["arrays"]] == [0.0, 10.0, 11.0]
    assert gathered["json"] == [{"rank": 0, "name": "é"}, {"rank": 1, "name": "é"}]


def _batch_norm_step(inputs: torch.Tensor, weights: dict[str, torch.Tensor]) -> dict:
    layer = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    layer.load_state_dict(weights)
    swapped = distributed.synchronise_batch_norms([layer])
    output = layer(distributed.shard(inputs))
    # the loss of the whole batch is the mean over its images: each rank its share
    share = output.shape[0] / inputs.shape[0]
    (output.pow(2).mean() * share).backward()
    distributed.reduce_gradients(layer.parameters())
    distributed.restore_batch_norms(swapped)
    return {"output": distributed.all_gather_shards(output.detach(), inputs.shape[0]),
            "gradients": [p.grad for p in layer.parameters()],
            "buffers": [b.clone() for b in layer[1].buffers()],
            "class": type(layer[1]).__name__}


def test_synchronised_batch_norm_on_two_ranks_gives_the_whole_batch_forward_and_backward(
) -> None:
    torch.manual_seed(0)
    inputs = torch.randn(5, 3, 6, 6) * 3 + 1  # five images: shares of 3 and 2
    reference = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    weights = {k: v.clone() for k, v in reference.state_dict().items()}
    output = reference(inputs)
    output.pow(2).mean().backward()
    ranks = run_ranks(_batch_norm_step, inputs, weights)
    torch.testing.assert_close(ranks["output"], output.detach(), rtol=1e-5, atol=1e-5)
    for got, expected in zip(ranks["gradients"], [p.grad for p in reference.parameters()]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    for got, expected in zip(ranks["buffers"], reference[1].buffers()):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert ranks["class"] == "BatchNorm2d"  # restored after training


def _reverse_distillation_fit(images: torch.Tensor, epochs: int) -> dict[str, Any]:
    from iadkit.methods import create_detector

    detector = create_detector("rd", "cpu", image_size=64, epochs=epochs,
                               batch_size=images.shape[0], device="cpu")
    detector.fit(images)
    # The last step's gradients stay on the parameters (zeroed before the next step only).
    return {"gradients": [p.grad.clone() for p in detector.student_.parameters()],
            "losses": detector.fit_info_["loss_history"]["distill"]}


def _reverse_distillation_gradients_in_float64(images: torch.Tensor) -> list[torch.Tensor]:
    """The first step's gradients of the same RD fit, computed in float64 in one process."""
    from iadkit.methods import create_detector
    from iadkit.methods.training import TrainingImages

    detector = create_detector("rd", "cpu", image_size=64, batch_size=images.shape[0],
                               device="cpu")
    with detector.seeded():
        detector._build_networks()
    stored = TrainingImages.collect(images)  # the fit's uint8 copy
    features = [f.double() for f in detector.teacher_features(
        stored.get(torch.arange(len(stored)), torch.device("cpu")))]
    student = detector.student_.double().train()
    detector._distillation_loss(features, student(features)).backward()
    return [p.grad.float() for p in student.parameters()]


def _worst_relative_error(got: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    return max(float((g - r).abs().max() / r.abs().max()) for g, r in zip(got, reference))


def test_reverse_distillation_on_two_ranks_takes_the_one_rank_step() -> None:
    """The batch split over the ranks with its loss shares, BatchNorm synchronised and the
    gradients summed give the single-process step: as close to the exact (float64) gradients
    as one float32 process is. (RD's gradients at initialisation are ill-conditioned: on some
    images float32 rounding alone moves them by a percent, so no fixed tolerance would do.
    Weights after many Adam steps are not compared either: Adam turns rounding noise in
    near-zero gradients into steps of the learning rate's size, in one process as in two.)"""
    torch.manual_seed(0)
    images = torch.rand(7, 3, 64, 64)  # shares of 4 and 3
    one = _reverse_distillation_fit(images, epochs=1)
    two = run_ranks(_reverse_distillation_fit, images, 1)
    exact = _reverse_distillation_gradients_in_float64(images)
    one_process = _worst_relative_error(one["gradients"], exact)
    assert _worst_relative_error(two["gradients"], exact) <= 3 * one_process + 1e-4
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)


def _iadkit(*args: str, ranks: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    """The command line in one process, or under torchrun on ``ranks`` gloo processes."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", str(ranks)] if ranks > 1 else [sys.executable]
    # a rank that dies in native code prints its Python stack (faulthandler) before aborting
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    done = subprocess.run([*launcher, "-m", "iadkit", *args, "--quiet", "--device", "cpu"],
                          check=False, capture_output=True, text=True, env=env, timeout=600)
    if check:  # the ranks' stderr is torchrun's: all of it, their errors then its report
        assert done.returncode == 0, f"exit {done.returncode}\n{done.stderr}"
    return done


def _metrics(path: Path) -> dict[str, Any]:
    """A test JSON without its timings."""
    results = json.loads(path.read_text())
    for group in results["per_category"].values():
        group.pop("ms_per_image")
    return results


def _streamed_coreset(features: torch.Tensor, memory_points: int | None) -> tuple:
    from iadkit.nn.coreset import StreamingCoreset

    # chunks of 250 points cut the batches of 90 anywhere
    coreset = StreamingCoreset(features.shape[1], 0.05, 16, memory_points=memory_points,
                               chunk_points=250, block_size=32)
    ranks, rank = distributed.world_size(), distributed.rank()
    for number, part in enumerate(features.split(90)):  # every rank every world_size-th batch
        coreset.add(part if number % ranks == rank else None, len(part))
    return (*coreset.finish(), coreset.rule)


@pytest.mark.parametrize("memory_points", [None, 400])
def test_a_streamed_coreset_on_two_ranks_is_the_one_rank_coreset(memory_points: int | None
                                                                   ) -> None:
    features = torch.randn(1500, 40) @ torch.randn(40, 40)
    one = _streamed_coreset(features, memory_points)
    two = run_ranks(_streamed_coreset, features, memory_points)
    assert one[2] == two[2] == ("exact" if memory_points is None else "chunked")
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def _command_as_rank(rank: int, world: int, port: int, out: str) -> None:
    """``iadkit methods`` in an environment as torchrun sets it; what it left behind."""
    from iadkit.cli import main

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    code = main(["methods", "--quiet"])
    Path(f"{out}.{rank}").write_text(json.dumps({
        "code": code, "joined_as_other_rank": sys.stdout.name == os.devnull,
        "group_open": dist.is_initialized()}))


def test_a_command_under_torchrun_closes_its_process_group_before_it_returns() -> None:
    """A group left open can abort a rank at exit (gloo's threads can hold tensors past the
    interpreter's shutdown)."""
    port = free_loopback_port()
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "left")
        mp.spawn(_command_as_rank, args=(2, port, out), nprocs=2)
        left = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(2)]
    assert left == [{"code": 0, "joined_as_other_rank": rank == 1, "group_open": False}
                    for rank in range(2)]


def test_patchcore_fitted_and_tested_on_two_ranks_gives_the_one_process_files(
        toy_root: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    fit = ["fit", "--method", "patchcore", "--data", str(toy_root), "--category", "alpha",
           "--param", "image_size=64", "--param", "coreset_ratio=0.1", "--batch-size", "4"]
    _iadkit(*fit, "--out", str(tmp_path / "one"))
    _iadkit(*fit, "--out", str(tmp_path / "two"), ranks=2)
    one = load_file(str(tmp_path / "one/models/alpha/weights.safetensors"))
    two = load_file(str(tmp_path / "two/models/alpha/weights.safetensors"))
    assert one.keys() == two.keys()
    for key in one:  # the memory bank selected over both ranks' patches is the same bank
        assert torch.equal(one[key], two[key]), key
    _iadkit("test", str(tmp_path / "one"), "--json", str(tmp_path / "one.json"))
    _iadkit("test", str(tmp_path / "one"), "--json", str(tmp_path / "split.json"), ranks=2)
    assert _metrics(tmp_path / "split.json") == _metrics(tmp_path / "one.json")


def test_a_two_rank_training_killed_midway_resumes_from_its_checkpoint(
        toy_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    fit = ["fit", "--method", "rd", "--data", str(toy_root), "--category", "alpha", "--out",
           str(out), "--param", "image_size=64", "--param", "epochs=12", "--param",
           "checkpoint_every_s=0", "--batch-size", "8"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", "-m", "iadkit", *fit, "--quiet", "--device", "cpu"]
    checkpoint = out / "models" / "alpha.training" / "training.json"
    running = subprocess.Popen(launcher, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not checkpoint.is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert checkpoint.is_file(), "no training checkpoint written"
    finally:  # a crash: the launcher and both ranks (each in a process group of its own)
        for process in Path("/proc").iterdir():
            try:
                command = (process / "cmdline").read_bytes()
            except OSError:
                continue
            if process.name.isdigit() and str(out).encode() in command:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(process.name), signal.SIGKILL)
        running.wait()
    assert not (out / "models" / "alpha" / "detector.json").is_file()
    done = _iadkit(*fit, "--resume", "--verbose", ranks=2)
    assert "resuming the training from" in done.stderr
    history = json.loads((out / "models" / "alpha" / "detector.json").read_text())
    assert len(history["fit_info"]["loss_history"]["distill"]) == 12


def test_a_batch_too_small_for_the_ranks_is_refused_with_one_clear_error(
        toy_root: Path, tmp_path: Path) -> None:
    done = _iadkit("fit", "--method", "rd", "--data", str(toy_root), "--category", "alpha",
                   "--out", str(tmp_path / "run"), "--param", "image_size=64",
                   "--param", "batch_size=1", ranks=2, check=False)
    assert done.returncode != 0
    assert "batch_size=1 with 14 training images cannot give each of the 2 ranks an image" \
        in done.stderr
    assert not (tmp_path / "run" / "models" / "alpha").exists()


@pytest.mark.parametrize("method", ["cada", "cse"])
def test_methods_with_nested_fits_or_batch_coupled_losses_fit_on_two_ranks(
        method: str, toy_root: Path, tmp_path: Path) -> None:
    """CADA fits its base inside its own fit (rank 0 alone keeps the base's files); CSE's
    contrastive loss couples the images of a batch (each rank's term covers its share)."""
    import yaml

    from iadkit.methods import get_method

    tiny = get_method(method).tiny_params
    flags = [flag for key, value in tiny.items()
             for flag in ("--param", f"{key}={yaml.safe_dump(value, default_flow_style=True)}"
                          .removesuffix("\n...\n").strip())]
    _iadkit("fit", "--method", method, "--data", str(toy_root), "--category", "alpha",
            "--out", str(tmp_path / "run"), "--batch-size", "4", *flags, ranks=2)
    assert (tmp_path / "run" / "models" / "alpha" / "detector.json").is_file()
    assert not (tmp_path / "run" / "models" / "alpha.training").exists()
