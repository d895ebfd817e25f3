"""One training configuration: `TrainConfig`, its checks and its JSON form.

A setting has one name and one home: a field of one of the four frozen parts
of `TrainConfig` (data, model, optim, run). Field names are unique across the
parts, and each is the flag of the same name in train.py (which defines its
flags from `FIELDS`), so `--lambda_ring` ends up in `config.model
.lambda_ring` and nowhere else. The same object is what `training.train`
takes, what a run saves as `<model_dir>/config.json` (versioned; older files
still load), what resuming and export rebuild from, and what a row of the
study (`bench/reproduce.py`) is.

    config = make(head="asoftmax", lambda_ring=0.01, steps=28000)
    check(config)                       # ConfigError naming the setting
    replace(config, seed=1).optim.steps  # 28000

Settings left as None take a default that depends on the data, the backbone
or the head (`resolve`): the image size and channels of the backbone
(insightface's networks: 112×112×3) or else of the data, the embedding size
and block of the backbone (`registry.BACKBONES`), the head's margin
warm-up, embedding block and center-loss weight (`registry.HEADS`). A run
saves its resolved configuration, so a later change of a default never
changes a saved run.

This module imports no TensorFlow: a bad flag fails in a fraction of a
second.

Over 600 lines: most of it is the settings themselves with their flag
help (the one place a setting is described); the checks and the
config.json reading belong beside them so one wording serves every entry
point.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib

from ring_loss_tf import cluster
from ring_loss_tf import registry
from ring_loss_tf import layouts
from ring_loss_tf.errors import ConfigError

VERSION = 2
CONFIG_FILE = "config.json"

LR_SCHEDULES = ("step", "cosine", "constant")
COLLECTIVES = ("auto", "nccl", "ring")
ALL_REDUCE_DTYPES = ("float32", "bfloat16", "float16")
OPTIMIZERS = ("sgd", "adam")
AUGMENTATIONS = ("face", "characters", "none")

# The embedded character set (`ring_loss_tf.data.kanji`) and a face folder
# (SphereFace's aligned crops).
KANJI_CHANNELS = 1
FACE_IMAGE_SIZE = (112, 96)
FACE_CHANNELS = 3
# ring_loss_tf.data.images.MAX_IMAGE_PIXELS, repeated: this module imports no
# TensorFlow.
MAX_IMAGE_PIXELS = 8192 * 8192


def setting(default, help, *, kind=None, resume="match"):
    """A field of a configuration part.

    Args:
        default: the default (train.py's flag default too).
        help: the flag's help text.
        kind: how a flag's text is parsed: "str", "int", "float", "bool",
            "size" (SIZE or HEIGHT,WIDTH) or "radius" ("auto" or a number);
            None: from the default's type; "none": not a flag (set by the
            run itself).
        resume: "match" if a resumed run must have the saved value (it
            shapes the checkpoint or the optimisation), "free" if it may
            change (logging, the number of steps, where the data is).
    """
    return dataclasses.field(
        default=default,
        metadata={"help": help, "kind": kind, "resume": resume},
    )


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What is read, and how it is turned into training batches."""

    data_dir: str | None = setting(
        None,
        "Directory with train/ (a folder per identity), train.rec or "
        "train-*.tfrecord shards, and optionally test/ + pairs.txt (LFW "
        "layout). Default: the embedded KanjiVG character set.",
        kind="str", resume="free")
    image_size: tuple[int, int] | None = setting(
        None,
        "HEIGHT,WIDTH or SIZE the images are resized to (default 112 for "
        "iresnet*/mobilefacenet, else 32 for the embedded set, 112,96 for a "
        "face folder).", kind="size")
    channels: int | None = setting(
        None, "1 (grey) or 3 (RGB); default 3 for iresnet*/mobilefacenet, "
        "else by data.", kind="int")
    augment: str | None = setting(
        None,
        "face | characters | none (default: characters for the embedded "
        "set, face otherwise).", kind="str")
    skip_corrupt: bool = setting(
        False,
        "Decode every training image (file, or .rec record) once at the "
        "start and leave out corrupt, truncated or unreadable ones (one "
        "warning). Without it such an image stops training with an error "
        "naming the file or record.",
        resume="free")
    max_image_pixels: int = setting(
        MAX_IMAGE_PIXELS,
        "Pixel budget per training image: an image whose header says more "
        "pixels (width x height) stops training with an error naming the "
        "file, before it is decoded (a small compressed file can decode to "
        "gigabytes). Default 8192x8192.", resume="free")
    tfrecord_image_key: str = setting(
        "image/encoded",
        "TFRecord sets: the tf.train.Example feature holding the encoded "
        "image (JPEG/PNG bytes).", resume="free")
    tfrecord_label_key: str = setting(
        "image/class/label",
        "TFRecord sets: the tf.train.Example feature holding the class "
        "label (int64).", resume="free")
    cache_dir: str | None = setting(
        None,
        "Where the embedded character set is generated, and where a "
        "TFRecord shard's index goes when the shard's directory is "
        "read-only (default: the user cache directory).", kind="str",
        resume="free")
    num_train_identities: int = setting(
        1000, "Embedded set: training characters.", resume="free")
    num_test_identities: int = setting(
        500, "Embedded set: unseen test characters.", resume="free")
    train_samples_per_identity: int = setting(
        40, "Embedded set: images per training character.", resume="free")
    test_samples_per_identity: int = setting(
        10, "Embedded set: images per test character.", resume="free")
    kanji_image_size: int = setting(
        32, "Embedded set: side of the generated square images.",
        resume="free")
    kanji_seed: int | None = setting(
        None,
        "Embedded set: the seed that picks the characters and each sample's "
        "hand (default: --seed; a study of several seeds fixes it to train "
        "them on one set).", kind="int", resume="free")
    pairs_per_fold: int = setting(
        1000,
        "Embedded set: genuine (and impostor) pairs per fold of pairs.txt.",
        resume="free")


