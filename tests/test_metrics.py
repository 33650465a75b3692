"""classify.metrics against confusion matrices worked out by hand, and against sklearn."""

import math

import numpy as np
import pytest
from sklearn.metrics import precision_recall_fscore_support

from cxr_transfer.classify.metrics import (
    HEADLINE_METRICS,
    classification_metrics,
    confusion_matrix,
    headline,
    metrics_from_confusion,
    summarize,
)
from cxr_transfer.core.errors import CxrError

PAPER_CLASSES = ("covid", "normal", "pneumonia")


def test_confusion_matrix_rows_true_cols_predicted_and_absent_labels_kept():
    y_true = np.array([0, 0, 1, 1, 1])
    y_pred = np.array([0, 1, 1, 1, 0])
    cm = confusion_matrix(y_true, y_pred, n_classes=4)
    # true 0 -> pred 0 once, pred 1 once; true 1 -> pred 1 twice, pred 0 once; labels 2, 3 absent.
    expected = np.array([[1, 1, 0, 0], [1, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, expected)


def test_confusion_matrix_rejects_out_of_range_labels():
    with pytest.raises(CxrError):
        confusion_matrix(np.array([0, 3]), np.array([0, 1]), n_classes=3)
    with pytest.raises(CxrError):
        confusion_matrix(np.array([0, 1]), np.array([0]), n_classes=3)


def test_three_classes_one_never_predicted():
    # rows = true, cols = predicted; class "c" (2 images) is never predicted.
    cm = np.array([[3, 1, 0], [1, 4, 0], [1, 1, 0]])
    m = metrics_from_confusion(cm, ["a", "b", "c"])
    # n = 11, trace = 3 + 4 + 0 = 7 -> accuracy 7/11
    assert m["accuracy"] == pytest.approx(7 / 11)
    # a: TP=3, FP=(3+1+1)-3=2, FN=1, TN=11-3-2-1=5
    #    P=3/5, R=3/4, F1=2*0.6*0.75/(0.6+0.75)=0.9/1.35=2/3, spec=5/(5+2)=5/7
    a = m["per_class"]["a"]
    assert (a["precision"], a["recall"]) == (pytest.approx(3 / 5), pytest.approx(3 / 4))
    assert a["f1"] == pytest.approx(2 / 3)
    assert a["specificity"] == pytest.approx(5 / 7)
    assert a["support"] == 4
    # b: TP=4, FP=(1+4+1)-4=2, FN=1, TN=11-4-2-1=4
    #    P=4/6, R=4/5, F1=2*(2/3)*(4/5)/(2/3+4/5)=(16/15)/(22/15)=8/11, spec=4/(4+2)=2/3
    b = m["per_class"]["b"]
    assert (b["precision"], b["recall"]) == (pytest.approx(2 / 3), pytest.approx(4 / 5))
    assert b["f1"] == pytest.approx(8 / 11)
    assert b["specificity"] == pytest.approx(2 / 3)
    # c: TP=0, FP=0 (never predicted -> precision 0/0 -> 0.0), FN=2, TN=9
    #    P=0.0, R=0/2=0, F1=0.0 (0/0), spec=9/(9+0)=1.0
    c = m["per_class"]["c"]
    assert c == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "specificity": 1.0, "support": 2}
    # macro = unweighted means over the three classes
    assert m["macro"]["precision"] == pytest.approx((3 / 5 + 2 / 3 + 0) / 3)
    assert m["macro"]["recall"] == pytest.approx((3 / 4 + 4 / 5 + 0) / 3)
    assert m["macro"]["f1"] == pytest.approx((2 / 3 + 8 / 11 + 0) / 3)
    assert m["macro"]["specificity"] == pytest.approx((5 / 7 + 2 / 3 + 1) / 3)
    assert m["confusion_matrix"] == cm.tolist()


def test_paper_vgg16_sized_confusion_matrix():
    # 68 test images: 26 covid, 20 normal, 22 pneumonia (VGG16 row of Table 1, as given in the brief).
    cm = np.array([[25, 0, 1], [0, 20, 0], [1, 1, 20]])
    m = metrics_from_confusion(cm, PAPER_CLASSES)
    # trace = 25 + 20 + 20 = 65 -> accuracy 65/68 ~ 0.9559
    assert m["accuracy"] == pytest.approx(65 / 68)
    # covid: TP=25, FP=(25+0+1)-25=1, FN=26-25=1, TN=68-25-1-1=41
    #   P=25/26, R=25/26, F1=2TP/(2TP+FP+FN)=50/52=25/26, spec=41/42
    covid = m["per_class"]["covid"]
    assert covid["precision"] == pytest.approx(25 / 26)
    assert covid["recall"] == pytest.approx(25 / 26)
    assert covid["f1"] == pytest.approx(25 / 26)
    assert covid["specificity"] == pytest.approx(41 / 42)
    assert covid["support"] == 26
    # normal: TP=20, FP=(0+20+1)-20=1, FN=0, TN=68-20-1-0=47
    #   P=20/21, R=1, F1=40/41, spec=47/48
    normal = m["per_class"]["normal"]
    assert normal["precision"] == pytest.approx(20 / 21)
    assert normal["recall"] == pytest.approx(1.0)
    assert normal["f1"] == pytest.approx(40 / 41)
    assert normal["specificity"] == pytest.approx(47 / 48)
    # pneumonia: TP=20, FP=(1+0+20)-20=1, FN=22-20=2, TN=68-20-1-2=45
    #   P=20/21, R=20/22=10/11, F1=40/43, spec=45/46
    pneumonia = m["per_class"]["pneumonia"]
    assert pneumonia["precision"] == pytest.approx(20 / 21)
    assert pneumonia["recall"] == pytest.approx(10 / 11)
    assert pneumonia["f1"] == pytest.approx(40 / 43)
    assert pneumonia["specificity"] == pytest.approx(45 / 46)
    assert m["macro"]["recall"] == pytest.approx((25 / 26 + 1 + 10 / 11) / 3)

    flat = headline(m)
    assert flat["accuracy"] == pytest.approx(65 / 68)
    assert flat["covid_sensitivity"] == pytest.approx(25 / 26)
    assert flat["covid_specificity"] == pytest.approx(41 / 42)
    assert flat["macro_f1"] == pytest.approx((25 / 26 + 40 / 41 + 40 / 43) / 3)
    assert flat["roc_auc_macro"] is None  # no probabilities in metrics_from_confusion


def test_perfect_classifier():
    y = np.array([0, 0, 1, 1, 1, 2, 2])
    proba = np.eye(3)[y]
    m = classification_metrics(y, y, PAPER_CLASSES, proba=proba)
    assert m["accuracy"] == 1.0
    for values in m["per_class"].values():
        assert (values["precision"], values["recall"], values["f1"], values["specificity"]) == (1.0, 1.0, 1.0, 1.0)
    assert m["macro"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "specificity": 1.0}
    assert m["roc_auc"] == {"covid": 1.0, "normal": 1.0, "pneumonia": 1.0, "macro": 1.0}
    assert m["confusion_matrix"] == [[2, 0, 0], [0, 3, 0], [0, 0, 2]]


def test_roc_auc_by_hand_and_undefined_cases():
    y_true = np.array([0, 0, 1, 1])
    y_pred = np.array([0, 1, 0, 1])
    # class 0 scores: positives {0.9, 0.4}, negatives {0.5, 0.1}
    # pairs pos>neg: 0.9>0.5, 0.9>0.1, 0.4>0.1 (0.4<0.5 fails) -> AUC 3/4
    p0 = np.array([0.9, 0.4, 0.5, 0.1])
    proba = np.column_stack([p0, 1 - p0, np.zeros(4)])
    m = classification_metrics(y_true, y_pred, ["a", "b", "c"], proba=proba)
    assert m["roc_auc"]["a"] == pytest.approx(0.75)
    assert m["roc_auc"]["b"] == pytest.approx(0.75)  # 1 - p0 ranks class b the mirror way
    assert m["roc_auc"]["c"] is None  # no positives for c in y_true
    assert m["roc_auc"]["macro"] == pytest.approx(0.75)  # mean over defined classes only

    without_proba = classification_metrics(y_true, y_pred, ["a", "b", "c"])
    assert without_proba["roc_auc"] == {"a": None, "b": None, "c": None, "macro": None}
    with pytest.raises(CxrError):
        classification_metrics(y_true, y_pred, ["a", "b", "c"], proba=proba[:, :2])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_sklearn_on_random_labels(seed):
    rng = np.random.default_rng(seed)
    n_classes = 4
    y_true = rng.integers(0, n_classes, size=200)
    y_pred = rng.integers(0, n_classes - 1, size=200)  # the last class is never predicted
    m = metrics_from_confusion(confusion_matrix(y_true, y_pred, n_classes), list("wxyz"))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=range(n_classes), zero_division=0
    )
    for index, name in enumerate("wxyz"):
        assert m["per_class"][name]["precision"] == pytest.approx(precision[index])
        assert m["per_class"][name]["recall"] == pytest.approx(recall[index])
        assert m["per_class"][name]["f1"] == pytest.approx(f1[index])
        assert m["per_class"][name]["support"] == support[index]
    assert m["macro"]["f1"] == pytest.approx(f1.mean())
    assert m["accuracy"] == pytest.approx(np.mean(y_true == y_pred))
    # specificity: recall of "not class c" = TN / (TN + FP)
    for index, name in enumerate("wxyz"):
        negatives = y_true != index
        expected = np.mean(y_pred[negatives] != index)
        assert m["per_class"][name]["specificity"] == pytest.approx(expected)


