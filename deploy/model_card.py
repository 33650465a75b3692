"""model-card.md for an exported model, after Mitchell et al. 2019, "Model Cards for Model Reporting".

Every number in the card comes from the exported file's metadata and the run records behind it
(``deploy.evidence``: the validate, compare or finetune run, and an audit of the training data); the words around
them are fixed templates. A section whose record is missing says which command would fill it.
"""
from __future__ import annotations

import json
from typing import Any

METRIC_NAMES = {"accuracy": "accuracy", "macro_f1": "macro F1", "auc_macro": "AUC (macro, one-vs-rest)",
                "roc_auc_macro": "AUC (macro, one-vs-rest)"}


def _f(value: Any, digits: int = 3) -> str:
    """A number with ``digits`` decimals; a metric record (``{"mean": ..., "ci_low": ...}``) with its interval."""
    if isinstance(value, dict):
        return _ci(value)
    return "n/a" if value is None else f"{float(value):.{digits}f}"


def _ci(metric: dict[str, Any] | None) -> str:
    """``0.856 [0.772, 0.921]`` from a value (or mean) and its interval."""
    if not metric:
        return "n/a"
    centre = metric.get("value", metric.get("mean"))
    text = _f(centre)
    if metric.get("ci_low") is not None:
        text += f" [{_f(metric['ci_low'])}, {_f(metric['ci_high'])}]"
    return text


def _subgroup_accuracy(row: dict[str, Any]) -> str:
    """A subgroup row's accuracy and Wilson interval (its ``value`` is the subgroup's value, not a number)."""
    return _ci({"value": row["accuracy"], "ci_low": row.get("ci_low"), "ci_high": row.get("ci_high")})


def _metric_label(name: str) -> str:
    if name in METRIC_NAMES:
        return METRIC_NAMES[name]
    for kind in ("sensitivity", "specificity", "auc"):
        if name.startswith(kind + "_"):
            return f"{'AUC' if kind == 'auc' else kind} {name[len(kind) + 1:]}"
        if name.endswith("_" + kind):
            return f"{kind} {name[:-len(kind) - 1]}"
    return name.replace("_", " ")


def model_card(metadata: dict[str, str], evidence: dict[str, Any] | None, audit: dict[str, Any] | None,
               file_name: str, sha256: str, max_difference: float) -> str:
    """The card's markdown for a file ``export_model`` wrote (its ``metadata_props`` as ``metadata``)."""
    classes = json.loads(metadata["class_names"])
    size = json.loads(metadata["input"])["size"]
    training = json.loads(metadata.get("training") or "{}")
    title = f"{metadata['backbone']} + {metadata['head']}"
    lines = [f"# Model card: {title} ({', '.join(classes)})", "",
             f"Written by cxr-transfer {metadata['project_version']} with `{file_name}` from the run records named "
             f"below; every number is copied from them.", ""]
    lines += _details(metadata, training, classes, size, file_name, sha256, max_difference)
    lines += _uses(classes, evidence)
    lines += _training_data(evidence, training, audit)
    lines += _evaluation(evidence)
    lines += _calibration(evidence)
    lines += _limitations(evidence, audit, classes)
    return "\n".join(lines).rstrip() + "\n"


def _details(metadata: dict[str, str], training: dict[str, Any], classes: list[str], size: int, file_name: str,
             sha256: str, max_difference: float) -> list[str]:
    head = (f"scikit-learn head `{metadata['head']}` (`{metadata['head_file']}`, joblib sha256 "
            f"`{metadata['head_joblib_sha256'][:16]}...`)" if metadata.get("head_file")
            else f"fine-tuned model (`{metadata['head']}`)")
    return ["## Model details", "",
            f"- **File**: `{file_name}`, one ONNX graph, model_sha256 `{sha256}` (checked by `cxr-transfer predict`)",
            f"- **Input**: uint8 RGB images, shape (N, {size}, {size}, 3); read and resized by: "
            f"{metadata['resize_rule']}",
            f"- **Output**: `probabilities` (float32, columns {', '.join(classes)}) and `label` (the class name of "
            f"the largest probability)",
            f"- **Backbone**: {metadata['backbone']} ({metadata['precision']}), weights sha256 "
            f"`{metadata['backbone_weights_sha256'][:16]}...`; ImageNet preprocessing inside the graph",
            f"- **Head**: {head}",
            f"- **Training**: seed {training.get('seed', 'n/a')}, {training.get('n_train', 'n/a')} images, data "
            f"fingerprint `{str(metadata.get('training_data_fingerprint') or 'n/a')[:16]}...`",
            f"- **Export check**: the file's probabilities differ from the two-stage path (backbone, then head) by "
            f"at most {max_difference:.1e} on the check batch", ""]


