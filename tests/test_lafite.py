"""LafitE: the cosine schedule, DDIM from a partial corruption, the U-Net, feature editing, the
detector end to end, and the engine's inference-parameter search on pseudo-validation data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from iadkit import engine, metrics
from iadkit.cli import main
from iadkit.data import load_dataset, make_loader
from iadkit.errors import IadkitError
from iadkit.methods import Detector, create_detector
from iadkit.methods.lafite.diffusion import CosineSchedule, NoisePredictionUNet, cosine_alpha_bar
from iadkit.nn.feature_editing import edit_features, neighbour_weights
from iadkit.nn.knn import FlatIndex

#: LafitE small enough for seconds: 64 px images on an 8x8 grid, a two-level U-Net.
SMALL_LAFITE = dict(image_size=64, grid=8, base_channels=16, channel_mults=(1, 2),
                    attention_levels=(1,), batch_size=8, lr=1e-3, coreset_ratio=0.5, tau=100,
                    score_pool=8, device="cpu")


# -- schedule and sampler --------------------------------------------------------------------
def test_schedule_matches_the_cosine_closed_form() -> None:
    schedule = CosineSchedule(1000)
    t = torch.arange(1001)
    closed = cosine_alpha_bar(t, 1000).float()
    assert schedule.alpha_bar[0] == 1.0
    assert schedule.betas.max() <= 0.999 + 1e-7
    # beta is clipped at 0.999 only in the last steps, where alpha_bar is ~0 anyway
    assert torch.allclose(schedule.alpha_bar[:990], closed[:990], rtol=1e-4, atol=1e-7)
    expected_500 = np.cos((0.5 + 0.008) / 1.008 * np.pi / 2) ** 2 / np.cos(
        0.008 / 1.008 * np.pi / 2) ** 2
    assert schedule.alpha_bar[500].item() == pytest.approx(expected_500, rel=1e-5)
    assert torch.all(schedule.alpha_bar[1:] < schedule.alpha_bar[:-1])


def test_ddim_from_tau_zero_returns_the_input_exactly() -> None:
    schedule = CosineSchedule(1000)
    unet = NoisePredictionUNet(8, base_channels=16, channel_mults=(1, 2), attention_levels=())
    x = torch.randn(2, 8, 8, 8)
    assert torch.equal(schedule.reconstruct(unet, x, tau=0), x)


@pytest.mark.parametrize("tau", [1, 250, 999])
def test_ddim_with_an_exact_noise_predictor_recovers_the_clean_input(tau: int) -> None:
    """A predictor that knows x0 returns the true noise of x_t; deterministic DDIM must then land
    on x0 from any corruption step, whatever jumps it takes."""
    schedule = CosineSchedule(1000)
    clean = torch.randn(3, 4, 8, 8)

    def oracle(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha_bar = schedule.alpha_bar[t].view(-1, 1, 1, 1)
        return (x_t - alpha_bar.sqrt() * clean) / (1 - alpha_bar).sqrt()

    rebuilt = schedule.reconstruct(oracle, torch.zeros_like(clean) + clean, tau=tau, steps=7,
                                   generator=torch.Generator().manual_seed(0))
    assert torch.allclose(rebuilt, clean, atol=1e-3)
    assert schedule.sampling_steps(tau, 7)[0] == tau and schedule.sampling_steps(tau, 7)[-1] == 0


def test_unet_shapes_on_the_paper_grid_and_a_refused_grid() -> None:
    unet = NoisePredictionUNet(272, base_channels=32, channel_mults=(1, 2, 3, 4))
    x = torch.randn(1, 272, 32, 32)
    assert unet(x, torch.tensor([500])).shape == x.shape
    with pytest.raises(ValueError, match="divisible"):
        unet(torch.randn(1, 272, 28, 28), torch.tensor([1]))


def test_a_tiny_unet_overfits_one_feature_map() -> None:
    torch.manual_seed(0)
    schedule = CosineSchedule(1000)
    target = torch.randn(1, 8, 8, 8)
    unet = NoisePredictionUNet(8, base_channels=16, channel_mults=(1, 2), attention_levels=(),
                               dropout=0.0)
    optimizer = torch.optim.Adam(unet.parameters(), lr=5e-3)
    losses = []
    for _ in range(150):
        loss = schedule.training_loss(unet, target.expand(32, -1, -1, -1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-20:]) < 0.3 * np.mean(losses[:20])
    # from a heavily corrupted start, the model has learnt to bring back its one feature map
    unet.eval()
    with torch.no_grad():
        rebuilt = schedule.reconstruct(unet, target, tau=600, steps=10,
                                       generator=torch.Generator().manual_seed(1))
        corrupted = schedule.corrupt(target, torch.tensor([600]),
                                     torch.randn(target.shape, generator=torch.Generator().manual_seed(1)))
    assert (rebuilt - target).pow(2).mean() < 0.25 * (corrupted - target).pow(2).mean()


# -- feature editing -------------------------------------------------------------------------
def test_editing_with_one_neighbour_and_the_query_in_the_bank_returns_the_query() -> None:
    features = torch.randn(2, 6, 4, 4)
    bank = torch.cat([features.permute(0, 2, 3, 1).reshape(-1, 6), torch.randn(50, 6)])
    edited = edit_features(features, FlatIndex(bank, "torch"), k=1)
    assert torch.allclose(edited, features, atol=1e-6)


def test_editing_weights_favour_close_neighbours_and_their_normalisation() -> None:
    distances = torch.tensor([[0.5, 1.0, 3.0]])
    literal = neighbour_weights(distances, "paper")
    assert literal.sum().item() == pytest.approx(2.0)  # K - 1, as the paper's Eq. 10 gives
    normalised = neighbour_weights(distances, "sum_to_one")
    assert normalised.sum().item() == pytest.approx(1.0)
    assert normalised[0, 0] > normalised[0, 1] > normalised[0, 2]
    # editing moves an outlier onto the span of its normal neighbours
    bank = torch.randn(200, 6)
    outlier = torch.full((1, 6, 1, 1), 6.0)
    edited = edit_features(outlier, FlatIndex(bank, "torch"), k=3)
    assert (edited - outlier).norm() > 5.0
    assert edited.abs().max() <= bank.abs().max()


# -- the detector ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted_lafite(toy_root: Path):
    samples = load_dataset(toy_root, ["alpha", "beta"])
    detector = create_detector("lafite", "cpu", **SMALL_LAFITE, epochs=6)
    detector.fit(make_loader(samples.where(split="train"), detector.preprocess, 8))
    return detector, samples


def _scores(detector: Detector, samples) -> tuple[np.ndarray, ...]:
    predicted = engine.predict_samples(detector, samples, batch_size=12)
    return predicted.scores, predicted.maps, predicted.masks, predicted.labels


def test_lafite_separates_generated_defects_in_both_categories(fitted_lafite) -> None:
    detector, samples = fitted_lafite
    losses = detector.fit_info_["loss_history"]["diffusion"]
    assert losses[-1] < losses[0]
    assert detector.bank_.vectors.shape[1] == detector.fit_info_["feature_channels"]
    for category in ("alpha", "beta"):
        scores, maps, masks, labels = _scores(
            detector, samples.where(split="test", category=category))
        assert maps.shape[1:] == (64, 64)
        assert metrics.auroc(labels, scores) >= 0.8, category
        assert metrics.pixel_metrics(masks, maps)["pixel_auroc"] >= 0.8, category


def test_lafite_round_trip_and_scores_do_not_depend_on_the_batch(fitted_lafite,
                                                                 tmp_path: Path) -> None:
    detector, _ = fitted_lafite
    images = torch.rand(3, 3, 64, 64)
    together = detector.predict(images)
    alone = detector.predict(images[1:2])
    assert torch.allclose(together.scores[1:2], alone.scores, rtol=1e-5)
    loaded = Detector.load(detector.save(tmp_path / "lafite"))
    again = loaded.predict(images)
    assert torch.equal(together.scores, again.scores)
    assert torch.equal(together.anomaly_maps, again.anomaly_maps)


def test_inference_params_change_after_fit_and_others_are_refused(fitted_lafite) -> None:
    detector, _ = fitted_lafite
    images = torch.rand(2, 3, 64, 64)
    before = detector.predict(images).scores
    detector.set_inference_params(feature_editing=False)
    try:
        assert not torch.equal(detector.predict(images).scores, before)
    finally:
        detector.set_inference_params(feature_editing=True)
    assert torch.equal(detector.predict(images).scores, before)
    with pytest.raises(IadkitError, match="cannot change after fit"):
        detector.set_inference_params(base_channels=8)
    with pytest.raises(IadkitError, match="tau"):
        detector.set_inference_params(tau=5000)
    assert detector.tau == SMALL_LAFITE["tau"]  # a refused value is not kept


def test_interrupted_lafite_training_resumes_to_the_same_model(
        toy_root: Path, tmp_path: Path, interrupt_training) -> None:
    train = load_dataset(toy_root, ["alpha"]).where(split="train")
    settings = dict(SMALL_LAFITE, epochs=3, checkpoint_every_s=0)
    reference = create_detector("lafite", "cpu", **settings)
    reference.fit(make_loader(train, reference.preprocess, 8))
    detector = create_detector("lafite", "cpu", **settings)
    folder = tmp_path / "checkpoint"
    undo = interrupt_training(2)
    with pytest.raises(KeyboardInterrupt):
        detector.fit(make_loader(train, detector.preprocess, 8), checkpoint_dir=folder)
    undo()
    resumed = create_detector("lafite", "cpu", **settings)
    undo = interrupt_training(1)  # only the missing epoch may run
    resumed.fit(make_loader(train, resumed.preprocess, 8), checkpoint_dir=folder)
    undo()
    images = torch.rand(2, 3, 64, 64)
    assert torch.equal(resumed.predict(images).scores, reference.predict(images).scores)


# -- inference-parameter search --------------------------------------------------------------
def test_search_picks_the_best_point_of_its_curve_and_restores_fixed_params(
        fitted_lafite, tmp_path: Path) -> None:
    from iadkit.synthesis import build_pseudo_validation

    detector, samples = fitted_lafite
    normals = samples.where(split="train")
    pseudo = build_pseudo_validation(normals, tmp_path / "pseudo", "fragments", 64, seed=0)
    assert 0 < sum(pseudo.labels) < len(pseudo)
    stages = [{"param": "tau", "values": [0, 50, 300], "fixed": {"feature_editing": False}},
              {"param": "k_neighbours", "values": [1, 4]}]
    result = engine.search_inference_params(detector, pseudo, stages, batch_size=16)
    for stage in result["stages"]:
        best = max(point["image_auroc"] for point in stage["curve"])
        chosen = next(p for p in stage["curve"] if p["value"] == stage["chosen"])
        assert chosen["image_auroc"] == best
        assert all(point["pixel_auroc"] is not None for point in stage["curve"])
    assert detector.tau == result["chosen"]["tau"]
    assert detector.k_neighbours == result["chosen"]["k_neighbours"]
    assert detector.feature_editing is True  # fixed only for its stage
    # without editing and without corruption the reconstruction is the input: no signal at all
    tau_zero = result["stages"][0]["curve"][0]
    assert tau_zero["image_auroc"] == pytest.approx(0.5)
    with pytest.raises(IadkitError, match="cannot search"):
        engine.search_inference_params(detector, pseudo, [{"param": "lr", "values": [1]}])


def test_cli_fit_with_the_default_search_records_its_curve(toy_root: Path, tmp_path: Path) -> None:
    params = [f"--param={k}={json.dumps(v)}" for k, v in SMALL_LAFITE.items() if k != "device"]
    search = "[{param: tau, values: [20, 200], fixed: {feature_editing: false}}, " \
             "{param: k_neighbours, values: [2, 3]}]"
    code = main(["fit", "--method", "lafite", "--data", str(toy_root), "--category", "alpha",
                 "--category", "beta", "--setting", "model-unified", "--param", "epochs=2",
                 *params, "--validation-fraction", "0.25", "--search", search,
                 "--search-synthesis", "draem", "--out", str(tmp_path / "run"), "--device", "cpu",
                 "-q"])
    assert code == 0
    saved = json.loads((tmp_path / "run" / "models" / "unified" / "detector.json").read_text())
    search_record = saved["fit_info"]["search"]
    assert [s["param"] for s in search_record["stages"]] == ["tau", "k_neighbours"]
    assert saved["params"]["tau"] == search_record["chosen"]["tau"]
    assert saved["params"]["k_neighbours"] == search_record["chosen"]["k_neighbours"]
    assert search_record["source"].startswith("draem pseudo-validation set")
    assert "held out from training" in search_record["source"]
    assert saved["calibration"] is not None


def test_feature_editing_in_front_of_uniad(toy_root: Path, tmp_path: Path) -> None:
    """The paper's "UniAD w/ F.E." ablation: the same editing bank in front of another
    reconstructor, saved with it, switchable at inference."""
    samples = load_dataset(toy_root, ["alpha"])
    small = dict(image_size=64, feature_stride=8, neighbourhood=3, hidden_dim=32, ffn_dim=64,
                 num_heads=4, lr=1e-3, batch_size=8, epochs=2, device="cpu")
    detector = create_detector("uniad", "cpu", **small, feature_editing=True,
                               coreset_ratio=0.5, k_neighbours=1)
    detector.fit(make_loader(samples.where(split="train"), detector.preprocess, 8))
    assert detector.fit_info_["editing_bank_size"] == detector.bank_.vectors.shape[0] > 0
    images = torch.rand(2, 3, 64, 64)
    edited = detector.predict(images).scores
    loaded = Detector.load(detector.save(tmp_path / "uniad_fe"))
    assert torch.equal(loaded.predict(images).scores, edited)
    loaded.set_inference_params(feature_editing=False)
    assert not torch.equal(loaded.predict(images).scores, edited)

    plain = create_detector("uniad", "cpu", **small)
    plain.fit(make_loader(samples.where(split="train"), plain.preprocess, 8))
    with pytest.raises(IadkitError, match="bank"):
        plain.set_inference_params(feature_editing=True)
