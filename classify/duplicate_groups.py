"""Patient groups that also respect duplicates: every near-duplicate cluster (``extract.duplicates``) lands in one group.

Patient ids alone do not keep a radiograph out of both sides of a split when the same film is filed under
several ids (the audit of the paper's data found one radiograph under three patient ids). ``merge_groups``
joins every group that shares a duplicate cluster into one (union-find over group labels); grouped splits
(compare's ``resolve_groups``, validate's cross-validation) then keep the whole cluster on one side.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from cxr_transfer.extract.dataset import Dataset
from cxr_transfer.extract.duplicates import find_duplicates, hash_cache_path, linked_components


def merge_groups(groups: Sequence[str], clusters: Iterable[Sequence[int]]) -> np.ndarray:
    """Groups with every cluster's rows in one group: groups linked through a cluster get one label, the
    sorted member labels joined by '+'. Rows outside any cluster keep their label."""
    groups = np.asarray(groups).astype(str)
    links = [(groups[cluster[0]], groups[i]) for cluster in clusters if len(cluster) for i in cluster]
    name = {label: "+".join(members) for members in linked_components(links) if len(members) > 1
            for label in members}
    return np.array([name.get(g, g) for g in groups.tolist()], dtype=object).astype(str)


@dataclass
class DuplicateGroups:
    """The merged groups and what was merged (for reports)."""

    groups: np.ndarray
    clusters: list[list[str]] = field(default_factory=list)   # duplicate clusters, as paths relative to the root
    merged: list[str] = field(default_factory=list)           # new group labels that joined several groups


def duplicate_aware_groups(dataset: Dataset, groups: Sequence[str], embeddings: dict[str, np.ndarray] | None = None,
                           hash_cache: Path | None = None) -> DuplicateGroups:
    """``groups`` (one per sample of ``dataset``) merged over the audit's duplicate clusters.

    embeddings: sha256 -> VGG16 embedding, to use the audit's full rule (pHash or pHash + cosine); without it
    the pHash-alone threshold decides. hash_cache: the audit's crop-hash cache file, read and extended; by
    default one under the system's temporary folder (``extract.duplicates.hash_cache_path``), since grouped
    splits are asked for again and again.
    """
    scan = find_duplicates(dataset, embeddings, cache_path=hash_cache or hash_cache_path(dataset))
    row = {dataset.relative(s): i for i, s in enumerate(dataset.samples)}
    clusters = scan.clusters()
    merged = merge_groups(groups, [[row[name] for name in cluster if name in row] for cluster in clusters])
    original = set(np.asarray(groups).astype(str).tolist())
    return DuplicateGroups(merged, clusters, sorted(set(merged.tolist()) - original))
