"""What the explanations cost beside the forward pass: nearest cases, the diagnosis set and the PDF report.

    python -m bench.explanations [--checkpoint assets/models/lesion-efficientnet-lite0-demo.pt] [--reps 20]

Measured in one run, round-robin, medians after warm-up, with the bundled model (its real index
of training-split embeddings) on one sample lesion:

  1. a bare forward pass of the network (batch 1, no_grad) — the baseline;
  2. the similar-case search for that image's features (cosine against the whole index, the 6
     shown and the 16-case vote) — with the model's index, and with a synthetic index of
     :data:`lesion.similar.MAX_IMAGES` rows (the most a checkpoint keeps);
  3. the conformal set from the image's probabilities;
  4. the whole prediction (decode, forward, Grad-CAM, OOD, cases, set);
  5. the one-page PDF report of that prediction (the goal: under 1 s on the CPU).

Prints each median and its ratio to (1).
"""

from __future__ import annotations

import argparse
import math
import os

import torch

from bench.common import REPO
from bench.predict_pace import median_seconds
from lesion import conformal, similar
from lesion.explain import overlay
from lesion.images import load_image
from lesion.predict import Predictor
from lesion.report import CasePictures, ModelFacts, render_report
from lesion.runs import BUNDLED_MODEL

SAMPLE = REPO / "assets" / "samples" / "lesions" / "ISIC_0000169.jpg"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.explanations", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(BUNDLED_MODEL))
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)

    device = torch.device("cpu")
    print(f"device: CPU, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    predictor = Predictor.from_checkpoint(args.checkpoint)
    if predictor.similar is None or predictor.conformal is None:
        print("error: this checkpoint stores no similar cases or no conformal calibration; re-export it")
        return 1
    batch = predictor.preprocessor.batch([predictor.preprocessor.prepare_one(SAMPLE)])
    features = predictor.features([SAMPLE])
    width = features.shape[1]
    large = similar.SimilarIndex(
        similar.build_index(
            torch.randn(similar.MAX_IMAGES, width),
            [str(i) for i in range(similar.MAX_IMAGES)],
            [i % 2 for i in range(similar.MAX_IMAGES)],
            ["nv"] * similar.MAX_IMAGES,
        )
    )
    prediction = predictor.predict(SAMPLE, ood_threshold=math.inf)
    probabilities = [prediction.dx_probabilities[name] for name in predictor.dx_names] or [
        prediction.probabilities[name] for name in predictor.class_names
    ]
    image = load_image(SAMPLE)
    heatmap = overlay(image, prediction.heatmap, box=prediction.crop_box)
    facts = ModelFacts.from_checkpoint(predictor.checkpoint, "bundled")
    pictures = CasePictures(predictor.checkpoint)
    thumbnails = pictures.for_prediction(prediction)

    def forward() -> None:
        with torch.no_grad():
            predictor.model(batch)

    runs = {
        "bare forward (baseline)": forward,
        f"similar cases, model's index ({len(predictor.similar)} cases)": lambda: predictor.similar.search(features),
        f"similar cases, {similar.MAX_IMAGES}-case index": lambda: large.search(features),
        "diagnosis set": lambda: conformal.prediction_set(predictor.conformal, probabilities, 0.9),
        "whole prediction (decode ... set)": lambda: predictor.predict(SAMPLE),
        "PDF report": lambda: render_report(
            prediction, image, facts, name=SAMPLE.name, heatmap_image=heatmap, thumbnails=thumbnails
        ),
    }
    medians = median_seconds(runs, args.reps, args.warmup, device)
    base = medians["bare forward (baseline)"]
    print(f"checkpoint: {args.checkpoint} ({predictor.checkpoint['arch']}, {predictor.image_size} px)")
    for name, seconds in medians.items():
        print(f"{name:48s} {seconds * 1000:9.2f} ms  {seconds / base:7.3f}x forward")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
