"""Every setting of a fine-tuning run (defaults are the paper's), shared by the loops and the run folder."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.settings import BackboneSettings, UsesBackboneSettings
from cxr_transfer.finetune.model import PAPER_DENSE_UNITS, PAPER_DROPOUT

DEFAULT_OUT_DIR = Path("runs")


@dataclass
class FinetuneSettings(UsesBackboneSettings):
    """Every setting of a fine-tuning run; defaults are the paper's (input 224 for all nine backbones)."""

    data: str | Path
    common: BackboneSettings = field(default_factory=lambda: BackboneSettings(input_size=224))
    epochs: int = 35
    batch_size: int = 8
    lr: float = 1e-3
    seed: int = 0                         # split, head initialisation, augmentation and batch order
    fast: bool = False
    views: int = 10                       # fast path: views per training image (1 = no augmentation)
    augment: bool = True                  # False = no augmentation (plain; fast: as views=1)
    dense_units: int = PAPER_DENSE_UNITS
    dropout: float = PAPER_DROPOUT
    test_size: float = 0.2
    split: str | None = "train"           # the split folder the 80/20 is drawn from (None: all images)
    group_by: str | None = None           # "patient_id"/"group": keep each patient on one side of the split
    run_dir: str | Path | None = None     # exact folder; default: <out_dir>/finetune-<backbone>-...-<time>
    out_dir: str | Path = DEFAULT_OUT_DIR
    export_onnx: bool = True

    def check(self) -> None:
        """Raise CxrError for values that cannot work."""
        for name in ("epochs", "batch_size", "views", "dense_units"):
            if getattr(self, name) < 1:
                raise CxrError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.precision != "float32":
            raise CxrError(f"finetune trains in Keras at float32; --precision {self.precision} applies to extract, "
                           f"compare, audit and predict")
        if not self.lr > 0:
            raise CxrError(f"learning rate must be positive, got {self.lr}")
        if not 0.0 <= self.dropout < 1.0:
            raise CxrError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def model_name(self) -> str:
        return "finetune-fast" if self.fast else "finetune"
