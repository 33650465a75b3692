"""Every setting of a fine-tuning run (defaults are the paper's), shared by the loops and the run folder."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.params import COUNT, FRACTION, POSITIVE, SEED, Interval, check_params, param
from cxr_transfer.core.settings import BackboneSettings, UsesBackboneSettings
from cxr_transfer.finetune.model import PAPER_DENSE_UNITS, PAPER_DROPOUT

DEFAULT_OUT_DIR = Path("runs")


@dataclass
class FinetuneSettings(UsesBackboneSettings):
    """Every setting of a fine-tuning run; defaults are the paper's (input 224 for all nine backbones)."""

    data: str | Path
    common: BackboneSettings = field(default_factory=lambda: BackboneSettings(input_size=224))
    epochs: int = param(35, COUNT, "training epochs")
    batch_size: int = param(8, COUNT, "images per training batch")
    lr: float = param(1e-3, POSITIVE, "Adam learning rate")
    seed: int = param(0, SEED, "split, initialisation, augmentation and batch order")
    fast: bool = param(False, help="train the head on a cached bank of augmented copies")
    copies: int = param(10, COUNT, "fast: augmented copies per training image (1: none)")
    augment: bool = param(True, help="the paper's augmentation (False: plain loop without it)")
    dense_units: int = param(PAPER_DENSE_UNITS, COUNT, "hidden units of the head (see finetune/model.py)")
    dropout: float = param(PAPER_DROPOUT, Interval(0.0, 1.0, real=True, high_open=True), "dropout of the head")
    test_size: float = param(0.2, FRACTION, "held-out share of the split")
    split: str | None = param("train", help="the split folder the 80/20 is drawn from (None: all images)",
                              none_means="all images", cli=False)
    group_by: str | None = param(None, help="patient_id (or group, or dicom:PatientID): keep each patient on one "
                                            "side of the split")
    run_dir: str | Path | None = param(None, help="exact run folder")
    out_dir: str | Path = param(DEFAULT_OUT_DIR, help="folder for run folders", flag="--out")
    export_onnx: bool = param(True, help="also write model.onnx (checked against Keras)", cli=False)

    def __post_init__(self) -> None:
        check_params(self)

    def check(self) -> None:
        """Raise CxrError for values that cannot work together."""
        if self.precision != "float32":
            raise CxrError(f"finetune trains in Keras at float32; precision {self.precision} applies to extract, "
                           f"compare, audit and predict", param="precision")

    @property
    def model_name(self) -> str:
        return "finetune-fast" if self.fast else "finetune"