def test_summarize_t_interval_by_hand():
    s = summarize([0.8, 0.9, 1.0])
    # mean 0.9; std(ddof=1) = sqrt((0.01 + 0 + 0.01) / 2) = 0.1
    # t_{0.975, 2} = 4.302652729911275; half width = 4.3027 * 0.1 / sqrt(3) = 0.248414
    half = 4.302652729911275 * 0.1 / math.sqrt(3)
    assert s["n"] == 3
    assert s["mean"] == pytest.approx(0.9)
    assert s["std"] == pytest.approx(0.1)
    assert s["ci_low"] == pytest.approx(0.9 - half)
    assert s["ci_high"] == pytest.approx(0.9 + half)
    assert s["ci_high"] > 1.0  # not clipped: the caller decides


def test_summarize_single_value_and_errors():
    assert summarize([0.7]) == {"mean": 0.7, "std": 0.0, "ci_low": 0.7, "ci_high": 0.7, "n": 1}
    with pytest.raises(CxrError):
        summarize([])
    with pytest.raises(CxrError):
        summarize([0.5, 0.6], confidence=1.5)


def test_headline_names_and_missing_positive_class():
    assert HEADLINE_METRICS == ("accuracy", "covid_sensitivity", "covid_specificity", "macro_f1")
    m = classification_metrics(np.array([0, 1, 1]), np.array([0, 1, 0]), ["normal", "pneumonia"])
    flat = headline(m)
    assert set(HEADLINE_METRICS) <= set(flat)
    assert flat["covid_sensitivity"] is None and flat["covid_specificity"] is None
    assert flat["accuracy"] == pytest.approx(2 / 3)
    # normal: P=1/2, R=1 -> F1=2/3; pneumonia: P=1, R=1/2 -> F1=2/3
    assert flat["macro_f1"] == pytest.approx(2 / 3)
    other = headline(m, positive_class="pneumonia")
    assert other["pneumonia_sensitivity"] == pytest.approx(0.5)
    assert other["pneumonia_specificity"] == pytest.approx(1.0)
