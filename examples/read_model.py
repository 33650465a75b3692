#!/usr/bin/env python
"""Run a model written by ``cxr-transfer export-model`` with only numpy, Pillow and onnxruntime.

    python read_model.py model.onnx IMAGE_OR_FOLDER [...]

Prints one CSV line per image: path, predicted class, one probability per class; an unreadable image is
skipped with a line on stderr (exit status 1). The file is checked first: its
last 82 bytes hold ``model_sha256``, the sha256 of every byte before them; a changed file is refused.

Images are read the way cxr-transfer reads them (cxr_transfer/extract/images.py, ``read_rgb``): Pillow decodes
(JPEG in draft mode, at no less than the input size), the EXIF orientation is applied, 16-bit
grey is scaled by 255/65535, transparency is composited onto black, other modes become RGB, and the image is
stretched to the model's square input with no crop or padding: area-averaged when shrinking (H*W >= S*S), bilinear
when enlarging. cxr-transfer does the resize with OpenCV; ``resize`` below is OpenCV's INTER_AREA and
INTER_LINEAR arithmetic for uint8 written in numpy. DICOM files are not read here.
"""
from __future__ import annotations

import csv
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
HASH_PREFIX = b"\x72\x50\x0a\x0cmodel_sha256\x12\x40"


def load_model(path: str | Path) -> tuple[ort.InferenceSession, dict[str, str]]:
    """The checked model's session and its metadata (class names, input size, resize rule, hashes...)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        sys.exit(f"error: {path}: cannot read the model ({exc.strerror or exc})")
    end = len(HASH_PREFIX) + 64
    if len(data) < end or data[-end:-64] != HASH_PREFIX:
        sys.exit(f"error: {path}: no model_sha256 at its end: not a model written by cxr-transfer export-model")
    if hashlib.sha256(data[:-end]).hexdigest().encode("ascii") != data[-64:]:
        sys.exit(f"error: {path}: its bytes differ from the model_sha256 recorded in it; refusing a changed model")
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session, dict(session.get_modelmeta().custom_metadata_map)


def to_pixels(image: Image.Image) -> np.ndarray:
    """Pillow image -> uint8 (H, W) grey or (H, W, 3) RGB, by cxr-transfer's mode rules."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float32)
        return np.clip(np.rint(values * np.float32(255.0 / 65535.0)), 0, 255).astype(np.uint8)
    if mode == "F":
        values = np.asarray(image, dtype=np.float32)
        lo, hi = float(values.min()), float(values.max())
        return np.zeros_like(values, dtype=np.uint8) if hi <= lo else \
            np.rint((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = np.asarray(image if mode == "RGBA" else image.convert("RGBA"), dtype=np.uint8)
        alpha = rgba[:, :, 3]
        if alpha.min() == 255:
            return np.ascontiguousarray(rgba[:, :, :3])
        weighted = rgba[:, :, :3] * alpha[:, :, None].astype(np.uint16) + 128
        return ((weighted + (weighted >> 8)) >> 8).astype(np.uint8)   # round(colour * alpha / 255)
    if mode == "L":
        return np.asarray(image, dtype=np.uint8)
    if mode == "1":
        return np.asarray(image.convert("L"), dtype=np.uint8)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _area_table(source: int, target: int) -> list[tuple[int, int, np.float32]]:
    """OpenCV's computeResizeAreaTab: (target index, source index, weight) in OpenCV's order."""
    scale, table = 1.0 / (target / source), []   # OpenCV's scale: the inverse of target / source
    for d in range(target):
        f1 = d * scale
        f2 = f1 + scale
        cell = min(scale, source - f1)
        s2 = min(int(np.floor(f2)), source - 1)
        s1 = min(int(np.ceil(f1)), s2)
        if s1 - f1 > 1e-3:
            table.append((d, s1 - 1, np.float32((s1 - f1) / cell)))
        table += [(d, s, np.float32(1.0 / cell)) for s in range(s1, s2)]
        if f2 - s2 > 1e-3:
            table.append((d, s2, np.float32(min(min(f2 - s2, 1.0), cell) / cell)))
    return table


def _area(pixels: np.ndarray, size: int) -> np.ndarray:
    """OpenCV INTER_AREA for a shrink by a non-integer factor: float32 sums in OpenCV's order, rounded half to even."""
    height, width = pixels.shape[:2]
    xtab, ytab = _area_table(width, size), _area_table(height, size)
    rows = np.zeros((height, size) + pixels.shape[2:], np.float32)   # the horizontal pass of every source row
    for d, s, weight in xtab:
        rows[:, d] += pixels[:, s].astype(np.float32) * weight
    out = np.zeros((size, size) + pixels.shape[2:], np.float32)
    started = np.zeros(size, bool)
    for d, s, weight in ytab:
        if started[d]:
            out[d] += weight * rows[s]
        else:
            out[d], started[d] = weight * rows[s], True
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _area_integer(pixels: np.ndarray, size: int, fy: int, fx: int) -> np.ndarray:
    """OpenCV INTER_AREA for a shrink by whole factors: the block mean; (sum + 2) >> 2 for 2x2 blocks, else the
    sum times float32(1 / area), rounded half to even."""
    height, width = pixels.shape[:2]
    blocks = pixels.reshape((size, fy, size, fx) + pixels.shape[2:]).astype(np.int32).sum(axis=(1, 3))
    if fy == fx == 2:
        return ((blocks + 2) >> 2).astype(np.uint8)
    return np.clip(np.rint(blocks.astype(np.float32) * np.float32(1.0 / (fy * fx))), 0, 255).astype(np.uint8)


def _linear_table(source: int, target: int, area: bool, rows: bool) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV INTER_LINEAR's source index and 11-bit fixed-point weights per target index (``area``: the weights
    OpenCV's INTER_AREA uses when one side grows)."""
    scale, d = 1.0 / (target / source), np.arange(target)
    if area:
        index = np.floor(d * scale).astype(np.int64)
        f = ((d + 1) - (index + 1) * (target / source)).astype(np.float32)
        f = np.where(f <= 0, np.float32(0), f - np.floor(f)).astype(np.float32)
    else:
        f = ((d + 0.5) * scale - 0.5).astype(np.float32)
        index = np.floor(f).astype(np.int64)
        f = f - index
    if not rows:   # columns beyond the edge take the edge pixel; rows beyond it blend the edge row with itself
        f = np.where(index < 0, 0, f)
        index = np.where(index < 0, 0, index)
        f = np.where(index >= source - 1, 0, f)
        index = np.minimum(index, source - 1)
    weights = [np.rint((np.float32(1) - f) * np.float32(2048)), np.rint(f * np.float32(2048))]   # 11-bit fixed point
    return index, np.stack(weights, axis=1).astype(np.int64)


def _linear(pixels: np.ndarray, size: int, area: bool = False) -> np.ndarray:
    """OpenCV INTER_LINEAR for uint8: horizontal pass in integers, vertical pass as its SIMD code rounds."""
    height, width = pixels.shape[:2]
    xi, xw = _linear_table(width, size, area, rows=False)
    yi, yw = _linear_table(height, size, area, rows=True)
    source = pixels.astype(np.int64)
    nxt = np.minimum(xi + 1, width - 1)
    extra = (1,) * (pixels.ndim - 2)
    rows = source[:, xi] * xw[:, 0].reshape((-1,) + extra) + source[:, nxt] * xw[:, 1].reshape((-1,) + extra)
    top, bottom = rows[np.clip(yi, 0, height - 1)], rows[np.clip(yi + 1, 0, height - 1)]
    b0, b1 = yw[:, 0].reshape((-1, 1) + extra), yw[:, 1].reshape((-1, 1) + extra)
    value = (((b0 * (top >> 4)) >> 16) + ((b1 * (bottom >> 4)) >> 16) + 2) >> 2
    return np.clip(value, 0, 255).astype(np.uint8)


def resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """Stretch (H, W) or (H, W, C) uint8 to (size, size): area-averaged when shrinking, bilinear when enlarging."""
    height, width = pixels.shape[:2]
    if (height, width) == (size, size):
        return pixels
    if height * width >= size * size:
        if height >= size and width >= size:
            if height % size == 0 and width % size == 0:
                return _area_integer(pixels, size, height // size, width // size)
            return _area(pixels, size)
        return _linear(pixels, size, area=True)   # OpenCV's INTER_AREA when one side grows
    return _linear(pixels, size)


def read_rgb(path: str | Path, size: int) -> np.ndarray:
    """One image file as uint8 RGB (size, size, 3), by cxr-transfer's reading rule."""
    with Image.open(path) as image:
        if image.format == "JPEG":
            image.draft(image.mode if image.mode in ("L", "RGB") else None, (size, size))
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        pixels = resize(to_pixels(image), size)
    return np.repeat(pixels[:, :, None], 3, axis=2) if pixels.ndim == 2 else pixels


def image_files(arguments: list[str]) -> list[Path]:
    """The image files named, and those under the folders named (sorted)."""
    found = []
    for argument in map(Path, arguments):
        found += sorted(p for p in argument.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file()
                        and not any(part.startswith(".") for part in p.relative_to(argument).parts)) \
            if argument.is_dir() else [argument]   # hidden files skipped, as cxr-transfer skips them
    return found


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.split("\n\n")[1].strip(), file=sys.stderr)
        return 2
    session, metadata = load_model(argv[0])
    size, classes = json.loads(metadata["input"])["size"], json.loads(metadata["class_names"])
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(["path", "predicted"] + [f"p_{c}" for c in classes])
    skipped = 0
    for path in image_files(argv[1:]):
        try:
            pixels = read_rgb(path, size)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:   # unreadable: say so, go on
            print(f"skipped {path}: {exc}", file=sys.stderr)
            skipped += 1
            continue
        probabilities, label = session.run(["probabilities", "label"], {"image": pixels[None]})
        writer.writerow([str(path), str(label[0])] + [f"{p:.9g}" for p in probabilities[0]])
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
