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


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """Apply steps 2 and 3 of the module rule to an opened, oriented Pillow image."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float32)
        scale = 255.0 / 65535.0
        grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "F":
        values = np.asarray(image, dtype=np.float32)
        lo, hi = float(values.min()), float(values.max())
        grey = np.zeros_like(values, dtype=np.uint8) if hi <= lo else \
            np.rint((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        alpha = rgba[:, :, 3:4] / 255.0
        return np.rint(rgba[:, :, :3] * alpha).astype(np.uint8)
    if mode == "L":
        grey = np.asarray(image, dtype=np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "1":
        grey = np.asarray(image.convert("L"), dtype=np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def resize_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """Step 4: stretch to size x size (no crop, no padding), area-averaged when shrinking."""
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
            image = ImageOps.exif_transpose(image)
            rgb = _to_rgb_array(image)
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc
    if rgb.ndim != 3 or rgb.shape[0] < 2 or rgb.shape[1] < 2:
        raise ImageDecodeError(f"{path}: degenerate image of shape {rgb.shape}")
    return resize_square(rgb, size) if size is not None else rgb


@dataclass(frozen=True)
class ImageView:
    """A deterministic change applied to every resized image before the network (e.g. the audit's masks).

    The name is part of the cache file name, so features of different views never mix.
    """

    name: str
    apply: Callable[[np.ndarray], np.ndarray]


def _decode(sample: "Sample", size: int, view: ImageView | None) -> np.ndarray | str:
    try:
        image = read_rgb(sample.path, size)
    except ImageDecodeError as exc:
        return str(exc)
    return view.apply(image) if view else image


def decoded_batches(samples: "list[Sample]", size: int, batch_size: int, workers: int,
                    view: ImageView | None = None, ahead: int = 2
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
            pending.append((batch, [pool.submit(_decode, s, size, view) for s in batch]))
            if len(pending) > ahead:
                yield collect(*pending.popleft())
        while pending:
            yield collect(*pending.popleft())
