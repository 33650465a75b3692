"""finetune: the paper's model builds for all nine backbones, both training paths write a run folder on the
paper's split, Ctrl-C keeps a partial run, missing weights fail before training. Random weights, tiny inputs."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from cxr_transfer.classify.protocols import paper_splits
from cxr_transfer.classify.results import images_fingerprint as fingerprint_of
from cxr_transfer.classify.results import load_results
from cxr_transfer.core.errors import WeightsNotFoundError
from cxr_transfer.extract.dataset import load_dataset
from cxr_transfer.extract.registry import BACKBONES
from cxr_transfer.extract.weights import WeightsSource
from cxr_transfer.finetune.augment import (
    NO_AUGMENTATION,
    PAPER_AUGMENTATION,
    augment_batch,
    augment_image,
    copy_rng,
)
from cxr_transfer.finetune.loops import held_out_scores
from cxr_transfer.finetune.train import FinetuneSettings, run_finetune

keras = pytest.importorskip("keras")

RANDOM = WeightsSource("random", None, "random:seed0")
CLASSES = ("covid", "normal", "pneumonia")
SIZE = 32


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    """12 synthetic PNGs per class (brightness tells the class apart) in train/, 2 per class in test/."""
    root = tmp_path_factory.mktemp("cxr")
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("test", 2)):
        for index, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                image = rng.normal(60 + 60 * index, 25, (40, 48, 3)).clip(0, 255).astype(np.uint8)
                cv2.imwrite(str(folder / f"{name}{i}.png"), image)
    return root


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def settings(data: Path, run_dir: Path, cache: Path, **overrides) -> FinetuneSettings:
    values = dict(random_weights=True, input_size=SIZE, epochs=2, run_dir=run_dir, cache_dir=cache, progress=False)
    return FinetuneSettings.from_options(data=data, backbone="vgg16", **{**values, **overrides})


@pytest.fixture(scope="module")
def plain_run(dataset_dir, cache_dir, tmp_path_factory) -> Path:
    return run_finetune(settings(dataset_dir, tmp_path_factory.mktemp("runs") / "plain", cache_dir))


@pytest.fixture(scope="module")
def fast_run(dataset_dir, cache_dir, tmp_path_factory) -> Path:
    return run_finetune(settings(dataset_dir, tmp_path_factory.mktemp("runs") / "fast", cache_dir, fast=True,
                                 copies=3, export_onnx=False))


# --- model ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BACKBONES))
def test_every_backbone_builds_and_takes_a_train_step(name):
    from cxr_transfer.finetune.model import build_finetune_model

    config = BACKBONES[name]
    size = max(config.min_input_size, SIZE)
    model = build_finetune_model(config, size, RANDOM)
    model.compile(optimizer="adam", loss="categorical_crossentropy", run_eagerly=True)  # no graph tracing
    frozen = [w.numpy().copy() for w in model.get_layer(index=2).weights[:2]]
    pixels = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype(np.float32)
    loss = model.train_on_batch(pixels, np.eye(3, dtype=np.float32)[[0, 2]])
    assert np.isfinite(loss)
    assert len(model.trainable_weights) == 4  # only the head: two Dense kernels and biases
    for before, after in zip(frozen, model.get_layer(index=2).weights[:2]):
        np.testing.assert_array_equal(before, after.numpy())
    assert model.predict(pixels, verbose=0).shape == (2, 3)


def test_head_alone_starts_like_the_full_models_head():
    from cxr_transfer.finetune.model import build_finetune_model, build_head

    config = BACKBONES["vgg16"]
    full = build_finetune_model(config, SIZE, RANDOM, seed=3)
    head = build_head(config.feature_dim, seed=3)
    for a, b in zip(full.get_layer("head").weights, head.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert [layer.__class__.__name__ for layer in head.layers] == ["InputLayer", "Dense", "Dropout", "Dense"]
    assert head.get_layer("fc").units == 64 and head.get_layer("dropout").rate == 0.5


# --- augmentation -----------------------------------------------------------------------------


def test_augmentation_is_seeded_and_keeps_shape():
    image = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    first = augment_image(image, np.random.default_rng(5))
    assert first.shape == image.shape and first.dtype == np.uint8
    np.testing.assert_array_equal(first, augment_image(image, np.random.default_rng(5)))
    assert not np.array_equal(first, augment_image(image, np.random.default_rng(6)))
    np.testing.assert_array_equal(augment_image(image, np.random.default_rng(5), NO_AUGMENTATION), image)
    batch = augment_batch(np.stack([image, image]), np.random.default_rng(0), PAPER_AUGMENTATION)
    assert batch.shape == (2, SIZE, SIZE, 3) and not np.array_equal(batch[0], batch[1])
    np.testing.assert_array_equal(augment_image(image, copy_rng("ab" * 32, 2)),
                                  augment_image(image, copy_rng("ab" * 32, 2)))


def test_held_out_scores_match_keras():
    proba = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1]], dtype=np.float32)
    labels = np.array([0, 2, 1])
    loss, accuracy = held_out_scores(proba, labels)
    expected = keras.losses.categorical_crossentropy(np.eye(3)[labels], proba).numpy().mean()
    assert loss == pytest.approx(float(expected), rel=1e-5)
    assert accuracy == pytest.approx(2 / 3)


def test_bank_computes_each_copy_once_whatever_k(tmp_path, monkeypatch):
    from cxr_transfer.extract.onnx_export import OnnxBackbone
    from cxr_transfer.finetune import bank

    class CountingEmbedder:
        calls = 0

        def __init__(self, backbone, threads=None):
            pass

        def embed(self, images):
            CountingEmbedder.calls += len(images)
            return images.reshape(len(images), -1)[:, :512].astype(np.float32)

    monkeypatch.setattr(bank, "OnnxEmbedder", CountingEmbedder)
    body = OnnxBackbone(BACKBONES["vgg16"], SIZE, tmp_path / "x.onnx", "", "random:seed0", 17, 0.0)
    images = np.random.default_rng(0).integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)
    shas = [f"{i:064x}" for i in range(4)]
    first, stats = bank.bank_features(body, shas, images, [3, 3, 1, 1], 3, PAPER_AUGMENTATION, tmp_path)
    assert stats.computed == CountingEmbedder.calls == 8 and np.isnan(first[2, 1:]).all()
    np.testing.assert_array_equal(first[0, 0], images[0].reshape(-1)[:512])  # copy 0 = the image itself
    fewer, stats = bank.bank_features(body, shas, images, [2, 2, 2, 2], 2, PAPER_AUGMENTATION, tmp_path)
    assert stats.computed == 2 and stats.cached == 6  # only copy 1 of images 2 and 3 was missing
    np.testing.assert_array_equal(fewer[:2], first[:2, :2])
    more, stats = bank.bank_features(body, shas, images, [4, 4, 4, 4], 4, PAPER_AUGMENTATION, tmp_path)
    assert stats.computed == 2 * 1 + 2 * 2 and stats.cached == 10  # copy 3 of 0, 1; copies 2, 3 of 2, 3
    np.testing.assert_array_equal(more[:, :2], fewer)


# --- end to end -------------------------------------------------------------------------------


def _paper_test_fingerprint(data: Path, seed: int) -> str:
    train = load_dataset(data, split="train")
    split = paper_splits(np.asarray(train.label_indices), [seed])[0]
    return fingerprint_of(train.samples[i].sha256 for i in split.test_idx)


@pytest.mark.parametrize("run", ["plain_run", "fast_run"])
def test_both_paths_write_a_run_on_the_paper_split(run, request, dataset_dir):
    run_dir = request.getfixturevalue(run)
    results = load_results(run_dir)
    assert results["kind"] == "finetune" and results["class_names"] == list(CLASSES)
    (evaluation,) = results["evaluations"]
    assert evaluation.model == ("finetune-fast" if run == "fast_run" else "finetune")
    assert evaluation.protocol == "paper" and (evaluation.n_train, evaluation.n_test) == (28, 8)
    assert evaluation.test_fingerprint == _paper_test_fingerprint(dataset_dir, seed=0)
    assert 0.0 <= evaluation.metrics["accuracy"] <= 1.0 and evaluation.fit_seconds > 0
    assert results["record"]["partial"] is False and results["record"]["settings"]["seed"] == 0
    assert results["record"]["dataset"]["fingerprint"]
    for name in ("report.md", "curves.png", "confusion.png", "history.csv", "model.keras", "model.json"):
        assert (run_dir / name).is_file(), name
    assert len((run_dir / "history.csv").read_text().strip().splitlines()) == 1 + 2
    assert json.loads((run_dir / "status.json").read_text())["status"] == "complete"
    report = (run_dir / "report.md").read_text()
    assert "**Accuracy" in report and "paper: 0.9588" in report  # next to the paper's VGG16 row


def test_plain_run_exports_an_onnx_model_that_matches_keras(plain_run, dataset_dir):
    import onnxruntime as ort

    from cxr_transfer.finetune.model import load_finetuned

    info = json.loads((plain_run / "model.json").read_text())
    assert info["kind"] == "finetune" and info["backbone"] == "vgg16" and info["input_size"] == SIZE
    assert info["class_names"] == list(CLASSES) and info["weights_sha256"] == "random:seed0"
    assert info["onnx_max_probability_error"] <= 1e-4
    pixels = np.random.default_rng(2).uniform(0, 255, (3, SIZE, SIZE, 3)).astype(np.float32)
    session = ort.InferenceSession(str(plain_run / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_proba = session.run(None, {session.get_inputs()[0].name: pixels})[0]
    keras_proba = load_finetuned(str(plain_run / "model.keras")).predict(pixels, verbose=0)
    np.testing.assert_allclose(onnx_proba, keras_proba, atol=1e-4)
    np.testing.assert_allclose(onnx_proba.sum(axis=1), 1.0, atol=1e-5)


def test_fast_path_reuses_its_bank_and_is_reproducible(fast_run, dataset_dir, cache_dir, tmp_path):
    first = load_results(fast_run)["evaluations"][0]
    assert first.extra["bank_copies_computed"] == 28 * 3 + 8
    again = run_finetune(settings(dataset_dir, tmp_path / "again", cache_dir, fast=True, copies=3,
                                  export_onnx=False))
    repeat = load_results(again)["evaluations"][0]
    assert repeat.extra["bank_copies_computed"] == 0
    assert (again / "history.csv").read_text().splitlines()[1].split(",")[:5] == \
        (fast_run / "history.csv").read_text().splitlines()[1].split(",")[:5]
    assert repeat.metrics["confusion_matrix"] == first.metrics["confusion_matrix"]


def test_ctrl_c_keeps_a_partial_run_with_curves(dataset_dir, cache_dir, tmp_path):
    class CtrlC(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise KeyboardInterrupt

    run_dir = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        run_finetune(settings(dataset_dir, run_dir, cache_dir, epochs=4), callbacks=[CtrlC()])
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "partial" and status["partial"] is True and status["epochs_done"] == 2
    results = load_results(run_dir)
    assert results["record"]["partial"] is True and results["evaluations"] == []
    assert (run_dir / "curves.png").is_file()
    assert len((run_dir / "history.csv").read_text().strip().splitlines()) == 1 + 2
    assert "partial: true" in (run_dir / "report.md").read_text()
    assert not (run_dir / "model.keras").exists()


def test_ctrl_c_while_saving_keeps_every_epoch_and_no_half_model(dataset_dir, cache_dir, tmp_path, monkeypatch):
    """Issue 9, item 4: Ctrl-C after the last epoch (while saving) used to wipe the history to 0 epochs."""
    import cxr_transfer.finetune.run_folder as run_folder

    def interrupted_save(run_dir, *args, **kwargs):
        (run_dir / "model.keras").write_bytes(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(run_folder, "save_model", interrupted_save)
    run_dir = tmp_path / "saving"
    with pytest.raises(KeyboardInterrupt):
        run_finetune(settings(dataset_dir, run_dir, cache_dir, epochs=2))
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "partial" and status["epochs_done"] == 2, status
    assert "while saving" in status["reason"]
    assert len((run_dir / "history.csv").read_text().strip().splitlines()) == 1 + 2
    assert json.loads((run_dir / "run.json").read_text())["epochs_done"] == 2
    assert not (run_dir / "model.keras").exists()


def test_an_unreadable_image_is_skipped_and_counted(dataset_dir, cache_dir, tmp_path):
    """Issue 9, item 13: finetune stopped at the first unreadable image; it is skipped and counted like extract."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(dataset_dir, data)
    (data / "train" / "covid" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    run_dir = run_finetune(settings(data, tmp_path / "run", cache_dir, epochs=1, export_onnx=False))
    record = json.loads((run_dir / "run.json").read_text())
    assert [path for path, _ in record["dataset"]["skipped"]] == ["train/covid/broken.png"]
    assert record["dataset"]["n_images"] == 3 * 12
    assert json.loads((run_dir / "status.json").read_text())["status"] == "complete"


def test_missing_weights_fail_before_anything_is_written(dataset_dir, cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    empty = tmp_path / "weights"
    empty.mkdir()
    run_dir = tmp_path / "never"
    with pytest.raises(WeightsNotFoundError, match="no weights for vgg16"):
        run_finetune(settings(dataset_dir, run_dir, cache_dir, random_weights=False, weights_dir=empty,
                              allow_download=False))
    assert not run_dir.exists()


def test_predict_runs_the_fine_tuned_onnx_model_and_refuses_a_changed_file(plain_run, dataset_dir, tmp_path):
    import csv

    from cxr_transfer.classify.predict import predict_images
    from cxr_transfer.core.errors import CxrError
    from cxr_transfer.extract.pipeline import ExtractSettings

    out, skipped = predict_images(dataset_dir / "test", plain_run, ExtractSettings.from_options(progress=False), tmp_path / "p.csv")
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 6 and not skipped
    assert {r["predicted"] for r in rows} <= set(CLASSES)
    assert abs(sum(float(rows[0][f"p_{c}"]) for c in CLASSES) - 1) < 1e-4
    onnx = plain_run / "model.onnx"
    original = onnx.read_bytes()
    onnx.write_bytes(original + b"\0")
    try:
        with pytest.raises(CxrError, match="changed since it was saved"):
            predict_images(dataset_dir / "test", plain_run, ExtractSettings.from_options(progress=False), tmp_path / "q.csv")
    finally:
        onnx.write_bytes(original)


def test_model_json_fields_are_covered_by_its_description_digest(plain_run, dataset_dir, tmp_path):
    """Swapping the class names (or the input size) in model.json would relabel every prediction silently."""
    from cxr_transfer.classify.predict import predict_images
    from cxr_transfer.core.errors import CxrError
    from cxr_transfer.extract.pipeline import ExtractSettings

    described = plain_run / "model.json"
    original = described.read_text()
    info = json.loads(original)
    assert len(info["description_sha256"]) == 64
    for edit in ({"class_names": info["class_names"][::-1]}, {"input_size": info["input_size"] + 1}):
        described.write_text(json.dumps({**info, **edit}))
        try:
            with pytest.raises(CxrError, match="edited since the model was saved"):
                predict_images(dataset_dir / "test", plain_run, ExtractSettings.from_options(progress=False),
                               tmp_path / "p.csv")
        finally:
            described.write_text(original)
