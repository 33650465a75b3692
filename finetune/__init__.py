"""Transfer learning by fine-tuning, as in Makris et al. 2020 (section 3.4): a frozen ImageNet body and a new
trainable head, trained with the paper's augmentation and hyper-parameters.

Modules, one job each:
- ``model``   the Keras models: full model (raw pixels -> probabilities) and the head alone (features -> probabilities);
- ``augment`` the paper's training-time augmentation on uint8 images (seeded, numpy/OpenCV);
- ``data``    decoding the images once and the paper's 80/20 split;
- ``bank``    the fast path's cache of embeddings of augmented views, computed with the ONNX body;
- ``export``  model.keras, model.onnx (checked against Keras) and model.json;
- ``report``  report.md, curves.png, confusion.png, history.csv;
- ``train``   the training loops and the library entry point ``run_finetune(FinetuneSettings)``.

The package is also the API function: ``cxr_transfer.finetune(data, backbone, ...)`` (see ``cxr_transfer.api``).
"""
from cxr_transfer.api import finetune as _finetune
from cxr_transfer.core.callable_module import make_module_callable

make_module_callable(__name__, _finetune)
