"""Every setting and default in one place: training, splitting, grouping, the demo. Standard library only.

Nothing here imports TensorFlow, Keras, NumPy or pandas, so the CLI can build its parser and ``--help`` from these
definitions without paying for them. :class:`TrainConfig` is the one source of truth for training: the CLI
builds it, :mod:`multitask.train` consumes it, and ``config.json`` stores it, so a run can be reproduced from
its own folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from multitask.errors import ConfigError
from multitask.taxonomy import TASKS

# ----------------------------------------------------------------------------------------------- choices

TASK_CHOICES = ("joint", *TASKS)
STRATEGIES = ("default", "mirrored", "multiworker")
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")  # auto: bf16 on a GPU that has it, else float32
SWITCHES = ("auto", "on", "off")  # --jit-compile (auto: on where a GPU is present), --decoded-cache (see below)
# --decoded-cache auto uses the decoded-image cache when it fits in this share of the free disk space under the
# cache folder (images x side^2 x 3 bytes: 268,203 per 299 px image, 34.9 GB for the full Kaggle set).
DECODED_CACHE_DISK_SHARE = 0.5
WEIGHTINGS = ("static", "uncertainty")
# --balance: "classes" weights each head's loss so its classes count equally (sklearn's "balanced" per head);
# "organs" weights every image by the inverse of its organ's share, in BOTH heads' losses, so a small organ counts as
# much as a large one in the cancer loss too (multitask.data.organ_weights). A config.json from before these modes
# holds true/false, which meant "classes"/"none" and still does (TrainConfig.__post_init__).
BALANCES = ("none", "classes", "organs")
# Fine-tuning augmentation (multitask.augment says what each one does and why it keeps the label): none, standard
# (flips, rotation up to ~10.8 degrees, 10% brightness/contrast: what every run before this setting used), strong.
AUGMENTS = ("none", "standard", "strong")
# Fine-tuning's learning rate over the phase: constant (every run before this setting), or cosine: from the rate down to
# 0 at the phase's last step (Keras' CosineDecay over fine_tune_epochs x the steps of an epoch). The schedule follows
# the optimizer's step count, which each epoch's backup holds, so a resumed run goes on where it stopped.
FINE_TUNE_SCHEDULES = ("constant", "cosine")
SPLITS = ("train", "val", "test")
SPLIT_METHODS = ("random", "grouped")
DEFAULT_SPLIT_METHOD = "grouped"  # leakage-aware: augmented siblings of one source stay in one split
DEFAULT_FRACTIONS = (0.70, 0.15, 0.15)
DEFAULT_SEED = 42
MIN_IMAGE_SIZE = 75  # InceptionV3's smallest accepted input
MAX_IMAGE_SIZE = 1024  # the largest model input: twice the Kaggle images' 512 px; memory grows with its square
BATCH_SIZE = 32  # prediction and evaluation
ENGINES = ("keras", "onnx", "int8")  # what runs the inference graph (multitask.engines)
EXPORT_FORMATS = ("tf_saved_model", "onnx", "int8")
EXPORT_CHECK_IMAGES = 32  # val/test images every export is checked on against Keras
SERVE_HOST = "127.0.0.1"  # multitask serve: localhost only unless asked (elsewhere --token is required)
SERVE_PORT = 8000
SERVE_MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # per file; a larger one gets an error entry, the others are answered
SERVE_MAX_FILES = 64  # per request
SERVE_MAX_REQUEST_BYTES = 48 * 1024 * 1024  # per request, counted as the bytes arrive: 413 and the connection closes
SERVE_MAX_BUFFERED_BYTES = 192 * 1024 * 1024  # file bytes all requests hold in memory together: 503 beyond
SERVE_MAX_UPLOADS = 8  # requests reading their upload at the same time: 503 beyond
SERVE_BODY_TIMEOUT_S = 60.0  # a request's whole upload must arrive within this: 408 beyond
SERVE_LOW_CONFIDENCE = 0.8  # the page marks an organ answer below this probability as uncertain
SERVE_MAX_BATCH = BATCH_SIZE  # micro-batching: one forward pass takes at most this many images...
SERVE_MAX_WAIT_MS = 10.0  # ...and waits at most this long for more to arrive after the first
BOOTSTRAP_RESAMPLES = 1000  # evaluate: resamples behind every 95% interval
BOOTSTRAP_SEED = 0


# ----------------------------------------------------------------------------------------------- training

# The default recipe for pretrained weights, chosen on validation by scripts/sweep_defaults.py over grouped splits of
# the 9-organ real sample (README "Training"): 299 px, the heads on cached features, then 3 epochs of fine-tuning
# from mixed7 at the heads' learning rate (ahead of 384 px, of 2 epochs at 299 px and of 3 at 256 px). A random-init
# backbone (--weights none) gains nothing from it, so it stays frozen there. A 4th epoch led on the mean in the
# reproducible rerun (0.957 against 0.944) but not on every seed, which the sweep asks of a new default.
PRETRAINED_FINE_TUNE_EPOCHS = 3
# Fine-tuning's learning rate, as a multiple of the heads' (learning_rate), from the same sweep at 299 px + 3 epochs:
# 1x (1e-4) scored higher than 0.1x (1e-5, the rate used until then) on every seed, in the first sweep (0.957
# against 0.935) and in the reproducible rerun (0.944 against 0.934); 3x (0.957 in the rerun) and 0.3x (0.947)
# did not beat 1x on every seed.
FINE_TUNE_LR_FACTOR = 1.0


def balance_mode(value: str | bool) -> str:
    """The --balance mode ``value`` means: an older config.json (or caller) holds true/false, a switch of class
    weights, which meant "classes"/"none"; a mode is returned as it is."""
    return ("classes" if value else "none") if isinstance(value, bool) else value


@dataclass
class TrainConfig:
    """Every training setting, with its default; ``config.json`` stores it under "settings"."""

    out: str = "run"
    data: str | None = None
    task: str = "joint"
    weights: str | None = "imagenet"
    image_size: int = 299  # InceptionV3's own size: the sweep's best (README "Training")
    batch_size: int = 32
    # Chosen on the real sample with the pretrained backbone, on VALIDATION (scripts/sweep_defaults.py; README
    # "Training"): Adam 1e-4 (the seed's rate) reached the lowest validation loss, 0.480, against 0.492 at 3e-4 and
    # 0.563 at 1e-3, but needs ~35 epochs: cheap, as the heads train on cached features. Patience 5 = 10 there.
    epochs: int = 40
    # None: PRETRAINED_FINE_TUNE_EPOCHS with pretrained weights (imagenet or a file), 0 with weights "none";
    # resolved on construction, so config.json always holds the number used.
    fine_tune_epochs: int | None = None
    unfreeze_from: str = "mixed7"  # same sweep, 2 fine-tuning epochs: validation loss 0.379, against 0.427 from mixed9
    learning_rate: float = 1e-4
    # None: FINE_TUNE_LR_FACTOR x learning_rate; resolved on construction, so config.json holds the rate used.
    fine_tune_learning_rate: float | None = None
    fine_tune_schedule: str = "constant"  # FINE_TUNE_SCHEDULES; a config.json from before this setting means constant
    loss_weights: dict[str, float] = field(default_factory=lambda: {t: 1.0 for t in TASKS})
    weighting: str = "static"
    balance: str = "none"  # BALANCES; true/false in an older config.json mean "classes"/"none"
    augment: str = "standard"  # AUGMENTS: fine-tuning's augmentation strength (phase 1 sees no augmentation)
    split_file: str | None = None
    split: str = DEFAULT_SPLIT_METHOD
    min_inliers: int | None = None  # grouped split: None = GroupingParams.min_inliers
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    seed: int = DEFAULT_SEED
    strategy: str = "default"
    taxonomy: str | None = None
    allow_unknown: bool = False
    cache_dir: str | None = None  # None: <out>/cache
    precision: str = "auto"  # PRECISIONS; the saved model computes in float32 whatever this is
    jit_compile: str = "auto"  # XLA
    decoded_cache: str = "auto"  # decode and resize each image once into <cache_dir>/decoded-*.npy
    patience: int = 5  # early stopping, in epochs without a better validation loss
    target_sensitivity: float = 0.95  # the malignancy threshold is chosen on validation to reach this
    overwrite: bool = False
    verbose: int = 1

    @property
    def tasks(self) -> tuple[str, ...]:
        return TASKS if self.task == "joint" else (self.task,)

    @property
    def fine_tune_lr(self) -> float | None:
        """The fine-tuning rate, resolved on construction (None only beside an invalid learning_rate: validate())."""
        return self.fine_tune_learning_rate

    @property
    def pretrained(self) -> bool:
        return str(self.weights).lower() not in ("none", "")

    def __post_init__(self) -> None:
        if self.fine_tune_epochs is None:  # the default depends on the weights: resolved once, here
            self.fine_tune_epochs = PRETRAINED_FINE_TUNE_EPOCHS if self.pretrained else 0
        if self.fine_tune_learning_rate is None and _positive(self.learning_rate):
            self.fine_tune_learning_rate = self.learning_rate * FINE_TUNE_LR_FACTOR
        self.balance = balance_mode(self.balance)

    def validate(self) -> TrainConfig:
        """Return self, or raise ConfigError naming the bad setting."""
        checks = [
            (self.task in TASK_CHOICES, f"$task must be one of {', '.join(TASK_CHOICES)}, got {self.task!r}"),
            (self.weighting in WEIGHTINGS, f"$weighting must be one of {', '.join(WEIGHTINGS)}, got "
                                           f"{self.weighting!r}"),
            (self.balance in BALANCES, f"$balance must be one of {', '.join(BALANCES)}, got {self.balance!r}"),
            (self.augment in AUGMENTS, f"$augment must be one of {', '.join(AUGMENTS)}, got {self.augment!r}"),
            (self.fine_tune_schedule in FINE_TUNE_SCHEDULES, "$fine_tune_schedule must be one of "
                                                             f"{', '.join(FINE_TUNE_SCHEDULES)}, got "
                                                             f"{self.fine_tune_schedule!r}"),
            (self.strategy in STRATEGIES, f"$strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}"),
            (self.split in SPLIT_METHODS, f"$split must be one of {', '.join(SPLIT_METHODS)}, got {self.split!r}"),
            (self.precision in PRECISIONS, f"$precision must be one of {', '.join(PRECISIONS)}, got "
                                           f"{self.precision!r}"),
            (self.jit_compile in SWITCHES, f"$jit_compile must be one of {', '.join(SWITCHES)}, got "
                                           f"{self.jit_compile!r}"),
            (self.decoded_cache in SWITCHES, f"$decoded_cache must be one of {', '.join(SWITCHES)}, got "
                                             f"{self.decoded_cache!r}"),
            (_integer(self.image_size) and self.image_size >= MIN_IMAGE_SIZE,
             f"$image_size {self.image_size!r} is below InceptionV3's minimum of {MIN_IMAGE_SIZE} px"),
            (not _integer(self.image_size) or self.image_size <= MAX_IMAGE_SIZE,
             f"$image_size {self.image_size!r} is above the largest supported, {MAX_IMAGE_SIZE} px (the model's input "
             "grows with its square: 100000 px would need terabytes; the Kaggle images are 512 px)"),
            (_integer(self.batch_size) and self.batch_size >= 1, f"$batch_size must be at least 1, got "
                                                                 f"{self.batch_size!r}"),
            (_integer(self.epochs) and self.epochs >= 1, f"$epochs must be at least 1 (the heads train first), got "
                                                         f"{self.epochs!r}"),
            (_integer(self.fine_tune_epochs) and self.fine_tune_epochs >= 0,
             f"$fine_tune_epochs must be 0 or more, got {self.fine_tune_epochs!r}"),
            (_positive(self.learning_rate), f"$learning_rate must be a positive number, got {self.learning_rate!r}"),
            (_positive(self.fine_tune_lr), "$fine_tune_learning_rate must be a positive number, got "
                                           f"{self.fine_tune_learning_rate!r}"),
            (_integer(self.patience) and self.patience >= 0, f"$patience must be 0 or more, got {self.patience!r}"),
            (_positive(self.target_sensitivity) and self.target_sensitivity <= 1,
             f"$target_sensitivity must be in (0, 1], got {self.target_sensitivity!r}"),
            (bool(self.data or self.split_file), "give the dataset folder ($data) or a saved split ($split_file)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        check_fractions(self.fractions)
        self.loss_weights = check_loss_weights(self.loss_weights, tasks=self.tasks)
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (paths as strings, tuples as lists), as config.json stores them."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    @classmethod
    def from_dict(cls, settings: Mapping[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict` (e.g. ``config.json["settings"]``); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise ConfigError(f"unknown training setting(s) {', '.join(unknown)}")
        settings = dict(settings)
        settings["fine_tune_learning_rate"] = saved_fine_tune_rate(settings)
        settings.setdefault("fine_tune_schedule", "constant")  # what every run before the setting did
        if "fractions" in settings:
            settings["fractions"] = tuple(settings["fractions"])
        return cls(**settings)


def saved_fine_tune_rate(settings: Mapping[str, Any]) -> float | None:
    """The fine-tuning learning rate that ``config.json["settings"]`` describes. One written before the rate was
    resolved on construction holds null (or no key), which meant a tenth of ``learning_rate``."""
    rate = settings.get("fine_tune_learning_rate")
    if rate is None:
        heads = settings.get("learning_rate", TrainConfig.learning_rate)
        rate = heads / 10 if _positive(heads) else None
    return rate


def defaults(cls) -> dict[str, Any]:
    """``{field: default}`` of a settings dataclass (the CLI's defaults come from here)."""
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(cls)}


