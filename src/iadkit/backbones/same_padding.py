"""TensorFlow's "same" padding of strided convolutions without a padded copy of the input.

timm builds the ``tf_`` EfficientNets (the default backbone, EfficientNet-Lite0, among them)
with ``Conv2dSame`` for their strided convolutions: where TensorFlow pads one pixel more after
the input than before it, each call copies the whole input into a zero-filled larger tensor
(``F.pad``) and convolves that. The same output comes from one convolution with the larger
padding on both sides and a kernel one tap longer whose first tap is zero: the window then
starts one pixel earlier, on a zero that the zero tap ignores. On Lite0 at 256 pixels the
copies took about an eighth of the frozen backbone's CPU time (2026-12-03, Intel Xeon, 2
threads). Only frozen networks are rewritten (a trained zero tap would not stay zero): the
frozen backbones when built, and every network of a detector when it is exported (a trained
student then too, whose padding would otherwise be computed in the graph, with shape arithmetic
around each copy).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._torchvision_compat import import_timm
from .fold import outputs_match


class SamePaddingConv(nn.Module):
    """A frozen ``Conv2dSame`` computed without padding its input first.

    Args:
        conv: the convolution to replace (dilation 1, zero padding).

    Example:
        >>> conv = import_timm().layers.Conv2dSame(8, 8, 3, stride=2, groups=8)
        >>> x = torch.rand(1, 8, 32, 32)
        >>> torch.allclose(SamePaddingConv(conv)(x), conv(x), atol=1e-6)
        True
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.kernel_size: tuple[int, int] = tuple(conv.kernel_size)
        self.stride: tuple[int, int] = tuple(conv.stride)
        self.groups = conv.groups
        self.bias = conv.bias
        # One kernel per dimension needing one more pixel after than before: the zero tap
        # goes first (top, left). Buffers, so that they follow the module's device and layout.
        for longer_h in (0, 1):
            for longer_w in (0, 1):
                weight = F.pad(conv.weight.detach(), (longer_w, 0, longer_h, 0))
                self.register_buffer(f"weight_{longer_h}{longer_w}", weight, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        longer, padding = [], []
        for size, kernel, stride in zip(images.shape[-2:], self.kernel_size, self.stride):
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            before, after = total // 2, total - total // 2
            longer.append(after - before)
            padding.append(after)
        weight = getattr(self, f"weight_{longer[0]}{longer[1]}")
        return F.conv2d(images, weight, self.bias, self.stride, tuple(padding), 1, self.groups)


def without_padded_copies(model: nn.Module, examples: Sequence[torch.Tensor],
                          tolerance: float = 1e-5) -> nn.Module:
    """``model`` (frozen) with every ``Conv2dSame`` replaced by a :class:`SamePaddingConv`, in
    place, when its outputs on each of ``examples`` (inputs of every size it will see: both
    parities, for a backbone) stay within ``tolerance`` of the original's relative to their
    scale; else unchanged."""
    layers = import_timm().layers
    same = tuple(getattr(layers, name) for name in ("Conv2dSame", "Conv2dSameExport")
                 if hasattr(layers, name))
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, same) and module.dilation == (1, 1)
               and module.padding_mode == "zeros"]
    if not targets:
        return model
    model.eval()  # (in training mode the checks' passes would move BatchNorm's statistics)
    with torch.no_grad():
        expected = [model(images) for images in examples]
    originals = {}
    modules = dict(model.named_modules())
    for name, conv in targets:
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        originals[name] = (parent, child, conv)
        setattr(parent, child, SamePaddingConv(conv))
    with torch.no_grad():
        found = [model(images) for images in examples]
    if not all(outputs_match(reference, candidate, tolerance)
               for reference, candidate in zip(expected, found)):
        for parent, child, conv in originals.values():
            setattr(parent, child, conv)
    return model
