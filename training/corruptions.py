"""Common corruptions of uint8 image batches [N, C, H, W], at severities 1 (mild) to 5 (harsh).

In the spirit of Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations" (ICLR 2019): the same images, shifted by a known kind and amount,
to see how a model's answers (and the drift score on them) move. Noise, blur and contrast take
CIFAR-10-C's parameters (its 32x32 images are close to Fashion-MNIST's 28x28 in scale). Rotation
is not an ImageNet-C corruption, so its angles are ours: they stop at 30 degrees because beyond
about 45 a Fashion-MNIST ensemble answers many turned garments confidently (as bags), and a
shift meant to grow would then look smaller to every confidence-based signal.

==============  =================================================  ====  ====  ====  ====  ====
corruption      parameter                                          1     2     3     4     5
==============  =================================================  ====  ====  ====  ====  ====
gaussian_noise  noise standard deviation, pixels scaled to [0, 1]  0.04  0.06  0.08  0.09  0.10
gaussian_blur   kernel standard deviation, in pixels               0.4   0.6   0.7   0.8   1.0
rotation        angle in degrees, its direction drawn per image    5     10    15    20    30
contrast        factor on each pixel's distance from its image's   0.75  0.5   0.4   0.3   0.15
                (and channel's) mean
==============  =================================================  ====  ====  ====  ====  ====

Every result is uint8 again, rounded and clipped to 0..255; rotation is bilinear and fills the
uncovered corners with 0. A corruption is deterministic given its numpy Generator (noise and
rotation draw from it, blur and contrast do not).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torchvision.transforms.v2.functional as F

SEVERITIES = (1, 2, 3, 4, 5)
NOISE_STD = (0.04, 0.06, 0.08, 0.09, 0.10)
BLUR_SIGMA = (0.4, 0.6, 0.7, 0.8, 1.0)
ROTATION_DEGREES = (5.0, 10.0, 15.0, 20.0, 30.0)
CONTRAST_FACTOR = (0.75, 0.5, 0.4, 0.3, 0.15)

Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]
"""(uint8 images [N, C, H, W], severity 1..5, generator) -> corrupted uint8 images of the same shape."""


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    result: np.ndarray = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return result


def gaussian_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Independent Gaussian noise on every pixel (NOISE_STD of the 0..255 range)."""
    std = NOISE_STD[severity - 1] * 255.0
    return _to_uint8(images.astype(np.float64) + rng.normal(0.0, std, images.shape))


def gaussian_blur(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A Gaussian blur of BLUR_SIGMA pixels (deterministic: `rng` is not drawn from)."""
    sigma = BLUR_SIGMA[severity - 1]
    # +-3 sigma holds all but 0.3 % of the kernel's weight; the kernel size must be odd.
    size = 2 * math.ceil(3 * sigma) + 1
    blurred = F.gaussian_blur(torch.from_numpy(np.ascontiguousarray(images)), kernel_size=[size, size],
                              sigma=[sigma, sigma])
    result: np.ndarray = blurred.numpy()
    return result


def rotation(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A rotation about the centre by ROTATION_DEGREES, clockwise or not at random per image (bilinear)."""
    angle = ROTATION_DEGREES[severity - 1]
    # Both directions, so that a model which happens to tolerate one better does not hide the shift.
    clockwise = rng.random(len(images)) < 0.5
    pixels = torch.from_numpy(np.ascontiguousarray(images))
    result = np.empty_like(images)
    for mask, signed in ((clockwise, -angle), (~clockwise, angle)):
        if mask.any():
            result[mask] = F.rotate(pixels[torch.from_numpy(mask)], signed,
                                    interpolation=F.InterpolationMode.BILINEAR, fill=[0.0]).numpy()
    return result


def contrast(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Each image's pixels pulled towards their own per-channel mean by CONTRAST_FACTOR (deterministic)."""
    factor = CONTRAST_FACTOR[severity - 1]
    pixels = images.astype(np.float64)
    means = pixels.mean(axis=(2, 3), keepdims=True)
    return _to_uint8((pixels - means) * factor + means)


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise,
    "gaussian_blur": gaussian_blur,
    "rotation": rotation,
    "contrast": contrast,
}


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """`images` (uint8 [N, C, H, W]) under corruption `name` at `severity` (1..5), drawn from `seed`."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}: choose one of {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, int | np.integer) or severity not in SEVERITIES:
        raise ValueError(f"severity must be an integer from {SEVERITIES[0]} to {SEVERITIES[-1]}, got {severity!r}")
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {images.shape}")
    return CORRUPTIONS[name](images, int(severity), np.random.default_rng(seed))
