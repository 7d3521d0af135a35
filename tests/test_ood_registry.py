"""One registry of OOD detector names: the config's choices, the checkpoint default, the CLI and the predictor read it."""

from __future__ import annotations

import pytest

from lesion import ood
from lesion.checkpoint import new_checkpoint
from lesion.config import CHOICES, TrainConfig
from lesion.model import build_model
from lesion.predict import Predictor
from tests.helpers_model import tiny_checkpoint_dict
from train.predict import get_args_parser


def test_every_list_of_detector_names_is_the_registry():
    assert tuple(ood.DETECTORS) == ood.DETECTOR_NAMES
    assert CHOICES["ood_method"] is ood.DETECTOR_NAMES
    ood_option = next(a for a in get_args_parser()._actions if a.dest == "ood_method")
    assert sorted(ood_option.choices) == sorted(ood.DETECTOR_NAMES)
    assert {ood.DEFAULT_DETECTOR, ood.UNNAMED_DETECTOR} <= set(ood.DETECTOR_NAMES)


def test_training_and_a_new_checkpoint_name_the_one_default():
    assert TrainConfig().ood_method == ood.DEFAULT_DETECTOR
    model = build_model("resnet18", "linear", num_classes=2)
    assert new_checkpoint(model, "resnet18", "linear", 64)["ood"]["method"] == ood.DEFAULT_DETECTOR


def test_the_predictor_reads_the_registry_and_an_unnamed_entry_as_before():
    checkpoint = tiny_checkpoint_dict()
    assert set(checkpoint["ood"]["detectors"]) <= set(ood.DETECTOR_NAMES)
    assert Predictor(checkpoint, ood_method=ood.DEFAULT_DETECTOR).ood_method == ood.DEFAULT_DETECTOR
    unnamed = {**checkpoint, "ood": {**checkpoint["ood"], "method": None}}
    assert Predictor(unnamed).ood_method == ood.UNNAMED_DETECTOR == "mahalanobis"
    with pytest.raises(ValueError, match="choose one of " + ", ".join(ood.DETECTOR_NAMES)):
        Predictor(checkpoint, ood_method="odin")
