"""Evidence for the near-duplicate thresholds: synthetic duplicates of real images vs different patients.

    PYTHONPATH=tests python benchmarks/duplicate_thresholds.py --data ../shared/data/covid19-xray \
        --weights-dir ../shared/weights --out runs/duplicate-thresholds

1. Positives: ``--per-class`` real images per class (seeded choice) are edited with every function of
   ``tests/testkit/transforms.py``; each (original, edited copy) pair is scored (pHash, dHash, embedding cosine).
2. Negatives: every pair of real images of *different* patients (manifest patient_id) is scored the same way.
   Some of these may be genuine duplicates the metadata does not know about, so the top negatives are
   listed by path for a look by eye.
3. A grid of rules is evaluated: positives found / negative pairs flagged. The chosen default
   ``DuplicateRule`` is reported against both sets.
Outputs: thresholds.json (distributions, grid, top negatives), thresholds.png (scatter plot) and
edited/ (the synthetic copies, kept so their embeddings stay cached).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np

from cxr_transfer.extract.duplicates import (
    HASH_BITS,
    DuplicateRule,
    cosine_matrix,
    crop_hashes,
    grey_for_hash,
    hash_files,
    phash_distance,
    phash_distance_matrix,
)
from cxr_transfer.core.plotting import subplots
from cxr_transfer.core.record import run_record, write_json
from cxr_transfer.core.settings import BackboneSettings
from cxr_transfer.extract.dataset import load_dataset
from cxr_transfer.extract.images import read_rgb
from cxr_transfer.extract.pipeline import ExtractSettings, load_features
try:  # testkit is test support, on the path when run as the docstring says (PYTHONPATH=tests)
    from testkit.transforms import TRANSFORMS, save_grey
except ImportError:  # pragma: no cover - a usage error, said in one line
    sys.exit("error: run with PYTHONPATH=tests (the edits come from tests/testkit/transforms.py)")


def _quantiles(values: np.ndarray) -> dict:
    if values.size == 0:
        return {}
    qs = (0.0, 0.001, 0.01, 0.05, 0.5, 0.95, 0.99, 0.999, 1.0)
    return {f"q{q:g}": float(np.quantile(values, q)) for q in qs}


def make_positives(dataset, per_class: int, seed: int, folder: Path) -> list[tuple[int, str, Path]]:
    """Write the edited copies into ``folder/<class>/``; return (source index, transform, path) triples."""
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for name in dataset.class_names:
        indices = [i for i, s in enumerate(dataset.samples) if s.label == name]
        chosen += sorted(rng.choice(indices, size=min(per_class, len(indices)), replace=False).tolist())
    made = []
    for index in chosen:
        sample = dataset.samples[index]
        grey = cv2.cvtColor(read_rgb(sample.path), cv2.COLOR_RGB2GRAY)
        target = folder / sample.label
        target.mkdir(parents=True, exist_ok=True)
        for transform, edit in TRANSFORMS.items():
            path = target / f"{index:04d}-{transform}.png"
            save_grey(edit(grey), path)
            made.append((index, transform, path))
    return made


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--weights-dir", default=None)
    parser.add_argument("--weights-file", default=None)
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--cache-dir", default="features")
    parser.add_argument("--out", default="runs/duplicate-thresholds")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = ExtractSettings(BackboneSettings(backbone=args.backbone, weights_file=args.weights_file,
                                                weights_dir=args.weights_dir, random_weights=args.random_weights,
                                                cache_dir=Path(args.cache_dir)))
    dataset = load_dataset(args.data)
    features, _ = load_features(dataset, settings)
    emb = {s.sha256: features.embeddings[i] for i, s in enumerate(features.samples)}
    samples = dataset.samples
    hashes = hash_files([s.path for s in samples])
    ph = phash_distance_matrix(np.stack(hashes))
    cos = cosine_matrix(np.array([emb[s.sha256] for s in samples]))
    groups = np.array([s.group for s in samples])
    labels = np.array([s.label for s in samples])
    neg = np.triu(groups[:, None] != groups[None, :], k=1)
    neg_same_label = neg & (labels[:, None] == labels[None, :])

    made = make_positives(dataset, args.per_class, args.seed, out / "edited")  # kept: its features stay cached
    edited = load_dataset(out / "edited")
    edited_features, _ = load_features(edited, settings)
    edited_emb = {s.path.name: edited_features.embeddings[i] for i, s in enumerate(edited_features.samples)}
    positives = []
    for index, transform, path in made:
        a, b = emb[samples[index].sha256], edited_emb[path.name]
        positives.append({
            "source": dataset.relative(samples[index]), "label": samples[index].label, "transform": transform,
            "phash": phash_distance(hashes[index], crop_hashes(grey_for_hash(path))),
            "cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))})

    pos_ph = np.array([p["phash"] for p in positives])
    pos_cos = np.array([p["cosine"] for p in positives])
    by_transform = {t: {"phash_max": int(pos_ph[[p["transform"] == t for p in positives]].max()),
                        "cosine_min": float(pos_cos[[p["transform"] == t for p in positives]].min())}
                    for t in TRANSFORMS}
    grid = []
    for alone in range(0, 65, 4):
        for with_emb in range(alone, 97, 4):
            for cmin in (0.85, 0.88, 0.9, 0.92, 0.94, 0.96, 0.98):
                rule = DuplicateRule(alone, with_emb, cmin)
                found = rule.flags(pos_ph, pos_cos)
                flagged = rule.flags(ph, cos) & neg
                grid.append({"rule": asdict(rule), "positives_found": int(found.sum()),
                             "negatives_flagged": int(flagged.sum())})
    default = DuplicateRule()
    flagged_default = np.argwhere(default.flags(ph, cos) & neg)
    top = np.argwhere(neg)
    order = np.lexsort((-cos[neg], ph[neg]))[:40]
    top_negatives = [{"a": dataset.relative(samples[i]), "b": dataset.relative(samples[j]),
                      "group_a": samples[i].group, "group_b": samples[j].group,
                      "phash": int(ph[i, j]), "cosine": float(cos[i, j])}
                     for i, j in top[order]]
    result = {
        "record": run_record("benchmarks/duplicate_thresholds.py", vars(args), dataset_fingerprint=dataset.fingerprint,
                             seconds=round(time.perf_counter() - started, 1)),
        "n_positive_pairs": len(positives), "n_negative_pairs": int(neg.sum()),
        "hash_bits": HASH_BITS,
        "positives": {"phash": _quantiles(pos_ph), "cosine": _quantiles(pos_cos),
                      "by_transform": by_transform},
        "negatives": {"phash": _quantiles(ph[neg]), "cosine": _quantiles(cos[neg]),
                      "same_label_cosine": _quantiles(cos[neg_same_label])},
        "default_rule": {"rule": asdict(default), "positives_found": int(default.flags(pos_ph, pos_cos).sum()),
                         "negatives_flagged": len(flagged_default),
                         "flagged_negative_pairs": [[dataset.relative(samples[i]), dataset.relative(samples[j]),
                                                     int(ph[i, j]), float(cos[i, j])] for i, j in flagged_default]},
        "grid": grid, "top_negatives": top_negatives, "positive_pairs": positives,
    }
    write_json(out / "thresholds.json", result)
    _plot(out / "thresholds.png", ph[neg], cos[neg], pos_ph, pos_cos, [p["transform"] for p in positives], default)
    print(f"positives {len(positives)}: phash max {pos_ph.max()}, cosine min {pos_cos.min():.4f}")
    print(f"negatives {int(neg.sum())}: phash min {ph[neg].min()}, cosine max {cos[neg].max():.4f}")
    print("by transform:", by_transform)
    print(f"default {default}: found {result['default_rule']['positives_found']}/{len(positives)}, "
          f"negatives flagged {len(flagged_default)}")
    print(f"-> {out}/thresholds.json ({time.perf_counter() - started:.0f} s)")


def _plot(path: Path, neg_ph, neg_cos, pos_ph, pos_cos, transforms, rule: DuplicateRule) -> None:
    fig, ax = subplots(figsize=(8, 6))
    ax.scatter(neg_ph + np.random.default_rng(0).uniform(-0.3, 0.3, neg_ph.size), neg_cos, s=2, c="0.6",
               alpha=0.3, label=f"different patients ({neg_ph.size} pairs)")
    import matplotlib

    palette = [c for c in matplotlib.colormaps["tab10"].colors if len(set(c)) > 1]  # no grey: negatives are grey
    for k, name in enumerate(dict.fromkeys(transforms)):
        mask = np.array([t == name for t in transforms])
        ax.scatter(pos_ph[mask], pos_cos[mask], s=12, color=palette[k % len(palette)], label=f"edited copy: {name}")
    ax.axvline(rule.phash_alone + 0.5, color="k", lw=1, ls="--")
    ax.plot([rule.phash_alone + 0.5, rule.phash_with_embedding + 0.5, rule.phash_with_embedding + 0.5],
            [rule.cosine_min, rule.cosine_min, 1.0], color="r", lw=1)
    ax.set_xlabel(f"pHash distance (of {HASH_BITS} bits, best trimmed crop)")
    ax.set_ylabel("embedding cosine similarity")
    ax.set_title("near-duplicate rule: left of dashed line, or inside the red box")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
