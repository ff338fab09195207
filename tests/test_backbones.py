"""Feature extractors and weight resolution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from iadkit.backbones import FeatureExtractor, build_with_weights
from iadkit.errors import WeightsNotFoundError


def test_lite0_features_have_the_documented_shapes_and_stay_frozen() -> None:
    extractor = FeatureExtractor("lite0", layers=(1, 2, 3))
    assert extractor.weights.source == "package"
    assert extractor.channels == [24, 40, 112] and extractor.strides == [4, 8, 16]
    features = extractor(torch.rand(2, 3, 64, 64))
    assert [tuple(f.shape) for f in features] == [(2, 24, 16, 16), (2, 40, 8, 8), (2, 112, 4, 4)]
    extractor.train()
    assert not extractor.training and not any(p.requires_grad for p in extractor.parameters())


def test_lite0_weights_are_real_imagenet_weights() -> None:
    """The pretrained classifier must put a cat photo into ImageNet's cat classes (281-285)."""
    from PIL import Image
    from skimage import data

    model, source = build_with_weights("tf_efficientnet_lite0", "pretrained")
    model.eval()
    image = Image.fromarray(data.chelsea()).resize((224, 224), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float()[None]
    with torch.no_grad():
        top = model((x - 127.0) / 128.0).softmax(-1).topk(3).indices[0].tolist()
    assert source.source == "package"
    assert top[0] in range(281, 286), top


def test_paper_backbone_builds_with_random_weights_for_shapes() -> None:
    extractor = FeatureExtractor("wide_resnet50_2", layers=("layer2", "layer3"), weights="random")
    assert extractor.channels == [512, 1024] and extractor.strides == [8, 16]
    assert [tuple(f.shape) for f in extractor(torch.rand(1, 3, 64, 64))] == [
        (1, 512, 8, 8), (1, 1024, 4, 4)]


def test_missing_weights_error_names_the_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IADKIT_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as error:
        FeatureExtractor("resnet18", layers=(2, 3))
    message = str(error.value)
    assert "weight file" in message and "Hugging Face cache" in message and "lite0" in message


def test_weights_from_a_file_and_a_bad_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model, _ = build_with_weights("tf_efficientnet_lite0", "pretrained")
    path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    from_file = FeatureExtractor("lite0", (2,), weights=str(path))
    from_package = FeatureExtractor("lite0", (2,))
    x = torch.rand(1, 3, 32, 32)
    assert from_file.weights.source == "file"
    assert torch.equal(from_file(x)[0], from_package(x)[0])
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    with pytest.raises(WeightsNotFoundError, match="bad.pth: not a readable weight file"):
        FeatureExtractor("lite0", (2,), weights=str(bad))
    with pytest.raises(WeightsNotFoundError, match="do not fit"):
        FeatureExtractor("resnet18", (2,), weights=str(path))


@pytest.mark.parametrize("name,layers,weights", [
    ("lite0", (1, 2, 3), "pretrained"),
    ("resnet18", ("layer2", "layer3"), "random"),
])
def test_batchnorm_folding_keeps_outputs_and_removes_every_batchnorm(name, layers, weights) -> None:
    torch.manual_seed(0)
    folded = FeatureExtractor(name, layers, weights=weights, fold_bn=True)
    torch.manual_seed(0)
    plain = FeatureExtractor(name, layers, weights=weights, fold_bn=False)  # same random init
    x = torch.rand(2, 3, 64, 64)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    for a, b in zip(folded(x), plain(x)):
        assert torch.allclose(a, b, atol=1e-4 * float(b.abs().max()))


def test_same_padding_without_a_padded_copy_gives_timms_output() -> None:
    from iadkit._torchvision_compat import import_timm
    from iadkit.backbones.same_padding import SamePaddingConv

    timm = import_timm()
    torch.manual_seed(0)
    for kernel, groups in ((3, 1), (5, 8), (3, 8)):
        conv = timm.layers.Conv2dSame(8, 8, kernel, stride=2, groups=groups).eval()
        rewritten = SamePaddingConv(conv)
        # every parity of height and width: TensorFlow pads the even sizes unevenly
        for height, width in ((32, 32), (33, 33), (32, 35), (17, 40)):
            x = torch.randn(2, 8, height, width)
            expected = conv(x)
            assert rewritten(x).shape == expected.shape
            torch.testing.assert_close(rewritten(x), expected, rtol=1e-5, atol=1e-5)
    # The frozen Lite0 keeps none of timm's padding convolutions and gives timm's features
    # (its own BatchNorm included) at even and odd input sizes.
    extractor = FeatureExtractor("lite0", (1, 2, 3))
    assert not any(isinstance(m, timm.layers.Conv2dSame) for m in extractor.modules())
    assert any(isinstance(m, SamePaddingConv) for m in extractor.modules())
    plain, _ = build_with_weights(extractor.name, "pretrained", features_only=True,
                                  out_indices=(1, 2, 3))
    plain.eval()
    for size in (64, 75):
        images = torch.rand(2, 3, size, size)
        with torch.no_grad():
            reference = plain((images - extractor.mean) / extractor.std)
            for ours, theirs in zip(extractor(images), reference):
                torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4 * float(
                    theirs.abs().max()))
