"""The model card: what the model is, what it was trained and measured on, and what it is not for.

Built from the checkpoint alone, so it can be rewritten whenever a threshold is saved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lesion.checkpoint import load_checkpoint
from lesion.files import CARD_FILE, MODEL_FILE, write_text_atomic
from lesion.labels import dx_name
from lesion.model import DISPLAY_NAMES

INTENDED_USE = """\
**Intended use.** A demonstration and research tool: it shows how a convolutional network, a
Grad-CAM heatmap and an out-of-distribution check behave on dermoscopic images. It is **not a
medical device and does not give a diagnosis**. Nobody should act on its output; a skin lesion
that worries anyone belongs in front of a dermatologist.

**Limits.** Trained on dermoscopic images only (close-up, polarised, usually centred lesions from
the ISIC archive / HAM10000, mostly fair skin); photos from a phone without a dermatoscope, other
skin types, and lesion classes outside the eight HAM10000 ones are outside what it has seen. The
OOD check rejects photos that look unlike the training lesions, but it is a statistical screen,
not a guarantee. The figures below were measured once, on the held-out split named beside them;
small splits give wide uncertainty.
"""


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _describe_change(change: Any) -> str:
    """One line for a threshold saved from the OOD page (lesion.runs.save_ood_threshold)."""
    if not isinstance(change, dict):
        return f"changed: {change}"
    old, new = change.get("old_threshold"), change.get("new_threshold")
    method, previous = change.get("method"), change.get("old_method")
    switched = f" (detector in use was {previous})" if previous and previous != method else ""

    def number(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, (int, float)) else "n/a"

    return f"{change.get('time', '?')}: {method} threshold set from {number(old)} to {number(new)} on the OOD page{switched}"


def _metrics_table(metrics: dict[str, Any]) -> list[str]:
    keys = (
        "roc_auc",
        "pr_auc",
        "balanced_accuracy",
        "accuracy",
        "sensitivity",
        "specificity",
        "precision",
        "f1",
        "sens_at_90_spec",
        "spec_at_90_sens",
        "ece_before_scaling",
        "ece_after_scaling",
        "n",
        "n_malignant",
    )
    lines = ["| metric | validation | test |", "| --- | --- | --- |"]
    val, test = metrics.get("val", {}), metrics.get("test", {})
    for key in keys:
        if key in val or key in test:
            lines.append(f"| {key} | {_fmt(val.get(key))} | {_fmt(test.get(key))} |")
    return lines


def _split_table(split: dict[str, dict[str, int]]) -> list[str]:
    lines = ["| split | benign | malignant |", "| --- | --- | --- |"]
    for fold, counts in split.items():
        lines.append(f"| {fold} | {counts.get('benign', 0)} | {counts.get('malignant', 0)} |")
    return lines


def _head_line(checkpoint: dict[str, Any], metrics: dict[str, Any]) -> str:
    """What the head predicts, and why when training fell back to binary."""
    names, malignant = checkpoint.get("dx_names") or [], checkpoint.get("dx_malignant") or []
    note = metrics.get("target_note") or ""
    if not names:
        return "- Head: benign / malignant" + (f" ({note})" if note else "")
    bad = [name for name, is_bad in zip(names, malignant, strict=True) if is_bad]
    side = float((checkpoint.get("config") or {}).get("side_loss") or 0.0)
    loss = (
        f"; loss: diagnosis cross-entropy plus {side:g} x benign / malignant cross-entropy of P(malignant)"
        if side
        else "; loss: diagnosis cross-entropy"
    )
    return (
        f"- Head: one output per diagnosis ({', '.join(names)}); P(malignant) is the sum of the calibrated "
        f"probabilities of the malignant ones ({', '.join(bad)}){loss}"
    )


def _dx_section(dx: dict[str, Any], split: str) -> list[str]:
    """Per-diagnosis recall, precision and support, and the dx confusion matrix, as Markdown."""
    names = dx.get("names") or []
    lines = [
        f"Diagnosis ({split} split): balanced accuracy (mean recall over diagnoses, the ISIC 2018 task 3 "
        f"measure) **{_fmt(dx.get('balanced_accuracy'))}**, accuracy {_fmt(dx.get('accuracy'))}, "
        f"{dx.get('n', 0)} images"
        + (f" ({dx['n_unscored']} without a dx output left out)" if dx.get("n_unscored") else ""),
        "",
        "| diagnosis | support | recall | precision |",
        "| --- | --- | --- | --- |",
    ]
    for name in names:
        lines.append(
            f"| {name} ({dx_name(name)}) | {dx['support'].get(name, 0)} | {_fmt(dx['recall'].get(name))} "
            f"| {_fmt(dx['precision'].get(name))} |"
        )
    lines += ["", "Confusion matrix (rows: true diagnosis, columns: predicted; plots/dx_confusion.png):", ""]
    lines.append("| true \\ predicted | " + " | ".join(names) + " |")
    lines.append("| --- |" + " --- |" * len(names))
    for name, row in zip(names, dx.get("confusion") or [], strict=False):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    return [*lines, ""]


def _fine_tuning(config: dict[str, Any]) -> str:
    """The fine-tuning settings, when they differ from training every layer at one learning rate."""
    parts = []
    if config.get("freeze_stages"):
        stages = int(config["freeze_stages"])
        parts.append(f"stem and first {stages} stages frozen" if stages > 1 else "stem and first stage frozen")
    if config.get("backbone_lr_scale", 1.0) != 1.0:
        parts.append(f"backbone learning rate {config['backbone_lr_scale']} x lr")
    if config.get("warmup_epochs"):
        parts.append(f"{config['warmup_epochs']} warm-up epochs")
    return f"; {', '.join(parts)}" if parts else ""


def render_model_card(checkpoint: dict[str, Any], name: str = "model") -> str:
    """Markdown text of the card."""
    config, data, metrics = checkpoint.get("config", {}), checkpoint.get("data", {}), checkpoint.get("metrics", {})
    ood = checkpoint["ood"]
    skipped = data.get("skipped", {}) or {}
    n_skipped = sum(len(v) for v in skipped.values() if isinstance(v, list))
    lines = [
        f"# Model card: {name}",
        "",
        "> Demonstration only — not a diagnosis.",
        "",
        "## Model",
        f"- Architecture: {DISPLAY_NAMES.get(checkpoint['arch'], checkpoint['arch'])} (`{checkpoint['arch']}`) with a {checkpoint['head']} head; classes {', '.join(checkpoint['class_names'])}",
        _head_line(checkpoint, metrics),
        f"- Input: {checkpoint['image_size']} px centre crop of the image resized to {checkpoint['resize_size']} px (shorter side)",
        f"- Initial weights: {data.get('weights', config.get('weights', 'unknown'))}",
        f"- Trained: {checkpoint.get('created', 'unknown')}, best epoch {checkpoint.get('epoch')} of {metrics.get('epochs_run', '?')}"
        + (" (stopped by the user)" if metrics.get("stopped_by_user") else ""),
        f"- Recipe settings: optimizer {config.get('optimizer')}, lr {config.get('lr')}, batch {config.get('batch_size')}, "
        f"augmentation {config.get('augment')}, balance {config.get('balance')}, seed {config.get('seed')}"
        + _fine_tuning(config),
        "",
        "## Data and split",
        f"- Source: {data.get('layout', 'unknown')} metadata `{data.get('metadata', '?')}`; {data.get('n_images', '?')} images "
        f"of {data.get('n_lesions', '?')} lesions",
        "- Split by lesion (no lesion on two sides), stratified by label and diagnosis, seeded; saved as split.csv",
        f"- Images skipped as missing, unreadable or of unknown diagnosis: {n_skipped}",
        f"- ISIC rows dropped as Indeterminate: {data.get('dropped_indeterminate', 0)}",
        "",
        *_split_table(data.get("split", {})),
        "",
        "## Thresholds",
        f"- Decision threshold on calibrated P(malignant): {checkpoint['decision_threshold']:.3f} "
        f"(rule: {config.get('threshold_rule')}, fitted on the validation split)",
        *_vote_line(checkpoint),
        f"- Calibration temperature: {checkpoint['temperature']:.3f} (fitted on the validation split)",
        f"- Out-of-distribution detector in use: **{ood.get('method')}**",
    ]
    for method, stats in ood.get("detectors", {}).items():
        accepted = metrics.get("ood_test_lesions_accepted", {}).get(method)
        note = f"; accepts {accepted:.1%} of test lesions" if accepted is not None else ""
        spread = stats.get("rejection_spread") or {}
        if spread.get("median") is not None:
            note += (
                f"; rejects {spread['median']:.1%} of new lesions (bootstrap 95 % range "
                f"{spread['low']:.1%}-{spread['high']:.1%}, target {spread['target']:.0%})"
            )
        lines.append(f"  - {method}: threshold {float(stats['threshold']):.4f}{note}")
    for change in checkpoint.get("threshold_history", []):
        lines.append(f"  - {_describe_change(change)}")
    lines += [
        "",
        "## Measured performance",
        f"Headline figures come from the **{metrics.get('headline_split', 'test')}** split, measured once after training.",
        "",
        *_metrics_table(metrics),
        "",
    ]
    per_dx = metrics.get("test", {}).get("recall_per_dx") or {}
    if per_dx:
        lines += ["Share of each diagnosis given its correct benign / malignant label (test split):", ""]
        lines += [f"- {dx}: {_fmt(value)}" for dx, value in sorted(per_dx.items())]
        lines.append("")
    dx = metrics.get("test", {}).get("dx")
    if dx:
        lines += _dx_section(dx, "test")
    lines += _explanations_section(checkpoint, metrics.get("test", {}))
    lines += ["## Intended use and limits", "", INTENDED_USE]
    return "\n".join(lines)


def _vote_line(checkpoint: dict[str, Any]) -> list[str]:
    """How P(malignant) is formed when the similar cases' vote is part of it ([] when it is not)."""
    index = checkpoint.get("similar") or {}
    weight = float(index.get("weight", 0.0) or 0.0)
    if weight <= 0:
        return []
    return [
        f"- P(malignant) = {1 - weight:.0%} of the network's calibrated probability + {weight:.0%} of the share "
        f"malignant among the {index.get('k')} most similar training lesions (the threshold, like every figure "
        "below, is on that blend; the network's own ROC-AUC is under Explanations)"
    ]


