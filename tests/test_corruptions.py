"""Corruptions of uint8 image batches (training/corruptions.py): shapes kept, severities ordered, draws seeded."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from training.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from training.data import load_splits


@pytest.fixture(scope="module")
def fashion() -> np.ndarray:
    """200 real Fashion-MNIST test images, uint8 [200, 1, 28, 28]."""
    images: np.ndarray = load_splits("fashion-mnist", subset=200).test.images.numpy()  # type: ignore[attr-defined]
    return images


@pytest.fixture(scope="module")
def colour(fashion: np.ndarray) -> np.ndarray:
    """CIFAR-shaped images, uint8 [64, 3, 32, 32]: three different garments as the channels, padded to 32x32."""
    padded = np.pad(fashion, ((0, 0), (0, 0), (2, 2), (2, 2)))
    return np.concatenate([padded[0:64], padded[64:128], padded[128:192]], axis=1)


def _mean_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.abs(a.astype(np.int16) - b.astype(np.int16))))


@pytest.mark.parametrize("name", list(CORRUPTIONS))
@pytest.mark.parametrize("images_of", ["fashion", "colour"])
def test_shape_and_dtype_are_kept_and_the_input_is_left_alone(name: str, images_of: str,
                                                              request: pytest.FixtureRequest) -> None:
    images: np.ndarray = request.getfixturevalue(images_of)
    before = images.copy()
    for severity in SEVERITIES:
        corrupted = corrupt(images, name, severity, seed=0)
        assert corrupted.shape == images.shape and corrupted.dtype == np.uint8
        assert not np.array_equal(corrupted, images), (name, severity, "changes the images")
    np.testing.assert_array_equal(images, before)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
@pytest.mark.parametrize("images_of", ["fashion", "colour"])
def test_a_higher_severity_moves_the_images_further(name: str, images_of: str,
                                                    request: pytest.FixtureRequest) -> None:
    images: np.ndarray = request.getfixturevalue(images_of)
    differences = [_mean_difference(corrupt(images, name, severity, seed=0), images) for severity in SEVERITIES]
    assert all(later > earlier for earlier, later in pairwise(differences)), (name, differences)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_the_same_seed_gives_the_same_images(name: str, fashion: np.ndarray) -> None:
    np.testing.assert_array_equal(corrupt(fashion, name, 3, seed=7), corrupt(fashion, name, 3, seed=7))


@pytest.mark.parametrize(("name", "draws"), [("gaussian_noise", True), ("rotation", True),
                                             ("gaussian_blur", False), ("contrast", False)])
def test_only_noise_and_rotation_draw_from_the_seed(name: str, draws: bool, fashion: np.ndarray) -> None:
    other = corrupt(fashion, name, 3, seed=8)
    assert np.array_equal(corrupt(fashion, name, 3, seed=7), other) is not draws


def test_noise_is_clipped_not_wrapped_around() -> None:
    black, white = np.zeros((4, 1, 28, 28), np.uint8), np.full((4, 1, 28, 28), 255, np.uint8)
    # A wrapped value would land at the other end of 0..255: 0.1 * 255 = 25.5 standard deviation, 6 of them at most.
    assert corrupt(black, "gaussian_noise", 5).max() < 160 and corrupt(black, "gaussian_noise", 5).max() > 0
    assert corrupt(white, "gaussian_noise", 5).min() > 95 and corrupt(white, "gaussian_noise", 5).min() < 255


def test_rotation_fills_the_corners_with_black_and_turns_both_ways() -> None:
    white = np.full((64, 1, 28, 28), 255, np.uint8)
    rotated = corrupt(white, "rotation", 5, seed=0)
    assert np.all(rotated[:, :, 0, 0] == 0) and np.all(rotated[:, :, 14, 14] == 255)
    bar = np.zeros((64, 1, 28, 28), np.uint8)
    bar[:, :, 13:15, :] = 255
    turned = corrupt(bar, "rotation", 5, seed=0)
    # A horizontal bar turned anticlockwise (positive angle) rises on the right: its top-right quadrant lights up.
    anticlockwise = turned[:, 0, :13, 15:].sum(axis=(1, 2)) > turned[:, 0, :13, :13].sum(axis=(1, 2))
    assert 0 < anticlockwise.sum() < len(bar), "each image's direction is drawn"


def test_contrast_keeps_each_images_mean_and_narrows_its_range(colour: np.ndarray) -> None:
    low = corrupt(colour, "contrast", 5)
    np.testing.assert_allclose(low.mean(axis=(2, 3)), colour.mean(axis=(2, 3)), atol=0.5)
    assert np.all(np.ptp(low, axis=(2, 3)) < np.ptp(colour, axis=(2, 3)))


@pytest.mark.parametrize("severity", [0, 6, -1, 2.0, True])
def test_a_severity_outside_1_to_5_is_refused(severity: object, fashion: np.ndarray) -> None:
    with pytest.raises(ValueError, match="severity must be an integer from 1 to 5"):
        corrupt(fashion, "gaussian_blur", severity)  # type: ignore[arg-type]


def test_an_unknown_corruption_is_refused_with_the_valid_names(fashion: np.ndarray) -> None:
    with pytest.raises(ValueError, match="gaussian_noise, gaussian_blur, rotation, contrast") as raised:
        corrupt(fashion, "shot_noise", 1)
    assert "'shot_noise'" in str(raised.value)


@pytest.mark.parametrize("images", [np.zeros((2, 1, 28, 28), np.float32), np.zeros((1, 28, 28), np.uint8)])
def test_images_that_are_not_uint8_nchw_are_refused(images: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"images must be uint8 \[N, C, H, W\]"):
        corrupt(images, "contrast", 1)
