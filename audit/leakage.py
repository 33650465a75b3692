"""Patient leakage: one patient's images on more than one side of a train/test (or val) split.

Needs a group column (``manifest.csv`` patient_id, or a CSV's group column). Images of one patient are
strongly correlated (same body, same scanner, often the same day), so a model tested on a patient it was
trained on is partly tested on its training data.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass

from cxr_transfer.extract.dataset import Dataset


@dataclass
class LeakedPatient:
    """A patient present in several splits, with the images on each side."""

    group: str
    labels: list[str]                   # the distinct labels of the patient's images
    images: dict[str, list[str]]        # split -> relative paths

    @property
    def splits(self) -> list[str]:
        return sorted(self.images)

    @property
    def n_images(self) -> int:
        return sum(len(paths) for paths in self.images.values())

    def to_dict(self) -> dict:
        return {**asdict(self), "splits": self.splits, "n_images": self.n_images}


@dataclass
class LeakageResult:
    """What the leakage check found; ``checked`` is False when the data has no patient ids or no splits."""

    checked: bool
    reason: str
    n_patients: int
    leaked: list[LeakedPatient]
    multi_image_patients: int           # patients with more than one image (a reason to use grouped CV)
    mixed_label_patients: list[str]     # patients whose images carry different labels

    def to_dict(self) -> dict:
        return {"checked": self.checked, "reason": self.reason, "n_patients": self.n_patients,
                "n_leaked": len(self.leaked), "leaked": [p.to_dict() for p in self.leaked],
                "multi_image_patients": self.multi_image_patients,
                "mixed_label_patients": self.mixed_label_patients}


def patient_leakage(dataset: Dataset) -> LeakageResult:
    """Every patient whose images sit in more than one split (sorted by patient id)."""
    samples = [s for s in dataset.samples if s.group]
    if not dataset.has_groups or not samples:
        return LeakageResult(False, "no patient/group column (manifest.csv patient_id or CSV group)", 0, [], 0, [])
    by_group: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    labels: dict[str, set[str]] = defaultdict(set)
    for sample in samples:
        by_group[sample.group][sample.split].append(dataset.relative(sample))
        labels[sample.group].add(sample.label)
    splits = {s.split for s in samples}
    leaked = [LeakedPatient(group, sorted(labels[group]), {k: sorted(v) for k, v in sorted(images.items())})
              for group, images in sorted(by_group.items()) if len(images) > 1]
    reason = "" if len(splits) > 1 else "only one split: nothing can leak between splits"
    multi = sum(1 for images in by_group.values() if sum(len(v) for v in images.values()) > 1)
    mixed = sorted(group for group, names in labels.items() if len(names) > 1)
    return LeakageResult(len(splits) > 1, reason, len(by_group), leaked, multi, mixed)
