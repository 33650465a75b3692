"""The paper's training-time augmentation (section 3.2) on uint8 RGB images, seeded, numpy + OpenCV.

The paper used Keras' ImageDataGenerator with "random rotation (maximum 30 degrees), horizontal flips,
shearing, zooming, cropping and small random noise"; only the rotation limit is given. The values here
(``PAPER_AUGMENTATION``) are the usual ImageDataGenerator settings for those words:

| transform | value |
|---|---|
| rotation | uniform in [-30, +30] degrees (the paper's number) |
| horizontal flip | with probability 0.5 |
| shear | uniform in [-10, +10] degrees |
| zoom | factor uniform in [0.85, 1.15], both axes (> 1 zooms in) |
| crop | a square window of 85-100 % of the side at a random place, stretched back to the full size |
| noise | Gaussian, standard deviation uniform in [0, 5] grey levels (of 255), then rounded and clipped |

Rotation, shear, zoom, crop and flip are one affine map applied with a single ``cv2.warpAffine`` (bilinear,
border replicated = ImageDataGenerator's ``fill_mode="nearest"``), so an image is interpolated once. Every
draw comes from the ``np.random.Generator`` passed in: the same generator state gives the same image.
Augmentation is for training images only; test images are never augmented.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from cxr_transfer.core.hashing import sha256_strings


@dataclass(frozen=True)
class AugmentParams:
    """Ranges of the random transforms (module table). All zero / False = identity."""

    rotation_deg: float = 30.0
    horizontal_flip: bool = True
    shear_deg: float = 10.0
    zoom: float = 0.15           # factor in [1 - zoom, 1 + zoom]
    crop_min: float = 0.85       # smallest crop side as a fraction of the image side (1.0 = no crop)
    noise_std_max: float = 5.0   # grey levels

    def fingerprint(self) -> str:
        """Short identity of the parameters (part of the fast path's cache key)."""
        return sha256_strings([f"{k}={v}" for k, v in sorted(asdict(self).items())])[:12]


PAPER_AUGMENTATION = AugmentParams()
NO_AUGMENTATION = AugmentParams(0.0, False, 0.0, 0.0, 1.0, 0.0)


def random_affine(size: int, rng: np.random.Generator, params: AugmentParams) -> np.ndarray:
    """A 2x3 matrix mapping output pixel coordinates to input coordinates (for WARP_INVERSE_MAP)."""
    theta = math.radians(rng.uniform(-params.rotation_deg, params.rotation_deg))
    shear = math.radians(rng.uniform(-params.shear_deg, params.shear_deg))
    zoom = rng.uniform(1.0 - params.zoom, 1.0 + params.zoom)
    crop = rng.uniform(params.crop_min, 1.0)
    flip = params.horizontal_flip and rng.random() < 0.5
    slack = (1.0 - crop) * size / 2.0
    shift = np.array([rng.uniform(-slack, slack), rng.uniform(-slack, slack)])
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    shearing = np.array([[1.0, -math.sin(shear)], [0.0, math.cos(shear)]])
    linear = rotation @ shearing * (crop / zoom)
    if flip:
        linear = linear @ np.diag([-1.0, 1.0])
    center = np.array([(size - 1) / 2.0, (size - 1) / 2.0])
    offset = center - linear @ center + shift
    return np.hstack([linear, offset[:, None]])


def augment_image(image: np.ndarray, rng: np.random.Generator,
                  params: AugmentParams = PAPER_AUGMENTATION) -> np.ndarray:
    """One randomly augmented copy of a square uint8 RGB image (same shape and dtype)."""
    size = image.shape[0]
    matrix = random_affine(size, rng, params)
    out = cv2.warpAffine(image, matrix, (image.shape[1], size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_REPLICATE)
    sigma = rng.uniform(0.0, params.noise_std_max) if params.noise_std_max > 0 else 0.0
    if sigma > 0:
        noisy = out.astype(np.float32) + rng.normal(0.0, sigma, size=out.shape).astype(np.float32)
        out = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    return out


def augment_batch(images: np.ndarray, rng: np.random.Generator,
                  params: AugmentParams = PAPER_AUGMENTATION) -> np.ndarray:
    """Augment each image of a (N, S, S, 3) uint8 batch independently, drawing from one generator."""
    return np.stack([augment_image(image, rng, params) for image in images]) if len(images) else images.copy()


def copy_rng(sha256: str, copy: int, seed: int = 0) -> np.random.Generator:
    """The generator of one image's augmented copy in the fast path's bank: a function of the image's
    identity and the copy number only, so a cached copy is the same whatever split or run asks for it."""
    return np.random.default_rng([seed, int(sha256[:16], 16), copy])
