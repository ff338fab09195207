"""Data-parallel work on ``torch.distributed``, started by ``torchrun``.

``torchrun --nproc-per-node N -m iadkit fit ...`` starts N copies of the command line; each
finds its rank in the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``...), and :func:`init_from_environment` joins them in one process group (gloo on
the CPU; with CUDA, NCCL for GPU tensors and gloo for CPU ones, one GPU per local rank) and
:func:`leave` closes that group before the process exits. Everything else asks this module who
it is:

- the training loop (:mod:`iadkit.methods.training`) splits every batch over the ranks and sums
  their gradients, so N ranks take the single-process step (:func:`reduce_gradients`);
- trained BatchNorm layers normalise with the whole batch's statistics
  (:class:`SynchronisedBatchNorm`);
- PatchCore extracts its features shard-wise and selects the same greedy coreset
  (:mod:`iadkit.nn.coreset`);
- evaluation splits the test images and gathers the predictions on rank 0;
- only rank 0 writes run folders and checkpoints (:func:`is_main`), the others wait for it
  (:func:`barrier`).

In one process (no torchrun) every function here is the identity: rank 0 of a world of one.

Example:
    >>> init_from_environment()          # no-op without torchrun
    >>> mine = shard(torch.arange(10))   # this rank's part of a batch
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError

# Whether this process joined torchrun's group itself (a group an embedding program made is
# its own to close).
_joined = False


def is_distributed() -> bool:
    """Whether this process is one of several ranks of a started process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Whether this process writes files (rank 0, or the only process)."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank gets here (nothing in one process)."""
    if is_distributed():
        dist.barrier()


def init_from_environment(device: str | None = None, timeout_minutes: float = 30.0) -> bool:
    """Join the process group torchrun described in the environment, once.

    Args:
        device: the run's device setting; "cuda" (or a run on a machine with CUDA and no
            setting) uses NCCL and this rank's local GPU, anything else gloo.
        timeout_minutes: how long a collective waits for a missing rank before failing.

    Returns:
        Whether this process is one of several ranks.

    Raises:
        ConfigError: torchrun's variables are incomplete.
    """
    if dist.is_initialized():
        return is_distributed()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    missing = [name for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
               if name not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} "
                          "not set: start distributed runs with torchrun")
    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    # With CUDA, NCCL carries the GPU tensors and gloo the small CPU ones (counts, losses,
    # the gathered predictions).
    dist.init_process_group("cpu:gloo,cuda:nccl" if use_cuda else "gloo",
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    global _joined
    _joined = True
    return is_distributed()


def leave() -> None:
    """Close the process group :func:`init_from_environment` joined (nothing otherwise).

    A rank that leaves it open can abort in native code (SIGABRT) as the interpreter shuts
    down: gloo's threads still hold tensors whose release needs the interpreter. PyTorch does
    not close the group at exit itself, so every command closes it before it returns.
    """
    global _joined
    if _joined and dist.is_initialized():
        dist.destroy_process_group()
    _joined = False


def shard(items: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous part of ``items`` (sizes differ by at most one, first ranks
    larger): a training batch's image indices, a test set's sample indices."""
    return items.tensor_split(world_size())[rank()]


def check_batch_splits(batch_size: int, n_images: int, option: str = "batch_size") -> None:
    """Refuse a batch too small to give every rank an image (before the first step)."""
    ranks = world_size()
    if ranks > 1 and min(batch_size, n_images) < ranks:
        raise ConfigError(f"{option}={batch_size} with {n_images} training images cannot give "
                          f"each of the {ranks} ranks an image per step: use fewer ranks or a "
                          "larger batch")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum over ranks, in place (``tensor`` itself in one process)."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def reduce_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Sum the gradients of ``parameters`` over the ranks, in one collective.

    Each rank's loss was scaled to its share of the batch (see the training loop), so the sum
    is the single-process batch's gradient. A parameter no rank computed a gradient for stays
    without one (an optimizer skips it, as in one process).
    """
    if not is_distributed():
        return
    parameters = list(parameters)
    device = parameters[0].device if parameters else torch.device("cpu")
    present = torch.tensor([p.grad is not None for p in parameters], dtype=torch.float32,
                           device=device)
    dist.all_reduce(present)
    with_gradient = [p for p, seen in zip(parameters, present.tolist()) if seen > 0]
    if not with_gradient:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in with_gradient])
    dist.all_reduce(flat)
    offset = 0
    for parameter in with_gradient:
        size = parameter.numel()
        parameter.grad = flat[offset:offset + size].view_as(parameter).clone()
        offset += size


