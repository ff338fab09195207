"""bfloat16 networks (iadkit.nn.precision): inside a Network the arithmetic is bfloat16, what
comes out is float32, and outside a bf16 block nothing changes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from iadkit.errors import ConfigError
from iadkit.methods import get_method
from iadkit.nn.precision import Network, bfloat16_problem, network_method, network_precision

CPU = torch.device("cpu")


class TwoLayers(Network):
    """Records the dtype its second layer computed in."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(8, 8), nn.Linear(8, 2)
        self.inner_dtypes: list[torch.dtype] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        hidden = self.first(x)
        out = self.second(hidden)
        self.inner_dtypes.append(out.dtype)
        return out, [hidden, torch.arange(3)]

    @network_method
    def loss(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x)).square().mean()


class Outer(Network):
    def __init__(self) -> None:
        super().__init__()
        self.inner = TwoLayers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.inner(x)
        return out * 2


def test_a_network_computes_in_bfloat16_inside_a_bf16_block_and_returns_float32() -> None:
    network, x = TwoLayers(), torch.randn(4, 8)
    plain, _ = network(x)
    with network_precision("f32", CPU):
        same, _ = network(x)
    assert torch.equal(plain, same)
    with network_precision("bf16", CPU):
        out, (hidden, integers) = network(x)
    assert network.inner_dtypes == [torch.float32, torch.float32, torch.bfloat16]
    assert out.dtype == hidden.dtype == torch.float32 and integers.dtype == torch.int64
    assert not torch.equal(out, plain)
    torch.testing.assert_close(out, plain, atol=0.05, rtol=0.05)
    network(x)  # the block is left: float32 again
    assert network.inner_dtypes[-1] == torch.float32


def test_nested_networks_stay_in_bfloat16_and_gradients_reach_the_weights() -> None:
    outer, x = Outer(), torch.randn(4, 8)
    with network_precision("bf16", CPU):
        out = outer(x)
        loss = outer.inner.loss(x)
    assert out.dtype == torch.float32 and outer.inner.inner_dtypes == [torch.bfloat16]
    assert loss.dtype == torch.float32
    (out.sum() + loss).backward()
    for parameter in outer.parameters():
        assert parameter.grad is not None and parameter.grad.dtype == torch.float32
        assert torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0


def test_unknown_precisions_and_devices_without_bfloat16_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown precision 'fp16'"), \
            network_precision("fp16", CPU):
        pass
    assert bfloat16_problem(CPU) is None
    assert "not on 'meta'" in bfloat16_problem(torch.device("meta"))
    with pytest.raises(ConfigError, match="precision="):
        get_method("rd")(precision="fp16")
    detector = get_method("rd")(device="meta", precision="bf16", backbone_weights="random")
    with pytest.raises(ConfigError, match="rd: precision='bf16': bfloat16 networks run on"):
        detector.check_resources()


def test_the_cli_fits_in_bf16_and_tests_and_loads_in_either_precision(toy_root, tmp_path) -> None:
    import json

    from iadkit.cli import main
    from iadkit.errors import IadkitError
    from iadkit.methods import Detector

    run = tmp_path / "run"
    assert main(["fit", "--method", "patchcore", "--data", str(toy_root), "--category", "alpha",
                 "--param", "image_size=48", "--precision", "bf16", "--out", str(run),
                 "--quiet"]) == 0
    model = run / "models" / "alpha"
    assert json.loads((model / "detector.json").read_text())["params"]["precision"] == "bf16"
    assert Detector.load(model).precision == "bf16"
    assert Detector.load(model, precision="f32").precision == "f32"
    with pytest.raises(ConfigError, match="precision="):
        Detector.load(model, precision="fp16")
    results = {}
    for precision in ("bf16", "f32"):
        out = tmp_path / f"{precision}.json"
        assert main(["test", str(run), "--precision", precision, "--json", str(out),
                     "--quiet"]) == 0
        results[precision] = json.loads(out.read_text())["image_auroc"]
    assert abs(results["bf16"] - results["f32"]) <= 0.1
    with pytest.raises(SystemExit, match="2"):  # argparse refuses it, naming the choices
        main(["test", str(run), "--precision", "fp16", "--quiet"])
    pytest.importorskip("fastapi")
    from iadkit.deploy.service import load_scorer

    assert load_scorer(model, precision="f32").detector.precision == "f32"
    with pytest.raises(IadkitError, match="int8 needs an OpenVINO export"):
        load_scorer(model, precision="int8")
