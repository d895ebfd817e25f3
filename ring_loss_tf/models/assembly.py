"""Model assembly: backbone → RingLoss → CenterLoss → head, from a config.

`build_models(config)` builds the training model `[images, labels] →
[logits, embeddings]` and the embedding model `images → embeddings` (the
backbone: what is exported and evaluated) from a `TrainConfig`.
`load_training_models(model_dir)` rebuilds them from a run's config.json and
restores its latest checkpoint. The loss is not built here: the trainer
takes sparse cross-entropy from the logits and adds the layers' `add_loss`
terms (ring, center) and weight decay on `decayed_variables`.

The backbones and heads come from `registry`; each head function below
takes `(features, labels, model, num_classes, seed)` and returns `(logits,
head_layer)`.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import keras
import tensorflow as tf

from ring_loss_tf import config as config_lib
from ring_loss_tf import layers
from ring_loss_tf import registry
from ring_loss_tf.models import sharded_head
from ring_loss_tf.errors import first_line


@dataclasses.dataclass
class Models:
    """The models of one run.

    Attributes:
        train_model: `[images, labels] → [logits, embeddings]`; with a
            sharded head `[features, embeddings]` (the head's input).
        embedding_model: `images → embeddings` (the backbone; exported).
        ring: the `RingLoss` layer, or None when λ = 0.
        head: the head layer producing logits, or a
            `sharded_head.ShardedHead`.
    """

    train_model: keras.Model
    embedding_model: keras.Model
    ring: layers.RingLoss | None
    head: keras.layers.Layer


def _dense_logits(num_classes, seed):
    # Logits in float32 under mixed precision.
    return keras.layers.Dense(
        num_classes,
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
        dtype="float32",
        name="logits",
    )


def softmax_head(features, labels, model, num_classes, seed):
    """Plain softmax: a dense layer to the class logits."""
    dense = _dense_logits(num_classes, seed)
    return dense(features), dense


def l2softmax_head(features, labels, model, num_classes, seed):
    """l2-constrained softmax (Ranjan et al.): ‖x‖ fixed to α, then dense."""
    dense = _dense_logits(num_classes, seed)
    scaled = layers.L2Constrained(model.l2_alpha, name="l2")(features)
    return dense(scaled), dense


def _seeded_kernel(head, seed):
    # The margin heads take no initializer argument: draw their kernel from
    # the seed too, so equal seeds give equal models.
    if seed is not None:
        head.kernel.assign(
            keras.initializers.GlorotUniform(seed=seed + 1)(head.kernel.shape)
        )
    return head


def margin_arguments(name, model):
    """The margin head `name`'s margin arguments in a run: the registry's
    defaults, with the run's `margin` and `scale` where it sets them."""
    spec = registry.head(name)
    arguments = dict(spec.margin_arguments)
    if model.margin is not None:
        arguments["margin"] = model.margin
    if model.scale is not None and "scale" in arguments:
        arguments["scale"] = model.scale
    return arguments


def margin_layer(name, model, num_classes):
    """The margin head `name` (`registry.Head` with a `margin_function`) as
    the run's `ModelConfig` sets it, not yet built: the replicated head
    calls it, a sharded head (`sharded_head.ShardedHead`) takes its margin.
    `config.check` refuses sharding any other head."""
    spec = registry.head(name)
    function = spec.margin_function
    if callable(function):
        # A margin given as a function is known by its head's name, also
        # in the saved layer's config.
        layers.MARGINS[name] = function
        function = name
    options = {
        option: getattr(model, option) for option in spec.layer_options
    }
    arguments = margin_arguments(name, model)
    if spec.layer is None:
        return layers.CosineClassifier(
            num_classes,
            margin_function=function,
            margin_arguments=arguments,
            margin_warmup_steps=model.margin_warmup_steps,
            name=name,
            **options,
        )
    return registry.load(spec.layer)(
        num_classes,
        margin_warmup_steps=model.margin_warmup_steps,
        name=name,
        **arguments,
        **options,
    )


def margin_head(name, features, labels, model, num_classes, seed):
    """A margin head's logits and layer (`margin_layer`), kernel seeded."""
    head = margin_layer(name, model, num_classes)
    logits = head([features, labels])
    return logits, _seeded_kernel(head, seed)


def build_head(name, features, labels, model, num_classes, seed):
    """The logits and layer of the head registered as `name`: a margin head
    (`margin_head`) or one its own function builds."""
    spec = registry.head(name)
    if spec.function is None:
        return margin_head(name, features, labels, model, num_classes, seed)
    return registry.load(spec)(features, labels, model, num_classes, seed)


def build_models(config: config_lib.TrainConfig) -> Models:
    """Builds backbone → RingLoss (if λ > 0) → CenterLoss (if its weight is
    > 0) → head, as `config` says. Call under the strategy's scope.

    Args:
        config: a `TrainConfig` with `num_classes` set; settings left None
            take their defaults (`config.resolve`).

    Raises:
        ConfigError: `num_classes` is not set.
    """
    config = config_lib.resolve(config)
    data, model = config.data, config.model
    if model.num_classes is None:
        raise config_lib.ConfigError(
            "num_classes", None, "is not set",
            "give the class count of the training data",
        )
    config_lib.check(config, parts=("model",))
    seed = config.run.seed
    backbone = registry.load(registry.BACKBONES[model.backbone])
    input_shape = (*data.image_size, data.channels)
    embedding_model = backbone(
        input_shape=input_shape,
        embedding_dim=model.embedding_dim,
        seed=seed,
        embedding_block=model.embedding_block,
    )
    images = keras.Input(input_shape, name="images")
    labels = keras.Input((), dtype="int32", name="labels")
    embeddings = embedding_model(images)
    features = embeddings
    ring = None
    if model.lambda_ring > 0:
        ring = layers.RingLoss(
            loss_weight=model.lambda_ring, radius_init=model.ring_radius,
            name="ring_loss",
        )
        features = ring(features)
    if model.center_loss_weight > 0:
        features = layers.CenterLoss(
            model.num_classes, model.center_loss_weight, model.center_alpha,
            name="center_loss",
        )([features, labels])
    if model.head_sharding:
        # The head lives outside the Keras model, its shards on the
        # replicas' devices (`Trainer` builds them): the model ends in the
        # features the head receives.
        head = sharded_head.ShardedHead(
            margin_layer(model.head, model, model.num_classes),
            model.embedding_dim, model.head_sample_rate, seed,
        )
        outputs = [features, embeddings]
    else:
        logits, head = build_head(
            model.head, features, labels, model, model.num_classes, seed
        )
        outputs = [logits, embeddings]
    train_model = keras.Model([images, labels], outputs,
                              name="training_model")
    return Models(train_model, embedding_model, ring, head)


def decayed_variables(model):
    """The variables weight decay applies to: kernels of convs and denses.

    Never the ring radius R, the centers, PReLU slopes or biases: only
    trainable variables named "kernel", outside `RingLoss`, `CenterLoss` and
    `PReLU` layers.
    """
    excluded = set()
    for layer in all_layers(model):
        if isinstance(
            layer, (layers.RingLoss, layers.CenterLoss, keras.layers.PReLU)
        ):
            excluded.update(id(v) for v in layer.weights)
    return [
        v
        for v in model.trainable_variables
        if v.name == "kernel" and id(v) not in excluded
    ]


def all_layers(model):
    """The layers of `model` and of the models nested in it."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from all_layers(layer)


def load_training_models(model_dir: str | os.PathLike) -> Models:
    """Rebuilds the models of a training `model_dir` at its last checkpoint.

    Reads `config.json` (any version `config.load` reads), builds the same
    backbone, ring and head, and restores the latest checkpoint.

    Raises:
        FileNotFoundError: no config.json or no checkpoint in `model_dir`.
        ValueError: config.json is not one a run writes, or the checkpoint
            does not fit it or is damaged (`checkpoint_error`).
    """
    model_dir = pathlib.Path(model_dir)
    config_path = model_dir / config_lib.CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} not found: --model_dir must be the directory "
            "train.py wrote (config.json + checkpoints)."
        )
    latest = tf.train.latest_checkpoint(str(model_dir))
    if latest is None:
        raise FileNotFoundError(
            f"{model_dir} has no checkpoint yet: train first (train.py "
            "saves one every --checkpoint_every steps and at the end)."
        )
    models = build_models(config_lib.load(model_dir))
    restore_checkpoint(
        tf.train.Checkpoint(model=models.train_model), latest, model_dir,
        partial=True,
        fix=f"Restore the config.json of the run that wrote it in {model_dir}",
    )
    return models


def restore_checkpoint(checkpoint, path, model_dir, *, partial=False,
                       fix=None):
    """`checkpoint.restore(path)`, every object of `checkpoint` given a value.

    Raises:
        ValueError: one line (`checkpoint_error`) instead of TensorFlow's
            errors, which list every variable: the files of `path` cannot
            be read (damaged, missing), or its variables do not fit the
            objects.
    """
    try:
        status = checkpoint.restore(path)
        if partial:
            status = status.expect_partial()
        status.assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as error:
        raise checkpoint_error(path, model_dir, error, fix) from None


def checkpoint_error(latest, model_dir, error, fix=None) -> ValueError:
    """One line for a checkpoint `latest` of `model_dir` that cannot be
    restored: its files cannot be read (a `tf.errors.OpError`: damaged
    bytes fail their checksum, a file is missing), or its variables do not
    fit the model the settings build (TensorFlow's AssertionError or
    ValueError)."""
    if isinstance(error, tf.errors.OpError):
        index = pathlib.Path(model_dir) / "checkpoint"
        return ValueError(
            f"Checkpoint {latest} cannot be read ({first_line(error)}); the "
            f"checkpoints in {model_dir} are unchanged. To resume from an "
            "earlier checkpoint there, name it in the model_checkpoint_path "
            f"line of {index}; or use a new model_dir."
        )
    config_path = pathlib.Path(model_dir) / config_lib.CONFIG_FILE
    missing = "" if config_path.is_file() else f"; {config_path} is missing"
    return ValueError(
        f"Checkpoint {latest} does not fit the model these settings build "
        "(another backbone, head, embedding size or class count"
        f"{missing}); the checkpoints in {model_dir} are unchanged. "
        + (fix or "Give the settings of the run that wrote it, or use a new "
           "model_dir") + "."
    )