def broadcast_modules(modules: Iterable[nn.Module]) -> None:
    """Give every rank rank 0's parameters and buffers (same start, same resumed state)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for module in modules:
            for tensor in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(tensor.data, src=0)


def gather_rows(local: torch.Tensor, rows: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """The rows of global indices ``wanted``, wherever they were computed, on every rank.

    Args:
        local: (n_local, ...) rows this rank computed.
        rows: (n_local,) their global indices, ascending (each index on one rank only).
        wanted: (K,) global indices.
    """
    if not is_distributed():
        return local[wanted.to(local.device)]
    position, owned = find_rows(rows, wanted)
    found = local.new_zeros((len(wanted), *local.shape[1:]))
    found[owned.to(local.device)] = local[position[owned].to(local.device)]
    # A sum of zeros and each row once is exact, whatever the order of the additions.
    dist.all_reduce(found)
    return found


def find_rows(rows: torch.Tensor, wanted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each of the global indices ``wanted`` sits among this rank's ascending ``rows``,
    and whether it is there (the positions of those that are not are meaningless)."""
    rows, wanted = rows.cpu(), wanted.cpu()
    position = torch.searchsorted(rows, wanted).clamp_max(max(len(rows) - 1, 0))
    owned = rows[position] == wanted if len(rows) else torch.zeros_like(wanted, dtype=torch.bool)
    return position, owned


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum over ranks, in place (``tensor`` itself in one process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_gather_shards(local: torch.Tensor, total: int) -> torch.Tensor:
    """The ranks' :func:`shard` results of ``total`` items, concatenated in order, on every
    rank (``local`` itself in one process)."""
    if not is_distributed():
        return local
    sizes = [len(part) for part in torch.arange(total).tensor_split(world_size())]
    padded = local.new_zeros((max(sizes), *local.shape[1:]))
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def all_gather_arrays(local: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The ranks' lists of arrays (of any shapes, one dtype), concatenated in rank order, on
    every rank (``local`` itself in one process): e.g. anomaly maps of images of different
    sizes."""
    if not is_distributed():
        return list(local)
    shapes = [shape for part in all_gather_json([list(a.shape) for a in local]) for shape in part]
    dtype = local[0].dtype if len(local) else np.dtype(np.float32)
    flat = np.concatenate([np.ravel(a) for a in local]) if len(local) else np.zeros(0, dtype)
    everything = torch.cat(_all_gather_ragged(torch.from_numpy(flat))).numpy()
    arrays, start = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        arrays.append(everything[start:start + size].reshape(shape))
        start += size
    return arrays


def _all_gather_ragged(local: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's 1-D ``local`` (lengths may differ), in rank order."""
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([len(local)]))
    padded = local.new_zeros(int(max(sizes)))
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return [part[:int(size)] for part, size in zip(parts, sizes)]


def all_gather_json(value: Any) -> list[Any]:
    """Every rank's JSON-serialisable ``value``, in rank order (``[value]`` in one process).
    Sent as JSON text in a byte tensor: nothing is pickled."""
    if not is_distributed():
        return [value]
    data = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8)
    return [json.loads(bytes(part.tolist()).decode()) for part in _all_gather_ragged(data)]


class _SummedOverRanks(torch.autograd.Function):
    """The sum of a tensor over the ranks, with its gradient: each rank's input feeds every
    rank's output, so its gradient is the sum of the output gradients over the ranks."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, tensor: torch.Tensor) -> torch.Tensor:
        summed = tensor.clone()
        dist.all_reduce(summed)
        return summed

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, gradient: torch.Tensor
                 ) -> torch.Tensor:
        summed = gradient.clone()
        dist.all_reduce(summed)
        return summed


class SynchronisedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the whole batch over all ranks.

    Torch's ``SyncBatchNorm`` refuses CPU tensors (gloo); this one works on any backend: the
    mean, then the variance around it, are sums over the ranks that carry gradients back to
    every rank's images, as in one process. Outside training, or in one process, it is the plain BatchNorm it
    replaced. Its parameters and buffers are the original layer's (same names, same objects).
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = _SummedOverRanks.apply(input.new_tensor([input.numel() / input.shape[1]]))
        mean = _SummedOverRanks.apply(input.sum(dims)) / count
        centred = input - mean.view(shape)
        variance = _SummedOverRanks.apply(centred.pow(2).sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                            else self.momentum)
                unbiased = variance * count / (count - 1).clamp_min(1)
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(unbiased.detach(), momentum)
        output = centred * torch.rsqrt(variance + self.eps).view(shape)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        return output


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def synchronise_batch_norms(modules: Sequence[nn.Module]) -> list[tuple[nn.Module, type]]:
    """Make the trained BatchNorm layers of ``modules`` :class:`SynchronisedBatchNorm` in place
    (when distributed); returns what :func:`restore_batch_norms` undoes.

    The layers' class is swapped rather than the layers replaced: the methods hold their
    modules and the optimizers their parameters, and both stay valid.
    """
    if not is_distributed():
        return []
    swapped = []
    for module in modules:
        for layer in module.modules():
            if type(layer) in _BATCH_NORMS:
                swapped.append((layer, type(layer)))
                layer.__class__ = SynchronisedBatchNorm
    return swapped


def restore_batch_norms(swapped: Sequence[tuple[nn.Module, type]]) -> None:
    for layer, kind in swapped:
        layer.__class__ = kind
