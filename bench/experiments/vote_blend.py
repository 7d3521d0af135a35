"""How much the similar cases' vote adds to the network's P(malignant), chosen on validation over runs.

For each finished run folder (model.pt and split.csv, trained on the bundled demo set or ``--data``)
the script embeds the run's training images with its own network, takes the ``k`` nearest training
images of every validation and test image by cosine similarity (``lesion.similar``), and scores
``(1 - w) * network + w * vote`` for every k and w asked. It prints, per candidate, the mean
validation ROC-AUC over the runs, the paired gain over the network alone with its 95 % t-interval,
on how many runs it went up, and the test figures beside them (to be read only after the choice).

    python -m bench.experiments.vote_blend runs/lite0-s0 runs/lite0-s1 runs/lite0-s2 --k 8,16,32,64 --w 0.25,0.5,0.75

Each run's own split pairs the candidates. The runs' own scoring path is used (the Predictor, with
the checkpoint's temperature, its own similar-cases index set aside), so "network" reproduces each
run's recorded network ROC-AUC (``roc_auc`` for a run without a vote, ``similar.softmax_roc_auc``
for one with). The vote is over every training image, where a checkpoint's index keeps at most
``lesion.similar.MAX_IMAGES``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score

from lesion.checkpoint import load_checkpoint
from lesion.export import _fold, split_frame
from lesion.predict import Predictor
from lesion.similar import blended, normalised


def scores(run: Path, data: str, ks: list[int], weights: list[float]) -> dict[str, dict[str, float]]:
    """{fold: {candidate: ROC-AUC}} for one run; candidate "network", "vote{k}" and "k{k}_w{w}"."""
    checkpoint = load_checkpoint(run / "model.pt")
    checkpoint["split"] = {"csv": (run / "split.csv").read_text(encoding="utf-8"), "data": data}
    predictor = Predictor({key: value for key, value in checkpoint.items() if key not in ("similar", "conformal")})
    frame = split_frame(checkpoint)
    train = _fold(frame, "train")
    bank = normalised(predictor.features(train["path"].tolist()))
    train_labels = torch.tensor(train["label"].to_numpy(), dtype=torch.float32)
    result = {}
    for fold in ("val", "test"):
        part = _fold(frame, fold)
        y = part["label"].to_numpy()
        p = predictor.p_malignant(part["path"].tolist())
        similarity = normalised(predictor.features(part["path"].tolist())) @ bank.T
        found = {"network": roc_auc_score(y, p)}
        for k in ks:
            vote = train_labels[similarity.topk(min(k, len(train)), dim=1).indices].mean(dim=1).numpy()
            found[f"vote{k}"] = roc_auc_score(y, vote)
            for w in weights:
                found[f"k{k}_w{w:g}"] = roc_auc_score(y, blended(p, vote, w))
        result[fold] = found
    return result


def summary(results: list[dict[str, dict[str, float]]]) -> list[str]:
    """One line per candidate: validation mean, paired gain over the network [95 % t-interval], runs up."""
    lines = []
    for name in results[0]["val"]:
        val = np.array([r["val"][name] for r in results])
        gain = val - np.array([r["val"]["network"] for r in results])
        test = np.array([r["test"][name] - r["test"]["network"] for r in results])
        half = stats.t.ppf(0.975, len(gain) - 1) * gain.std(ddof=1) / np.sqrt(len(gain)) if len(gain) > 1 else np.nan
        lines.append(
            f"{name:12s} validation {val.mean():.4f}  gain {gain.mean():+.4f} [{gain.mean() - half:+.4f}, "
            f"{gain.mean() + half:+.4f}]  up on {int((gain > 0).sum())}/{len(gain)}  | test "
            f"{np.mean([r['test'][name] for r in results]):.4f} (gain {test.mean():+.4f})"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run folders")
    parser.add_argument("--data", default="assets/demo", help="the data folder the runs trained on")
    parser.add_argument("--k", default="8,16,32,64", help="vote sizes, comma-separated")
    parser.add_argument("--w", default="0.25,0.5,0.75", help="vote weights in (0, 1), comma-separated")
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    args = parser.parse_args(argv)
    ks = [int(k) for k in args.k.split(",")]
    weights = [float(w) for w in args.w.split(",")]
    results = []
    for run in args.runs:
        if not (run / "model.pt").is_file() or not (run / "split.csv").is_file():
            print(f"error: {run} has no model.pt and split.csv (train it to the end first)", file=sys.stderr)
            return 2
        results.append(scores(run, args.data, ks, weights))
        print(f"{run}: validation network {results[-1]['val']['network']:.4f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(dict(zip(map(str, args.runs), results, strict=True)), indent=1) + "\n")
    print("\n".join(summary(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
