"""Import torchvision on CPU-only torch builds where its compiled ops fail to register.

torchvision 0.28 wheels built against CUDA register "fake" kernels for operators
(``torchvision::nms`` ...) whose real kernels live in a CUDA library; on a CPU-only torch the
registration raises ``RuntimeError: operator torchvision::nms does not exist``
(pytorch/vision issue 9077). timm imports torchvision, so without this nothing loads. The fake
kernels only matter for ``torch.compile`` tracing of those ops, which iadkit never uses, so we
make ``torch.library.register_fake`` a no-op while torchvision imports, then restore it.
The workaround is applied only when the plain import fails.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


def import_torchvision() -> Any:
    """Return the ``torchvision`` module, applying the CPU workaround only when needed."""
    try:
        import torchvision

        return torchvision
    except RuntimeError as error:
        if "does not exist" not in str(error):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]

    import torch

    original = torch.library.register_fake

    def _skip_fake_registration(*_args: Any, **_kwargs: Any) -> Callable[[Callable], Callable]:
        return lambda function: function

    torch.library.register_fake = _skip_fake_registration
    try:
        import torchvision
    finally:
        torch.library.register_fake = original
    return torchvision


def import_timm() -> Any:
    """Return the ``timm`` module (it imports torchvision, so make that work first)."""
    import_torchvision()
    import timm

    return timm
