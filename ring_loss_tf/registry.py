"""The backbones and heads train.py knows, by name.

A new backbone or head is one function plus one line here (README,
"Extending"). Entries name their function as "module:function" so that this
module, and the configuration checks that read it, import no TensorFlow: a
misspelt `--head` fails before TensorFlow loads.

A backbone function takes `(input_shape, embedding_dim, *, seed,
embedding_block)` and returns a `keras.Model` from images to embeddings
(see `ring_loss_tf.models.backbones`); its `Backbone` entry may carry the image
size and embedding block the published network has. A head is either a
margin function for the cosine classifier (`Head(margin_function=...)`) or a
head function of its own: it takes `(features, labels, model, num_classes,
seed)` — symbolic Keras tensors,
the run's `ModelConfig`, the class count and the seed — and returns
`(logits, head_layer)` (see `ring_loss_tf.models.assembly`).
"""

from __future__ import annotations

import dataclasses
import importlib


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A backbone train.py can build, and what a run gets when a flag is
    omitted.

    Attributes:
        function: "module:function" building the backbone (module
            docstring), or the function itself.
        image_size: `(height, width)` the network is defined for; None: the
            data's default (32×32 for the embedded set, 112×96 for a face
            folder). insightface's networks take 112×112.
        channels: likewise (None: 1 for the embedded set, 3 otherwise).
        embedding_dim: the default embedding size.
        embedding_block: the block the published network ends in; None:
            the head's default (`Head.embedding_block`).
        xla_on_cpu: whether a CPU run compiles it with XLA by default
            (`trainer.jit_by_default`); False for networks of depthwise
            convolutions, which XLA:CPU runs several times slower than
            TensorFlow's kernels, with oneDNN or without.
    """

    function: object  # "module:function", or the function itself
    image_size: tuple[int, int] | None = None
    channels: int | None = None
    embedding_dim: int = 512
    embedding_block: str | None = None
    xla_on_cpu: bool = True


def _insightface(name, embedding_block, xla_on_cpu=True):
    return Backbone(
        f"ring_loss_tf.models.backbones:{name}",
        image_size=(112, 112),
        channels=3,
        embedding_block=embedding_block,
        xla_on_cpu=xla_on_cpu,
    )


BACKBONES = {
    "small_cnn": Backbone("ring_loss_tf.models.backbones:small_cnn",
                          embedding_dim=128),
    "sphereface4": Backbone("ring_loss_tf.models.backbones:sphereface4"),
    "sphereface20": Backbone("ring_loss_tf.models.backbones:sphereface20"),
    "iresnet18": _insightface("iresnet18", "bn"),
    "iresnet50": _insightface("iresnet50", "bn"),
    "iresnet100": _insightface("iresnet100", "bn"),
    "mobilefacenet": _insightface("mobilefacenet", "gdc", xla_on_cpu=False),
}

# How a backbone's last feature map becomes the embedding: "fc", a
# fully-connected layer (SphereFace, the paper's); "bn", insightface's BN →
# FC → BN block (BatchNorm on the feature map, the FC, and a BatchNorm
# without a learned scale on the embedding; insightface's dropout before the
# FC is 0 by default and left out): iResNet's output block; "gdc",
# MobileFaceNet's global depthwise conv (a linear depthwise conv as large as
# the map) + BN, a bias-free FC and a BatchNorm with a learned scale. Batch
# statistics are per replica, as in insightface's trainer
# (`layers.BatchNorm`).
EMBEDDING_BLOCKS = ("fc", "bn", "gdc")


@dataclasses.dataclass(frozen=True)
class Head:
    """A head train.py can build: how, with which margin, and what a run
    gets when a flag is omitted. The configuration's help text and checks,
    `config.resolve`, model assembly and the sharded head all read it.

    A cosine head with a margin is one margin function plus one entry:
    `Head(margin_function=my_margin, margin_arguments={"scale": 32.0,
    "margin": 0.3})` (docs, "Extending"). Such a head can be sharded
    (`--head_sharding`): the sharded head calls the same margin function on
    its slice of the cosines.

    Attributes:
        function: "module:function" building a head of its own (softmax,
            l2-softmax, or any head: see the module docstring), or the
            function itself; None for a margin head, which model assembly
            builds from `margin_function`.
        margin_function: the margin of a cosine head: a name in
            `ring_loss_tf.layers.heads.MARGINS`, or the function itself
            (registered there under the head's name when the head is
            built).
        layer: "module:Class" of the cosine head's layer, a
            `CosineClassifier` subclass taking the margin arguments as
            keywords (the built-in `ASoftmax`, `CosFace`, `ArcFace`); None:
            `CosineClassifier` with `margin_arguments`.
        margin_arguments: the margin function's default keyword arguments
            (`--margin` and `--scale` replace "margin" and "scale").
        margin_choices: the values `--margin` may take, if only some.
        layer_options: `ModelConfig` fields passed to `layer` by name
            (A-Softmax's λ schedule).
        margin: the head has a margin `margin_warmup_steps` applies to (a
            head built by `function`; a margin head always has).
        margin_warmup_steps: the default warm-up without the margin. 200 for
            the margin heads: on the embedded set A-Softmax collapses and
            ArcFace / CosFace barely learn without one (docs, "Staged
            margin training"); 0 is the papers' recipe.
        embedding_block: the default embedding block. "bn" for the scaled
            cosine heads: without insightface's BN → FC → BN their feature
            norm runs away (docs, "Staged margin training").
        center_loss_weight: the default center-loss weight (Wen et al.'s
            λ = 0.003 for "centerloss"; 0 is off).
    """

    function: object = None  # "module:function", or the function itself
    margin_function: object = None  # a name in MARGINS, or the function
    layer: str | None = None
    margin_arguments: dict = dataclasses.field(default_factory=dict)
    margin_choices: tuple | None = None
    layer_options: tuple[str, ...] = ()
    margin: bool = False
    margin_warmup_steps: int = 0
    embedding_block: str = "fc"
    center_loss_weight: float = 0.0

    def __post_init__(self):
        if (self.function is None) == (self.margin_function is None):
            raise ValueError(
                "A `Head` is built either by its `function` or from its "
                "`margin_function`: give exactly one. Received: "
                f"function={self.function!r}, "
                f"margin_function={self.margin_function!r}")

    @property
    def has_margin(self) -> bool:
        """Whether a margin warm-up applies to the head."""
        return self.margin or self.margin_function is not None

    @property
    def shardable(self) -> bool:
        """Whether `--head_sharding` can split it: a cosine head whose
        margin the sharded head can call."""
        return self.margin_function is not None


_A_SOFTMAX_SCHEDULE = (
    "lambda_base", "lambda_gamma", "lambda_power", "lambda_min")

HEADS = {
    "softmax": Head("ring_loss_tf.models.assembly:softmax_head"),
    "asoftmax": Head(
        margin_function="asoftmax",
        layer="ring_loss_tf.layers.heads:ASoftmax",
        margin_arguments={"margin": 4},
        margin_choices=(1, 2, 3, 4),
        layer_options=_A_SOFTMAX_SCHEDULE,
        margin_warmup_steps=200,
    ),
    "l2softmax": Head("ring_loss_tf.models.assembly:l2softmax_head"),
    "centerloss": Head(
        "ring_loss_tf.models.assembly:softmax_head", center_loss_weight=0.003
    ),
    "cosface": Head(
        margin_function="cosface",
        layer="ring_loss_tf.layers.heads:CosFace",
        margin_arguments={"scale": 64.0, "margin": 0.35},
        margin_warmup_steps=200,
        embedding_block="bn",
    ),
    "arcface": Head(
        margin_function="arcface",
        layer="ring_loss_tf.layers.heads:ArcFace",
        margin_arguments={"scale": 64.0, "margin": 0.5},
        margin_warmup_steps=200,
        embedding_block="bn",
    ),
}


def head(name) -> Head:
    """The `Head` registered as `name` (a bare function or
    "module:function" registered at run time is a head of its own)."""
    entry = HEADS[name]
    return entry if isinstance(entry, Head) else Head(entry)


def load(entry):
    """The function an entry names ("module:function"), or the entry itself
    when it is already a callable (a head or backbone added at run time)."""
    if isinstance(entry, (Head, Backbone)):
        entry = entry.function
    if callable(entry):
        return entry
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)


def backbone(name) -> Backbone:
    """The `Backbone` registered as `name` (a bare function or
    "module:function" registered at run time gets the plain defaults)."""
    entry = BACKBONES[name]
    return entry if isinstance(entry, Backbone) else Backbone(entry)


def margin_heads() -> tuple[str, ...]:
    """The heads a margin warm-up applies to, in registry order."""
    return tuple(name for name in HEADS if head(name).has_margin)


def shardable_heads() -> tuple[str, ...]:
    """The heads `--head_sharding` can split, in registry order."""
    return tuple(name for name in HEADS if head(name).shardable)
