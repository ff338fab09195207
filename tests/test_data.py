"""Image reading, dataset layouts, loaders and evaluation settings."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iadkit.data import (
    ImageDataset,
    Preprocess,
    generate_dataset,
    load_dataset,
    make_tasks,
    read_folder,
    read_image,
    read_mask,
)
from iadkit.errors import DatasetError, ImageReadError


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


@pytest.mark.parametrize("kind", ["gray", "rgba", "gray16", "palette", "gray_alpha"])
def test_read_image_makes_rgb_uint8(tmp_path: Path, kind: str) -> None:
    rng = np.random.default_rng(0)
    if kind == "gray":
        path = _save(tmp_path / "a.png", rng.integers(0, 255, (9, 7), dtype=np.uint8))
    elif kind == "rgba":
        path = _save(tmp_path / "a.png", rng.integers(0, 255, (9, 7, 4), dtype=np.uint8))
    elif kind == "gray16":
        path = tmp_path / "a.png"
        Image.fromarray(np.full((9, 7), 65535, dtype=np.uint16)).save(path)
    elif kind == "palette":
        path = tmp_path / "a.png"
        Image.fromarray(rng.integers(0, 255, (9, 7, 3), dtype=np.uint8)).convert("P").save(path)
    else:
        path = tmp_path / "a.png"
        Image.fromarray(rng.integers(0, 255, (9, 7, 2), dtype=np.uint8), mode="LA").save(path)
    image = read_image(path)
    assert image.shape == (9, 7, 3) and image.dtype == np.uint8
    if kind == "gray16":
        assert (image == 255).all()  # full 16-bit range maps to full 8-bit range


def test_corrupt_truncated_and_missing_images_name_the_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError, match="garbage.png.*not a readable image"):
        read_image(garbage)
    good = _save(tmp_path / "good.png", np.random.default_rng(0).integers(0, 255, (64, 64, 3),
                                                                          dtype=np.uint8))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageReadError, match="truncated.png.*corrupt or truncated"):
        read_image(truncated)
    with pytest.raises(ImageReadError, match="missing.png: file not found"):
        read_image(tmp_path / "missing.png")


def test_masks_are_binarised_for_0_255_and_0_1_files(tmp_path: Path) -> None:
    values = np.array([[0, 255, 100, 200]], dtype=np.uint8)
    assert read_mask(_save(tmp_path / "m255.png", values)).tolist() == [[False, True, False, True]]
    ones = np.array([[0, 1, 1, 0]], dtype=np.uint8)
    assert read_mask(_save(tmp_path / "m01.png", ones)).tolist() == [[False, True, True, False]]


def test_mvtec_layout_reads_labels_masks_and_categories(toy_root: Path) -> None:
    samples = load_dataset(toy_root)
    assert samples.categories == ["alpha", "beta"]
    alpha = samples.where(category="alpha")
    assert len(alpha.where(split="train")) == 16
    test = alpha.where(split="test")
    assert sorted(set(test.labels)) == [0, 1] and len(test) == 12
    assert all(s.mask_path is not None for s in test if s.label == 1)
    assert all(s.mask_path is None for s in test if s.label == 0)
    assert test.has_masks
    one = load_dataset(toy_root / "beta")  # a category folder on its own works too
    assert one.categories == ["beta"]


def test_category_without_ground_truth_is_image_level_only(tmp_path: Path) -> None:
    root = generate_dataset(tmp_path / "d", n_train=3, n_test_good=2, n_test_defect=2)
    import shutil

    shutil.rmtree(root / "texture" / "ground_truth")
    test = load_dataset(root).where(split="test")
    assert not test.has_masks and all(s.mask_path is None for s in test)


def test_missing_mask_and_empty_train_folder_are_reported(tmp_path: Path, caplog) -> None:
    root = generate_dataset(tmp_path / "d", n_train=3, n_test_good=2, n_test_defect=2)
    mask = next((root / "texture" / "ground_truth").rglob("*_mask.png"))
    mask.unlink()
    with caplog.at_level("WARNING", logger="iadkit"):  # training never reads test masks
        samples = load_dataset(root)
    assert "has no mask" in caplog.text
    assert not samples.where(category="texture", split="test").has_masks
    empty = tmp_path / "empty" / "cat"
    (empty / "train" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no training images"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(DatasetError, match="unknown dataset layout"):
        load_dataset(tmp_path / "d" / "texture" / "test")


def test_btad_layout_with_bmp_images_and_unsuffixed_masks(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    category = tmp_path / "btad" / "03"
    for i in range(3):
        _save(category / "train" / "ok" / f"{i:04d}.bmp", rng.integers(0, 255, (16, 16, 3),
                                                                        dtype=np.uint8))
    _save(category / "test" / "ok" / "0000.bmp", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    _save(category / "test" / "ko" / "0001.bmp", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    _save(category / "ground_truth" / "ko" / "0001.png", np.full((16, 16), 255, dtype=np.uint8))
    samples = load_dataset(tmp_path / "btad")
    test = samples.where(split="test")
    assert len(samples.where(split="train")) == 3
    assert [s.label for s in test] == [1, 0]
    assert test[0].mask_path.name == "0001.png"


def test_visa_split_csv(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    rows = [["object", "split", "label", "image", "mask"]]
    for i in range(4):
        image = f"candle/Data/Images/Normal/{i}.JPG"
        _save(tmp_path / image, rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
        rows.append(["candle", "train" if i < 3 else "test", "normal", image, ""])
    _save(tmp_path / "candle/Data/Images/Anomaly/9.JPG", rng.integers(0, 255, (8, 8, 3),
                                                                       dtype=np.uint8))
    _save(tmp_path / "candle/Data/Masks/Anomaly/9.png", np.full((8, 8), 255, dtype=np.uint8))
    rows.append(["candle", "test", "anomaly", "candle/Data/Images/Anomaly/9.JPG",
                 "candle/Data/Masks/Anomaly/9.png"])
    (tmp_path / "split_csv").mkdir()
    with (tmp_path / "split_csv" / "1cls.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    samples = load_dataset(tmp_path)
    assert samples.categories == ["candle"]
    assert len(samples.where(split="train")) == 3
    assert samples.where(split="test").labels == [0, 1]


def test_mvtec3d_rgb_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    category = tmp_path / "bagel"
    for split, defect in (("train", "good"), ("validation", "good"), ("test", "good"),
                          ("test", "crack")):
        _save(category / split / defect / "rgb" / "000.png",
              rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    _save(category / "test" / "crack" / "gt" / "000.png", np.full((8, 8), 255, dtype=np.uint8))
    samples = load_dataset(tmp_path)
    assert len(samples.where(split="val")) == 1
    assert samples.where(split="test", label=1)[0].mask_path.parent.name == "gt"


def test_folder_dataset_and_subclasses_csv(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    for i in range(10):
        _save(tmp_path / "normal" / f"n{i}.png", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    _save(tmp_path / "bad" / "b0.png", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    _save(tmp_path / "masks" / "b0_mask.png", np.full((8, 8), 255, dtype=np.uint8))
    samples = read_folder(tmp_path / "normal", tmp_path / "bad", tmp_path / "masks",
                          test_fraction=0.2)
    assert len(samples.where(split="train")) == 8
    assert samples.where(label=1)[0].mask_path.name == "b0_mask.png"

    root = generate_dataset(tmp_path / "sub", n_train=4, n_test_good=2, n_test_defect=2)
    category = root / "texture"
    with (category / "subclasses.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "subclass"])
        for path in sorted(category.rglob("*.png")):
            if "ground_truth" not in path.parts:
                writer.writerow([path.relative_to(category), "x" if path.stem < "002" else "y"])
    subclasses = load_dataset(root).subclasses
    assert subclasses == ["x", "y"]


def test_mask_size_mismatch_names_both_files(tmp_path: Path) -> None:
    root = generate_dataset(tmp_path / "d", n_train=2, n_test_good=1, n_test_defect=1, size=32)
    mask = next((root / "texture" / "ground_truth").rglob("*_mask.png"))
    Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(mask)
    test = load_dataset(root).where(split="test", label=1)
    with pytest.raises(ImageReadError, match="mask size 20x20 differs from image"):
        ImageDataset(test, Preprocess(32))[0]


def test_preprocess_shapes_and_exact_binary_masks() -> None:
    preprocess = Preprocess(40, crop_size=32)
    image = preprocess.image(np.zeros((50, 70, 3), dtype=np.uint8))
    mask = preprocess.mask(np.ones((50, 70), dtype=bool))
    assert image.shape == (3, 32, 32) and float(image.max()) == 0.0
    assert mask.shape == (32, 32) and set(mask.unique().tolist()) == {1.0}


def test_settings_make_the_right_tasks(toy_root: Path) -> None:
    samples = load_dataset(toy_root)
    one_class = make_tasks(samples, "one-class")
    assert [t.name for t in one_class] == ["alpha", "beta"]
    assert all(set(t.train.categories) == {t.name} for t in one_class)
    unified = make_tasks(samples, "model-unified")
    assert len(unified) == 1 and set(unified[0].test_groups) == {"alpha", "beta"}
    assert not unified[0].pooled and make_tasks(samples, "absolute-unified")[0].pooled
    unseen = make_tasks(samples, "unseen-subclass", unseen_subclasses=["beta"])[0]
    assert unseen.train.categories == ["alpha"] and list(unseen.test_groups) == ["beta"]
    with pytest.raises(DatasetError, match="unknown subclasses"):
        make_tasks(samples, "unseen-subclass", unseen_subclasses=["gamma"])


def test_batches_carry_category_and_subclass(toy_root: Path) -> None:
    from iadkit.data import make_loader

    samples = load_dataset(toy_root)
    batch = next(iter(make_loader(samples.where(split="train"), Preprocess(32), batch_size=40)))
    assert set(batch["category"]) == {"alpha", "beta"} and set(batch["subclass"]) == {""}
    assert batch["image"].shape == (32, 3, 32, 32) and batch["index"].tolist() == list(range(32))


def test_texture_ad_layout_gives_categories_and_subclass_folders(tmp_path: Path) -> None:
    root = tmp_path / "texture_ad"
    generate_dataset(root / "cloth", categories=("sub1", "sub2"), n_train=3, n_test_good=1,
                     n_test_defect=2, size=32)
    generate_dataset(root / "metal", categories=("sub1",), n_train=2, n_test_good=1,
                     n_test_defect=1, size=32)
    samples = load_dataset(root)  # detected
    assert samples.categories == ["cloth", "metal"]
    cloth = samples.where(category="cloth")
    assert cloth.subclasses == ["sub1", "sub2"] and len(cloth) == 12
    assert all(s.mask_path is not None for s in cloth.where(split="test", label=1))
    # One category folder, named explicitly; then the paper's protocol: seen sub1, unseen sub2.
    one = load_dataset(root / "cloth", layout="texture-ad")
    assert [s.image_path for s in one] == [s.image_path for s in cloth]
    (task,) = make_tasks(one, "unseen-subclass", unseen_subclasses=["sub2"])
    assert {s.subclass for s in task.train} == {"sub1"}
    assert list(task.test_groups) == ["sub2"]
    with pytest.raises(DatasetError, match="no category \\['wafer'\\]"):
        load_dataset(root, ["wafer"], layout="texture-ad")