def _head_defaults(argument):
    """"default 4 (asoftmax), 0.35 (cosface), ..." from the registry."""
    defaults = [
        f"{registry.head(name).margin_arguments[argument]:g} ({name})"
        for name in registry.HEADS
        if argument in registry.head(name).margin_arguments
    ]
    return "default " + ", ".join(defaults)


_MARGIN_HEADS = "/".join(registry.margin_heads())
_SHARDABLE_HEADS = "/".join(registry.shardable_heads())


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Backbone → RingLoss → CenterLoss → head (`models.build_models`)."""

    backbone: str = setting(
        "small_cnn", "|".join(registry.BACKBONES))
    head: str = setting("softmax", "|".join(registry.HEADS))
    embedding_dim: int | None = setting(
        None, "Embedding size (default 128 small_cnn, 512 otherwise).",
        kind="int")
    embedding_block: str | None = setting(
        None,
        "fc (a fully-connected embedding, SphereFace's) | bn (insightface's "
        "BN → FC → BN) | gdc (MobileFaceNet's global depthwise conv → FC → "
        "BN). Default: the backbone's (bn for iresnet*, gdc for "
        "mobilefacenet), else bn for cosface/arcface (their feature norm "
        "runs away without it), fc otherwise.", kind="str")
    num_classes: int | None = setting(
        None, "Set from the training data.", kind="none")
    lambda_ring: float = setting(
        0.01,
        "Ring loss weight λ in the paper's λ/(2m)·Σ(‖F‖−R)² form; 0 disables "
        "the RingLoss layer.")
    ring_radius: float | str = setting(
        "auto",
        "Initial R: auto (mean norm of the first batch) or a positive "
        "number.", kind="radius")
    margin: float | None = setting(
        None, "Head margin: " + _head_defaults("margin") + ".",
        kind="float")
    scale: float | None = setting(
        None, "Head scale s: " + _head_defaults("scale") + ".",
        kind="float")
    lambda_base: float = setting(1000.0, "A-Softmax λ schedule: base.")
    lambda_gamma: float = setting(0.12, "A-Softmax λ schedule: gamma.")
    lambda_power: float = setting(1.0, "A-Softmax λ schedule: power.")
    lambda_min: float = setting(5.0, "A-Softmax λ schedule: lower bound.")
    margin_warmup_steps: int | None = setting(
        None,
        f"{_MARGIN_HEADS}: steps trained without the margin first "
        "(A-Softmax's λ schedule starts when the margin does). Default 200 "
        "for these heads (A-Softmax collapses and ArcFace/CosFace barely "
        "learn without it on the embedded set; docs: training.md, "
        "\"Staged margin training\"); 0 is the paper's recipe.", kind="int")
    l2_alpha: float = setting(16.0, "l2softmax: feature norm α.")
    center_loss_weight: float | None = setting(
        None,
        "Center loss λ, with any head; 0 disables it. Default 0.003 for "
        "--head=centerloss (softmax + center loss), else 0.", kind="float")
    center_alpha: float = setting(0.5, "Center loss: center update rate α.")
    head_sharding: bool = setting(
        False,
        f"{_SHARDABLE_HEADS}: split the class centres over the "
        "replicas (Partial FC) instead of copying the head to each: for "
        "hundreds of thousands of identities and more (docs: "
        "sharded-head.md). SGD only.")
    head_sample_rate: float = setting(
        1.0,
        "With --head_sharding: the fraction of negative classes each step "
        "uses (every class of the batch is always kept; 1 uses all). For "
        "millions of identities; a rate below 1 may need a lower --lr "
        "(docs: sharded-head.md).")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The optimisation: batch, length, optimizer and learning rate."""

    batch_size: int = setting(
        256, "Global batch size (divisible by the replica count).")
    epochs: float = setting(
        6.0, "Training epochs (ignored with --steps).", resume="free")
    steps: int | None = setting(
        None, "Training steps (overrides --epochs).", kind="int",
        resume="free")
    optimizer: str = setting("sgd", "sgd (with momentum) | adam")
    lr: float = setting(
        0.05,
        "Peak learning rate (the default small_cnn has no BatchNorm and "
        "diverges at 0.1 on the embedded set).")
    lr_schedule: str = setting(
        "cosine",
        "cosine | step (×0.1 at 16/28 and 24/28 of the steps, SphereFace) | "
        "constant")
    warmup_steps: int = setting(100, "Linear warm-up steps.")
    momentum: float = setting(0.9, "SGD momentum.")
    weight_decay: float = setting(
        5e-4,
        "L2 weight decay on kernels (never R, centers, PReLU slopes or "
        "biases).")
    mixed_precision: bool = setting(
        False,
        "mixed_float16 on GPU (with loss scaling), mixed_bfloat16 on CPU.")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Where the run writes, its seed, and what it does besides training."""

    model_dir: str = setting(
        "runs/default",
        "Checkpoints, config, TensorBoard summaries and export.",
        resume="free")
    seed: int = setting(0, "Seed of data, initialisation and order.")
    jit: bool | None = setting(
        None,
        "Compile the per-replica forward/backward with XLA. Unset: on when "
        "training on GPUs, and on a CPU unless TensorFlow runs its CPU "
        "kernels with oneDNN (its default on AVX-512 VNNI / AMX CPUs, not "
        "on AVX2-only ones; TF_ENABLE_ONEDNN_OPTS overrides).",
        kind="bool", resume="free")
    log_every: int = setting(50, "Steps between progress lines.",
                             resume="free")
    checkpoint_every: int = setting(500, "Steps between checkpoints.",
                                    resume="free")
    steps_per_loop: int = setting(
        1,
        "Most training steps per compiled call (fewer host round trips); "
        "a loop never runs past a log, checkpoint or stop step, and a stop "
        "signal acts at the end of the current loop.", resume="free")
    max_to_keep: int = setting(3, "Checkpoints kept.", resume="free")
    stop_at_step: int | None = setting(
        None,
        "Stop with a checkpoint after this step (time-sliced jobs; the next "
        "run resumes).", kind="int", resume="free")
    cpu_replicas: int | None = setting(
        None,
        "Split the CPU into this many logical devices and train one replica "
        "on each (CPU-only machines; for tests and benchmarks).", kind="int",
        resume="free")
    worker_scratch_dir: str | None = setting(
        None,
        "Multi-worker runs: where the workers other than the chief write "
        "the checkpoints they must take part in (deleted at the end; "
        "default: the system's temporary directory).", kind="str",
        resume="free")
    startup_timeout: int = setting(
        600,
        "Multi-worker runs: seconds a worker waits for the other workers "
        "of TF_CONFIG to start before it stops with an error (0: no "
        "limit).", resume="free")
    collectives: str = setting(
        "auto",
        "Multi-worker all-reduce: auto (NCCL where every worker has GPUs, "
        "ring otherwise) | nccl | ring.", resume="free")
    cluster: str = setting(
        "auto",
        "Where the workers of a multi-worker run come from: auto (TF_CONFIG "
        "if set, else the tasks of an srun step, else one process) | "
        "tf_config | slurm | none (one process; docs/clusters.md).",
        resume="free")
    all_reduce_dtype: str = setting(
        "float32",
        "Type the gradients are summed across replicas in: float32 "
        "(exact) | bfloat16 | float16 (half the bytes on the wire, "
        "gradients rounded; float16 can overflow).", resume="free")
    evaluate: bool = setting(
        True, "Print verification on the test identities at the end.",
        resume="free")
    export: bool = setting(True, "Export the embedding model at the end.",
                           resume="free")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run reads (module docstring)."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()


PARTS = ("data", "model", "optim", "run")
_PART_CLASSES = {
    "data": DataConfig, "model": ModelConfig, "optim": OptimConfig,
    "run": RunConfig,
}


@dataclasses.dataclass(frozen=True)
class Field:
    """One setting: its part, name, default, flag kind, help, resume rule."""

    part: str
    name: str
    default: object
    kind: str
    help: str
    resume: str


def _kind(field):
    kind = field.metadata["kind"]
    if kind is not None:
        return kind
    return {bool: "bool", int: "int", float: "float", str: "str"}[
        type(field.default)
    ]


def fields() -> dict[str, Field]:
    """Every setting by name, in part order."""
    return {
        f.name: Field(part, f.name, f.default, _kind(f), f.metadata["help"],
                      f.metadata["resume"])
        for part in PARTS
        for f in dataclasses.fields(_PART_CLASSES[part])
    }


FIELDS = fields()


def replace(config: TrainConfig, **settings) -> TrainConfig:
    """`config` with some settings changed, each named by its field name.

    Raises:
        ConfigError: a name that is no setting.
    """
    changes = {part: {} for part in PARTS}
    for name, value in settings.items():
        if isinstance(value, os.PathLike):
            value = os.fspath(value)  # config.json holds paths as text
        if name not in FIELDS:
            raise ConfigError(
                name, value, "no such setting",
                "see `ring_loss_tf.config.FIELDS` or train.py --helpfull",
            )
        changes[FIELDS[name].part][name] = value
    return TrainConfig(**{
        part: dataclasses.replace(getattr(config, part), **changes[part])
        for part in PARTS
    })


def make(**settings) -> TrainConfig:
    """A `TrainConfig` of the defaults with `settings` (see `replace`)."""
    return replace(TrainConfig(), **settings)


def flat(config: TrainConfig) -> dict:
    """{setting: value} over all parts."""
    return {
        name: getattr(getattr(config, field.part), name)
        for name, field in FIELDS.items()
    }


# --------------------------------------------------------------------------
# Parsing flag text
# --------------------------------------------------------------------------

# Face and character networks take 32 to 224 pixels a side; a side of
# thousands would need gigabytes per image before the first step. The same
# for the embedding: a head holds embedding_dim x num_classes weights.
MAX_IMAGE_SIDE = 1024
MAX_EMBEDDING_DIM = 8192
# keras.utils.set_random_seed hands the seed to NumPy, which takes 0..2**32-1.
MAX_SEED = 2**32 - 1
_IMAGE_SIZE_PROBLEM = "must be SIZE or HEIGHT,WIDTH, each >= 8"
_IMAGE_SIZE_FIX = "use e.g. 32 or 112,96"
_SIDE_TOO_LARGE = (
    f"a side of more than {MAX_IMAGE_SIDE} pixels (the limit) would need "
    "gigabytes per batch"
)
_SIDE_FIX = "use e.g. 112 or 224"
_RADIUS_PROBLEM = "must be auto or a positive number"
_RADIUS_FIX = "use auto (mean norm of the first batch) or e.g. 20"


def parse_image_size(text: str | None):
    """"32" → (32, 32), "112,96" → (112, 96); None stays None."""
    if text is None:
        return None
    try:
        parts = [int(p) for p in str(text).replace("x", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 8:
        raise ConfigError("image_size", text, _IMAGE_SIZE_PROBLEM,
                          _IMAGE_SIZE_FIX)
    if max(parts) > MAX_IMAGE_SIDE:
        raise ConfigError("image_size", text, _SIDE_TOO_LARGE, _SIDE_FIX)
    return tuple(parts)


def parse_radius(text: str):
    """"auto" stays "auto"; a number becomes a float."""
    if text == "auto":
        return "auto"
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ConfigError("ring_radius", text, _RADIUS_PROBLEM,
                          _RADIUS_FIX) from None
    return value


# --------------------------------------------------------------------------
# Checks: one place, one wording per problem
# --------------------------------------------------------------------------


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _writable(path):
    """Whether `path`, or the nearest existing directory above it (where it
    would be created), can be written."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return False
        path = parent
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def _one_of(name, value, choices, what):
    if value not in choices:
        raise ConfigError(name, value, f"unknown {what}",
                          f"use one of {', '.join(choices)}")


