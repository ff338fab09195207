"""What every trained (gradient-descent) detector needs: images in memory, seeded epochs,
cached frozen features, learning-rate steps and resumable training checkpoints.

Training images are decoded once and kept as uint8, so an epoch costs only the network, and the
order of every epoch is drawn from ``(seed, epoch)``: a run resumed from a checkpoint sees the
same batches as one that was never interrupted.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..progress import progress

STATE_FILE = "training.json"
TENSORS_FILE = "training.safetensors"


@dataclass
class TrainingImages:
    """The training set in memory.

    Attributes:
        images: (N, 3, S, S) uint8.
        categories: category of each image ("" when the data has none).
        subclasses: subclass of each image ("" when the data has none).
    """

    images: torch.Tensor
    categories: list[str]
    subclasses: list[str]

    @classmethod
    def collect(cls, train: Iterable[Any] | torch.Tensor) -> TrainingImages:
        """From a tensor of images in [0, 1] or an iterable of batches (dicts or tensors)."""
        if isinstance(train, torch.Tensor):
            train = [train]
        chunks: list[torch.Tensor] = []
        names: dict[str, list[str]] = {"category": [], "subclass": []}
        for batch in train:
            images = batch["image"] if isinstance(batch, dict) else batch
            chunks.append((images.clamp(0, 1) * 255).round().to(torch.uint8).cpu())
            for key, values in names.items():
                given = batch.get(key) if isinstance(batch, dict) else None
                values += list(given) if given is not None else [""] * images.shape[0]
        if not chunks or sum(c.shape[0] for c in chunks) == 0:
            raise ValueError("no training images")
        return cls(torch.cat(chunks), names["category"], names["subclass"])

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, indices: torch.Tensor) -> TrainingImages:
        """The images at ``indices`` (e.g. a validation split), with their names."""
        rows = indices.tolist()
        return TrainingImages(self.images[indices], [self.categories[i] for i in rows],
                              [self.subclasses[i] for i in rows])

    def get(self, indices: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Images at ``indices`` as float in [0, 1] on ``device``."""
        return self.images[indices].to(device).float().div_(255.0)

    def epoch_batches(self, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
        """Shuffled index batches of one epoch, drawn from ``(seed, epoch)``.

        A last batch of a single image joins the one before it: batch normalisation cannot
        train on one sample, and no image is left out.
        """
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(self), generator=generator)
        batches = list(order.split(batch_size))
        if len(batches) > 1 and len(batches[-1]) == 1:
            batches[-2:] = [torch.cat(batches[-2:])]
        return batches

    def in_order(self, batch_size: int) -> Iterator[torch.Tensor]:
        yield from torch.arange(len(self)).split(batch_size)

    def batches(self, batch_size: int) -> Iterator[dict[str, Any]]:
        """The images in order, as the loader's batches (images in [0, 1] on the CPU, with
        categories and subclasses): to fit another detector on the same data."""
        for indices in self.in_order(batch_size):
            rows = indices.tolist()
            yield {"image": self.get(indices, torch.device("cpu")),
                   "category": [self.categories[i] for i in rows],
                   "subclass": [self.subclasses[i] for i in rows]}


def cache_features(extract: Callable[[torch.Tensor], list[torch.Tensor]], data: TrainingImages,
                   batch_size: int, device: torch.device, budget_mb: float
                   ) -> list[torch.Tensor] | None:
    """Frozen features of every training image, or None when they would exceed ``budget_mb``.

    A frozen teacher gives the same features every epoch; computing them once turns every later
    epoch into student-only work.
    """
    cached: list[list[torch.Tensor]] = []
    for indices in data.in_order(batch_size):
        with torch.no_grad():
            features = extract(data.get(indices, device))
        if not cached:
            per_image = sum(f[0].numel() * f.element_size() for f in features)
            if per_image * len(data) > budget_mb * 2**20:
                return None
        cached.append([f.detach() for f in features])
    return [torch.cat(level) for level in zip(*cached)]


