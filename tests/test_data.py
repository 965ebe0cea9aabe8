from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import (
    FASHION_MNIST_DIR,
    ImageTensors,
    augment_batch,
    load_splits,
    make_batches,
    read_idx,
)
from training.errors import UsageError


def test_read_idx_round_trip(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(struct.pack(">HBB3I", 0, 0x08, 3, 2, 3, 4) + images.tobytes())
    assert np.array_equal(read_idx(path), images)
    (tmp_path / "bad").write_bytes(struct.pack(">HBB1I", 0, 0x0D, 1, 4) + b"\0" * 16)
    with pytest.raises(UsageError, match="unsigned-byte IDX"):
        read_idx(tmp_path / "bad")


def test_synthetic_splits_and_batches() -> None:
    splits = load_splits("synthetic")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1000, 200, 500)
    batches = list(make_batches(splits.train, splits.info, 128, train=True, seed=7))
    images, labels = batches[0]
    assert images.dtype == torch.float32 and images.shape == (128, 1, 16, 16)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert labels.dtype == torch.int64
    assert sum(len(b[1]) for b in batches) == 1000
    again = next(iter(make_batches(splits.train, splits.info, 128, train=True, seed=7)))
    other = next(iter(make_batches(splits.train, splits.info, 128, train=True, seed=8)))
    assert torch.equal(again[0], images), "the same seed replays the same batches"
    assert not torch.equal(other[1], labels), "another seed shuffles differently"
    ordered = next(iter(make_batches(splits.test, splits.info, 500, train=False)))
    assert torch.equal(ordered[1], splits.test.labels), "evaluation keeps the split's order"  # type: ignore[attr-defined]


def test_augment_batch_crops_and_flips_per_image() -> None:
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).reshape(2, 1, 4, 4)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(augment_batch(images, 0, False, generator), images)
    crops = torch.stack([augment_batch(images, 1, False, torch.Generator().manual_seed(s)) for s in range(30)])
    assert crops.shape == (30, 2, 1, 4, 4)
    # Every crop is a shifted window of the zero-padded image: its non-zero pixels come from the original.
    assert set(crops[crops > 0].tolist()) <= set(images.flatten().tolist())
    assert len({tuple(c[0].flatten().tolist()) for c in crops}) > 3, "offsets vary"
    flipped = [augment_batch(images, 0, True, torch.Generator().manual_seed(s)) for s in range(20)]
    assert any(torch.equal(f[0], images[0].flip(-1)) for f in flipped)
    assert any(torch.equal(f[0], images[0]) for f in flipped)


def test_fashion_mnist_from_the_debian_package() -> None:
    splits = load_splits("fashion-mnist", subset=1000)
    assert splits.info.num_classes == 10 and splits.info.in_channels == 1
    assert splits.train.images.shape == (1000, 1, 28, 28)  # type: ignore[attr-defined]
    assert set(splits.test.labels.tolist()) == set(range(10))  # type: ignore[attr-defined]
    full = load_splits("fashion-mnist", FASHION_MNIST_DIR)
    assert (len(full.train), len(full.val), len(full.test)) == (55000, 5000, 10000)
    # The validation split is held out of train: no image is in both.
    train_hashes = {hash(image.numpy().tobytes()) for image in full.train.images[:20000]}  # type: ignore[attr-defined]
    overlap = sum(hash(image.numpy().tobytes()) in train_hashes for image in full.val.images)  # type: ignore[attr-defined]
    assert overlap < 10, "only exact-duplicate images may appear in both"
    again = load_splits("fashion-mnist", val_size=5000)
    assert torch.equal(again.val.labels, full.val.labels), "the split does not depend on anything but its seed"  # type: ignore[attr-defined]


def test_missing_data_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="apt-get install dataset-fashion-mnist"):
        load_splits("fashion-mnist", tmp_path / "nowhere")
    with pytest.raises(UsageError, match="--download"):
        load_splits("cifar10", tmp_path)
    with pytest.raises(UsageError, match="unknown dataset 'mnist': choose one of"):
        load_splits("mnist")


def test_image_folder(tmp_path: Path) -> None:
    for split, count in (("train", 12), ("test", 4)):
        for label in ("cat", "dog"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for index in range(count):
                value = 40 if label == "cat" else 200
                Image.fromarray(np.full((40, 30, 3), value + index, dtype=np.uint8)).save(folder / f"{index}.png")
    splits = load_splits("imagefolder", tmp_path, image_size=16)
    assert splits.info.classes == ("cat", "dog")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (22, 2, 8)
    images, labels = next(iter(make_batches(splits.train, splits.info, 8, train=True, seed=1)))
    assert images.shape == (8, 3, 16, 16) and images.dtype == torch.float32
    assert set(labels.tolist()) <= {0, 1}


def test_image_tensors_validate() -> None:
    with pytest.raises(ValueError, match="uint8"):
        ImageTensors(torch.zeros(2, 1, 4, 4), torch.zeros(2))


def _folder(root: Path, split: str, classes: dict[str, int], shape: tuple[int, ...]) -> None:
    for label, count in classes.items():
        folder = root / split / label
        folder.mkdir(parents=True)
        for index in range(count):
            Image.fromarray(np.full(shape, 30 * index % 255, dtype=np.uint8)).save(folder / f"{index}.png")


def test_image_folder_grey_with_its_own_validation_split_and_a_held_out_test(tmp_path: Path) -> None:
    _folder(tmp_path, "train", {"a": 15, "b": 15}, (20, 24))
    _folder(tmp_path, "val", {"a": 3, "b": 2}, (20, 24))
    splits = load_splits("imagefolder", tmp_path, image_size=12)
    assert splits.info.in_channels == 1 and splits.info.mean == (0.449,)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (27, 5, 3), "val/ replaces the held-out split"
    image, label = splits.val[0]
    assert image.shape == (1, 12, 12) and image.dtype == torch.uint8 and label in (0, 1)
    with pytest.raises(UsageError, match="leave out --val-size"):
        load_splits("imagefolder", tmp_path, val_size=3, image_size=12)


def test_image_folder_problems_are_named(tmp_path: Path) -> None:
    _folder(tmp_path, "train", {"a": 4, "b": 4}, (8, 8, 3))
    _folder(tmp_path, "test", {"a": 2, "c": 2}, (8, 8, 3))
    with pytest.raises(UsageError, match=r"missing \['b'\]; not in train \['c'\]"):
        load_splits("imagefolder", tmp_path, image_size=8)
    (tmp_path / "test" / "c").rename(tmp_path / "test" / "b")
    (tmp_path / "train" / "a" / "broken.png").write_bytes(b"not a png")
    splits = load_splits("imagefolder", tmp_path, image_size=8)
    broken = next(index for index, (path, _) in enumerate(splits.train.files)  # type: ignore[attr-defined]
                  if path.name == "broken.png")
    with pytest.raises(UsageError, match=r"broken\.png is not an image"):
        splits.train[broken]
    with pytest.raises(UsageError, match="needs --data-dir"):
        load_splits("imagefolder", tmp_path / "nowhere")