class _Checks:
    """The checks of one part over the flat settings `s`."""

    def __init__(self, settings):
        self.s = settings

    def bad(self, name, problem, fix):
        raise ConfigError(name, self.s[name], problem, fix)

    def positive_integer(self, name, fix="use e.g. 256"):
        if not _integer(self.s[name]) or self.s[name] < 1:
            self.bad(name, "must be a positive integer", fix)

    def finite(self, name, minimum, fix, strict=False):
        value = self.s[name]
        ok = _number(value) and math.isfinite(value) and (
            value > minimum if strict else value >= minimum
        )
        if not ok:
            problem = (f"must be a finite number > {minimum}" if strict
                       else f"must be a finite number >= {minimum}")
            self.bad(name, problem, fix)

    def seed(self, name, fix):
        value = self.s[name]
        if not _integer(value) or not 0 <= value <= MAX_SEED:
            self.bad(name, "must be an integer in 0 .. 2**32 - 1", fix)

    def data(self):
        s, bad = self.s, self.bad
        positive_integer = self.positive_integer
        data_dir = s["data_dir"]
        if data_dir is not None:
            root = pathlib.Path(data_dir)
            if not root.is_dir():
                bad("data_dir", "no such directory",
                    "give a directory holding train/ (a folder per "
                    "identity), or omit it to use the embedded character "
                    "set")
            if layouts.find(root) is None:
                bad("data_dir", f"has no {layouts.DESCRIPTION}",
                    "put a folder of images per identity under "
                    "<data_dir>/train (docs/data-formats.md)")
        for name in ("tfrecord_image_key", "tfrecord_label_key"):
            if not isinstance(s[name], str) or not s[name].strip():
                bad(name, "must name a tf.train.Example feature",
                    "use e.g. image/encoded and image/class/label")
        size = s["image_size"]
        if size is not None and not (
            isinstance(size, (tuple, list)) and len(size) == 2
            and all(_integer(v) and v >= 8 for v in size)
        ):
            bad("image_size", _IMAGE_SIZE_PROBLEM, _IMAGE_SIZE_FIX)
        if size is not None and max(size) > MAX_IMAGE_SIDE:
            bad("image_size", _SIDE_TOO_LARGE, _SIDE_FIX)
        if s["channels"] is not None and s["channels"] not in (1, 3):
            bad("channels", "must be 1 or 3", "use 1 (grey) or 3 (RGB)")
        if s["augment"] is not None:
            _one_of("augment", s["augment"], AUGMENTATIONS, "augmentation")
        for name in ("num_test_identities", "train_samples_per_identity"):
            positive_integer(name, "see train.py --helpfull for the defaults")
        positive_integer("max_image_pixels", "use e.g. 67108864 (8192x8192)")
        if not _integer(s["num_train_identities"]) or (
            s["num_train_identities"] < 2
        ):
            bad("num_train_identities",
                "must be >= 2 (a classifier needs at least 2 identities)",
                "use e.g. 1000")
        if not _integer(s["test_samples_per_identity"]) or (
            s["test_samples_per_identity"] < 2
        ):
            bad("test_samples_per_identity",
                "must be >= 2 (genuine pairs need two images)", "use e.g. 10")
        if not _integer(s["kanji_image_size"]) or s["kanji_image_size"] < 8:
            bad("kanji_image_size", "must be an integer >= 8", "use e.g. 32")
        if s["kanji_image_size"] > MAX_IMAGE_SIDE:
            bad("kanji_image_size", _SIDE_TOO_LARGE, "use e.g. 32")
        if s["kanji_seed"] is not None:
            self.seed("kanji_seed", "use e.g. 0, or omit it")
        positive_integer("pairs_per_fold", "use e.g. 1000")

    def model(self):
        s, bad = self.s, self.bad
        positive_integer, finite = self.positive_integer, self.finite
        _one_of("backbone", s["backbone"], tuple(registry.BACKBONES),
                "backbone")
        _one_of("head", s["head"], tuple(registry.HEADS), "head")
        if s["embedding_dim"] is not None:
            positive_integer("embedding_dim", "use e.g. 128 or 512")
            if s["embedding_dim"] > MAX_EMBEDDING_DIM:
                bad("embedding_dim",
                    f"is more than {MAX_EMBEDDING_DIM} (the limit; the head "
                    "holds embedding_dim x num_classes weights)",
                    "use e.g. 128 or 512")
        if s["embedding_block"] is not None:
            _one_of("embedding_block", s["embedding_block"],
                    registry.EMBEDDING_BLOCKS, "embedding block")
        if s["num_classes"] is not None:
            positive_integer("num_classes", "train on data with classes")
        finite("lambda_ring", 0, "use 0 to disable the ring loss or e.g. 0.01")
        radius = s["ring_radius"]
        if radius != "auto" and not (
            _number(radius) and radius > 0 and math.isfinite(radius)
        ):
            bad("ring_radius", _RADIUS_PROBLEM, _RADIUS_FIX)
        margin_heads = registry.margin_heads()
        head = registry.head(s["head"])
        choices = head.margin_choices
        if s["margin"] is not None:
            if choices is not None and s["margin"] not in choices:
                bad("margin",
                    f"the {s['head']} head's margin must be one of "
                    f"{', '.join(f'{c:g}' for c in choices)}",
                    f"use {head.margin_arguments['margin']:g} or omit it")
            finite("margin", 0, "use e.g. 0.35 (CosFace), 0.5 (ArcFace)")
        if s["scale"] is not None:
            finite("scale", 0, "use e.g. 64, or omit it", strict=True)
        for name in ("lambda_base", "lambda_gamma", "lambda_power",
                     "lambda_min"):
            finite(name, 0,
                   "see docs/training.md, A-Softmax schedule (defaults "
                   "1000, 0.12, 1, 5)")
        warmup = s["margin_warmup_steps"]
        if warmup is not None and (not _integer(warmup) or warmup < 0):
            bad("margin_warmup_steps", "must be an integer >= 0",
                "use 0 to start with the margin, or e.g. 200")
        if warmup and s["head"] not in margin_heads:
            bad("margin_warmup_steps",
                f"the {s['head']} head has no margin to warm up",
                f"use it with head {'/'.join(margin_heads)}, or omit it")
        for name, fix in (("l2_alpha", "use e.g. 16, or omit it"),
                          ("center_alpha", "use e.g. 0.5, or omit it")):
            finite(name, 0, fix, strict=True)
        if s["center_loss_weight"] is not None:
            finite("center_loss_weight", 0,
                   "use 0 to disable center loss or e.g. 0.003")
        if s["head_sharding"] and not head.shardable:
            shardable = "/".join(registry.shardable_heads())
            bad("head_sharding",
                f"the {s['head']} head has no margin function for the "
                "sharded head to call",
                f"shard a margin head ({shardable}), or omit it")
        rate = s["head_sample_rate"]
        if not (_number(rate) and 0 < rate <= 1):
            bad("head_sample_rate", "must be in (0, 1]",
                "use e.g. 0.1 (Partial FC), or 1 to keep every class")
        if rate != 1 and not s["head_sharding"]:
            bad("head_sample_rate", "samples the classes of a sharded head",
                "add --head_sharding, or omit it")

    def optim(self):
        s, bad = self.s, self.bad
        positive_integer, finite = self.positive_integer, self.finite
        positive_integer("batch_size")
        if s["steps"] is not None:
            positive_integer("steps", "use e.g. 1000")
        else:
            finite("epochs", 0, "use e.g. 6, or steps", strict=True)
        _one_of("optimizer", s["optimizer"], OPTIMIZERS, "optimizer")
        finite("lr", 0, "use e.g. 0.1", strict=True)
        _one_of("lr_schedule", s["lr_schedule"], LR_SCHEDULES, "schedule")
        if not _integer(s["warmup_steps"]) or s["warmup_steps"] < 0:
            bad("warmup_steps", "must be an integer >= 0",
                "use 0 to disable it")
        if not (_number(s["momentum"]) and 0 <= s["momentum"] < 1):
            bad("momentum", "must be in [0, 1)", "use e.g. 0.9")
        finite("weight_decay", 0, "use 0 to disable it")
        if s["head_sharding"] and s["optimizer"] != "sgd":
            bad("optimizer",
                "a sharded head updates its shards with SGD only",
                "use --optimizer=sgd, or omit --head_sharding")

    def run(self):
        s, bad = self.s, self.bad
        positive_integer = self.positive_integer
        model_dir = s["model_dir"]
        if model_dir is None or str(model_dir) == "":
            bad("model_dir", "is empty", "give a directory for checkpoints")
        if os.path.exists(model_dir) and not os.path.isdir(model_dir):
            bad("model_dir", "is a file, not a directory",
                "give a new or existing directory for checkpoints")
        _one_of("cluster", s["cluster"], cluster.CLUSTER_SOURCES,
                "cluster source")
        try:
            chief = cluster.detect(s["cluster"]).index == 0
        except ConfigError:
            raise
        except ValueError:  # a bad TF_CONFIG: training says so
            chief = True
        # Only the chief writes there (the other workers read it).
        if chief and not _writable(model_dir):
            bad("model_dir", "is not writable (read-only directory or file "
                "system)", "give a directory you can write to, or change "
                "its permissions")
        self.seed("seed", "use e.g. 0")
        positive_integer("log_every", "use e.g. 50")
        positive_integer("checkpoint_every", "use e.g. 500")
        positive_integer("steps_per_loop", "use e.g. 1, or 10")
        positive_integer("max_to_keep", "use e.g. 3")
        if not _integer(s["startup_timeout"]) or s["startup_timeout"] < 0:
            bad("startup_timeout", "must be an integer >= 0 (seconds)",
                "use e.g. 600, or 0 to wait without a limit")
        _one_of("collectives", s["collectives"], COLLECTIVES,
                "collective implementation")
        _one_of("all_reduce_dtype", s["all_reduce_dtype"],
                ALL_REDUCE_DTYPES, "all-reduce type")
        if s["stop_at_step"] is not None:
            positive_integer("stop_at_step", "use e.g. 1000, or omit it")
        replicas = s["cpu_replicas"]
        if replicas is not None:
            positive_integer("cpu_replicas", "use e.g. 2, or omit it")
        check_replicas(s["batch_size"], replicas or 1,
                       f" (cpu_replicas={replicas})" if replicas else "")