def run_stage(stage: str, epochs: int, run_epoch: Callable[[int], float],
              history: dict[str, list[float]], seed: int, checkpoint: TrainingCheckpoint,
              modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
              show_progress: bool) -> None:
    """Run the remaining epochs of a training stage, recording one mean loss per epoch.

    ``run_epoch(epoch)`` trains one epoch and returns its mean loss; ``history[stage]`` holds
    the losses of the epochs already done (restored from a checkpoint). Each epoch's random
    draws are seeded by (seed, stage, epoch), so a resumed run repeats an uninterrupted one.
    """
    losses = history.setdefault(stage, [])
    for epoch in progress(range(len(losses), epochs), stage, show_progress,
                          total=epochs - len(losses)):
        torch.manual_seed(epoch_seed(seed, stage, epoch))
        losses.append(round(float(run_epoch(epoch)), 6))
        checkpoint.maybe_save(history, modules, optimizers, force=epoch == epochs - 1)


def module_state_tensors(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Every module's state_dict in one flat dict, keys prefixed by the module's name."""
    return {f"{name}.{key}": value for name, module in modules.items()
            for key, value in module.state_dict().items()}


def load_module_states(modules: dict[str, nn.Module], tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`module_state_tensors`; leaves the modules in eval mode."""
    for name, module in modules.items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items()
                                if k.startswith(prefix)})
        module.eval()


def with_base_rates(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Remember each parameter group's initial learning rate (saved with the optimizer)."""
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])
    return optimizer


