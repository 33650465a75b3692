"""Exact and near-duplicate images: same bytes, or the same radiograph re-encoded, resized, trimmed,
contrast-changed or captioned.

Two independent scores per pair of images:

- **pHash distance** (0..256): each image is decoded with the library's one rule (``read_rgb`` at 256 px),
  turned grey, histogram-equalised (so contrast edits vanish) and hashed with imagehash's 256-bit pHash
  (``hash_size=16``) -- once whole and once per trimmed crop (every combination of 0 / 2.5 / 5 % cut from
  each edge, 81 crops). The distance of a pair is the smallest Hamming distance between one image whole and
  any crop of the other: a copy trimmed by up to ~6 % on any side still meets its original almost exactly.
- **embedding cosine** of the backbone features (``load_features``, full image): near 1 for the same
  content, but high for *all* chest X-rays of one source (0.95 between two different healthy children is
  common), so it is only used to confirm a fairly close hash.

``DuplicateRule``: flagged when the pHash distance is small on its own, or moderate AND the cosine agrees.
The thresholds come from ``benchmarks/duplicate_thresholds.py`` (numbers in docs/audit-notes.md): every
synthetic edit of 60 real images (``tests/testkit/transforms.py``) passes, pairs of different patients almost never do.
Detection lives here, below classify, because grouped splits use it (``classify.duplicate_groups``) as well
as the audit and validation.
Cost: 81 hashes per image (~0.3 ms each) and an N x N x 81 Hamming comparison -- seconds for 500 images.
"""
from __future__ import annotations

import itertools
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import imagehash
import numpy as np
from PIL import Image

from cxr_transfer.core.cache_keys import dataset_cache_id
from cxr_transfer.core.io import atomic_write
from cxr_transfer.extract.dataset import Dataset, Sample
from cxr_transfer.extract.images import ImageDecodeError, read_rgb

HASH_DECODE_SIZE = 256
"""Images are decoded straight to 256 x 256 (JPEG draft mode) before hashing (pHash works on 64 px)."""
HASH_SIZE = 16
"""pHash side: 16 x 16 = 256 bits. 64-bit pHash cannot tell two healthy children apart (distance 0-8)."""
TRIM_STEPS = (0.0, 0.025, 0.05)
"""Fractions cut from each edge to make the trimmed crops (3^4 = 81 crops, the first one whole)."""
TRIMS: tuple[tuple[float, float, float, float], ...] = tuple(itertools.product(TRIM_STEPS, repeat=4))
HASH_BITS = HASH_SIZE * HASH_SIZE


@dataclass(frozen=True)
class DuplicateRule:
    """When a pair of images counts as a near duplicate (see module docstring; evidence in audit-notes)."""

    phash_alone: int = 20            # pHash distance (of 256 bits) at or below which a pair is flagged anyway
    phash_with_embedding: int = 44   # pHash distance at or below which a pair is flagged if the cosine agrees
    cosine_min: float = 0.92         # embedding cosine (VGG16 GAP features) that counts as "agrees"

    def flags(self, phash: np.ndarray, cosine: np.ndarray | None) -> np.ndarray:
        """Boolean mask, same shape as ``phash``: the pairs this rule calls near duplicates."""
        phash = np.asarray(phash)
        hit = phash <= self.phash_alone
        if cosine is not None:
            hit = hit | ((phash <= self.phash_with_embedding) & (np.asarray(cosine) >= self.cosine_min))
        return hit


@dataclass
class DuplicatePair:
    """Two images that are the same radiograph; ``kind`` is "exact" (same sha256) or "near"."""

    kind: str
    a: str                 # path relative to the dataset root
    b: str
    label_a: str
    label_b: str
    split_a: str
    split_b: str
    group_a: str
    group_b: str
    phash_distance: int
    cosine: float | None

    @property
    def cross_split(self) -> bool:
        return self.split_a != self.split_b

    @property
    def same_patient(self) -> bool:
        return bool(self.group_a) and self.group_a == self.group_b

    @property
    def cross_label(self) -> bool:
        return self.label_a != self.label_b

    def to_dict(self) -> dict:
        return {**asdict(self), "cross_split": self.cross_split, "same_patient": self.same_patient,
                "cross_label": self.cross_label}


def grey_for_hash(path: str | Path) -> np.ndarray:
    """The grey image hashes are computed on: the library's decoding rule at 256 px, then luma."""
    return cv2.cvtColor(read_rgb(path, HASH_DECODE_SIZE), cv2.COLOR_RGB2GRAY)


def phash_bits(grey: np.ndarray) -> np.ndarray:
    """imagehash pHash (256 bits) of a grey uint8 image after histogram equalisation, packed to 32 bytes."""
    equalised = cv2.equalizeHist(np.ascontiguousarray(grey))
    bits = imagehash.phash(Image.fromarray(equalised), hash_size=HASH_SIZE).hash
    return np.packbits(bits.flatten().astype(np.uint8))