def check(config: TrainConfig, parts=PARTS) -> None:
    """Checks the settings of `parts`; the first bad one raises
    `ConfigError`.

    Reads the file system for `data_dir` and `model_dir` but imports no
    TensorFlow.
    """
    checks = _Checks(flat(config))
    for part in parts:
        getattr(checks, part)()


def check_replicas(batch_size, num_replicas, why=""):
    """The global batch must split evenly over the replicas."""
    if batch_size % num_replicas:
        n = num_replicas
        raise ConfigError(
            "batch_size", batch_size,
            f"not divisible by the {n} replicas{why}",
            f"use a multiple of {n}, e.g. {max(1, batch_size // n) * n}",
        )


# --------------------------------------------------------------------------
# Defaults that depend on the data and the head
# --------------------------------------------------------------------------


def resolve(config: TrainConfig, num_classes=None) -> TrainConfig:
    """`config` with every default that depends on data, backbone or head
    filled in.

    Args:
        num_classes: the classes of the training data (None: keep).

    Raises:
        ConfigError: `num_classes` is 1 (named as the data_dir setting).
    """
    data, model = config.data, config.model
    head = registry.head(model.head)
    backbone = registry.backbone(model.backbone)
    embedded = data.data_dir is None
    image_size = data.image_size or backbone.image_size
    if image_size is None:
        image_size = ((data.kanji_image_size,) * 2 if embedded
                      else FACE_IMAGE_SIZE)
    margin = model.margin
    if head.margin_choices is not None and margin is not None:
        margin = type(head.margin_choices[0])(margin)
    settings = dict(
        image_size=tuple(int(v) for v in image_size),
        channels=data.channels or backbone.channels or (
            KANJI_CHANNELS if embedded else FACE_CHANNELS
        ),
        augment=data.augment or ("characters" if embedded else "face"),
        embedding_dim=model.embedding_dim or backbone.embedding_dim,
        embedding_block=(model.embedding_block or backbone.embedding_block
                         or head.embedding_block),
        margin=margin,
        margin_warmup_steps=(
            head.margin_warmup_steps if model.margin_warmup_steps is None
            else model.margin_warmup_steps
        ),
        center_loss_weight=(
            head.center_loss_weight if model.center_loss_weight is None
            else model.center_loss_weight
        ),
    )
    if num_classes is not None:
        if int(num_classes) < 2:
            # Cross-entropy over one class is 0 whatever the embedding:
            # such a run would train nothing, without a sign.
            raise ConfigError(
                "data_dir", data.data_dir,
                f"holds {int(num_classes)} identity, and a classifier needs "
                "at least 2 identities",
                "add a folder per identity under <data_dir>/train",
            )
        settings["num_classes"] = int(num_classes)
    return replace(config, **settings)