def set_learning_rates(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Every group's learning rate becomes its base rate times ``factor``."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


def epoch_seed(seed: int, stage: str, epoch: int) -> int:
    """The seed of one epoch's random draws: stable across runs, different per stage."""
    return (seed * 1_000_003 + zlib.crc32(stage.encode()) * 1009 + epoch) % 2**63


def step_schedule(n_images: int, batch_size: int, epochs: int, max_steps: int | None
                  ) -> tuple[int, int, int]:
    """(epochs, steps per epoch, total steps) of a schedule given in epochs or, when
    ``max_steps`` is set, in optimisation steps (the last epoch then stops early)."""
    steps_per_epoch = math.ceil(n_images / batch_size)
    if steps_per_epoch > 1 and n_images % batch_size == 1:  # see TrainingImages.epoch_batches
        steps_per_epoch -= 1
    if max_steps:
        return math.ceil(max_steps / steps_per_epoch), steps_per_epoch, max_steps
    return epochs, steps_per_epoch, epochs * steps_per_epoch


def step_decay(progress: float, milestones: Iterable[float], gamma: float) -> float:
    """Multi-step decay: ``gamma`` to the number of milestones (fractions of training) passed."""
    return gamma ** sum(progress >= m for m in milestones)


def one_cycle(step: int, total_steps: int, pct_start: float = 0.3, div_factor: float = 25.0,
              final_div_factor: float = 1e4, momentum_range: tuple[float, float] = (0.85, 0.95)
              ) -> tuple[float, float]:
    """Smith's one-cycle policy at optimisation step ``step`` (0-based), as torch's
    ``OneCycleLR`` (cosine annealing, two phases) computes it, without its state.

    Returns:
        (learning rate as a fraction of the peak rate, momentum). The rate rises from
        1/div_factor of the peak to the peak over ``pct_start`` of training, then falls to
        1/(div_factor * final_div_factor); the momentum moves the opposite way.
    """
    def anneal(start: float, end: float, fraction: float) -> float:
        return end + (start - end) / 2.0 * (math.cos(math.pi * fraction) + 1.0)

    initial = 1.0 / div_factor
    lowest_momentum, highest_momentum = momentum_range
    warm_end = float(pct_start * total_steps) - 1
    if step <= warm_end:
        fraction = step / warm_end if warm_end > 0 else 1.0
        return anneal(initial, 1.0, fraction), anneal(highest_momentum, lowest_momentum, fraction)
    fraction = (step - warm_end) / max(total_steps - 1 - warm_end, 1e-12)
    return (anneal(1.0, initial / final_div_factor, fraction),
            anneal(lowest_momentum, highest_momentum, fraction))


class TrainingCheckpoint:
    """Training state in a folder, written atomically every ``every_seconds``.

    The state is the modules' ``state_dict`` and the optimizers' state as safetensors, and the
    progress (stage, epoch, loss history...) as JSON: no pickle. ``folder=None`` disables it.

    Example:
        >>> checkpoint = TrainingCheckpoint(folder, every_seconds=60)
        >>> progress = checkpoint.restore(modules, optimizers) or {"epoch": 0}
        >>> ... after each epoch: checkpoint.maybe_save(progress, modules, optimizers)
    """

    def __init__(self, folder: str | Path | None, every_seconds: float = 60.0) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.every_seconds = every_seconds
        self._last_save = time.monotonic()

    def restore(self, modules: dict[str, nn.Module],
                optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, Any] | None:
        """Load a saved state into ``modules`` and ``optimizers``; its progress, or None."""
        if self.folder is None or not (self.folder / STATE_FILE).is_file():
            return None
        from safetensors.torch import load_file

        try:
            record = json.loads((self.folder / STATE_FILE).read_text())
            tensors = load_file(str(self.folder / TENSORS_FILE))
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{self.folder}: unreadable training checkpoint ({error}); "
                                  "delete the folder to start the training again") from None
        for name, module in modules.items():
            prefix = f"module.{name}."
            module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items()
                                    if k.startswith(prefix)})
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(_unflatten_optimizer(record["optimizers"][name], tensors,
                                                           f"optimizer.{name}."))
        return record["progress"]

    def maybe_save(self, progress: dict[str, Any], modules: dict[str, nn.Module],
                   optimizers: dict[str, torch.optim.Optimizer], force: bool = False) -> None:
        if self.folder is None:
            return
        if not force and time.monotonic() - self._last_save < self.every_seconds:
            return
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        for name, module in modules.items():
            for key, value in module.state_dict().items():
                tensors[f"module.{name}.{key}"] = value.detach().cpu().contiguous()
        optimizer_records = {}
        for name, optimizer in optimizers.items():
            optimizer_records[name] = _flatten_optimizer(optimizer.state_dict(), tensors,
                                                         f"optimizer.{name}.")
        partial = self.folder.with_name(self.folder.name + ".partial")
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        save_file(tensors, str(partial / TENSORS_FILE))
        (partial / STATE_FILE).write_text(json.dumps(
            {"progress": progress, "optimizers": optimizer_records}))
        if self.folder.exists():
            shutil.rmtree(self.folder)
        partial.rename(self.folder)
        self._last_save = time.monotonic()

    def clear(self) -> None:
        if self.folder is not None and self.folder.exists():
            shutil.rmtree(self.folder)


def _flatten_optimizer(state: dict[str, Any], tensors: dict[str, torch.Tensor],
                       prefix: str) -> dict[str, Any]:
    """Optimizer state_dict -> JSON record, its tensors moved into ``tensors``."""
    per_parameter: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        entry = {}
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                name = f"{prefix}{index}.{key}"
                tensors[name] = value.detach().cpu().contiguous()
                entry[key] = {"tensor": name}
            else:
                entry[key] = value
        per_parameter[str(index)] = entry
    return {"state": per_parameter, "param_groups": state["param_groups"]}


def _unflatten_optimizer(record: dict[str, Any], tensors: dict[str, torch.Tensor],
                         prefix: str) -> dict[str, Any]:
    state = {}
    for index, values in record["state"].items():
        state[int(index)] = {key: tensors[value["tensor"]] if isinstance(value, dict) else value
                             for key, value in values.items()}
    return {"state": state, "param_groups": record["param_groups"]}
