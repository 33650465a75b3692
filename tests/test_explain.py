"""explain: region shares, the exact CAM of linear heads, occlusion, Grad-CAM, sheets and the command line.

Random-weight VGG16 at 64 px (a 2 x 2 feature map) on tiny synthetic images."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from cxr_transfer.classify.compare import CompareSettings, run_compare
from cxr_transfer.classify.heads import make_head
from cxr_transfer.classify.predict import predict_images
from testkit.synthetic import write_class_tree
from cxr_transfer.explain.cam import class_activation_maps, linear_scores
from cxr_transfer.explain.occlusion import occlusion_map, patch_starts
from cxr_transfer.explain.regions import REGIONS, evidence_shares, region_masks
from cxr_transfer.explain.run import run_explain, explanation_sheet, mean_shares
from cxr_transfer.extract.dataset import load_dataset
from cxr_transfer.extract.images import read_rgb
from cxr_transfer.extract.pipeline import ExtractSettings
from cxr_transfer.extract.registry import get_backbone
from cxr_transfer.extract.weights import WeightsSource

SIZE = 64
RANDOM = WeightsSource("random", None, "random:seed0")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_class_tree(tmp_path_factory.mktemp("explain") / "data", per_class=8, splits=("train", "test"),
                            size=SIZE)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def extract_settings(cache_dir) -> ExtractSettings:
    return ExtractSettings.from_options(backbone="vgg16", random_weights=True, input_size=SIZE, progress=False,
                                        cache_dir=cache_dir)


@pytest.fixture(scope="module")
def saved_heads(data_dir, extract_settings, tmp_path_factory) -> Path:
    run = run_compare(CompareSettings(data=data_dir, extract=extract_settings, backbones="vgg16",
                                      heads="logreg,linsvm,knn", protocol="holdout", save=True, n_jobs=1),
                      tmp_path_factory.mktemp("runs"), "r")
    return run.run_dir


# --- regions ------------------------------------------------------------------------------------


def test_regions_are_the_audits_and_partition_the_image():
    masks = region_masks(100, 100)
    assert sum(m.astype(int) for m in masks.values()).min() == 1 == sum(m.astype(int) for m in masks.values()).max()
    assert masks["center"].sum() == 80 * 80                 # audit CENTER_FRACTION 0.8 of each side
    assert masks["border"].sum() == 100 * 100 - 90 * 90      # audit BORDER_FRACTION: a frame 5 px wide
    assert masks["middle"].sum() == 90 * 90 - 80 * 80


def test_shares_by_hand():
    top_left = np.array([[2.0, -5.0], [0.0, 0.0]])          # negative evidence does not count
    shares = evidence_shares(top_left, size=100)            # one 50 x 50 quadrant carries all the evidence
    assert shares == pytest.approx({"center": 40 * 40 / 2500, "middle": (45 * 45 - 40 * 40) / 2500,
                                    "border": (2500 - 45 * 45) / 2500})
    assert sum(shares.values()) == pytest.approx(1.0)
    frame = np.zeros((100, 100))
    frame[0, :] = 1.0
    assert evidence_shares(frame)["border"] == 1.0
    assert all(math.isnan(v) for v in evidence_shares(-np.ones((4, 4))).values())


# --- exact CAM ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def feature_maps(data_dir, cache_dir):
    from cxr_transfer.explain.feature_map import FeatureMapRunner, get_feature_map_backbone

    dataset = load_dataset(data_dir)
    images = np.stack([read_rgb(s.path, SIZE) for s in dataset.samples])
    exported = get_feature_map_backbone(get_backbone("vgg16"), SIZE, RANDOM, cache_dir)
    maps, pooled = FeatureMapRunner(exported, 1).run(images)
    return images, maps, pooled, np.array(dataset.label_indices), exported


def test_feature_map_export_pools_to_the_embedding(feature_maps, extract_settings, data_dir):
    from cxr_transfer.extract.pipeline import load_features

    _, maps, pooled, _, exported = feature_maps
    assert maps.shape[1:] == (2, 2, 512) and exported.layer == "block5_pool"
    np.testing.assert_allclose(maps.mean(axis=(1, 2)), pooled, rtol=1e-5, atol=1e-5 * np.abs(pooled).max())
    features, _ = load_features(load_dataset(data_dir), extract_settings)   # the backbone predict uses
    np.testing.assert_allclose(pooled, features.embeddings, atol=1e-4 * np.abs(pooled).max())


@pytest.mark.parametrize("head", ["logreg", "linsvm"])
def test_cam_sums_to_the_class_score_minus_bias(feature_maps, head):
    _, maps, pooled, labels, _ = feature_maps
    model = make_head(head).fit(pooled, labels)
    scores = linear_scores(model)
    assert scores is not None
    if head == "logreg":
        reference = model.decision_function(pooled)           # the head's own logits
    else:                                                      # signed one-vs-one SVC values, summed per class
        svc = model.named_steps["clf"].calibrated_classifiers_[0].estimator
        ovo = _ovo(svc, model.named_steps["scale"].transform(pooled))
        reference = np.zeros((len(pooled), 3))
        for row, (i, j) in enumerate([(0, 1), (0, 2), (1, 2)]):
            reference[:, i] += ovo[:, row]
            reference[:, j] -= ovo[:, row]
    np.testing.assert_allclose(scores.scores(pooled), reference, rtol=1e-6, atol=1e-6)
    for k in range(3):
        cam = class_activation_maps(maps, scores, np.full(len(maps), k))
        # sum over positions of the CAM = the class score minus the head's own bias
        np.testing.assert_allclose(cam.sum(axis=(1, 2)), reference[:, k] - scores.bias[k], rtol=1e-4, atol=1e-4)
        # and each position is W_k . (F_p - mean) / P: the logit decomposition over the 2 x 2 map
        np.testing.assert_allclose(cam[:, 1, 0], (maps[:, 1, 0] - scores.center) @ scores.weights[k] / 4,
                                   rtol=1e-6)


def _ovo(svc, scaled: np.ndarray) -> np.ndarray:
    from copy import copy

    ovo = copy(svc)
    ovo.decision_function_shape = "ovo"
    return ovo.decision_function(scaled)


def test_non_linear_heads_have_no_cam(feature_maps):
    _, _, pooled, labels, _ = feature_maps
    assert linear_scores(make_head("knn").fit(pooled, labels)) is None
    assert linear_scores(make_head("rbfsvm").fit(pooled, labels)) is None


# --- occlusion ----------------------------------------------------------------------------------


def test_patch_positions_cover_the_side():
    assert patch_starts(10, 4, 4) == [0, 4, 6]
    assert patch_starts(8, 8, 2) == [0]
    with pytest.raises(ValueError, match="instead"):
        patch_starts(8, 9, 1)


def test_occlusion_finds_what_a_toy_model_looks_at():
    def toy(images: np.ndarray) -> np.ndarray:        # p(class 1) rises with the top-left 8 x 8 brightness
        bright = images[:, :8, :8].astype(float).mean(axis=(1, 2, 3)) / 255
        return np.stack([1 - bright, bright], axis=1)

    image = np.zeros((32, 32, 3), np.uint8)
    image[:8, :8] = 255
    heatmap = occlusion_map(image, toy, 1, patch=8, stride=4)
    assert (heatmap[:8, :8] > 0).all()
    assert heatmap[:8, :8].max() == pytest.approx(1 - 16 / 255)   # fully hidden by the mean-grey patch (16)
    outside = np.ones_like(heatmap, bool)
    outside[:12, :12] = False                       # patches overlapping the corner reach 4 px past it
    assert np.abs(heatmap[outside]).max() == 0
    assert evidence_shares(heatmap)["center"] < evidence_shares(heatmap)["border"] + evidence_shares(heatmap)["middle"]


# --- Grad-CAM -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finetuned(data_dir, cache_dir, tmp_path_factory) -> Path:
    from cxr_transfer.finetune.train import FinetuneSettings, run_finetune

    return run_finetune(FinetuneSettings.from_options(
        data=data_dir, backbone="vgg16", random_weights=True, input_size=SIZE, epochs=1, progress=False,
        cache_dir=cache_dir, run_dir=tmp_path_factory.mktemp("ft") / "run", export_onnx=False))


def test_gradcam_matches_the_models_probabilities_and_gradient(finetuned, feature_maps):
    import tensorflow as tf

    from cxr_transfer.explain.gradcam import GradCam
    from cxr_transfer.finetune.model import load_finetuned

    images = feature_maps[0][:6]
    model = load_finetuned(str(finetuned / "model.keras"))
    gradcam = GradCam(model)
    maps, proba = gradcam.maps(images)
    assert maps.shape == (6, 2, 2) and gradcam.layer == "block5_pool"
    np.testing.assert_allclose(proba, model.predict(images.astype(np.float32), verbose=0), atol=1e-5)
    # the map sums to grad(logit of the predicted class, pooled features) . pooled features
    pooled = tf.Variable(gradcam.pooling(gradcam.feature_model(gradcam.preprocess(images.astype(np.float32)))))
    with tf.GradientTape() as tape:
        logits = gradcam.logits(pooled)
        chosen = tf.reduce_sum(logits * tf.one_hot(np.argmax(proba, axis=1), 3))
    expected = tf.reduce_sum(tape.gradient(chosen, pooled) * pooled, axis=1).numpy()
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), expected, rtol=1e-4, atol=1e-6)


# --- library and command line -------------------------------------------------------------------


def _rows(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_explain_images_csv_matches_predict_and_shares_sum_to_one(saved_heads, data_dir, extract_settings,
                                                                  tmp_path):
    model = saved_heads / "vgg16-logreg.joblib"
    result = run_explain(data_dir / "test", model, extract_settings, tmp_path / "out")
    rows = _rows(result.csv_path)
    assert result.method == "cam" and len(rows) == 24 == len(result.explanations)
    predicted, _ = predict_images(data_dir / "test", model, extract_settings, tmp_path / "p.csv")
    assert [r["predicted"] for r in rows] == [r["predicted"] for r in _rows(predicted)]
    with_evidence = [row for row in rows if row["border_share"]]
    assert len(with_evidence) >= 12          # a map without positive evidence has empty shares (documented)
    for row in rows:
        assert (result.out_dir / row["png"]).is_file()
        if row in with_evidence:
            shares = [float(row[f"{r}_share"]) for r in REGIONS]
            assert all(0 <= s <= 1 for s in shares) and sum(shares) == pytest.approx(1, abs=1e-3)
        else:
            assert not row["center_share"] and not row["middle_share"]
    means = mean_shares(result.explanations)
    assert sum(n for _, n in means.values()) == len(with_evidence)
    assert all(0 <= share <= 1 for share, _ in means.values())


def test_sheet_of_given_images(saved_heads, data_dir, extract_settings, tmp_path):
    paths = sorted((data_dir / "test" / "covid").glob("*.png"))[:3]
    out, explanations = explanation_sheet(paths, saved_heads / "vgg16-knn.joblib", tmp_path / "sheet.png",
                                          captions=["a", "b", "c"], columns=2, settings=extract_settings)
    assert out.is_file() and out.stat().st_size > 1000
    assert [Path(e.path).name for e in explanations] == [p.name for p in paths]
    assert {e.method for e in explanations} == {"occlusion"}                  # knn: no exact CAM


def test_cli_explain_end_to_end(run_cli, saved_heads, finetuned, data_dir, cache_dir, tmp_path):
    flags = ("--random-weights", "--cache-dir", cache_dir, "--no-progress")
    done = run_cli("explain", data_dir / "test" / "normal", "--model", saved_heads / "vgg16-linsvm.joblib",
                   "--out", tmp_path / "lin", *flags)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cam: 8 heatmaps" in done.stdout and "mean border share" in done.stdout
    assert len(_rows(tmp_path / "lin" / "explain.csv")) == 8
    done = run_cli("explain", data_dir / "test" / "pneumonia", "--model", finetuned, *flags)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _rows(finetuned / "explain" / "explain.csv")
    assert len(rows) == 8 and {r["method"] for r in rows} == {"gradcam"}
    refused = run_cli("explain", data_dir / "test", "--model", saved_heads / "vgg16-knn.joblib", "--method", "cam",
                      *flags)
    assert refused.returncode == 2 and "no exact class activation map" in refused.error_line()
    missing = run_cli("explain", tmp_path / "nothing", "--model", saved_heads / "vgg16-knn.joblib", *flags)
    assert missing.returncode == 2 and "no such file or folder" in missing.error_line()