def steps_of(config: TrainConfig, num_examples: int) -> int:
    """The run's length in steps: `steps`, else `epochs` over the data."""
    if config.optim.steps is not None:
        return config.optim.steps
    return max(1, math.ceil(
        config.optim.epochs * num_examples / config.optim.batch_size
    ))


# The settings that pick the embedded set: evaluate.py takes them as flags
# too (the same names, defaults and help), to find the set a run trained on.
EMBEDDED_SET = (
    "cache_dir", "num_train_identities", "num_test_identities",
    "train_samples_per_identity", "test_samples_per_identity",
    "kanji_image_size", "kanji_seed", "pairs_per_fold", "seed",
)


def kanji_options(config: TrainConfig) -> dict:
    """`kanji.prepare` keyword arguments of the embedded set of `config`."""
    data = config.data
    return dict(
        cache_dir=data.cache_dir,
        seed=(config.run.seed if data.kanji_seed is None
              else data.kanji_seed),
        num_train_identities=data.num_train_identities,
        num_test_identities=data.num_test_identities,
        train_samples_per_identity=data.train_samples_per_identity,
        test_samples_per_identity=data.test_samples_per_identity,
        image_size=data.kanji_image_size,
        pairs_per_fold=data.pairs_per_fold,
    )


# --------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------

