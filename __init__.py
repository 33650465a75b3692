"""cxr-transfer: which pretrained CNN and which classifier detect COVID-19 / pneumonia on your chest X-rays.

    import cxr_transfer as cxr
    cxr.list_backbones()                                   # the paper's nine
    features = cxr.embed_folder("data/", "vgg16")          # cached ONNX embeddings of a folder
    vectors = cxr.embed_images(uint8_images, "vgg16")      # embeddings of arrays, no files
    run = cxr.compare("data/", "vgg16,xception", heads="all", protocol="paper")
    run_dir = cxr.finetune("data/", "vgg16", epochs=35)
    report = cxr.audit("data/")
    csv_path, skipped = cxr.predict("new_images/", "runs/RUN/vgg16-logreg.joblib")
    result = cxr.explain("new_images/", "runs/RUN/vgg16-logreg.joblib")   # heatmaps + border shares
    check = cxr.validate("data/", "external/", "vgg16", heads="logreg", subgroups="source")  # external validation
    table = cxr.export_embeddings("data/", "vgg16", out="vgg16.parquet")   # Parquet / npy for pandas, Spark, Ray

Subpackages, one job each: ``extract`` (images, datasets, backbone registry, weights, ONNX export, HDF5
cache, Parquet / npy export), ``classify`` (metrics, heads, protocols, compare, predict), ``finetune`` (the paper's Keras
training), ``audit`` (duplicates, leakage, shortcuts), ``explain`` (heatmaps), ``core`` (errors, settings, hashing, records).
Importing the package loads no deep-learning framework and changes no global state.
"""
from cxr_transfer import audit, explain, finetune  # subpackages that are also callable: audit(...), ...
from cxr_transfer.api import compare, embed_folder, embed_images, export_embeddings, list_backbones, predict, validate
from cxr_transfer.core.errors import CxrError, Int8RefusedError, WeightsNotFoundError
from cxr_transfer.core.settings import BackboneSettings

__version__ = "0.2.0"

__all__ = ["BackboneSettings", "CxrError", "Int8RefusedError", "WeightsNotFoundError", "__version__", "audit",
           "compare", "embed_folder", "embed_images", "explain", "export_embeddings", "finetune", "list_backbones",
           "predict", "validate"]