def crop_hashes(grey: np.ndarray) -> np.ndarray:
    """(len(TRIMS), 32) uint8: the pHash of every trimmed crop of ``grey``, row 0 the whole image."""
    height, width = grey.shape[:2]
    rows = []
    for top, bottom, left, right in TRIMS:
        crop = grey[round(top * height):height - round(bottom * height),
                    round(left * width):width - round(right * width)]
        rows.append(phash_bits(crop))
    return np.stack(rows)


def hash_file(path: str | Path) -> np.ndarray | str:
    """crop_hashes of an image file, or the decode error message."""
    try:
        return crop_hashes(grey_for_hash(path))
    except ImageDecodeError as exc:
        return str(exc)


def hash_files(paths: Sequence[Path], workers: int = 2) -> list[np.ndarray | str]:
    """hash_file for every path, in order, in threads (decoding and resizing release the GIL)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(hash_file, paths))


HASH_CACHE_NAME = f"audit-phash{HASH_SIZE}-views{len(TRIMS)}-decode{HASH_DECODE_SIZE}.npz"
"""File name of the crop-hash cache, inside the dataset's feature-cache folder; its settings are in the name
(``views`` there counts the trimmed crops: the name predates the word and stays, so existing caches are reused)."""


def hash_cache_path(dataset: Dataset, cache_dir: str | Path | None = None) -> Path:
    """``<cache dir>/<dataset cache id>/<HASH_CACHE_NAME>``, the one crop-hash cache of a dataset (keyed by
    sha256, so a stale entry is never used for another image); without a cache dir, under the system's
    temporary folder, since hashing 81 crops of every image takes seconds to minutes."""
    base = Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir()) / "cxr-transfer"
    return base / dataset_cache_id(dataset.root) / HASH_CACHE_NAME


def hash_samples(samples: Sequence[Sample], cache_path: Path | None = None,
                 workers: int = 2) -> list[np.ndarray | str]:
    """crop_hashes of every sample, reusing and extending the cache (keyed by sha256) when one is given."""
    cached: dict[str, np.ndarray] = {}
    if cache_path is not None and Path(cache_path).is_file():
        try:
            with np.load(cache_path) as stored:
                cached = dict(zip(stored["sha256"].tolist(), stored["hashes"]))
        except (OSError, KeyError, ValueError):
            cached = {}
    todo = [s for s in samples if s.sha256 not in cached]
    fresh = dict(zip([s.sha256 for s in todo], hash_files([s.path for s in todo], workers)))
    results = [cached[s.sha256] if s.sha256 in cached else fresh[s.sha256] for s in samples]
    new = {sha: h for sha, h in fresh.items() if not isinstance(h, str)}
    if cache_path is not None and new:
        cached.update(new)
        cache_path = Path(cache_path)
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(cache_path) as handle:
            np.savez(handle, sha256=np.array(list(cached)), hashes=np.stack(list(cached.values())))
    return results


def _popcount(xor: np.ndarray) -> np.ndarray:
    """Bits set along the last axis of a uint8 array."""
    words = np.ascontiguousarray(xor).view(np.uint64)
    return np.bitwise_count(words).sum(axis=-1, dtype=np.int32)


def phash_distance(a: np.ndarray, b: np.ndarray) -> int:
    """Distance of two images from their crop_hashes: best match of one whole vs any crop of the other."""
    whole_a_vs_crops_b = _popcount(b ^ a[0][None, :]).min()
    crops_a_vs_whole_b = _popcount(a ^ b[0][None, :]).min()
    return int(min(whole_a_vs_crops_b, crops_a_vs_whole_b))


def phash_distance_matrix(hashes: np.ndarray) -> np.ndarray:
    """All-pairs phash_distance (N x N int32) from stacked crop_hashes of shape (N, K, 32)."""
    hashes = np.asarray(hashes, dtype=np.uint8)
    n = hashes.shape[0]
    whole = hashes[:, 0, :]
    out = np.empty((n, n), dtype=np.int32)
    for i in range(n):  # row i: any crop of image i vs every whole image
        out[i] = _popcount(hashes[i][:, None, :] ^ whole[None, :, :]).min(axis=0)
    return np.minimum(out, out.T)


def cosine_matrix(embeddings: np.ndarray) -> np.ndarray:
    """All-pairs cosine similarity of embedding rows (N x N, float32); zero rows give 0."""
    x = np.asarray(embeddings, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    return (x @ x.T).astype(np.float32)


def linked_components(links: Iterable[tuple[str, str]]) -> list[list[str]]:
    """Connected components of linked names (a~b, b~c -> [a, b, c]), each sorted, largest first (union-find)."""
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in links:
        parent[root(a)] = root(b)
    groups: dict[str, list[str]] = {}
    for name in parent:
        groups.setdefault(root(name), []).append(name)
    return sorted((sorted(g) for g in groups.values()), key=lambda g: (-len(g), g))


@dataclass
class DuplicateScan:
    """Everything the duplicate search computed, for the report and for threshold checks."""

    pairs: list[DuplicatePair]
    samples: list[Sample]          # the hashed samples, aligned with the matrices
    phash: np.ndarray              # N x N pHash distances
    cosine: np.ndarray | None      # N x N, or None without embeddings
    unreadable: list[tuple[str, str]]
    rule: DuplicateRule
    names: list[str] = field(default_factory=list)  # paths relative to the dataset root, aligned with samples

    @property
    def exact(self) -> list[DuplicatePair]:
        return [p for p in self.pairs if p.kind == "exact"]

    @property
    def near(self) -> list[DuplicatePair]:
        return [p for p in self.pairs if p.kind == "near"]

    def clusters(self) -> list[list[str]]:
        """Groups of images joined by duplicate pairs (a~b, b~c -> one cluster), largest first."""
        return linked_components((pair.a, pair.b) for pair in self.pairs)

    def borderline(self, limit: int = 10, phash_slack: int = 8, cosine_slack: float = 0.03) -> list[dict]:
        """Unflagged pairs just outside the rule (pHash <= limit + slack and cosine >= min - slack): to check
        by eye, since a duplicate with heavier edits than the threshold benchmark's would land here."""
        if self.cosine is None:
            return []
        near = (self.phash <= self.rule.phash_with_embedding + phash_slack) & \
            (self.cosine >= self.rule.cosine_min - cosine_slack) & ~self.rule.flags(self.phash, self.cosine)
        ii, jj = np.nonzero(np.triu(near, k=1))
        order = np.lexsort((-self.cosine[ii, jj], self.phash[ii, jj]))[:limit]
        out = []
        for k in order:
            a, b = self.samples[ii[k]], self.samples[jj[k]]
            out.append({"a": self.names[ii[k]], "b": self.names[jj[k]], "group_a": a.group, "group_b": b.group,
                        "phash_distance": int(self.phash[ii[k], jj[k]]),
                        "cosine": round(float(self.cosine[ii[k], jj[k]]), 4)})
        return out

    def different_patient_stats(self) -> dict:
        """Pairs of different patients and how many the rule flags (the false-positive side of the rule).

        Without patient ids every pair of different files counts.
        """
        n = len(self.samples)
        upper = np.triu(np.ones((n, n), dtype=bool), k=1)
        groups = np.array([s.group for s in self.samples])
        grouped = bool(n) and all(groups)
        if grouped:
            upper &= groups[:, None] != groups[None, :]
        flagged = self.rule.flags(self.phash, self.cosine) & upper
        total = int(upper.sum())
        return {"pairs": total, "flagged": int(flagged.sum()), "rate": float(flagged.sum() / total) if total else 0.0,
                "by_patient_id": grouped}


