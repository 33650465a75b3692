"""shift: two-sample tests (level and power), ATC / DoC, the workflow end to end and its refusals."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cxr_transfer.core.errors import CxrError
from cxr_transfer.extract.pipeline import ExtractSettings
from cxr_transfer.validation.accuracy_estimates import atc, atc_threshold, doc, estimate_accuracy
from cxr_transfer.validation.run import ValidateSettings, run_validate
from cxr_transfer.validation.shift import MIN_TARGET_IMAGES, ShiftSettings, evaluate_shift, run_shift
from cxr_transfer.validation.two_sample import (
    auc_score,
    domain_classifier_test,
    group_permutations,
    mmd_test,
    prepare,
)
from testkit.synthetic import write_class_tree

# ------------------------------------------------------------------------------------- two-sample tests


def _clustered(rng: np.random.Generator, patients: int, per_patient: int, dim: int, shift: float = 0.0):
    """Images of ``patients`` patients, each image its patient's effect plus noise: images of one patient are
    alike, so they are not exchangeable one by one."""
    effects = rng.normal(size=(patients, dim)) + shift
    X = np.repeat(effects, per_patient, axis=0) + 0.5 * rng.normal(size=(patients * per_patient, dim))
    return X, np.repeat(np.arange(patients), per_patient)


def test_mmd_keeps_its_level_under_no_shift_with_patients_of_several_images():
    # 300 draws of TRAIN and TARGET from one distribution; 3 images per patient. Whole-patient permutations keep
    # the false-positive rate at the level; image-by-image permutations would reject far too often.
    rng = np.random.default_rng(1)
    p_values = []
    for draw in range(300):
        X, g = _clustered(rng, 20, 3, 8)
        Y, h = _clustered(rng, 10, 3, 8)
        p_values.append(mmd_test(prepare(X, Y, g, h), n_permutations=99, seed=draw).p_value)
    p_values = np.array(p_values)
    rate = float(np.mean(p_values <= 0.05))
    assert 0.01 <= rate <= 0.09, rate                          # binomial sd at 0.05 over 300 draws: 0.013
    assert 0.4 <= p_values.mean() <= 0.6                       # roughly uniform
    image_level = [mmd_test(prepare(*_clustered(rng, 20, 3, 8)[:1], *_clustered(rng, 10, 3, 8)[:1]),
                            n_permutations=99, seed=k).p_value for k in range(60)]
    assert np.mean(np.array(image_level) <= 0.05) > 0.3        # the same data, patients ignored: not at the level


def test_domain_classifier_keeps_its_level_under_no_shift():
    rng = np.random.default_rng(2)
    p_values = [domain_classifier_test(prepare(rng.normal(size=(60, 6)), rng.normal(size=(30, 6))), folds=3,
                                       n_permutations=19, seed=k).p_value for k in range(40)]
    rate = float(np.mean(np.array(p_values) <= 0.1))
    assert rate <= 0.22, rate                                  # level 0.1; binomial sd over 40 draws: 0.047
    assert 0.35 <= np.mean(p_values) <= 0.7                    # roughly uniform on {1/20, ..., 1}: mean 0.525


def test_a_planted_shift_is_detected_by_both_tests():
    rng = np.random.default_rng(3)
    X, Y = rng.normal(size=(120, 64)), rng.normal(size=(60, 64))
    Y[:, :4] += 1.0                                            # a shift in 4 of 64 directions
    pooled = prepare(X, Y)
    domain = domain_classifier_test(pooled, n_permutations=99)
    assert domain.auc > 0.75 and domain.p_value == pytest.approx(0.01)   # the smallest p of 99 permutations
    assert mmd_test(pooled, n_permutations=99).p_value == pytest.approx(0.01)
    ranked = np.argsort(-domain.scores[120:])
    assert len(domain.scores) == 180 and ranked.shape == (60,)


def test_group_permutations_move_whole_patients_and_auc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    domain = np.array([0, 0, 0, 0, 1, 1])
    groups = np.array(["a", "a", "b", "c", "d", "d"])
    for labels in group_permutations(domain, groups, 20, 0):
        assert labels[0] == labels[1] and labels[4] == labels[5] and sorted(labels.tolist()) != [0] * 6
    rng = np.random.default_rng(0)
    y, s = rng.integers(0, 2, 50), np.round(rng.random(50), 1)    # with ties
    assert auc_score(y, s) == pytest.approx(roc_auc_score(y, s))


# ------------------------------------------------------------------------------------- ATC and DoC


def test_atc_threshold_and_doc_by_hand():
    scores = np.array([0.2, 0.4, 0.6, 0.8, 0.9])
    correct = np.array([1, 1, 1, 0, 1])                       # accuracy 0.8: one score at or below t
    t = atc_threshold(scores, correct)
    assert 0.2 < t < 0.4 and np.mean(scores > t) == pytest.approx(0.8)
    source = np.array([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2], [0.7, 0.3]])
    target = np.array([[0.55, 0.45], [0.95, 0.05]])
    assert atc(source, np.array([1, 1, 0, 1]), target, "atc_mc") == pytest.approx(0.5)   # t between 0.6 and 0.7
    # DoC: accuracy 0.75 - (mean confidence 0.75 - 0.75) = 0.75
    assert doc(source, np.array([1, 1, 0, 1]), target) == pytest.approx(0.75)


def _calibrated_predictions(rng: np.random.Generator, n: int, wrong_but_sure: float = 0.0):
    """3-class probabilities whose confidence is the chance of being right; ``wrong_but_sure`` of the rows are
    wrong with confidence ~0.99 (the shortcut failure)."""
    confidence = rng.uniform(0.4, 1.0, n)
    y = rng.integers(0, 3, n)
    right = rng.random(n) < confidence
    sure = rng.random(n) < wrong_but_sure
    confidence[sure], right[sure] = 0.99, False
    predicted = np.where(right, y, (y + 1 + rng.integers(0, 2, n)) % 3)
    proba = np.tile(((1 - confidence) / 2)[:, None], (1, 3))
    proba[np.arange(n), predicted] = confidence
    return proba, y


def test_estimates_are_close_without_shift_and_optimistic_when_confidently_wrong():
    rng = np.random.default_rng(4)
    errors_same, errors_shifted = [], []
    for _ in range(20):
        source, y = _calibrated_predictions(rng, 400)
        same, y_same = _calibrated_predictions(rng, 400)
        shifted, y_shifted = _calibrated_predictions(rng, 400, wrong_but_sure=0.3)
        for target, truth, errors in ((same, y_same, errors_same), (shifted, y_shifted, errors_shifted)):
            found = estimate_accuracy(source, y, target, n_boot=100).estimates
            accuracy = float(np.mean(target.argmax(axis=1) == truth))
            errors.append([found[m]["value"] - accuracy for m in ("atc_ne", "atc_mc", "doc")])
    same, shifted = np.abs(errors_same).mean(axis=0), np.array(errors_shifted).mean(axis=0)
    assert (same < 0.04).all(), same                          # no shift: within a few points
    assert (shifted > 0.1).all(), shifted                     # confidently wrong: optimistic by far more
    one = estimate_accuracy(*_calibrated_predictions(rng, 200), _calibrated_predictions(rng, 50)[0], n_boot=200)
    for values in one.estimates.values():
        assert 0.0 <= values["ci_low"] <= values["value"] <= values["ci_high"] <= 1.0


# ------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def shift_setup(tmp_path_factory, tiny_exports) -> dict:
    """TRAIN (train/test splits, patient ids), TARGET with a manifest (source, patient ids), a logreg head saved
    by validate, and one cache, all on mobilenetv2 with random weights at 32 px."""
    base = tmp_path_factory.mktemp("shift")
    train = write_class_tree(base / "train", per_class=12, splits=("train", "test"))
    lines = ["path,patient_id"] + [f"{p.relative_to(train).as_posix()},{p.parts[-2]}-{p.parts[-3]}-{p.stem}"
                                   for p in sorted(train.rglob("*.png"))]
    (train / "manifest.csv").write_text("\n".join(lines) + "\n")
    target = write_class_tree(base / "target", per_class=5, seed=500)
    lines = ["path,source,patient_id"] + [f"{p.relative_to(target).as_posix()},{'a' if i % 2 else 'b'},t{i}"
                                          for i, p in enumerate(sorted(target.rglob("*.png")))]
    (target / "manifest.csv").write_text("\n".join(lines) + "\n")
    cache = base / "features"
    shutil.copytree(tiny_exports, cache / "onnx")                # skips the ONNX export
    extract = ExtractSettings.from_options(backbone="mobilenetv2", random_weights=True, input_size=32,
                                           progress=False, cache_dir=cache)
    run_validate(ValidateSettings(data=train, external=target, extract=extract, backbones="mobilenetv2",
                                  heads="logreg", folds=3, n_boot=100, save=True, n_jobs=1), base, "head")
    return {"base": base, "train": train, "target": target, "extract": extract,
            "model": base / "head" / "mobilenetv2-logreg.joblib"}


def test_shift_run_writes_its_folder_with_estimates_and_subgroups(shift_setup, tmp_path):
    s = shift_setup
    result = run_shift(ShiftSettings(data=s["train"], target=s["target"], extract=s["extract"], model=s["model"],
                                     subgroups="source,nowhere", permutations=49, folds=3, n_boot=100, top=4),
                       tmp_path, "run")
    assert {p.name for p in result.run_dir.iterdir()} == {"report.md", "results.json", "record.json",
                                                          "atypical.png", "atypical.csv"}
    payload = json.loads((result.run_dir / "results.json").read_text(), parse_constant=pytest.fail)
    assert payload["n_train"] == 36 and payload["n_target"] == 15
    assert 0 <= payload["domain_auc"] <= 1 and 0 < payload["domain_p"] <= 1 and 0 < payload["mmd_p"] <= 1
    assert payload["shift_detected"] == (min(payload["domain_p"], payload["mmd_p"]) <= 0.025)
    for method in ("atc_ne", "atc_mc", "doc"):
        value = payload["estimated_accuracy"][method]
        assert 0 <= value["ci_low"] <= value["value"] <= value["ci_high"] <= 1
    assert payload["target_accuracy"]["value"] is not None         # class folders: scored, for evaluation only
    assert {r["value"] for r in payload["subgroups"]} == {"a", "b"} and all(r["n"] >= 7 for r in payload["subgroups"])
    assert any("no column 'nowhere'" in note for note in payload["notes"])
    with open(result.run_dir / "atypical.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 15 and [int(r["rank"]) for r in rows] == list(range(1, 16))
    assert [float(r["p_target"]) for r in rows] == sorted((float(r["p_target"]) for r in rows), reverse=True)
    assert {"predicted", "confidence", "source"} <= set(rows[0])
    report = (result.run_dir / "report.md").read_text()
    assert report.index("## Verdict") < report.index("## Two-sample tests") < report.index("## Expected accuracy")
    assert ("can be optimistic" in report) == payload["shift_detected"]


def test_a_planted_shift_in_the_images_is_detected_and_flat_folders_are_read(shift_setup, tmp_path):
    s = shift_setup
    flat = tmp_path / "flat"
    flat.mkdir()
    for k, image in enumerate(sorted(s["target"].rglob("*.png"))):      # unlabeled: images straight in the folder
        from PIL import Image

        pixels = 255 - np.asarray(Image.open(image))                    # inverted: a planted shift
        Image.fromarray(pixels.astype(np.uint8)).save(flat / f"x{k:02d}.png")
    result = evaluate_shift(ShiftSettings(data=s["train"], target=flat, extract=s["extract"], model=s["model"],
                                          permutations=49, folds=3, n_boot=100))
    assert result.shift_detected and result.results["domain_auc"] > 0.9
    assert result.results["target_accuracy"] is None                  # no labels: nothing scored
    assert any("can be optimistic" in line for line in result.summary_lines())


def _copy_images(source: Path, target: Path, count: int) -> Path:
    for k, image in enumerate(sorted(source.rglob("*.png"))[:count]):
        (target / "covid").mkdir(parents=True, exist_ok=True)
        shutil.copy(image, target / "covid" / f"c{k}.png")
    return target


def test_shift_refusals_are_one_line_each(shift_setup, tmp_path, run_cli):
    s = shift_setup
    settings = dict(data=s["train"], extract=s["extract"], permutations=19, folds=3, n_boot=100)
    few = _copy_images(s["target"], tmp_path / "few", MIN_TARGET_IMAGES - 1)
    with pytest.raises(CxrError, match=f"{MIN_TARGET_IMAGES - 1} target image\\(s\\); a shift check needs at least"):
        evaluate_shift(ShiftSettings(target=few, **settings))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CxrError, match="no images found in the target folder"):
        evaluate_shift(ShiftSettings(target=tmp_path / "empty", **settings))
    with pytest.raises(CxrError, match="not external"):                # TRAIN's own images
        evaluate_shift(ShiftSettings(target=s["train"] / "train", **settings))
    one_class = write_class_tree(tmp_path / "one", classes=("covid",), per_class=8)
    with pytest.raises(CxrError, match="TRAIN has one class"):
        evaluate_shift(ShiftSettings(**{**settings, "data": one_class}, target=s["target"]))
    with pytest.raises(CxrError, match="permutations must be at least 19"):
        ShiftSettings(target=s["target"], **{**settings, "permutations": 5})
    common = ["--backbone", "mobilenetv2", "--random-weights", "--input-size", "32", "--cache-dir",
              s["extract"].cache_dir, "--no-progress", "--data", s["train"], "--out", tmp_path]
    for target, words in ((few, "a shift check needs at least"), (s["train"] / "train", "not external")):
        done = run_cli("shift", "--target", target, *common)
        assert done.returncode == 2 and words in done.error_line()


def test_one_labelled_class_in_the_target_is_a_note_not_an_error(shift_setup, tmp_path):
    s = shift_setup
    target = _copy_images(s["target"], tmp_path / "one", 8)
    result = evaluate_shift(ShiftSettings(data=s["train"], target=target, extract=s["extract"], model=s["model"],
                                          permutations=19, folds=3, n_boot=100))
    assert any("one class only (covid)" in note for note in result.notes)


def test_the_api_function_returns_in_memory_and_checks_its_keywords(shift_setup, tmp_path):
    import cxr_transfer

    s = shift_setup
    keywords = dict(random_weights=True, input_size=32, cache_dir=s["extract"].cache_dir, progress=False,
                    permutations=19, folds=3, n_boot=100)
    result = cxr_transfer.shift_check(s["train"], s["target"], "mobilenetv2", **keywords)
    assert result.run_dir is None and result.results["estimated_accuracy"] is None   # no model: tests only
    assert result.summary_lines()[0].startswith("Shift ")
    with pytest.raises(TypeError, match="unknown setting\\(s\\) heads for shift_check"):
        cxr_transfer.shift_check(s["train"], s["target"], "mobilenetv2", heads="logreg", **keywords)
    with pytest.raises(CxrError, match="out_dir is needed"):
        cxr_transfer.shift_check(s["train"], s["target"], "mobilenetv2", run_name="x", **keywords)
    with pytest.raises(TypeError, match="model must be a str or Path"):
        cxr_transfer.shift_check(s["train"], s["target"], model=3)


def test_overlap_words_say_when_near_duplicates_were_not_looked_for():
    from cxr_transfer.validation.run import overlap_words

    overlap = {"identical": {"n": 2}, "near_duplicate": {"n": None},
               "shared_patients": {"n_external_images": 0, "n": 0}}
    assert overlap_words(overlap).startswith("2 byte-identical, near duplicates not looked for, 0 sharing")
    overlap["near_duplicate"]["n"] = 1
    assert overlap_words(overlap).startswith("2 byte-identical, 1 near-duplicate, 0 sharing")