def _uses(classes: list[str], evidence: dict[str, Any] | None) -> list[str]:
    validated = evidence is not None and evidence.get("kind") == "validate"
    return ["## Intended use", "",
            f"- Research on chest X-ray classification into {', '.join(classes)}: benchmarking transfer learning, "
            "reproducing published results, and testing a model on a site's own images before any further step.",
            "- A second reader for research teams, next to a radiologist's reading, never instead of it.", "",
            "## Not intended use", "",
            "- Diagnosis, triage or treatment decisions for patients: the model was not evaluated prospectively "
            "or cleared by any regulator.",
            f"- Images of other findings or diseases: the model always answers one of {', '.join(classes)}.",
            "- Images unlike the training data (other hospitals, ages, views, devices or file formats) without first "
            "checking them" + (": see the external results below." if validated
                               else ": this model has no external validation record (run `cxr-transfer validate "
                                    "--save` and export its head)."), ""]


def _training_data(evidence: dict[str, Any] | None, training: dict[str, Any],
                   audit: dict[str, Any] | None) -> list[str]:
    lines = ["## Training data", ""]
    train = (evidence or {}).get("train") or {}
    root = train.get("root") or training.get("dataset")
    lines.append(f"- `{root}`{train.get('note', '')}: {train.get('n') or training.get('n_train')} images, "
                 f"fingerprint `{str(train.get('fingerprint') or training.get('trained_on'))[:16]}...`")
    if evidence and evidence.get("merged_groups"):
        lines.append(f"- Patients joined because they share a near-duplicate radiograph: "
                     f"{'; '.join(evidence['merged_groups'])}")
    if audit is None:
        lines += ["- **Audit**: no audit of this training data was found (run `cxr-transfer audit --data "
                  f"{root}`, then export again, or give `--audit`).", ""]
        return lines
    dup, leak = audit["duplicates"], audit["leakage"]
    lines += [f"- **Audit** (`{audit['audit']}`, {str(audit['created'])[:10]}, "
              f"{audit['dataset'].get('n_images')} images): {audit.get('verdict') or ''}"]
    lines += [f"  - finding: {f}" for f in audit["findings"]]
    lines.append(f"  - duplicates: {dup.get('n_exact')} exact, {dup.get('n_near')} near-duplicate pairs "
                 f"({dup.get('n_near_different_patient')} across different patient ids, "
                 f"{dup.get('n_near_cross_label')} across labels, {dup.get('n_near_cross_split')} across splits)")
    lines.append("  - patient leakage across splits: " + (f"{leak.get('n_leaked')} of {leak.get('n_patients')} "
                                                         f"patients" if leak.get("checked")
                                                         else f"not checked ({leak.get('reason')})"))
    acq = audit["acquisition"]
    if acq.get("accuracy") is not None and not acq.get("skipped"):
        lines.append(f"  - class predicted from acquisition properties alone (size, format, bit depth...): accuracy "
                     f"{_f(acq['accuracy'])} vs chance {_f(acq.get('chance'))}"
                     + (" (a shortcut)" if acq.get("shortcut") else ""))
    pixels = audit["pixel_shortcuts"]
    if pixels.get("accuracy") and not pixels.get("skipped"):
        shown = ", ".join(f"{name} {_f(acc)}" for name, acc in pixels["accuracy"].items())
        lines.append(f"  - class predicted from masked images: {shown} (chance {_f(pixels.get('chance'))})"
                     + ("; the classes can be told apart without the lungs" if pixels.get("separable_without_lungs")
                        else ""))
    return lines + [""]


