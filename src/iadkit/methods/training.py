"""The one training loop of iadkit, and what it needs: images in memory, seeded epochs, cached
frozen features, learning-rate schedules and resumable training checkpoints.

Every method trained by gradient descent describes its training as :class:`Stage` objects and
runs them in a :class:`Training`; no method has a loop of its own. Under ``torchrun`` this loop
is data-parallel (every batch split over the ranks, see :meth:`Training.run`), for every
method at once.

Training images are decoded once and kept as uint8, so an epoch costs only the network, and the
order of every epoch is drawn from ``(seed, epoch)``: a run resumed from a checkpoint sees the
same batches as one that was never interrupted.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
import zlib
from abc import abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..errors import CheckpointError
from ..files import read_json_record
from ..progress import progress
from ..validation import Number
from .base import BackboneDetector
from .hyperparameters import hyperparameter

log = logging.getLogger("iadkit")

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
    #: (a GPU, where :meth:`get` takes its batches for it: ``images`` moved there, or not).
    _gpu_source: tuple[torch.device, torch.Tensor] | None = field(default=None, repr=False,
                                                                  compare=False)

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
        """Images at ``indices`` as float in [0, 1] on ``device``.

        For a GPU the whole set moves there on first use when it takes at most a quarter of
        the GPU's free memory (uint8: 700 images of 256 pixels take 138 MB), so a batch is a
        gather on the GPU; otherwise each batch is copied from pinned memory without blocking.
        """
        source = self._source_for(device)
        batch = source[indices.to(source.device)]
        if batch.device.type == "cpu" and device.type == "cuda":
            batch = batch.pin_memory()
        return batch.to(device, non_blocking=True).float().div_(255.0)

    def _source_for(self, device: torch.device) -> torch.Tensor:
        if device.type != "cuda":
            return self.images
        if self._gpu_source is None or self._gpu_source[0] != device:
            free_bytes, _ = torch.cuda.mem_get_info(device)
            fits = self.images.numel() * self.images.element_size() <= free_bytes // 4
            self._gpu_source = (device, self.images.to(device) if fits else self.images)
        return self._gpu_source[1]

    def epoch_batches(self, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
        """Shuffled index batches of one epoch, drawn from ``(seed, epoch)``.

        A last batch smaller than :func:`smallest_batch` joins the one before it: batch
        normalisation cannot train on one sample, every rank needs an image, and no image is
        left out.
        """
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(self), generator=generator)
        batches = list(order.split(batch_size))
        if len(batches) > 1 and len(batches[-1]) < smallest_batch():
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


class FrozenFeatures:
    """A frozen network's features of the training images, for any batch of them.

    A frozen teacher gives the same features every epoch: they are computed once and kept in
    memory when they fit in ``budget_mb`` (every later epoch then costs only the trained
    networks), and computed per batch otherwise.

    Example:
        >>> teacher = FrozenFeatures(self.extractor, data, 16, device, budget_mb=4096)
        >>> levels = teacher(indices)   # one (B, C, h, w) tensor per level
    """

    def __init__(self, extract: Callable[[torch.Tensor], list[torch.Tensor]],
                 data: TrainingImages, batch_size: int, device: torch.device,
                 budget_mb: float) -> None:
        self.extract, self.data, self.device = extract, data, device
        self.cached: list[torch.Tensor] | None = None
        chunks: list[list[torch.Tensor]] = []
        for indices in data.in_order(batch_size):
            features = self._compute(indices)
            if not chunks:
                per_image = sum(f[0].numel() * f.element_size() for f in features)
                if per_image * len(data) > budget_mb * 2**20:
                    return
            chunks.append(features)
        self.cached = [torch.cat(level) for level in zip(*chunks)]

    def _compute(self, indices: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            return [f.detach() for f in self.extract(self.data.get(indices, self.device))]

    def __call__(self, indices: torch.Tensor) -> list[torch.Tensor]:
        if self.cached is None:
            return self._compute(indices)
        return [level[indices.to(level.device)] for level in self.cached]


def recompute_batch_norm_statistics(module: nn.Module, data: TrainingImages, batch_size: int,
                                    device: torch.device) -> int:
    """Replace the running means and variances of ``module``'s BatchNorm layers by their
    averages over ``data`` with the final weights (one pass, no gradients); returns how many
    layers there are.

    A network trained at a high rate moves faster than its running averages follow (momentum
    0.1 averages over the last few dozen steps of changing weights), so in eval mode it
    normalises with statistics of weights it no longer has.
    """
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average over the pass
    module.train()
    with torch.no_grad():
        for indices in data.in_order(batch_size):
            module(data.get(indices, device))
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
    module.eval()
    return len(layers)


#: A learning-rate schedule: (optimisation step, total steps) -> (factor of every parameter
#: group's base rate, the first Adam beta / SGD momentum or None to leave it).
Schedule = Callable[[int, int], tuple[float, float | None]]


def step_decay(milestones: Sequence[float], gamma: float) -> Schedule:
    """Multi-step decay: ``gamma`` to the number of milestones (fractions of training) passed."""
    def schedule(step: int, total_steps: int) -> tuple[float, None]:
        return gamma ** sum(step / total_steps >= m for m in milestones), None
    return schedule


def one_cycle(pct_start: float = 0.3, div_factor: float = 25.0, final_div_factor: float = 1e4,
              momentum_range: tuple[float, float] = (0.85, 0.95)) -> Schedule:
    """Smith's one-cycle policy, as torch's ``OneCycleLR`` computes it (cosine annealing, two
    phases), without its state: the rate rises from 1/div_factor of the peak (the base rate) to
    the peak over ``pct_start`` of training, then falls to 1/(div_factor * final_div_factor);
    the momentum moves the opposite way."""
    def anneal(start: float, end: float, fraction: float) -> float:
        return end + (start - end) / 2.0 * (math.cos(math.pi * fraction) + 1.0)

    initial = 1.0 / div_factor
    lowest_momentum, highest_momentum = momentum_range

    def schedule(step: int, total_steps: int) -> tuple[float, float]:
        warm_end = float(pct_start * total_steps) - 1
        if step <= warm_end:
            fraction = step / warm_end if warm_end > 0 else 1.0
            return (anneal(initial, 1.0, fraction),
                    anneal(highest_momentum, lowest_momentum, fraction))
        fraction = (step - warm_end) / max(total_steps - 1 - warm_end, 1e-12)
        return (anneal(1.0, initial / final_div_factor, fraction),
                anneal(lowest_momentum, highest_momentum, fraction))
    return schedule


def smallest_batch() -> int:
    """The fewest images a training batch may have: two (batch normalisation), and one per
    rank when training is distributed."""
    return max(2, distributed.world_size())


def step_schedule(n_images: int, batch_size: int, epochs: int, max_steps: int | None = None
                  ) -> tuple[int, int, int]:
    """(epochs, steps per epoch, total steps) of a schedule given in epochs or, when
    ``max_steps`` is set, in optimisation steps (the last epoch then stops early)."""
    steps_per_epoch = math.ceil(n_images / batch_size)
    # see TrainingImages.epoch_batches
    if steps_per_epoch > 1 and 0 < n_images % batch_size < smallest_batch():
        steps_per_epoch -= 1
    if max_steps:
        return math.ceil(max_steps / steps_per_epoch), steps_per_epoch, max_steps
    return epochs, steps_per_epoch, epochs * steps_per_epoch


@dataclass
class Stage:
    """One stage of training: passes over ``data`` in seeded batches, one optimisation step
    per batch, until ``epochs`` (or ``max_steps`` steps) are done.

    Attributes:
        name: the stage's name in the loss history and in the epochs' seeds.
        data: the images whose seeded epoch order gives the batches.
        loss: (a batch's image indices, the step's index) -> the loss to minimise.
        optimizers: stepped together after every batch (all gradients zeroed first).
        modules: put in training mode at the start of every epoch.
        epochs, batch_size, max_steps: the schedule (see :func:`step_schedule`).
        schedule: the learning rate (and momentum) at each step; None keeps the rates.
        schedule_per_epoch: evaluate ``schedule`` at each epoch's first step only.
        clip_norm: clip the gradients' global norm of the stepped parameters (0: off).
        loss_is_sum: ``loss`` sums over the batch's images (else it is their mean); the
            epoch's recorded loss is a mean per image either way.
        start_epoch, end_epoch: called with the epoch's index before its first and after its
            last step (per-epoch draws, validation).
        after_step: called after every optimisation step.
    """

    name: str
    data: TrainingImages
    loss: Callable[[torch.Tensor, int], torch.Tensor]
    optimizers: Sequence[torch.optim.Optimizer]
    modules: Sequence[nn.Module]
    epochs: int
    batch_size: int
    max_steps: int | None = None
    schedule: Schedule | None = None
    schedule_per_epoch: bool = False
    clip_norm: float = 0.0
    loss_is_sum: bool = False
    start_epoch: Callable[[int], None] | None = None
    end_epoch: Callable[[int], None] | None = None
    after_step: Callable[[], None] | None = None

    @property
    def steps(self) -> tuple[int, int, int]:
        """(epochs, steps per epoch, total steps)."""
        return step_schedule(len(self.data), self.batch_size, self.epochs, self.max_steps)


class Training:
    """One fit's training: the trained modules and their optimizers, restored from a training
    checkpoint when ``folder`` holds one, and the loss history. Stages run in it with
    :meth:`run`; leaving the ``with`` block normally removes the checkpoint and puts every
    module in eval mode.

    Every epoch draws from torch's generator seeded by (seed, stage, epoch), and its batches
    come from (seed, epoch): a run resumed from a checkpoint repeats an uninterrupted one.

    Example:
        >>> with Training(modules, optimizers, checkpoint_dir, seed=0) as training:
        ...     training.run(Stage("distill", data, loss, [optimizer], [student], 30, 16))
        >>> training.history["distill"]   # one mean loss per epoch
    """

    def __init__(self, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                 folder: str | Path | None, seed: int, every_seconds: float = 60.0,
                 show_progress: bool = False) -> None:
        self.modules, self.optimizers, self.seed = modules, optimizers, seed
        self.show_progress = show_progress
        for optimizer in optimizers.values():  # what schedules scale
            for group in optimizer.param_groups:
                group.setdefault("base_lr", group["lr"])
        self.checkpoint = TrainingCheckpoint(folder, every_seconds)
        self.history: dict[str, list[float]] = self.checkpoint.restore(modules, optimizers) or {}
        if self.history:
            log.info("resuming the training from %s after %s", folder,
                     ", ".join(f"{len(losses)} epochs of {stage}"
                               for stage, losses in self.history.items()))
        # Under torchrun: every rank starts from rank 0's weights, and trained BatchNorm
        # layers normalise with the whole batch's statistics.
        distributed.broadcast_modules(modules.values())
        self._synchronised = distributed.synchronise_batch_norms(list(modules.values()))
        self.started = time.perf_counter()

    def __enter__(self) -> Training:  # noqa: PYI034 (Self needs Python 3.11)
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        distributed.restore_batch_norms(self._synchronised)
        if kind is None:
            self.checkpoint.clear()
            for module in self.modules.values():
                module.eval()

    def done(self, stage: str, epochs: int) -> bool:
        """Whether ``stage`` already ran its ``epochs`` (a resumed fit skips its set-up)."""
        return len(self.history.get(stage, [])) >= epochs

    def run(self, stage: Stage) -> None:
        """Run the epochs of ``stage`` not done yet, recording one mean loss per epoch and
        saving a checkpoint after each when it is due (and after the last).

        Under torchrun each rank computes the loss of its part of every batch, weighted by its
        share of the batch's images (a loss that sums over images needs no weight), and the
        ranks' gradients are summed: every rank then takes the single-process step.
        """
        epochs, steps_per_epoch, total_steps = stage.steps
        distributed.check_batch_splits(stage.batch_size, len(stage.data))
        losses = self.history.setdefault(stage.name, [])
        parameters = [p for optimizer in stage.optimizers for group in optimizer.param_groups
                      for p in group["params"]]
        for epoch in progress(range(len(losses), epochs), stage.name, self.show_progress,
                              total=epochs - len(losses)):
            seed = epoch_seed(self.seed, stage.name, epoch)
            torch.manual_seed(seed)
            if stage.start_epoch is not None:
                stage.start_epoch(epoch)
            if distributed.is_distributed():  # each rank its own draws for its own images
                torch.manual_seed(seed + distributed.rank())
            for module in stage.modules:
                module.train()
            total, count = 0.0, 0
            batches = stage.data.epoch_batches(stage.batch_size, self.seed, epoch)
            for offset, indices in enumerate(batches):
                step = epoch * steps_per_epoch + offset
                if step >= total_steps:
                    break
                if stage.schedule is not None and (offset == 0 or not stage.schedule_per_epoch):
                    factor, momentum = stage.schedule(step, total_steps)
                    for optimizer in stage.optimizers:
                        _set_rate(optimizer, factor, momentum)
                mine = distributed.shard(indices)
                loss = stage.loss(mine, step)
                for optimizer in stage.optimizers:
                    optimizer.zero_grad(set_to_none=True)
                share = 1.0 if stage.loss_is_sum else len(mine) / len(indices)
                (loss * share if share != 1.0 else loss).backward()
                distributed.reduce_gradients(parameters)
                if stage.clip_norm > 0:
                    nn.utils.clip_grad_norm_(parameters, stage.clip_norm)
                for optimizer in stage.optimizers:
                    optimizer.step()
                if stage.after_step is not None:
                    stage.after_step()
                total += float(loss.detach()) * (1 if stage.loss_is_sum else len(mine))
                count += len(mine)
            if stage.end_epoch is not None:
                stage.end_epoch(epoch)
            sums = distributed.all_reduce_sum(torch.tensor([total, float(count)],
                                                           dtype=torch.float64))
            losses.append(round(float(sums[0] / sums[1]), 6))
            self.checkpoint.maybe_save(self.history, self.modules, self.optimizers,
                                       force=epoch == epochs - 1)


def _set_rate(optimizer: torch.optim.Optimizer, factor: float, momentum: float | None) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
        if momentum is not None and "betas" in group:
            group["betas"] = (momentum, group["betas"][1])
        elif momentum is not None:
            group["momentum"] = momentum


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


def epoch_seed(seed: int, stage: str, epoch: int) -> int:
    """The seed of one epoch's random draws: stable across runs, different per stage."""
    return (seed * 1_000_003 + zlib.crc32(stage.encode()) * 1009 + epoch) % 2**63


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
        if self.folder is None:
            return None
        # Read-only (every rank of a torchrun restores): the folder, or the previous checkpoint
        # when a kill came between the two renames of a save.
        folder = next((f for f in (self.folder, self._previous) if (f / STATE_FILE).is_file()),
                      None)
        if folder is None:
            return None
        from safetensors.torch import load_file

        again = "; delete the folder to start the training again"
        record = read_json_record(folder / STATE_FILE, {"progress": dict,
                                                             "optimizers": dict})
        try:
            tensors = load_file(str(folder / TENSORS_FILE))
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{folder / TENSORS_FILE}: unreadable training "
                                  f"checkpoint ({error}){again}") from None
        try:
            for name, module in modules.items():
                prefix = f"module.{name}."
                module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items()
                                        if k.startswith(prefix)})
            for name, optimizer in optimizers.items():
                optimizer.load_state_dict(_unflatten_optimizer(
                    record["optimizers"][name], tensors, f"optimizer.{name}."))
        except (KeyError, RuntimeError, ValueError, TypeError) as error:
            raise CheckpointError(f"{folder}: the training checkpoint does not fit this "
                                  f"model ({type(error).__name__}: {error}){again}") from None
        return record["progress"]

    def maybe_save(self, progress: dict[str, Any], modules: dict[str, nn.Module],
                   optimizers: dict[str, torch.optim.Optimizer], force: bool = False) -> None:
        """Save when ``every_seconds`` have passed since the last save, or ``force``; under
        torchrun rank 0 alone writes (every rank holds the same state)."""
        if self.folder is None or not distributed.is_main():
            return
        if not force and time.monotonic() - self._last_save < self.every_seconds:
            return
        from safetensors.torch import save_file

        tensors = {f"module.{key}": value.detach().cpu().contiguous()
                   for key, value in module_state_tensors(modules).items()}
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
        # Renames only, so that a kill at any point leaves one complete checkpoint: the folder,
        # or (between the renames) the previous one under ".previous".
        previous = self._previous
        if previous.exists():
            shutil.rmtree(previous)
        if self.folder.exists():
            self.folder.rename(previous)
        partial.rename(self.folder)
        shutil.rmtree(previous, ignore_errors=True)
        self._last_save = time.monotonic()

    @property
    def _previous(self) -> Path:
        assert self.folder is not None
        return self.folder.with_name(self.folder.name + ".previous")

    def clear(self) -> None:
        if self.folder is not None and distributed.is_main() and self.folder.exists():
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


