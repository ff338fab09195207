"""Which statistics should Adapted-MoE's test-time adaption use, and which expert detects an
unseen subclass? An analysis of one fitted model.

Takes a fitted single-expert Adapted-MoE (``use_moe=False``, ``use_tta=True``) from an
unseen-subclass run (e.g. ``benchmarks/adapted_moe_unseen_subclass.py``'s ``tta`` runs) and
scores the unseen subclass's test images with the same expert under several test-time
re-stylings, changing nothing but the statistics (mean, std) the features are re-styled from:

- ``per-image`` (the paper's Eq. 5 read per channel over the image's positions), ``per-image
  scalar`` (one mean and std over the image's values), ``none`` (only the Eq. 6 norm);
- ``oracle``: per-channel statistics of the unseen subclass's *training* normals (images the
  model never saw; an upper bound of what any re-styling toward the expert can give, not a
  deployable rule), and the two halves of it: the image's own mean with the oracle std, and
  the oracle mean with the image's own std; ``reference_K``: the same from K seeded
  training normals only (what a user could supply for a new variant);
- ``test set``: per-channel statistics over all test images together (the limit of
  ``tta_statistics="batch"`` with a large batch).

It also scores the images by their per-image statistics alone (median over channels of the
image's std, and of its mean's distance, in units of the expert's training std): when those
separate defective from normal images, per-image re-styling removes anomaly evidence.

For a mixture (``use_moe=True``) it reports instead each expert's mean routing weight on the
unseen subclass and its image AUROC alone, with and without test-time adaption: whether the
experts the routing prefers are the ones that detect best; the mean score each expert
gives 16 seeded training normals of the unseen subclass (whether that picks the best expert);
and, where the test images have masks, each expert's pixel AUROC alone (the model's own maps,
its test-time adaption included). ``standardised_ensemble``: every expert's patch scores in
units of their mean and std over the 16 references, averaged over the experts (a mixture that
needs neither routing nor a choice), for three reference draws.

With ``--batch-order`` it scores a ``tta_statistics="batch"`` model in file order (test images
grouped by label), in shuffled orders and one image at a time: a batch-dependent score must not
owe its AUROC to label-grouped batches. One JSON line. Usage::

    .venv/bin/python benchmarks/tta_statistics.py RUN_MODEL_DIR DATA_DIR --unseen mono
        [--category elpv] [--batch-order]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from iadkit import metrics
from iadkit.data import SampleSet, load_dataset, make_loader
from iadkit.engine.evaluation import draw_references, predict_samples, score_predictions
from iadkit.methods import Detector
from iadkit.methods.simplenet.adapted_moe import ReferenceScores
from iadkit.methods.simplenet.mixture import adapt_statistics, rescale_to_expert_norm
from iadkit.nn.anomaly_maps import gaussian_blur

Restyle = Callable[[torch.Tensor], torch.Tensor]
#: How many of the unseen subclass's training normals the few-shot references take.
REFERENCE_COUNTS = (1, 4, 16)
#: How many of them a mixture's experts score (``reference_score``).
MIXTURE_REFERENCES = 16


def features_of(detector: Detector, samples: SampleSet) -> tuple[torch.Tensor, np.ndarray]:
    """(N, C, h, w) patch features and labels of ``samples``."""
    features, labels = [], []
    with torch.no_grad():
        for batch in make_loader(samples, detector.preprocess, 16):
            features.append(detector.patch_features(batch["image"].to(detector.torch_device)))
            labels.append(batch["label"])
    return torch.cat(features), torch.cat(labels).numpy()


def image_scores(detector: Detector, features: torch.Tensor, restyle: Restyle | None,
                 order: np.ndarray | None = None, batch_size: int = 16, expert: int = 0
                 ) -> np.ndarray:
    """Image scores (maximum patch score) of expert ``expert`` alone seeing ``restyle(batch)``,
    or of the whole model (``restyle`` None), in batches of ``batch_size`` taken in ``order``."""
    head = detector.experts_[expert]
    order = np.arange(len(features)) if order is None else order
    scores = np.empty(len(features))
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            batch = features[chosen]
            if restyle is None:
                patch_scores = detector.patch_scores(batch)
            else:
                inputs = restyle(batch)
                count, channels, height, width = inputs.shape
                patch_scores = head(inputs.permute(0, 2, 3, 1).reshape(-1, channels)).view(
                    count, height, width)
            scores[chosen] = patch_scores.flatten(1).amax(1).cpu().numpy()
    return scores


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    return round(float(roc_auc_score(labels, scores)), 4)


def experts_alone(detector: Detector, features: torch.Tensor, labels: np.ndarray,
                  references: torch.Tensor) -> dict[str, dict[str, float]]:
    """For each expert of a mixture: its mean routing weight on ``features``, its image AUROC
    alone, with its test-time adaption and without (only the Eq. 6 norm), and the mean image
    score it gives ``references``, normal images of the unseen subclass (every expert's
    discriminator is trained to the same margin, so a lower mean says that expert finds the
    new subclass's normal images more normal: a way to choose an expert without test labels)."""
    with torch.no_grad():
        weights = torch.cat([detector._expert_weights(batch) for batch in features.split(16)])
    report = {}
    for expert, name in enumerate(detector.expert_names):
        mean, std = detector.statistics_.mean[expert], detector.statistics_.std[expert]

        def adapted(batch: torch.Tensor, expert: int = expert) -> torch.Tensor:
            return detector._expert_inputs(batch, expert)

        def unadapted(batch: torch.Tensor, mean: torch.Tensor = mean,
                      std: torch.Tensor = std) -> torch.Tensor:
            # The Eq. 6 norm comes with TTA: without TTA the model never applies it.
            if detector.use_tta and detector.use_norm:
                return rescale_to_expert_norm(batch, mean, std)
            return batch

        report[name] = {
            "routing_weight": round(float(weights[:, expert].mean()), 4),
            "alone": auroc(labels, image_scores(detector, features, adapted, expert=expert)),
            "alone_without_tta": auroc(labels, image_scores(detector, features, unadapted,
                                                            expert=expert)),
            "reference_score": round(float(image_scores(
                detector, references, adapted, expert=expert).mean()), 4),
            "reference_score_without_tta": round(float(image_scores(
                detector, references, unadapted, expert=expert).mean()), 4)}
    return report


def pixel_auroc_alone(detector: Detector, test: SampleSet) -> dict[str, float]:
    """Each expert's pixel AUROC on ``test`` when it alone scores every image."""
    saved = detector.expert_choice, detector.reference_scores_
    result = {}
    try:
        detector.expert_choice = "references"
        for expert, name in enumerate(detector.expert_names):
            forced = ReferenceScores(len(detector.expert_names)).to(detector.torch_device)
            forced.scores[expert] = -1.0
            detector.reference_scores_ = forced
            metrics = score_predictions(predict_samples(detector, test), pixel=True)
            result[name] = round(float(metrics["pixel_auroc"]), 4)
    finally:
        detector.expert_choice, detector.reference_scores_ = saved
    return result


def standardised_ensemble(detector: Detector, test: SampleSet, references: SampleSet,
                          seed: int) -> dict[str, float]:
    """Image (and pixel) AUROC of the experts' patch scores standardised by their mean and std
    over ``MIXTURE_REFERENCES`` references drawn by ``seed``, averaged over the experts."""
    experts = range(len(detector.expert_names))

    def expert_scores(images: torch.Tensor) -> torch.Tensor:  # (B, E, h, w)
        features = detector.patch_features(images.to(detector.torch_device))
        return torch.stack([detector._expert_patch_scores(features, e) for e in experts], 1)

    with torch.no_grad():
        for module in detector._trained_modules().values():
            module.eval()
        reference = torch.cat([expert_scores(batch["image"]) for batch in make_loader(
            draw_references(references, MIXTURE_REFERENCES, seed), detector.preprocess, 16)])
        mean = reference.mean(dim=(0, 2, 3)).view(1, -1, 1, 1)
        std = reference.std(dim=(0, 2, 3)).view(1, -1, 1, 1)
        scores, maps, masks, labels = [], [], [], []
        for batch in make_loader(test, detector.preprocess, 16):
            fused = ((expert_scores(batch["image"]) - mean) / std).mean(dim=1)
            scores.append(fused.flatten(1).amax(1).cpu())
            upsampled = F.interpolate(fused.unsqueeze(1), size=batch["image"].shape[-2:],
                                      mode="bilinear", align_corners=False).squeeze(1)
            maps.append(gaussian_blur(upsampled, detector.smoothing_sigma).cpu())
            masks.append(batch["mask"])
            labels.append(batch["label"])
    result = {"image_auroc": auroc(torch.cat(labels).numpy(), torch.cat(scores).numpy())}
    if test.has_masks:
        result["pixel_auroc"] = round(float(metrics.pixel_metrics(
            torch.cat(masks).numpy(), torch.cat(maps).numpy())["pixel_auroc"]), 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a saved single-expert Adapted-MoE (use_moe=False)")
    parser.add_argument("data", help="the dataset folder of the unseen-subclass run")
    parser.add_argument("--unseen", required=True, help="the unseen subclass")
    parser.add_argument("--category", default=None, help="the category holding it")
    parser.add_argument("--batch-order", action="store_true")
    args = parser.parse_args()
    detector = Detector.load(args.model)
    if detector.name != "adapted_moe":
        raise SystemExit(f"{args.model}: needs an Adapted-MoE model")
    samples = load_dataset(args.data, [args.category] if args.category else None)
    if not samples.where(subclass=args.unseen):  # mixed categories: each is a subclass
        samples = SampleSet(s.with_subclass(s.category) for s in samples)
    test, labels = features_of(detector, samples.where(split="test", subclass=args.unseen))
    references = samples.where(split="train", subclass=args.unseen)
    reference, _ = features_of(detector, references)
    # The references a run would draw with reference_normals K and seed 0.
    drawn = {count: features_of(detector, draw_references(references, count, 0))[0]
             for count in {*REFERENCE_COUNTS, MIXTURE_REFERENCES}}
    if detector.needs_references:  # the 16 scored below
        detector.adapt_to_references(make_loader(draw_references(
            references, MIXTURE_REFERENCES, 0), detector.preprocess, 16))
    record: dict[str, object] = {
        "benchmark": "tta_statistics", "model": args.model, "unseen": args.unseen,
        "params": {key: detector.get_params()[key]
                   for key in ("use_moe", "use_tta", "tta_statistics", "use_norm",
                                 "expert_choice")},
        "n_test": len(labels), "image_auroc_as_fitted": auroc(labels, image_scores(
            detector, test, None))}
    if detector.use_moe:
        record["experts"] = experts_alone(detector, test, labels, drawn[MIXTURE_REFERENCES])
        test_samples = samples.where(split="test", subclass=args.unseen)
        if test_samples.has_masks:
            for name, value in pixel_auroc_alone(detector, test_samples).items():
                record["experts"][name]["pixel_auroc_alone"] = value
        record["standardised_ensemble"] = [
            standardised_ensemble(detector, test_samples, references, seed) for seed in range(3)]
        print(json.dumps(record), flush=True)
        return
    if not detector.use_tta:
        raise SystemExit(f"{args.model}: a single-expert model needs use_tta=True")
    if len(reference) < 2:
        raise SystemExit(f"{args.data}: the oracle needs training normals of {args.unseen}")
    mean, std = detector.statistics_.mean[0], detector.statistics_.std[0]
    eps = 1e-5

    def to_expert(source_mean: torch.Tensor, source_std: torch.Tensor) -> Restyle:
        def restyle(batch: torch.Tensor) -> torch.Tensor:
            adapted = (batch - source_mean) / (source_std + eps) * std.view(1, -1, 1, 1) + \
                mean.view(1, -1, 1, 1)
            return rescale_to_expert_norm(adapted, mean, std) if detector.use_norm else adapted
        return restyle

    def per_image(kind: str) -> Restyle:
        return lambda batch: adapt_statistics(batch, mean, std, kind, detector.use_norm)

    oracle_mean = reference.mean(dim=(0, 2, 3), keepdim=True)
    oracle_std = reference.std(dim=(0, 2, 3), keepdim=True)

    def split_rule(use_image_mean: bool) -> Restyle:
        def restyle(batch: torch.Tensor) -> torch.Tensor:
            if use_image_mean:
                return to_expert(batch.mean(dim=(2, 3), keepdim=True), oracle_std)(batch)
            return to_expert(oracle_mean, batch.std(dim=(2, 3), keepdim=True))(batch)
        return restyle

    def none(batch: torch.Tensor) -> torch.Tensor:
        return rescale_to_expert_norm(batch, mean, std) if detector.use_norm else batch

    restyles: dict[str, Restyle] = {
        "per_image": per_image("channel"),
        "per_image_scalar": per_image("scalar"),
        "none": none,
        "oracle": to_expert(oracle_mean, oracle_std),
        "image_mean_oracle_std": split_rule(True),
        "oracle_mean_image_std": split_rule(False),
        **{f"reference_{count}": to_expert(drawn[count].mean(dim=(0, 2, 3), keepdim=True),
                                           drawn[count].std(dim=(0, 2, 3), keepdim=True))
           for count in REFERENCE_COUNTS if count < len(reference)},
        "test_set": to_expert(test.mean(dim=(0, 2, 3), keepdim=True),
                              test.std(dim=(0, 2, 3), keepdim=True)),
    }
    record["n_reference"] = len(reference)
    record["image_auroc"] = {name: auroc(labels, image_scores(detector, test, restyle))
                             for name, restyle in restyles.items()}
    # Per-image statistics as anomaly scores on their own.
    spread = (test.std(dim=(2, 3)) / (std + eps)).median(dim=1).values
    shift = ((test.mean(dim=(2, 3)) - mean).abs() / (std + eps)).median(dim=1).values
    record["statistic_as_score_auroc"] = {"image_std": auroc(labels, spread.cpu().numpy()),
                                          "image_mean_shift": auroc(labels, shift.cpu().numpy())}
    if args.batch_order:
        orders = {"file_order": np.arange(len(labels)), **{
            f"shuffled_{seed}": np.random.default_rng(seed).permutation(len(labels))
            for seed in range(3)}}
        record["batch_order_auroc"] = {
            name: auroc(labels, image_scores(detector, test, None, order))
            for name, order in orders.items()}
        record["batch_order_auroc"]["one_at_a_time"] = auroc(
            labels, image_scores(detector, test, None, batch_size=1))
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