# Version 1 (ring_loss_tf 0.1.0) saved one flat object. What it did not save
# took the values of that time: no margin warm-up, the "fc" block, center
# loss by head, and the embedded set's options under "kanji_options".
_V1_DEFAULTS = {
    "margin_warmup_steps": 0,
    "embedding_block": "fc",
    "center_loss_weight": None,
    "lambda_ring": 0.01,
    "warmup_steps": 0,
}
_V1_KANJI = {
    "cache_dir": "cache_dir",
    "num_train_identities": "num_train_identities",
    "num_test_identities": "num_test_identities",
    "train_samples_per_identity": "train_samples_per_identity",
    "test_samples_per_identity": "test_samples_per_identity",
    "image_size": "kanji_image_size",
    "seed": "kanji_seed",
    "pairs_per_fold": "pairs_per_fold",
}


def to_dict(config: TrainConfig) -> dict:
    """The JSON object of `config` (`{"version": 2, "data": {...}, ...}`)."""
    payload = {"version": VERSION}
    payload.update(json.loads(json.dumps(dataclasses.asdict(config))))
    return payload


def _flat_v1(saved, where, fill):
    settings = {k: v for k, v in saved.items() if k in FIELDS}
    if fill:
        for name, value in _V1_DEFAULTS.items():
            settings.setdefault(name, value)
    if not saved.get("ring", True):
        settings["lambda_ring"] = 0.0
    kanji = saved.get("kanji_options") or {}
    if not isinstance(kanji, dict):
        raise ValueError(f"{where}: kanji_options must be an object")
    for key, name in _V1_KANJI.items():
        if key in kanji:
            settings[name] = kanji[key]
    return settings