def _positive(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_fractions(fractions) -> tuple[float, float, float]:
    """Three non-negative train/val/test fractions that sum to 1 with a positive train share; else ConfigError."""
    values = tuple(fractions)
    if len(values) != 3 or any(not math.isfinite(f) or f < 0 for f in values) or abs(sum(values) - 1) > 1e-6:
        raise ConfigError(f"$fractions {values} must be three non-negative numbers that sum to 1")
    if values[0] == 0:
        raise ConfigError("the train share of $fractions must be positive")
    return tuple(float(f) for f in values)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------- loss weights


def check_loss_weights(loss_weights: Mapping[str, object], *, tasks: tuple[str, ...] = TASKS) -> dict[str, float]:
    """``{task: weight}`` for every task (1.0 where not given); ConfigError for an unknown task, a bad value, or
    weights that are all 0 on the trained ``tasks``."""
    given = {task: _loss_weight(task, value) for task, value in loss_weights.items()}
    out = {task: given.get(task, 1.0) for task in TASKS}
    if not any(out[task] for task in tasks):
        raise ConfigError(f"the loss weight of {' and '.join(tasks)} is 0 in $loss_weights: nothing would be "
                          "trained; give a trained task a weight > 0")
    return out


def parse_loss_weights(text: str) -> dict[str, float]:
    """Parse ``"organ=1.0,cancer=0.5"`` into ``{task: weight}`` (only the tasks given); ConfigError when malformed."""
    weights = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"bad loss weight {part!r}: expected TASK=NUMBER, e.g. organ=1.0,cancer=0.5")
        weights[name.strip()] = _loss_weight(name.strip(), value.strip())
    if not weights:
        raise ConfigError(f"no loss weights in {text!r}: expected e.g. organ=1.0,cancer=0.5")
    return weights