def _explanations_section(checkpoint: dict[str, Any], test: dict[str, Any]) -> list[str]:
    """Similar cases and prediction sets: what the checkpoint holds and how they did on the test split."""
    index, sets = checkpoint.get("similar"), checkpoint.get("conformal")
    if not index and not sets:
        return []
    lines = ["## Explanations", ""]
    if index:
        vote = test.get("similar") or {}
        sample = index.get("sampled_from", len(index["image_ids"]))
        lines.append(
            f"- Similar cases: embeddings ({index.get('feature', 'features')}, float16) of "
            f"{len(index['image_ids'])} training-split images"
            + (f" (a stratified sample of {sample})" if sample > len(index["image_ids"]) else "")
        )
        if vote:
            lines.append(
                f"  - Test split ({vote.get('n')} images): the {vote.get('k')}-nearest vote's ROC-AUC "
                f"{_fmt(vote.get('vote_roc_auc'))} against the softmax's {_fmt(vote.get('softmax_roc_auc'))}; "
                f"their most common diagnosis is right for {_fmt(vote.get('dx_majority_accuracy'))} of images"
            )
    if sets:
        measured = test.get("sets") or {}
        lines.append(
            f"- Prediction sets: split-conformal ({sets['method'].upper()}), calibrated on "
            f"{len(sets['scores'])} validation images; default coverage {sets.get('default_coverage', 0.9):.0%}"
        )
        if measured.get("n"):
            lines += [
                f"  - Test split ({measured['n']} images): empirical coverage **{_fmt(measured['coverage'])}** "
                f"at nominal {measured['nominal_coverage']:.0%}, mean set size **{measured['mean_size']:.2f}**",
                "",
                "| true class | images | coverage | mean set size |",
                "| --- | --- | --- | --- |",
                *(
                    f"| {name} | {row['n']} | {_fmt(row['coverage'])} | {row['mean_size']:.2f} |"
                    for name, row in measured.get("per_class", {}).items()
                ),
                "",
                "Coverage is guaranteed on average over images like the validation ones, not per diagnosis.",
            ]
    return [*lines, ""]


def write_model_card(target: str | Path) -> Path:
    """Write model_card.md beside a checkpoint (``target`` is the run folder or the checkpoint)."""
    target = Path(target)
    checkpoint_path = target / MODEL_FILE if target.is_dir() else target
    checkpoint = load_checkpoint(checkpoint_path)
    return write_text_atomic(
        checkpoint_path.parent / CARD_FILE, render_model_card(checkpoint, checkpoint_path.parent.name)
    )
