"""Config: recipe files, --key=value overrides, type checks, unknown keys refused."""

from __future__ import annotations

import pytest

from lesion.config import TrainConfig, build_config, config_from_dict, field_help, load_recipe
from lesion.errors import ConfigError
from tests.conftest import run_cli
from train.cli import get_args_parser


def test_recipes_load_and_validate() -> None:
    for name in ("demo", "bundled", "notebook", "recommended", "scratch"):
        config = build_config(name)
        assert isinstance(config, TrainConfig)
    notebook = build_config("notebook")
    assert (notebook.optimizer, notebook.lr, notebook.batch_size, notebook.epochs) == ("adam", 1e-4, 16, 20)
    assert (notebook.patience, notebook.head, notebook.image_size, notebook.weights) == (5, "mlp", 224, "imagenet")
    assert notebook.balance == "class_weights"


def test_overrides_come_after_the_recipe_and_are_typed() -> None:
    config = build_config("demo", ["--epochs=3", "--lr=0.01", "--amp=false", "--arch=resnet34"])
    assert (config.epochs, config.lr, config.amp, config.arch) == (3, 0.01, False, "resnet34")
    assert load_recipe("demo")["epochs"] != 3


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--epochs=two", "epochs must be an integer"),
        ("--epochs=1.5", "epochs must be an integer"),
        ("--lr=fast", "lr must be a number"),
        ("--amp=maybe", "amp must be true or false"),
        ("--arch=vgg16", "arch must be one of"),
        ("--learning_rate=0.1", "unknown option"),
        ("--image_size=8", "image_size must be at least 32"),
        ("--mix_prob=1.5", "mix_prob must lie in"),
        ("--ema_decay=1", "ema_decay must lie in"),
        ("--mixup_alpha=-1", "mixup_alpha and cutmix_alpha"),
        ("--augment=wild", "augment must be one of"),
    ],
)
def test_bad_overrides_are_refused_with_the_key_named(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(None, [override])


def test_unknown_recipe_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="known recipes: bundled, demo, notebook, recommended, scratch"):
        build_config("fastest")


def test_every_field_has_help_and_saved_configs_round_trip() -> None:
    assert set(field_help()) == set(TrainConfig.__dataclass_fields__)
    config = build_config("demo", {"seed": 7})
    assert config_from_dict({**config.__dict__, "retired_key": 1}) == config


def test_cli_help_lists_every_option_with_its_default() -> None:
    result = run_cli(["--help"])
    assert result.returncode == 0
    for name, value in TrainConfig().__dict__.items():
        assert f"--{name.replace('_', '-')}" in result.stdout
        assert f"(default: {value!r})" in " ".join(result.stdout.split()), name


def test_cli_takes_hyphens_underscores_and_both_value_forms() -> None:
    # One spelling in --help (hyphens); the underscore spelling of earlier versions still parses.
    args = get_args_parser().parse_args(
        ["--image-size=96", "--batch_size", "8", "--skip-bad-images", "true", "--num_workers=0", "--max-images", "40"]
    )
    overrides = {k: v for k, v in vars(args).items() if k != "recipe" and v is not None}
    assert overrides == {
        "image_size": "96",
        "batch_size": "8",
        "skip_bad_images": "true",
        "num_workers": "0",
        "max_images": "40",
    }
    config = build_config("demo", overrides)
    assert (config.image_size, config.batch_size, config.skip_bad_images, config.max_images) == (96, 8, True, 40)


def test_cli_rejects_unknown_option_and_bad_value() -> None:
    unknown = run_cli(["--learning_rate=1"])
    assert unknown.returncode == 2 and "unrecognized arguments: --learning_rate=1" in unknown.stderr
    bad = run_cli(["--epochs=many"])
    assert bad.returncode == 2 and "epochs must be an integer" in bad.stderr