def _loss_weight(task: str, value: object) -> float:
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r} in loss weights; expected {' and/or '.join(TASKS)}, "
                          "e.g. organ=1.0,cancer=0.5")
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"loss weight of {task} must be a number, got {value!r}") from None
    if not math.isfinite(weight) or weight < 0:
        raise ConfigError(f"loss weight of {task} must be a finite number >= 0, got {value!r}")
    return weight


# ----------------------------------------------------------------------------------------------- grouping


@dataclass(frozen=True)
class GroupingParams:
    """Every setting of sibling detection (:mod:`multitask.grouping`), with its default (the README says why)."""

    k: int = 8  # candidates per image
    min_inliers: int = 30  # unrelated images of one class reach ~11-27 inliers; most siblings 40-300
    keypoints: int = 500  # ORB features per orientation
    image_side: int = 256  # images are resized to this square before detection
    ratio: float = 0.8  # Lowe's ratio test
    ransac_px: float = 4.0  # RANSAC reprojection threshold, in pixels at image_side
    hash_tables: int = 2  # bag of words: tables of hash_bits sampled descriptor bits each
    hash_bits: int = 12

    def __post_init__(self):
        problems = [f"{name} must be at least {low}, got {getattr(self, name)}" for name, low in
                    (("k", 1), ("min_inliers", 3), ("keypoints", 10), ("image_side", 64), ("hash_tables", 1),
                     ("hash_bits", 4)) if getattr(self, name) < low]
        if self.hash_bits > 16:
            problems.append(f"hash_bits must be at most 16, got {self.hash_bits}")
        if not 0 < self.ratio < 1:
            problems.append(f"ratio must be between 0 and 1, got {self.ratio}")
        if problems:
            raise ConfigError("invalid grouping settings: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------- demo


@dataclass
class SyntheticSettings:
    """The synthetic demo dataset (:func:`multitask.synthetic.generate`)."""

    per_class: int = 40  # images per subclass
    size: int = 128  # image side in pixels
    seed: int = 0


@dataclass
class DemoConfig:
    """``multitask demo``: synthetic data -> a joint run -> evaluation -> a few predictions."""

    out: str = "artifacts/demo"
    weights: str | None = None  # offline: random initialisation
    per_class: int = 30
    image_size: int = 96
    epochs: int = 15
    # A random-init backbone's standardised features want a larger step than pretrained ones (TrainConfig's 1e-4).
    learning_rate: float = 1e-3
    n_predict: int = 8
    seed: int = DEFAULT_SEED
    verbose: int = 1
