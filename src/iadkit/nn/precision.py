"""The precision the networks compute in: float32, or bfloat16 under autocast.

Every network of iadkit (the frozen backbone, and each method's trained networks) is a
:class:`Network`. A detector's ``precision`` hyperparameter reaches them through
:func:`network_precision`, which :meth:`iadkit.methods.Detector.fit` and ``predict`` enter: with
``"bf16"`` each outermost network call runs under ``torch.autocast(dtype=torch.bfloat16)`` and
its outputs come back as float32. Everything a detector computes from those outputs, between
and after the networks (losses, distances, statistics, neighbour search, coresets, smoothed
maps and image scores), therefore stays in float32: autocast would otherwise run matrix
products and convolutions of that arithmetic in bfloat16 too, and a cosine distance of nearly
equal features loses most of its digits there.

bfloat16 pays on CUDA GPUs from Ampere on and on CPUs with bfloat16 matrix instructions
(AVX512-BF16 or AMX); elsewhere it is slower than float32 (docs/performance.md).

Example:
    >>> with network_precision("bf16", torch.device("cpu")):
    ...     features = extractor(images)      # a Network: computed in bfloat16
    >>> features[0].dtype
    torch.float32
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: The precisions a detector's networks can compute in.
PRECISIONS = ("f32", "bf16")

#: The device type whose networks compute in bfloat16 now; None: float32.
_bfloat16_device: ContextVar[str | None] = ContextVar("iadkit_bfloat16_device", default=None)


@functools.cache
def cpuinfo() -> str | None:
    """The text of /proc/cpuinfo (Linux), read once; None elsewhere."""
    path = Path("/proc/cpuinfo")
    return path.read_text(errors="replace") if path.is_file() else None


@functools.cache
def cpu_has_bfloat16() -> bool:
    """Whether this machine's CPU has bfloat16 matrix instructions (AVX512-BF16 or AMX)."""
    return bool(set((cpuinfo() or "").split()) & {"avx512_bf16", "amx_bf16"})


def bfloat16_problem(device: torch.device) -> str | None:
    """Why bfloat16 networks cannot run on ``device``, or None when they can."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return f"{device} has no bfloat16 support (a GPU from NVIDIA Ampere on has)"
    if device.type not in ("cpu", "cuda"):
        return f"bfloat16 networks run on 'cpu' and 'cuda' devices, not on {device.type!r}"
    return None


@contextmanager
def network_precision(precision: str, device: torch.device) -> Iterator[None]:
    """A block in which every :class:`Network` computes in ``precision`` ("f32" or "bf16")
    on ``device``'s type."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {PRECISIONS}")
    token = _bfloat16_device.set(device.type if precision == "bf16" else None)
    try:
        yield
    finally:
        _bfloat16_device.reset(token)


class Network(nn.Module):
    """An ``nn.Module`` that computes in the precision of the enclosing
    :func:`network_precision` block (float32 outside any).

    Under bfloat16 a call not already inside autocast (a network called by another runs in its
    caller's autocast) enters ``torch.autocast`` for the forward pass and returns its floating
    outputs as float32. Gradients flow through both casts, so training works the same way. A
    method other than ``forward`` that callers use directly is decorated with
    :func:`network_method`.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _in_network_precision(super().__call__, args, kwargs)


def network_method(method: Callable[..., Any]) -> Callable[..., Any]:
    """Make a :class:`Network`'s method other than ``forward`` (a loss, a gate) compute in the
    networks' precision, as a call of the network does."""

    @functools.wraps(method)
    def in_precision(*args: Any, **kwargs: Any) -> Any:
        return _in_network_precision(method, args, kwargs)
    return in_precision


def _in_network_precision(run: Callable[..., Any], args: tuple[Any, ...],
                          kwargs: dict[str, Any]) -> Any:
    device_type = _bfloat16_device.get()
    if device_type is None or torch.is_autocast_enabled(device_type):
        return run(*args, **kwargs)
    with torch.autocast(device_type, dtype=torch.bfloat16):
        outputs = run(*args, **kwargs)
    return _as_float32(outputs)


def _as_float32(value: Any) -> Any:
    """``value`` with every bfloat16 tensor in it (also in lists, tuples, dicts) as float32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype == torch.bfloat16 else value
    if isinstance(value, (list, tuple)):
        converted = [_as_float32(item) for item in value]
        return type(value)(converted) if type(value) in (list, tuple) else type(value)(*converted)
    if isinstance(value, dict):
        return {key: _as_float32(item) for key, item in value.items()}
    return value