def saved_settings(saved: dict, where="config.json", fill=True) -> dict:
    """{setting: value} a saved config.json holds (any version).

    With `fill`, a version-1 file's missing settings take the values of
    its time (`_V1_DEFAULTS`); without, they are left out.

    Raises:
        ValueError: not a config.json of a known version.
    """
    if not isinstance(saved, dict):
        raise ValueError(f"{where}: expected a JSON object")
    version = saved.get("version", 1)
    if version == 1:
        return _flat_v1(saved, where, fill)
    if version != VERSION:
        raise ValueError(
            f"{where}: version {version!r} is not one this ring_loss_tf "
            f"reads (1..{VERSION}); upgrade ring_loss_tf to use it"
        )
    settings = {}
    for part in PARTS:
        values = saved.get(part)
        if not isinstance(values, dict):
            raise ValueError(f"{where}: {part!r} must be an object")
        for name, value in values.items():
            if name not in FIELDS or FIELDS[name].part != part:
                raise ValueError(
                    f"{where}: unknown setting {part}.{name}; it was written "
                    "by another ring_loss_tf version"
                )
            settings[name] = value
    return settings


def from_dict(saved: dict, where="config.json") -> TrainConfig:
    """The `TrainConfig` of a saved config.json object (any version)."""
    settings = saved_settings(saved, where)
    if settings.get("image_size") is not None:
        settings["image_size"] = tuple(settings["image_size"])
    return make(**settings)


def load(model_dir) -> TrainConfig:
    """The `TrainConfig` a run saved in `model_dir`.

    Raises:
        FileNotFoundError: there is no config.json.
        ValueError: it is not valid JSON of a known version.
    """
    path = pathlib.Path(model_dir) / CONFIG_FILE
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    return from_dict(saved, str(path))


def save(config: TrainConfig, model_dir) -> pathlib.Path:
    """Writes `config` to `<model_dir>/config.json` atomically."""
    path = pathlib.Path(model_dir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(to_dict(config), indent=2) + "\n")
    os.replace(temporary, path)
    return path


def differences(saved: dict, config: TrainConfig) -> list[str]:
    """The "must match" settings where `config` differs from a saved one.

    Settings the saved file does not hold cannot be compared.
    """
    settings = saved_settings(saved, fill=False)
    current = json.loads(json.dumps(flat(config)))
    return [
        f"{name}={value!r} (now {current[name]!r})"
        for name, value in settings.items()
        if FIELDS[name].resume == "match"
        and json.loads(json.dumps(value)) != current[name]
    ]
