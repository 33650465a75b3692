"""The reference numbers of Makris et al. 2020 (../shared/docs/paper-protocol.md), in one place.

Reports put measured numbers next to these; nothing else in cxr-transfer repeats them.
"""
from __future__ import annotations

from typing import Any

# Makris et al. 2020, Table 1: per class (precision, recall, F1, specificity), then overall accuracy.
PAPER_TABLE1: dict[str, dict[str, Any]] = {
    "vgg16": {"covid": (0.96, 0.96, 0.96, 0.98), "normal": (0.95, 1.00, 0.98, 0.98),
              "pneumonia": (0.95, 0.91, 0.93, 0.98), "accuracy": 0.9588},
    "vgg19": {"covid": (1.00, 0.92, 0.96, 1.00), "normal": (0.95, 1.00, 0.98, 0.98),
              "pneumonia": (0.95, 0.91, 0.93, 0.95), "accuracy": 0.9503},
    "mobilenetv2": {"covid": (1.00, 0.12, 0.21, 1.00), "normal": (1.00, 0.10, 0.18, 1.00),
                    "pneumonia": (0.35, 1.00, 0.52, 0.10), "accuracy": 0.3970},
    "inceptionv3": {"covid": (1.00, 0.04, 0.07, 1.00), "normal": (0.74, 0.70, 0.72, 0.89),
                    "pneumonia": (0.46, 1.00, 0.63, 0.43), "accuracy": 0.5441},
    "xception": {"covid": (1.00, 0.62, 0.76, 1.00), "normal": (0.88, 0.70, 0.78, 0.95),
                 "pneumonia": (0.61, 1.00, 0.76, 0.69), "accuracy": 0.7647},
    "inceptionresnetv2": {"covid": (1.00, 0.19, 0.32, 1.00), "normal": (0.51, 1.00, 0.68, 0.60),
                          "pneumonia": (0.54, 0.59, 0.57, 0.76), "accuracy": 0.5588},
    "densenet201": {"covid": (1.00, 0.12, 0.21, 1.00), "normal": (1.00, 0.05, 0.10, 1.00),
                    "pneumonia": (0.34, 1.00, 0.51, 0.08), "accuracy": 0.3823},
    "resnet152v2": {"covid": (1.00, 0.12, 0.21, 1.00), "normal": (0.95, 0.90, 0.92, 0.97),
                    "pneumonia": (0.46, 0.95, 0.62, 0.45), "accuracy": 0.6176},
    "nasnetlarge": {"covid": (1.00, 0.58, 0.73, 1.00), "normal": (0.76, 0.95, 0.84, 0.87),
                    "pneumonia": (0.75, 0.95, 0.84, 0.85), "accuracy": 0.8123},
}


def paper_accuracy(backbone: str) -> float | None:
    """The paper's overall accuracy for a backbone (one random 80/20 split), or None."""
    row = PAPER_TABLE1.get(backbone)
    return row["accuracy"] if row else None