def find_duplicates(dataset: Dataset, embeddings: dict[str, np.ndarray] | None = None,
                    rule: DuplicateRule = DuplicateRule(), workers: int = 2,
                    cache_path: Path | None = None) -> DuplicateScan:
    """Every exact and near-duplicate pair of ``dataset``, within and across splits.

    embeddings: sha256 -> embedding (e.g. from ``load_features``); without one an image is judged by the
    pHash-alone threshold only. cache_path: an .npz of crop hashes by sha256 (read and extended).
    Pairs come exact first, then by pHash distance.
    """
    results = hash_samples(dataset.samples, cache_path, workers)
    unreadable = [(dataset.relative(s), r) for s, r in zip(dataset.samples, results) if isinstance(r, str)]
    samples = [s for s, r in zip(dataset.samples, results) if not isinstance(r, str)]
    hashes = [r for r in results if not isinstance(r, str)]
    phash = phash_distance_matrix(np.stack(hashes)) if hashes else np.zeros((0, 0), np.int32)
    cosine = None
    if embeddings:
        dim = len(next(iter(embeddings.values())))
        # a missing embedding is a zero row: cosine 0, never "agrees"
        cosine = cosine_matrix(np.array([embeddings.get(s.sha256, np.zeros(dim)) for s in samples]).reshape(-1, dim))
    shas = np.array([s.sha256 for s in samples])
    same_bytes = shas[:, None] == shas[None, :]
    candidates = np.triu(same_bytes | rule.flags(phash, cosine), k=1)
    pairs = []
    for i, j in zip(*np.nonzero(candidates)):
        a, b = samples[i], samples[j]
        pairs.append(DuplicatePair(
            "exact" if same_bytes[i, j] else "near", dataset.relative(a), dataset.relative(b),
            a.label, b.label, a.split, b.split, a.group, b.group, int(phash[i, j]),
            None if cosine is None else round(float(cosine[i, j]), 4)))
    pairs.sort(key=lambda p: (p.kind != "exact", p.phash_distance, -(p.cosine or 0.0), p.a, p.b))
    return DuplicateScan(pairs, samples, phash, cosine, unreadable, rule, [dataset.relative(s) for s in samples])