def _evaluation(evidence: dict[str, Any] | None) -> list[str]:
    lines = ["## Evaluation", ""]
    if evidence is None:
        return lines + ["No run record was found beside the saved head, so this card holds no evaluation (export "
                        "a head from the run folder where compare or validate `--save` wrote it).", ""]
    lines.append(f"From the {evidence['kind']} run `{evidence['run']}` ({str(evidence.get('created'))[:19]}; "
                 f"report: `{evidence['report']}`).")
    lines.append("")
    if evidence["kind"] != "validate":
        lines += [f"Protocol {evidence.get('protocol')}, {evidence.get('n_evaluations')} evaluation(s), mean "
                  f"[interval] over them; no external validation.", "", "| metric | value |", "|---|---|"]
        lines += [f"| {_metric_label(k)} | {_ci(v)} |" for k, v in evidence["metrics"].items()]
        return lines + [""]
    method, ext = evidence["internal_method"], evidence["external"]
    lines += [f"- internal: out-of-fold predictions of {method.get('folds')}-fold cross-validation of the training "
              f"data grouped by {method.get('grouping')}; intervals: {method.get('interval')} "
              f"({method.get('n_boot')} replicates, resampling {method.get('units')})",
              f"- external: `{ext.get('root')}`, {ext.get('n')} images never used for training or tuning, "
              f"fingerprint `{str(ext.get('fingerprint'))[:16]}...`; the head fitted on all training images", ""]
    lines += ["| metric | internal | external | gap (external - internal) |", "|---|---|---|---|"]
    lines += [f"| {_metric_label(k)} | {_ci(v['internal'])} | {_ci(v['external'])} | {_ci(v['gap'])} |"
              for k, v in evidence["metrics"].items()]
    overlap = evidence.get("overlap") or {}
    lines += ["", f"Overlap of the external images with the training images: {overlap.get('identical')} identical, "
                  f"{overlap.get('near_duplicate')} near-duplicate, {overlap.get('shared_patients')} shared "
                  f"patients; {overlap.get('excluded')} excluded from the external scores.", ""]
    if evidence.get("subgroups"):
        lines += ["### External results by subgroup", "",
                  "| subgroup | class | n | accuracy [Wilson 95%] | flagged |", "|---|---|---|---|---|"]
        flagged = {(r["column"], r["value"], r["class"]) for r in evidence.get("flagged_subgroups", [])}
        for column, rows in evidence["subgroups"].items():
            for r in rows:
                mark = "below internal" if (column, r["value"], r["class"]) in flagged else ""
                lines.append(f"| {column}={r['value']} | {r['class']} | {r['n']} | {_subgroup_accuracy(r)} | {mark} |")
        lines.append("")
    return lines


def _calibration(evidence: dict[str, Any] | None) -> list[str]:
    if evidence is None or evidence.get("kind") != "validate":
        return []
    cal, conf = evidence.get("calibration") or {}, evidence.get("conformal")
    lines = ["## Calibration and uncertainty", "",
             f"- Expected calibration error (top label, 10 bins): internal {_f(cal['internal'].get('ece'))}, "
             f"external {_f(cal['external'].get('ece'))}; Brier score internal {_f(cal['internal'].get('brier'))}, "
             f"external {_f(cal['external'].get('brier'))}"]
    if conf:
        lines.append(f"- Conformal prediction sets at alpha {conf.get('alpha')} (target coverage "
                     f"{_f(1 - float(conf['alpha']), 2)}): coverage internal {_f(conf.get('internal_coverage'))}, "
                     f"external {_f(conf.get('external_coverage'))} (mean set size "
                     f"{_f(conf.get('external_mean_set_size'), 2)})")
        if conf.get("min_probability") is not None:
            threshold = _f(conf["min_probability"], 4)
            lines.append(f"- Conformal threshold: {conf['rule'].replace('min_probability', threshold)}")
    return lines + [""]


def _limitations(evidence: dict[str, Any] | None, audit: dict[str, Any] | None, classes: list[str]) -> list[str]:
    lines = ["## Limitations", ""]
    train_n = ((evidence or {}).get("train") or {}).get("n")
    if train_n:
        lines.append(f"- It learned from {train_n} images; small subgroups of patients, devices and ages are "
                     f"represented by few images or none.")
    if evidence is None or evidence.get("kind") != "validate":
        lines.append("- Its accuracy on images from other hospitals is unknown: it was not validated externally.")
    else:
        acc = evidence["metrics"]["accuracy"]
        gap = acc.get("gap") or {}
        if gap.get("ci_high") is not None and gap["ci_high"] < 0:
            lines.append(f"- On external images it was less accurate than inside its training data: "
                         f"{_ci(acc['external'])} vs {_ci(acc['internal'])}. Expect the lower number, or lower, on "
                         f"new sites.")
        for row in evidence.get("flagged_subgroups", []):
            what = f"{row['column']}={row['value']}" + ("" if row["class"] == "all" else f", class {row['class']}")
            lines.append(f"- It fails more often on {what}: accuracy {_subgroup_accuracy(row)} on {row['n']} external "
                         f"image{'' if row['n'] == 1 else 's'}.")
        cal = evidence.get("calibration") or {}
        ext_ece, int_ece = cal.get("external", {}).get("ece"), cal.get("internal", {}).get("ece")
        if ext_ece is not None and int_ece is not None and ext_ece > 2 * int_ece:
            lines.append(f"- Its probabilities are less trustworthy on external images (calibration error "
                         f"{_f(ext_ece)} vs {_f(int_ece)} internally): a high probability is not a sure answer.")
    if audit and audit["pixel_shortcuts"].get("separable_without_lungs"):
        lines.append("- The training classes can be told apart with the lungs blacked out, so part of its accuracy "
                     "may come from image source, text markers or borders rather than from the disease.")
    if audit and audit["acquisition"].get("shortcut"):
        lines.append("- The training classes differ in acquisition properties (image size, format, bit depth), a "
                     "shortcut a model can learn instead of the disease.")
    lines.append(f"- It always answers one of {', '.join(classes)}, also for images that show none of them.")
    return lines
