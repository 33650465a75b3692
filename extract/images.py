"""Decode any chest X-ray file to an RGB uint8 array, the same documented way everywhere.

The rule (README, "How images are read"):
1. Pillow opens the file; the EXIF orientation tag is applied (phone photos of films are often rotated).
2. 16-bit greyscale ("I;16", "I") is scaled linearly to 8 bit: 65535 -> 255.
3. Transparency (RGBA, LA, palette with transparency) is composited onto black, the background of a
   radiograph; palette, CMYK and other modes are converted to RGB; greyscale is copied to 3 channels.
4. The image is resized to the network's square input with no crop and no padding (what the paper's
   Keras ImageDataGenerator did): OpenCV INTER_AREA when shrinking, INTER_LINEAR when enlarging.

For JPEG, Pillow's draft mode lets libjpeg decode directly at 1/2, 1/4 or 1/8 scale when the result is
still at least the target size: a 4000 px covid figure then costs a fraction of a full decode.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cxr_transfer.core.errors import CxrError
from cxr_transfer.extract.dicom import DicomReadError, is_dicom_file, read_dicom_rgb

if TYPE_CHECKING:
    from cxr_transfer.extract.dataset import Sample

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

MAX_PIXELS = 120_000_000
"""Larger images are refused as decompression bombs (checked from the header, before any pixel is decoded;
Pillow's own global limit is left as the user set it)."""


class ImageDecodeError(CxrError):
    """The file is not a readable image (zero bytes, truncated, not an image at all)."""


def is_image_file(path: Path) -> bool:
    """True for files whose suffix is one cxr-transfer reads (case-insensitive), and DICOM files
    (``extract/dicom.py``: .dcm, or no suffix and the DICM preamble)."""
    return path.suffix.lower() in IMAGE_SUFFIXES or is_dicom_file(path)


def _to_pixels(image: Image.Image) -> np.ndarray:
    """Apply steps 2 and 3 of the module rule to an opened, oriented Pillow image.

    Greyscale sources stay one channel (H, W) here: resizing one channel and copying it to three afterwards
    gives the same bytes as resizing three equal channels (OpenCV treats channels independently), at a third
    of the cost. Everything else is RGB (H, W, 3).
    """
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float32)
        scale = 255.0 / 65535.0
        return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    if mode == "F":
        values = np.asarray(image, dtype=np.float32)
        lo, hi = float(values.min()), float(values.max())
        return np.zeros_like(values, dtype=np.uint8) if hi <= lo else \
            np.rint((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        return _composite_on_black(np.asarray(image if mode == "RGBA" else image.convert("RGBA"), dtype=np.uint8))
    if mode == "L":
        return np.asarray(image, dtype=np.uint8)
    if mode == "1":
        return np.asarray(image.convert("L"), dtype=np.uint8)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _composite_on_black(rgba: np.ndarray) -> np.ndarray:
    """round(colour * alpha / 255) in exact integer arithmetic.

    With x = c * a + 128, (x + (x >> 8)) >> 8 is c * a / 255 rounded to the nearest integer for every c, a in
    0..255 (c * a is an integer, so it is never exactly halfway): the same bytes as the float formula this
    replaced, 10x faster. Fully opaque images (most RGBA figures) skip the arithmetic.
    """
    alpha = rgba[:, :, 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[:, :, :3])
    weighted = rgba[:, :, :3] * alpha[:, :, None].astype(np.uint16)
    weighted += 128
    weighted += weighted >> 8
    weighted >>= 8
    return weighted.astype(np.uint8)


def _as_rgb(pixels: np.ndarray) -> np.ndarray:
    """(H, W) greyscale -> (H, W, 3) with three equal channels; RGB passes through."""
    if pixels.ndim == 2:
        return np.repeat(pixels[:, :, None], 3, axis=2)
    return pixels


def resize_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """Step 4: stretch to size x size (no crop, no padding), area-averaged when shrinking.

    Works on (H, W, C) and on single-channel (H, W) arrays alike.
    """
    height, width = rgb.shape[:2]
    if (height, width) == (size, size):
        return rgb
    shrinking = height * width >= size * size
    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def read_rgb(path: str | Path, size: int | None = None) -> np.ndarray:
    """Read one image file as an RGB uint8 array (H, W, 3), resized to (size, size) when size is given.

    DICOM files are read by ``extract/dicom.py``'s rule, then resized by the same step 4.
    Raises ImageDecodeError naming the file when it cannot be decoded.
    """
    path = Path(path)
    if is_dicom_file(path):
        try:
            rgb = read_dicom_rgb(path)
        except DicomReadError as exc:
            raise ImageDecodeError(str(exc)) from exc
        check_not_degenerate(path, rgb)
        return resize_square(rgb, size) if size is not None else rgb
    try:
        if path.stat().st_size == 0:
            raise ImageDecodeError(f"{path}: empty file (0 bytes)")
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:
                raise ImageDecodeError(f"{path}: {image.width}x{image.height} pixels is over the limit of "
                                       f"{MAX_PIXELS:,} (a decompression bomb, not an X-ray)")
            if size is not None and image.format == "JPEG":
                image.draft(image.mode if image.mode in ("L", "RGB") else None, (size, size))
            image.load()
            ImageOps.exif_transpose(image, in_place=True)     # no copy when there is nothing to turn
            pixels = _to_pixels(image)
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc
    except Exception as exc:  # noqa: BLE001 - a decoder failing on one file in any other way: that file's skip
        raise ImageDecodeError(f"{path}: cannot read image ({type(exc).__name__})") from exc
    check_not_degenerate(path, pixels)
    return _as_rgb(resize_square(pixels, size) if size is not None else pixels)


MIN_SIDE = 2
"""Images with a side shorter than this are skipped as degenerate, whatever their format (PNG, DICOM, ...)."""


def check_not_degenerate(path: str | Path, pixels: np.ndarray) -> None:
    """Raise ImageDecodeError for pixels that are not an image (H, W) or (H, W, C) of at least MIN_SIDE per side.

    The one rule for every format, so a 1x1 DICOM and a 1x1 PNG give the same reason.
    """
    if pixels.ndim not in (2, 3) or pixels.shape[0] < MIN_SIDE or pixels.shape[1] < MIN_SIDE:
        size = "x".join(str(n) for n in pixels.shape[:2]) if pixels.ndim >= 2 else str(pixels.shape)
        raise ImageDecodeError(f"{path}: degenerate image of {size} pixels (at least {MIN_SIDE}x{MIN_SIDE} is read)")


@dataclass(frozen=True)
class ImageMask:
    """A deterministic change applied to every resized image before the network (the audit's masks).

    The name is part of the cache file name, so features of different masks never mix.
    """

    name: str
    apply: Callable[[np.ndarray], np.ndarray]


CENTER_FRACTION = 0.8
"""Side fraction of the central box blacked out by the no-center mask."""
BORDER_FRACTION = 0.05
"""Width of the frame the border-only mask keeps, as a fraction of the side."""


def mask_center(image: np.ndarray, fraction: float = CENTER_FRACTION) -> np.ndarray:
    """A copy of ``image`` (H x W x C) with the central box of ``fraction`` of each side set to 0."""
    out = np.array(image, copy=True)
    height, width = out.shape[:2]
    dy, dx = round(height * (1 - fraction) / 2), round(width * (1 - fraction) / 2)
    out[dy:height - dy, dx:width - dx] = 0
    return out


def border_only(image: np.ndarray, band: float = BORDER_FRACTION) -> np.ndarray:
    """A copy of ``image`` with everything but an outer frame ``band`` of each side wide set to 0."""
    out = np.array(image, copy=True)
    height, width = out.shape[:2]
    dy, dx = max(1, round(height * band)), max(1, round(width * band))
    out[dy:height - dy, dx:width - dx] = 0
    return out


NO_CENTER = ImageMask(f"nocenter{round(CENTER_FRACTION * 100)}", mask_center)
BORDER_ONLY = ImageMask(f"border{round(BORDER_FRACTION * 100):02d}", border_only)


def _decode(sample: "Sample", size: int, mask: ImageMask | None) -> np.ndarray | str:
    try:
        image = read_rgb(sample.path, size)
    except ImageDecodeError as exc:
        return str(exc)
    return mask.apply(image) if mask else image


def decoded_batches(samples: "list[Sample]", size: int, batch_size: int, workers: int,
                    mask: ImageMask | None = None, ahead: int = 2
                    ) -> Iterator[tuple[list[Sample], np.ndarray, list[tuple[Sample, str]]]]:
    """Yield (samples, uint8 batch, failures) while the next ``ahead`` batches decode in threads.

    Memory stays bounded by (ahead + 1) batches whatever the number of samples.
    """
    pending: deque[tuple[list[Sample], list[Future]]] = deque()

    def collect(batch: list[Sample], futures: list[Future]):
        good, arrays, failures = [], [], []
        for sample, future in zip(batch, futures):
            result = future.result()
            if isinstance(result, str):
                failures.append((sample, result))
            else:
                good.append(sample)
                arrays.append(result)
        stacked = np.stack(arrays) if arrays else np.empty((0, size, size, 3), np.uint8)
        return good, stacked, failures

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(samples), batch_size):
            batch = samples[start:start + batch_size]
            pending.append((batch, [pool.submit(_decode, s, size, mask) for s in batch]))
            if len(pending) > ahead:
                yield collect(*pending.popleft())
        while pending:
            yield collect(*pending.popleft())
