"""Transfer learning by fine-tuning, as in Makris et al. 2020 (section 3.4): a frozen ImageNet body and a new
trainable head, trained with the paper's augmentation and hyper-parameters.

Modules, one job each:
- ``model``   the Keras models: full model (raw pixels -> probabilities) and the head alone (features -> probabilities);
- ``augment`` the paper's training-time augmentation on uint8 images (seeded, numpy/OpenCV);
- ``data``    decoding the images once and the paper's 80/20 split;
- ``bank``    the fast path's cache of embeddings of augmented copies, computed with the ONNX body;
- ``export``  model.keras, model.onnx (checked against Keras) and model.json;
- ``report``  report.md, curves.png, confusion.png, history.csv;
- ``loops``   the training loops: the paper's plain Keras loop and the fast path on cached augmented copies;
- ``layers``  the Keras layer that holds the backbone's preprocessing (registered: saved models name it);
- ``settings`` ``FinetuneSettings``; ``run_folder`` the run folder's files;
- ``train``   the library entry point ``run_finetune(FinetuneSettings)``.

The API function is ``cxr_transfer.finetune_backbone(data, backbone, ...)``.
"""