class TrainedDetector(BackboneDetector):
    """A detector whose networks are trained by gradient descent on the frozen backbone's
    features. Its ``_fit`` builds the networks, runs its stages in :meth:`training`, and
    returns :meth:`fit_facts`; saving and loading its trained modules come with it.

    Subclasses implement :meth:`_build_networks` (under :meth:`Detector.seeded`),
    :meth:`_trained_modules` and :meth:`_make_optimizers`.
    """

    epochs: int = hyperparameter(10, Number(int, 1), "passes over the training images")
    batch_size: int = hyperparameter(16, Number(int, 1), "training images per step")
    checkpoint_every_s: float = hyperparameter(60.0, Number(float, 0), "seconds between "
                                               "training checkpoints (when fit gets a folder)")

    @abstractmethod
    def _build_networks(self) -> None:
        """Create the trained networks with fresh, seeded weights on the device."""

    @abstractmethod
    def _trained_modules(self) -> dict[str, nn.Module]:
        """The modules whose weights are learned, saved and checkpointed, by name."""

    @abstractmethod
    def _make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The optimizers of the trained modules, by name."""

    def training(self, checkpoint_dir: str | Path | None, show_progress: bool,
                 modules: dict[str, nn.Module] | None = None,
                 optimizers: dict[str, torch.optim.Optimizer] | None = None) -> Training:
        """The :class:`Training` of the built networks, restored from ``checkpoint_dir`` when
        it holds one: of :meth:`_trained_modules` and :meth:`_make_optimizers` unless the
        training checkpoints more (``modules``, ``optimizers``)."""
        return Training(modules or self._trained_modules(),
                        optimizers or self._make_optimizers(), checkpoint_dir, self.seed,
                        self.checkpoint_every_s, show_progress)

    def fit_facts(self, data: TrainingImages, training: Training, **facts: Any
                  ) -> dict[str, Any]:
        """The fit facts every trained method records, and ``facts``."""
        return {"n_train_images": len(data), **self.backbone_facts(), **facts,
                "loss_history": training.history,
                "seconds_training": round(time.perf_counter() - training.started, 2)}

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return module_state_tensors(self._trained_modules())

    def _load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self._build_networks()
        load_module_states(self._trained_modules(), tensors)
