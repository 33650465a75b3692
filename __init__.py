"""cxr-transfer: which pretrained CNN and which classifier detect COVID-19 / pneumonia on your chest X-rays.

    import cxr_transfer as cxr
    cxr.list_backbones()                                   # the paper's nine
    features = cxr.embed_folder("data/", "vgg16")          # cached ONNX embeddings of a folder
    vectors = cxr.embed_images(uint8_images, "vgg16")      # embeddings of arrays, no files
    result = cxr.compare("data/", "vgg16,xception", heads="all", protocol="paper")   # in memory
    cxr.compare("data/", "vgg16", heads="logreg", save=True, out_dir="runs")         # + run folder, heads
    run_dir = cxr.finetune_backbone("data/", "vgg16", epochs=35)
    report = cxr.audit_dataset("data/")
    csv_path, skipped = cxr.predict("new_images/", "runs/RUN/vgg16-logreg.joblib")
    result = cxr.explain_images("new_images/", "runs/RUN/vgg16-logreg.joblib")   # heatmaps + border shares
    check = cxr.validate("data/", "external/", "vgg16", heads="logreg", subgroups="source")  # external validation
    shift = cxr.shift_check("data/", "hospital/", model="runs/RUN/vgg16-logreg.joblib")  # unlabeled: shift + ATC/DoC
    table = cxr.export_embeddings("data/", "vgg16", out="vgg16.parquet")   # Parquet / npy for pandas, Spark, Ray
    cxr.export_model("runs/RUN/vgg16-logreg.joblib", "model.onnx")   # one ONNX file: uint8 images -> probabilities

The package is layered (README "Layout"; setup.cfg's import-linter contract): ``core`` (errors, settings
checks, hashing, records) < ``extract`` (images, datasets, duplicates, backbones, ONNX, HDF5 cache) <
``classify`` (heads, metrics, protocols, compare, predict) < ``audit`` | ``finetune`` < ``explain`` (heatmaps)
< ``validation`` (external validation, shift check) < ``deploy`` (one-file ONNX export) < ``api`` (these functions) < ``cli``.
Importing the package loads no deep-learning framework and changes no global state.
"""
from cxr_transfer.api import (audit_dataset, compare, embed_folder, embed_images, explain_images, export_embeddings,
                              export_model, finetune_backbone, list_backbones, predict, shift_check, validate)
from cxr_transfer.core.errors import CxrError, Int8RefusedError, WeightsNotFoundError
from cxr_transfer.core.settings import BackboneSettings
from cxr_transfer.core.version import __version__

__all__ = ["BackboneSettings", "CxrError", "Int8RefusedError", "WeightsNotFoundError", "__version__",
           "audit_dataset", "compare", "embed_folder", "embed_images", "explain_images", "export_embeddings",
           "export_model", "finetune_backbone", "list_backbones", "predict", "shift_check", "validate"]
