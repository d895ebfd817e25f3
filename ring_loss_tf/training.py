"""Distributed training: strategy, the XLA replica step, checkpoints, summaries.

The data flow (design.md §2): images → backbone → `RingLoss` (if λ > 0) →
head → logits; the loss is sparse cross-entropy from the logits (the fused,
stable op) plus the layers' `add_loss` terms (ring, center) plus weight decay
on kernels. The embedding model (the backbone) is what is exported and
evaluated.

One training step, for a global batch of B examples on N replicas:

    each replica r, inside tf.function(jit_compile=jit):
        L_r = Σ_{i ∈ batch_r} CE_i / B  +  (Σ model.losses + wd/2 Σ‖W‖²) / N
        g_r = ∂L_r/∂θ
    outside the compiled function: g = Σ_r g_r (all-reduce), apply_gradients

so g is the gradient of the mean cross-entropy over the global batch plus the
regularisers, whatever N is: two replicas give the update one device gives on
the same batch (tested). Under `MirroredStrategy` Keras cannot compile the
whole `strategy.run` (design.md §3), hence the split. The forward pass of
the ring loss uses R initialised eagerly before the first step
(`RingLoss.initialize_radius`) so the compiled step holds no cross-replica
variable assignment.

Input: every worker reads the same seeded stream of global batches, and
replica r takes rows [r·B/N, (r+1)·B/N) of each. So the examples of a step
do not depend on the number of replicas or workers, a resumed run restores
one plain `tf.data` iterator, and N replicas give exactly the one-device
result. The price: each worker decodes the whole global batch (cheap next to
the network for image folders; shard the input if it is not).

Nothing here reads flags: `train.py` parses them and calls `train`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import re
import shutil
import signal
import tempfile
import threading
import time

import keras
import numpy as np
import tensorflow as tf

from ring_loss_tf import backbones
from ring_loss_tf import layers

HEADS = (
    "softmax", "asoftmax", "l2softmax", "centerloss", "cosface", "arcface"
)
LR_SCHEDULES = ("step", "cosine", "constant")
OPTIMIZERS = ("sgd", "adam")
AUGMENTATIONS = ("face", "characters", "none")

# SphereFace's solver: lr × 0.1 at 16k and 24k of 28k iterations.
STEP_BOUNDARIES = (16 / 28, 24 / 28)

# Defaults of the embedded character set (`ring_loss_tf.kanji`).
KANJI_IMAGE_SIZE = (32, 32)
KANJI_CHANNELS = 1
# Defaults of a face folder (SphereFace's aligned crops).
FACE_IMAGE_SIZE = (112, 96)
FACE_CHANNELS = 3

CONFIG_FILE = "config.json"
EXPORT_DIR = "export"
# Settings that fix the shape of the checkpoint: a resumed run must match.
ARCHITECTURE_KEYS = (
    "backbone",
    "head",
    "num_classes",
    "embedding_dim",
    "image_size",
    "channels",
    "ring",
    "embedding_block",
)
# The other settings of `build_models`: saved in config.json, read back by
# export, and a resumed run must match them too (a different value would
# silently change the model it continues).
MODEL_KEYS = (
    "lambda_ring",
    "ring_radius",
    "margin",
    "scale",
    "lambda_base",
    "lambda_gamma",
    "lambda_power",
    "lambda_min",
    "margin_warmup_steps",
    "l2_alpha",
    "center_loss_weight",
    "center_alpha",
)
# Settings of the optimisation a resumed run must keep (the number of
# steps may grow: that extends the run).
TRAINING_KEYS = (
    "batch_size",
    "lr",
    "lr_schedule",
    "warmup_steps",
    "optimizer",
    "momentum",
    "weight_decay",
    "mixed_precision",
    "augment",
    "seed",
)
# The warm-up train.py uses when --margin_warmup_steps is not given: where
# a head does not train on the embedded set without one (README, "Staged
# margin training").
DEFAULT_MARGIN_WARMUP_STEPS = {"asoftmax": 200, "cosface": 200, "arcface": 200}
# The embedding block train.py uses when --embedding_block is not given.
DEFAULT_EMBEDDING_BLOCK = {"cosface": "bn", "arcface": "bn"}
MARGIN_HEADS = ("asoftmax", "cosface", "arcface")
# Wen et al.'s λ: the center-loss weight of head "centerloss" (softmax +
# center loss) when none is given; other heads have none by default.
CENTERLOSS_HEAD_WEIGHT = 0.003


def center_loss_weight_for(head, center_loss_weight):
    """The center-loss weight a run uses: the given one, else the head's."""
    if center_loss_weight is not None:
        return center_loss_weight
    return CENTERLOSS_HEAD_WEIGHT if head == "centerloss" else 0.0


class ArgumentError(ValueError):
    """A bad argument of `train`, with its name, so `train.py` names the flag.

    `str(error)` is one line: "<argument>=<value>: <problem>; <fix>".
    """

    def __init__(self, argument, value, problem, fix):
        self.argument = argument
        self.value = value
        self.problem = problem
        self.fix = fix
        super().__init__(f"{argument}={value!r}: {problem}; {fix}")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; training stopped before saving it."""

    def __init__(self, message, step):
        super().__init__(message)
        self.step = step


class TrainingInterrupted(Exception):
    """A stop was requested (e.g. SIGTERM); the current step was saved.

    Attributes: `reason` (e.g. "SIGTERM"), `step`, `checkpoint` (its path,
    None without a model_dir or on a non-chief worker).
    """

    def __init__(self, reason, step, checkpoint, chief=True):
        self.reason = reason
        self.step = step
        self.checkpoint = checkpoint
        if checkpoint:
            saved = f"checkpoint {checkpoint} holds it"
        elif not chief:
            saved = "the chief worker wrote its checkpoint"
        else:
            saved = "nothing was saved (no model_dir)"
        super().__init__(f"Stopped by {reason} after step {step}; {saved}.")


class TrainingDataError(ValueError):
    """A training image could not be decoded (one line, naming the file when
    TensorFlow's message does, and the fix)."""


# tf.debugging.Assert's message: "[<text> File:] [b'<path>']" (or "<path>").
_CORRUPT_ASSERTION = re.compile(
    r"\[(Corrupt or truncated image file\..*?File:)\] \[b?['\"]?(.*?)['\"]?\]",
    re.S,
)


def _first_line(error):
    """The first line of an OSError's / tf.errors.OpError's message."""
    text = str(getattr(error, "message", None) or error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _data_error(error, trainer=None):
    """A `TrainingDataError` from tf.data's InvalidArgumentError."""
    text = getattr(error, "message", None) or str(error)
    match = _CORRUPT_ASSERTION.search(text)
    if match:
        message = f"{match.group(1)} {match.group(2)}"
    else:
        message = (
            "A training image could not be decoded "
            f"({_first_line(error)}), and TensorFlow does not say which "
            "file. Rerun with skip_corrupt=True (--skip_corrupt): it decodes "
            "every image once at the start and leaves out those that fail."
        )
    latest = None
    if trainer is not None and trainer.model_dir is not None:
        latest = tf.train.latest_checkpoint(str(trainer.model_dir))
    if latest:
        message += f" The last checkpoint {latest} is intact."
    return TrainingDataError(message)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, file size limit, ...).

    The checkpoints written before it are intact.
    """


class StopOnSignals:
    """Turns SIGINT / SIGTERM into a request to stop after the current step.

    Use as a context manager around the training loop and pass the instance
    as `stop_requested` (calling it returns the signal's name, or None). A
    second signal of the same kind acts at once (Ctrl-C twice: a
    KeyboardInterrupt; SIGTERM twice: the default termination); the
    checkpoints already written are intact either way. Outside the main
    thread, where Python cannot install handlers, it does nothing.

    Args:
        signals: the signals to catch.
        print_fn: told once when a stop is requested.
    """

    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM),
                 print_fn=print):
        self.signals = tuple(signals)
        self.print_fn = print_fn
        self.received = None
        self._previous = {}

    def __call__(self):
        return self.received

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is not None:
            signal.signal(signum, self._previous.get(signum) or signal.SIG_DFL)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.received = name
        self.print_fn(
            f"{name} received: stopping after this step with a checkpoint "
            f"(send {name} again to stop at once)."
        )

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous or signal.SIG_DFL)
        self._previous = {}
        return False


# --------------------------------------------------------------------------
# Strategy
# --------------------------------------------------------------------------


def _tf_config_workers():
    try:
        config = json.loads(os.environ.get("TF_CONFIG", "") or "{}")
    except json.JSONDecodeError as error:
        raise ValueError(
            f"TF_CONFIG is not valid JSON ({error}); set it as described in "
            "the tf.distribute multi-worker guide or unset it."
        ) from None
    return config.get("cluster", {}).get("worker", [])


def build_strategy(devices=None):
    """The distribution strategy for this process.

    - `TF_CONFIG` naming several workers: `MultiWorkerMirroredStrategy`
      (one replica per local GPU, or the CPU), ring collectives.
    - Otherwise `MirroredStrategy` over `devices`, default all visible GPUs,
      or the CPU when there is none. On CPU-only device lists the gradients
      are reduced with `ReductionToOneDevice`: the default collectives can
      fail with "Shape mismatch in the collective instance" when a second
      strategy with another model runs in the same process (design.md §3).

    Args:
        devices: device names, e.g. `["/cpu:0", "/cpu:1"]` (logical CPU
            devices); None for the default above.
    """
    if len(_tf_config_workers()) > 1:
        if devices is not None:
            raise ValueError(
                "`devices` cannot be combined with a multi-worker TF_CONFIG: "
                "each worker uses its local devices. Received: "
                f"devices={devices!r}"
            )
        experimental = tf.distribute.experimental
        options = experimental.CommunicationOptions(
            implementation=experimental.CommunicationImplementation.RING
        )
        return tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=options
        )
    if devices is None:
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or ["/cpu:0"]
    devices = list(devices)
    cpu_only = all("CPU" in d.upper() for d in devices)
    cross_device_ops = None
    if cpu_only:
        cross_device_ops = tf.distribute.ReductionToOneDevice()
    return tf.distribute.MirroredStrategy(
        devices, cross_device_ops=cross_device_ops
    )


def _is_chief(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    cluster = resolver.cluster_spec().as_dict()
    return (
        "chief" not in cluster
        and resolver.task_type == "worker"
        and resolver.task_id == 0
    )


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Models:
    """The models of one run.

    Attributes:
        train_model: `[images, labels] → [logits, embeddings]`.
        embedding_model: `images → embeddings` (the backbone; exported).
        ring: the `RingLoss` layer, or None when λ = 0.
        head: the head layer producing logits.
    """

    train_model: keras.Model
    embedding_model: keras.Model
    ring: layers.RingLoss | None
    head: keras.layers.Layer


def build_models(
    *,
    num_classes,
    backbone="small_cnn",
    head="softmax",
    image_size=KANJI_IMAGE_SIZE,
    channels=KANJI_CHANNELS,
    embedding_dim=128,
    lambda_ring=0.01,
    ring_radius="auto",
    margin=None,
    scale=None,
    lambda_base=1000.0,
    lambda_gamma=0.12,
    lambda_power=1.0,
    lambda_min=5.0,
    margin_warmup_steps=0,
    l2_alpha=16.0,
    center_loss_weight=None,
    center_alpha=0.5,
    embedding_block="fc",
    seed=None,
):
    """Builds backbone → RingLoss (if `lambda_ring` > 0) → CenterLoss (if
    `center_loss_weight` > 0) → head.

    Heads: "softmax" (`keras.layers.Dense`), "l2softmax" (`L2Constrained` +
    Dense), "asoftmax", "cosface", "arcface" (margin heads, with
    `margin_warmup_steps`), and "centerloss", softmax with center loss.
    Center loss, like Ring loss, combines with any head; its weight defaults
    to 0.003 for "centerloss" and 0 (off) for the others. `margin` and
    `scale` default to the head's own defaults. Call under the strategy's
    scope.
    """
    center_loss_weight = center_loss_weight_for(head, center_loss_weight)
    embedding_model = backbones.get(backbone)(
        input_shape=(*image_size, channels),
        embedding_dim=embedding_dim,
        seed=seed,
        embedding_block=embedding_block,
    )
    images = keras.Input((*image_size, channels), name="images")
    labels = keras.Input((), dtype="int32", name="labels")
    embeddings = embedding_model(images)
    features = embeddings
    ring = None
    if lambda_ring > 0:
        ring = layers.RingLoss(
            loss_weight=lambda_ring, radius_init=ring_radius, name="ring_loss"
        )
        features = ring(features)
    if center_loss_weight > 0:
        features = layers.CenterLoss(
            num_classes, center_loss_weight, center_alpha, name="center_loss"
        )([features, labels])
    margin_kwargs = {} if margin is None else {"margin": margin}
    scale_kwargs = {} if scale is None else {"scale": scale}
    dense_init = keras.initializers.GlorotUniform(seed=seed)
    # Logits in float32 under mixed precision.
    dense = keras.layers.Dense(
        num_classes, kernel_initializer=dense_init, dtype="float32",
        name="logits",
    )
    if head in ("softmax", "centerloss"):
        head_layer = dense
        logits = dense(features)
    elif head == "l2softmax":
        head_layer = dense
        logits = dense(layers.L2Constrained(l2_alpha, name="l2")(features))
    elif head == "asoftmax":
        head_layer = layers.ASoftmax(
            num_classes,
            lambda_base=lambda_base,
            lambda_gamma=lambda_gamma,
            lambda_power=lambda_power,
            lambda_min=lambda_min,
            margin_warmup_steps=margin_warmup_steps,
            name="asoftmax",
            **margin_kwargs,
        )
        logits = head_layer([features, labels])
    elif head in ("cosface", "arcface"):
        cls = layers.CosFace if head == "cosface" else layers.ArcFace
        head_layer = cls(
            num_classes, margin_warmup_steps=margin_warmup_steps, name=head,
            **margin_kwargs, **scale_kwargs,
        )
        logits = head_layer([features, labels])
    else:
        raise ArgumentError(
            "head", head, "unknown head", f"use one of {', '.join(HEADS)}"
        )
    if seed is not None and head in ("asoftmax", "cosface", "arcface"):
        # The margin heads take no initializer argument: draw their kernel
        # from the seed too, so equal seeds give equal models.
        head_layer.kernel.assign(
            keras.initializers.GlorotUniform(seed=seed + 1)(
                head_layer.kernel.shape
            )
        )
    train_model = keras.Model(
        [images, labels], [logits, embeddings], name="training_model"
    )
    return Models(train_model, embedding_model, ring, head_layer)


def decayed_variables(model):
    """The variables weight decay applies to: kernels of convs and denses.

    Never the ring radius R, the centers, PReLU slopes or biases: only
    trainable variables named "kernel", outside `RingLoss`, `CenterLoss` and
    `PReLU` layers.
    """
    excluded = set()
    for layer in _all_layers(model):
        if isinstance(
            layer, (layers.RingLoss, layers.CenterLoss, keras.layers.PReLU)
        ):
            excluded.update(id(v) for v in layer.weights)
    return [
        v
        for v in model.trainable_variables
        if v.name == "kernel" and id(v) not in excluded
    ]


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


# --------------------------------------------------------------------------
# Learning rate
# --------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="ring_loss_tf")
class LearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """lr(t) = base · warm-up(t) · decay(t), t = optimizer step (from 0).

    warm-up(t) = min(1, (t + 1) / warmup_steps) (1 without warm-up);
    decay: "step" × 0.1 at each fraction of `total_steps` in `boundaries`
    (SphereFace: 16k and 24k of 28k), "cosine" ½(1 + cos(π · t/total_steps)),
    "constant" 1.
    """

    def __init__(
        self,
        base,
        total_steps,
        schedule="cosine",
        warmup_steps=0,
        boundaries=STEP_BOUNDARIES,
    ):
        self.base = float(base)
        self.total_steps = int(total_steps)
        self.schedule = schedule
        self.warmup_steps = int(warmup_steps)
        self.boundaries = tuple(float(b) for b in boundaries)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        total = float(max(self.total_steps, 1))
        if self.schedule == "cosine":
            progress = tf.minimum(step / total, 1.0)
            factor = 0.5 * (1.0 + tf.cos(math.pi * progress))
        elif self.schedule == "step":
            factor = tf.constant(1.0)
            for fraction in self.boundaries:
                factor *= tf.where(step >= round(fraction * total), 0.1, 1.0)
        else:
            factor = tf.constant(1.0)
        if self.warmup_steps > 0:
            factor *= tf.minimum(1.0, (step + 1.0) / self.warmup_steps)
        return self.base * factor

    def get_config(self):
        return {
            "base": self.base,
            "total_steps": self.total_steps,
            "schedule": self.schedule,
            "warmup_steps": self.warmup_steps,
            "boundaries": list(self.boundaries),
        }


# --------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------


class Trainer:
    """Runs the custom distributed training loop on one `Models`.

    Args:
        strategy: a `tf.distribute` strategy (see `build_strategy`).
        model_fn: called without arguments under the strategy scope; returns
            a `Models`.
        global_batch_size: B, divisible by the number of replicas.
        learning_rate: float or `LearningRateSchedule`.
        optimizer: "sgd" (momentum) or "adam".
        momentum: SGD momentum.
        weight_decay: wd of the term wd/2 · Σ‖W‖² over `decayed_variables`.
        jit: compile the replica forward/backward with XLA.
        model_dir: checkpoints and summaries (None: neither).
        max_to_keep: checkpoints kept.
        mixed_precision: None, "mixed_float16" (dynamic loss scaling) or
            "mixed_bfloat16". The policy must be set before `model_fn` runs;
            `train` does it.
    """

    def __init__(
        self,
        strategy,
        model_fn,
        *,
        global_batch_size,
        learning_rate=0.1,
        optimizer="sgd",
        momentum=0.9,
        weight_decay=5e-4,
        jit=True,
        model_dir=None,
        max_to_keep=3,
        mixed_precision=None,
    ):
        self.strategy = strategy
        self.num_replicas = strategy.num_replicas_in_sync
        n = self.num_replicas
        if global_batch_size % n:
            raise ArgumentError(
                "batch_size",
                global_batch_size,
                f"not divisible by the {n} replicas",
                f"use a multiple of {n}, e.g. "
                f"{max(1, global_batch_size // n) * n}",
            )
        self.global_batch_size = global_batch_size
        self.per_replica_batch_size = global_batch_size // self.num_replicas
        self.weight_decay = float(weight_decay)
        self.jit = bool(jit)
        self.model_dir = None if model_dir is None else pathlib.Path(model_dir)
        self.is_chief = _is_chief(strategy)
        self.num_workers = max(1, len(_tf_config_workers()))
        with strategy.scope():
            self.models = model_fn()
            if optimizer == "sgd":
                opt = keras.optimizers.SGD(learning_rate, momentum=momentum)
            elif optimizer == "adam":
                opt = keras.optimizers.Adam(learning_rate)
            else:
                raise ArgumentError(
                    "optimizer", optimizer, "unknown optimizer",
                    f"use one of {', '.join(OPTIMIZERS)}",
                )
            self.loss_scaling = mixed_precision == "mixed_float16"
            if self.loss_scaling:
                opt = keras.optimizers.LossScaleOptimizer(opt)
            self.optimizer = opt
            self.trainable = self.models.train_model.trainable_variables
            self.optimizer.build(self.trainable)
            self.step = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="global_step"
            )
        self.decayed = decayed_variables(self.models.train_model)
        self._forward_backward = tf.function(
            self._forward_backward_fn, jit_compile=self.jit
        )
        self._train_step = tf.function(self._train_step_fn)
        self.checkpoint = None
        self.manager = None
        self._worker_dir = None

    # -- checkpoints -------------------------------------------------------

    def attach_checkpoint(self, iterator=None, max_to_keep=3):
        """Creates the checkpoint of model, optimizer, step and `iterator`.

        On a multi-worker run only the chief writes to `model_dir`; the
        others write to a temporary directory that is deleted (every worker
        must take part in saving).
        """
        items = {
            "model": self.models.train_model,
            "optimizer": self.optimizer,
            "step": self.step,
        }
        if iterator is not None:
            items["iterator"] = iterator
        self.checkpoint = tf.train.Checkpoint(**items)
        if self.model_dir is None:
            return None
        directory = self.model_dir
        if not self.is_chief:
            self._worker_dir = pathlib.Path(
                tempfile.mkdtemp(prefix="ring_loss_tf-worker-")
            )
            directory = self._worker_dir
        if self.is_chief:
            # Partial writes of a killed run (TensorFlow writes
            # ckpt-N_temp/ and merges it into ckpt-N.*): never read again.
            for stale in pathlib.Path(directory).glob("ckpt-*_temp"):
                shutil.rmtree(stale, ignore_errors=True)
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, str(directory), max_to_keep=max_to_keep
        )
        latest = tf.train.latest_checkpoint(str(self.model_dir))
        if latest:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
        return latest

    def save(self):
        """Saves a checkpoint (all workers call it); returns its path.

        Raises:
            CheckpointWriteError: it could not be written (no space, a file
                size limit, permissions); the earlier checkpoints are intact
                (the `checkpoint` index names a new one only once it is
                complete).
        """
        if self.manager is None:
            return None
        step = int(self.step.numpy())
        try:
            path = self.manager.save(checkpoint_number=step)
        except (OSError, tf.errors.OpError) as error:
            reason = _first_line(error)
            latest = tf.train.latest_checkpoint(str(self.model_dir))
            kept = (
                f"the previous checkpoint {latest} is intact"
                if latest
                else "no earlier checkpoint exists"
            )
            raise CheckpointWriteError(
                f"Could not write the checkpoint of step {step} to "
                f"{self.manager.directory} ({reason}); {kept}. Free disk "
                "space (or raise the file size limit, `ulimit -f`) and rerun "
                "the same command to resume."
            ) from None
        return path if self.is_chief else None

    def any_worker(self, flag):
        """True on every worker if `flag` is true on any (a collective on
        multi-worker runs, so all of them stop at the same step)."""
        if self.num_workers <= 1:
            return bool(flag)
        value = self.strategy.experimental_distribute_values_from_function(
            lambda _: tf.constant(1 if flag else 0, tf.int32)
        )
        total = self.strategy.reduce("SUM", value, axis=None)
        return int(total.numpy()) > 0

    def close(self):
        if self._worker_dir is not None:
            shutil.rmtree(self._worker_dir, ignore_errors=True)
            self._worker_dir = None

    # -- the step ----------------------------------------------------------

    def _forward_backward_fn(self, images, labels):
        """Per-replica loss and gradients (compiled with XLA when jit)."""
        models = self.models
        with tf.GradientTape() as tape:
            logits, embeddings = models.train_model(
                [images, labels], training=True
            )
            logits = tf.cast(logits, tf.float32)
            per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=labels, logits=logits
            )
            cross_entropy = tf.reduce_sum(per_example) / self.global_batch_size
            zero = tf.constant(0.0, tf.float32)
            model_losses = [
                tf.cast(x, tf.float32) for x in models.train_model.losses
            ]
            regularisation = tf.add_n(model_losses) if model_losses else zero
            ring = (
                tf.add_n([tf.cast(x, tf.float32) for x in models.ring.losses])
                if models.ring is not None and models.ring.losses
                else zero
            )
            decay = zero
            if self.weight_decay > 0 and self.decayed:
                decay = 0.5 * self.weight_decay * tf.add_n(
                    [
                        tf.reduce_sum(tf.square(tf.cast(v, tf.float32)))
                        for v in self.decayed
                    ]
                )
            # The all-reduce sums replicas: per-replica terms are divided by
            # the replica count, per-example terms by the global batch.
            loss = cross_entropy + (regularisation + decay) / self.num_replicas
            scaled = (
                self.optimizer.scale_loss(loss) if self.loss_scaling else loss
            )
        gradients = tape.gradient(scaled, self.trainable)
        norms = tf.norm(tf.cast(embeddings, tf.float32), axis=-1)
        stats = {
            "loss": loss,
            "cross_entropy": cross_entropy,
            "ring_loss": ring / self.num_replicas,
            "weight_decay": decay / self.num_replicas,
            "feature_norm": tf.reduce_sum(norms) / self.global_batch_size,
        }
        return gradients, stats, norms

    def _replica_step(self, images, labels):
        gradients, stats, norms = self._forward_backward(images, labels)
        # Outside the compiled function: the optimizer all-reduces (sums)
        # the gradients across replicas, then updates the mirrored weights.
        self.optimizer.apply_gradients(zip(gradients, self.trainable))
        return stats, norms

    def _train_step_fn(self, images, labels):
        per_replica = self.per_replica_batch_size

        def shard(context):
            start = context.replica_id_in_sync_group * per_replica
            return (
                images[start : start + per_replica],
                labels[start : start + per_replica],
            )

        sharded = self.strategy.experimental_distribute_values_from_function(
            shard
        )
        stats, norms = self.strategy.run(self._replica_step, args=sharded)
        reduced = {
            k: self.strategy.reduce(
                tf.distribute.ReduceOp.SUM, v, axis=None
            )
            for k, v in stats.items()
        }
        local_norms = tf.concat(
            self.strategy.experimental_local_results(norms), axis=0
        )
        return reduced, local_norms

    def initialize_radius(self, images):
        """R from the first global batch, eagerly (no-op when restored)."""
        if self.models.ring is None:
            return None
        embeddings = self.models.embedding_model(images, training=False)
        return self.models.ring.initialize_radius(embeddings)

    def train_step(self, images, labels):
        """One step on a global batch; returns ({name: float}, norms)."""
        stats, norms = self._train_step(images, labels)
        self.step.assign_add(1)
        return {k: float(v) for k, v in stats.items()}, norms

    # -- state for logs ----------------------------------------------------

    def radius(self):
        ring = self.models.ring
        return None if ring is None else float(ring.radius.numpy())

    def head_lambda(self):
        """A-Softmax's λ of the last step (None: another head or warm-up)."""
        head = self.models.head
        if isinstance(head, layers.ASoftmax):
            value = head.current_lambda()
            if value is not None:
                return float(keras.ops.convert_to_numpy(value))
        return None

    def in_margin_warmup(self):
        """True while a margin head still trains without its margin."""
        head = self.models.head
        return bool(
            getattr(head, "margin_warmup_steps", 0)
            and head.margin_step() == 0
        )

    def peak_learning_rate(self):
        """The base of a `LearningRate` schedule, else the current rate."""
        optimizer = self.optimizer
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            optimizer = optimizer.inner_optimizer
        schedule = getattr(optimizer, "_learning_rate", None)
        if isinstance(schedule, LearningRate):
            return schedule.base
        return self.learning_rate()

    def learning_rate(self):
        optimizer = self.optimizer
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            optimizer = optimizer.inner_optimizer
        return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


# --------------------------------------------------------------------------
# The training loop with logs, summaries and the NaN guard
# --------------------------------------------------------------------------


def _format_seconds(seconds):
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def run_loop(
    trainer,
    iterator,
    total_steps,
    *,
    checkpoint_every=500,
    log_every=50,
    stop_at_step=None,
    print_fn=print,
    summary_writer=None,
    stop_requested=None,
):
    """Trains until `total_steps` (or `stop_at_step`), checkpointing.

    The checkpoint saved at the end (and every `checkpoint_every` steps) holds
    the model, the optimizer, the step and the iterator position, so running
    again continues exactly. A NaN/Inf loss raises `NonFiniteLossError`
    before anything is saved.

    Args:
        stop_requested: None, or a callable checked before every step; when
            it returns a reason (e.g. `StopOnSignals`), the current step is
            checkpointed and `TrainingInterrupted` raised.

    Returns:
        Stats of the last step (dict of floats), or None if no step ran.

    Raises:
        NonFiniteLossError, TrainingInterrupted, CheckpointWriteError,
        TrainingDataError (an image could not be decoded).
    """
    step = int(trainer.step.numpy())
    stop = total_steps
    if stop_at_step is not None:
        stop = min(stop_at_step, total_steps)
    last = None
    saved_step = None
    interval_start, interval_steps = time.perf_counter(), 0
    steps_per_second = None
    chief = trainer.is_chief
    while step < stop:
        reason = stop_requested() if stop_requested is not None else None
        if stop_requested is not None and trainer.any_worker(reason):
            path = trainer.save() if saved_step != step else (
                tf.train.latest_checkpoint(str(trainer.model_dir))
                if trainer.model_dir is not None and chief
                else None
            )
            raise TrainingInterrupted(
                reason or "another worker", step, path, chief=chief
            )
        try:
            images, labels = next(iterator)
        except tf.errors.InvalidArgumentError as error:
            raise _data_error(error, trainer) from None
        if step == 0 or last is None:
            trainer.initialize_radius(images)
        stats, norms = trainer.train_step(images, labels)
        step += 1
        interval_steps += 1
        if not all(math.isfinite(v) for v in stats.values()):
            trainer.step.assign_add(-1)
            raise NonFiniteLossError(_nan_message(trainer, step, stats), step)
        last = stats
        if step % log_every == 0 or step == stop or step == 1:
            now = time.perf_counter()
            elapsed = now - interval_start
            images_per_second = (
                interval_steps * trainer.global_batch_size / elapsed
                if elapsed > 0
                else float("nan")
            )
            if step > 1:  # the first interval includes compilation
                steps_per_second = interval_steps / elapsed
            if chief:
                print_fn(
                    _progress_line(
                        trainer, step, total_steps, stats,
                        images_per_second, steps_per_second,
                    )
                )
                if summary_writer is not None:
                    _write_summaries(
                        summary_writer, trainer, step, stats, norms,
                        images_per_second,
                    )
            interval_start, interval_steps = time.perf_counter(), 0
        if step % checkpoint_every == 0 or step == stop:
            trainer.save()
            saved_step = step
    return last


def _progress_line(trainer, step, total_steps, stats, images_per_second, sps):
    width = len(str(total_steps))
    parts = [
        f"step {step:>{width}}/{total_steps}",
        f"loss {stats['loss']:.4f}",
        f"ce {stats['cross_entropy']:.4f}",
    ]
    radius = trainer.radius()
    if radius is not None:
        parts += [f"ring {stats['ring_loss']:.4f}", f"R {radius:.3f}"]
    parts.append(f"|F| {stats['feature_norm']:.3f}")
    head_lambda = trainer.head_lambda()
    if trainer.in_margin_warmup():
        parts.append("margin off")
    elif head_lambda is not None:
        parts.append(f"lambda {head_lambda:.2f}")
    parts.append(f"lr {trainer.learning_rate():.4g}")
    parts.append(f"{images_per_second:.0f} img/s")
    if sps:
        parts.append(f"ETA {_format_seconds((total_steps - step) / sps)}")
    return "  ".join(parts)


def _summary_metadata(plugin_name):
    # The protos TensorBoard's tf.summary.scalar/histogram write, so the
    # summaries need no `tensorboard` package at training time.
    from tensorflow.core.framework import summary_pb2

    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(
            plugin_name=plugin_name
        )
    )


def write_scalar(name, value, step):
    """A TensorBoard scalar (plugin "scalars") to the default writer."""
    tf.summary.write(
        name,
        tf.constant(value, tf.float32),
        step=step,
        metadata=_summary_metadata("scalars"),
    )


def write_histogram(name, values, step, buckets=30):
    """A TensorBoard histogram: a (buckets, 3) tensor of left, right, count."""
    values = np.asarray(values, np.float64).reshape(-1)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return
    low, high = float(values.min()), float(values.max())
    if high <= low:
        high = low + 1e-6
    counts, edges = np.histogram(values, bins=buckets, range=(low, high))
    tensor = np.stack([edges[:-1], edges[1:], counts], axis=1)
    tf.summary.write(
        name,
        tf.constant(tensor, tf.float64),
        step=step,
        metadata=_summary_metadata("histograms"),
    )


def _write_summaries(writer, trainer, step, stats, norms, images_per_second):
    with writer.as_default():
        for name, value in stats.items():
            write_scalar(f"loss/{name}", value, step)
        radius = trainer.radius()
        if radius is not None:
            write_scalar("ring/radius", radius, step)
        head_lambda = trainer.head_lambda()
        if head_lambda is not None:
            write_scalar("asoftmax/lambda", head_lambda, step)
        write_scalar("learning_rate", trainer.learning_rate(), step)
        write_scalar("images_per_second", images_per_second, step)
        write_histogram("feature_norm", norms.numpy(), step)
    writer.flush()


def _nan_message(trainer, step, stats):
    values = ", ".join(f"{k} {v:.4g}" for k, v in stats.items())
    latest = None
    if trainer.manager is not None:
        latest = tf.train.latest_checkpoint(str(trainer.model_dir))
    if latest:
        kept = (
            f"the last good checkpoint {latest} is intact and the next run "
            "resumes from it"
        )
    else:
        kept = "no checkpoint was written yet"
    return (
        f"Training stopped at step {step}: the loss is not finite ({values}); "
        f"{kept}. Try a lower lr (now {trainer.peak_learning_rate():.4g}), "
        "warmup_steps, a smaller lambda_ring, or training without "
        "mixed_precision."
    )


# --------------------------------------------------------------------------
# train(): everything train.py does
# --------------------------------------------------------------------------


def _check_arguments(a):
    def bad(name, problem, fix):
        raise ArgumentError(name, a[name], problem, fix)

    if a["head"] not in HEADS:
        bad("head", "unknown head", f"use one of {', '.join(HEADS)}")
    if a["backbone"] not in backbones.BACKBONES:
        bad(
            "backbone", "unknown backbone",
            f"use one of {', '.join(backbones.BACKBONES)}",
        )
    if not isinstance(a["lambda_ring"], (int, float)) or not (
        a["lambda_ring"] >= 0 and math.isfinite(a["lambda_ring"])
    ):
        bad(
            "lambda_ring", "must be a finite number >= 0",
            "use 0 to disable the ring loss or e.g. 0.01",
        )
    radius = a["ring_radius"]
    if radius != "auto" and not (
        isinstance(radius, (int, float)) and radius > 0
        and math.isfinite(radius)
    ):
        bad("ring_radius", "must be 'auto' or a positive number",
            "use auto (mean norm of the first batch) or e.g. 20")
    for name in ("batch_size", "log_every", "checkpoint_every"):
        if not isinstance(a[name], int) or a[name] < 1:
            bad(name, "must be a positive integer", "use e.g. 256")
    if a["steps"] is None and a["epochs"] is None:
        bad("steps", "neither steps nor epochs is set", "set one of them")
    if a["steps"] is not None and a["epochs"] is not None:
        bad("steps", "both steps and epochs are set", "set only one of them")
    if a["steps"] is not None and (
        not isinstance(a["steps"], int) or a["steps"] < 1
    ):
        bad("steps", "must be a positive integer", "use e.g. 1000")
    if a["epochs"] is not None and not (
        isinstance(a["epochs"], (int, float)) and a["epochs"] > 0
    ):
        bad("epochs", "must be a positive number", "use e.g. 8")
    for name in ("lr",):
        if not (isinstance(a[name], (int, float)) and a[name] > 0
                and math.isfinite(a[name])):
            bad(name, "must be a positive number", "use e.g. 0.1")
    for name in ("weight_decay", "warmup_steps"):
        if not (isinstance(a[name], (int, float)) and a[name] >= 0):
            bad(name, "must be >= 0", "use 0 to disable it")
    if not (0 <= a["momentum"] < 1):
        bad("momentum", "must be in [0, 1)", "use e.g. 0.9")
    if a["lr_schedule"] not in LR_SCHEDULES:
        bad("lr_schedule", "unknown schedule",
            f"use one of {', '.join(LR_SCHEDULES)}")
    if a["optimizer"] not in OPTIMIZERS:
        bad("optimizer", "unknown optimizer",
            f"use one of {', '.join(OPTIMIZERS)}")
    if a["augment"] is not None and a["augment"] not in AUGMENTATIONS:
        bad("augment", "unknown augmentation",
            f"use one of {', '.join(AUGMENTATIONS)}")
    if a["head"] == "asoftmax" and a["margin"] is not None and (
        a["margin"] not in (1, 2, 3, 4)
    ):
        bad("margin", "A-Softmax's margin m must be an integer 1..4",
            "use 4 (SphereFace) or omit it")
    if a["head"] in ("cosface", "arcface") and a["margin"] is not None and (
        not a["margin"] >= 0
    ):
        bad("margin", "must be >= 0", "use e.g. 0.35 (CosFace), 0.5 (ArcFace)")
    for name in ("lambda_base", "lambda_gamma", "lambda_power", "lambda_min"):
        if not (isinstance(a[name], (int, float)) and a[name] >= 0):
            bad(name, "must be >= 0",
                "see README, A-Softmax schedule (defaults 1000, 0.12, 1, 5)")
    warmup = a["margin_warmup_steps"]
    if warmup is not None and (
        isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0
    ):
        bad("margin_warmup_steps", "must be an integer >= 0",
            "use 0 to start with the margin, or e.g. 200")
    if warmup and a["head"] not in MARGIN_HEADS:
        bad("margin_warmup_steps",
            f"the {a['head']} head has no margin to warm up",
            f"use it with --head={'/'.join(MARGIN_HEADS)}, or omit it")
    if a["embedding_block"] is not None and (
        a["embedding_block"] not in backbones.EMBEDDING_BLOCKS
    ):
        bad("embedding_block", "unknown embedding block",
            f"use one of {', '.join(backbones.EMBEDDING_BLOCKS)}")
    for name in ("l2_alpha", "center_alpha"):
        if not (isinstance(a[name], (int, float)) and a[name] > 0
                and math.isfinite(a[name])):
            bad(name, "must be a positive number",
                "omit it for the default (16 for l2_alpha, 0.5 for "
                "center_alpha)")
    weight = a["center_loss_weight"]
    if weight is not None and not (
        isinstance(weight, (int, float)) and weight >= 0
        and math.isfinite(weight)
    ):
        bad("center_loss_weight", "must be a finite number >= 0",
            "use 0 to disable center loss or e.g. 0.003")
    if a["image_size"] is not None and (
        len(a["image_size"]) != 2 or min(a["image_size"]) < 8
    ):
        bad("image_size", "must be (height, width), both >= 8",
            "use e.g. 32 or 112,96")
    if a["channels"] is not None and a["channels"] not in (1, 3):
        bad("channels", "must be 1 or 3", "use 1 (grey) or 3 (RGB)")
    data_dir = a["data_dir"]
    if data_dir is not None and not (
        (pathlib.Path(data_dir) / "train").is_dir()
        or (pathlib.Path(data_dir) / "train.rec").is_file()
    ):
        if not pathlib.Path(data_dir).is_dir():
            bad("data_dir", "no such directory",
                "give a directory holding train/ (one folder per identity), "
                "or omit it to use the embedded character set")
        bad("data_dir", "has no train/ folder or train.rec",
            "put one folder of images per identity under <data_dir>/train")
    if a["model_dir"] is None or str(a["model_dir"]) == "":
        bad("model_dir", "is empty", "give a directory for checkpoints")


def _config(a, num_classes, image_size, channels, embedding_dim):
    config = {
        "backbone": a["backbone"],
        "head": a["head"],
        "num_classes": int(num_classes),
        "embedding_dim": int(embedding_dim),
        "image_size": list(image_size),
        "channels": int(channels),
        "ring": a["lambda_ring"] > 0,
        "embedding_block": a["embedding_block"],
        "data_dir": None if a["data_dir"] is None else str(a["data_dir"]),
    }
    config.update({k: a[k] for k in MODEL_KEYS + TRAINING_KEYS})
    return config


def model_settings(config):
    """`build_models` keyword arguments from a saved config.json.

    Settings an older config.json lacks take the values that run used
    then (the defaults of its time).
    """
    settings = {
        "num_classes": config["num_classes"],
        "backbone": config["backbone"],
        "head": config["head"],
        "image_size": tuple(config["image_size"]),
        "channels": config["channels"],
        "embedding_dim": config["embedding_dim"],
        "embedding_block": config.get("embedding_block", "fc"),
        "seed": config.get("seed"),
    }
    settings.update({k: config[k] for k in MODEL_KEYS if k in config})
    if not config.get("ring", True):
        settings["lambda_ring"] = 0.0
    return settings


def check_resume_config(model_dir, config):
    """Writes `config` to `model_dir`, or checks it against a saved one.

    Raises:
        ValueError: `model_dir` holds a checkpoint of another architecture.
    """
    model_dir = pathlib.Path(model_dir)
    path = model_dir / CONFIG_FILE
    has_checkpoint = tf.train.latest_checkpoint(str(model_dir)) is not None
    if path.is_file() and has_checkpoint:
        saved = json.loads(path.read_text())
        # A key an older config.json lacks cannot be compared.
        different = [
            f"{k}={saved[k]!r} (now {config[k]!r})"
            for k in ARCHITECTURE_KEYS + MODEL_KEYS + TRAINING_KEYS
            if k in saved and _json_value(saved[k]) != _json_value(config[k])
        ]
        if different:
            raise ValueError(
                f"{model_dir} holds a checkpoint of another model: "
                f"{', '.join(different)}. Use a new model_dir, or the settings "
                "of that run to resume it."
            )
        return
    model_dir.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(temporary, path)


def _json_value(value):
    """`value` as config.json holds it (tuples become lists)."""
    return json.loads(json.dumps(value))


def embed(embedding_model, images, batch_size=512):
    """Embeddings of preprocessed float images, in batches (numpy)."""
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        outputs.append(
            keras.ops.convert_to_numpy(
                embedding_model(batch, training=False)
            ).astype(np.float32)
        )
    if not outputs:
        return np.zeros((0, embedding_model.output_shape[-1]), np.float32)
    return np.concatenate(outputs)


def evaluate_verification(embedding_model, pairs_path, lfw_dir, image_size,
                          channels):
    """10-fold accuracy and TAR@FAR of `pairs_path` (LFW format)."""
    from ring_loss_tf import data
    from ring_loss_tf import metrics

    pairs = data.read_lfw_pairs(
        pairs_path, lfw_dir, image_size=tuple(image_size), channels=channels
    )
    images = data.normalize(pairs.images).numpy()
    embeddings = embed(embedding_model, images)
    scores = metrics.pair_scores(
        embeddings[pairs.left], embeddings[pairs.right]
    )
    fold = getattr(pairs, "fold", None)
    return metrics.verify(
        scores, pairs.issame, fold=fold, fars=(1e-3, 1e-4)
    )


def format_verification_table(result, title):
    """A short markdown table of a `metrics.VerificationResult`."""

    def rate(x):
        return "n/a" if x is None else f"{100 * x:.2f}%"

    rows = [
        f"{title}: {result.num_genuine} genuine, {result.num_impostor} "
        "impostor pairs",
        "| 10-fold accuracy | TAR@FAR=1e-3 | TAR@FAR=1e-4 |",
        "|---|---|---|",
        f"| {100 * result.accuracy_mean:.2f}% ± {100 * result.accuracy_std:.2f}"
        f" | {rate(result.tar_at_far.get(1e-3))}"
        f" | {rate(result.tar_at_far.get(1e-4))} |",
    ]
    return "\n".join(rows)


def _mixed_precision_policy(enabled):
    if not enabled:
        return None
    if tf.config.list_logical_devices("GPU"):
        return "mixed_float16"
    return "mixed_bfloat16"


def train(
    *,
    model_dir,
    data_dir=None,
    skip_corrupt=False,
    backbone="small_cnn",
    head="softmax",
    embedding_dim=None,
    image_size=None,
    channels=None,
    augment=None,
    lambda_ring=0.01,
    ring_radius="auto",
    batch_size=256,
    epochs=None,
    steps=None,
    lr=0.05,
    lr_schedule="cosine",
    warmup_steps=0,
    optimizer="sgd",
    momentum=0.9,
    weight_decay=5e-4,
    mixed_precision=False,
    jit=True,
    seed=0,
    margin=None,
    scale=None,
    lambda_base=1000.0,
    lambda_gamma=0.12,
    lambda_power=1.0,
    lambda_min=5.0,
    margin_warmup_steps=None,
    l2_alpha=16.0,
    center_loss_weight=None,
    center_alpha=0.5,
    embedding_block=None,
    log_every=50,
    checkpoint_every=500,
    max_to_keep=3,
    stop_at_step=None,
    evaluate=True,
    export=True,
    devices=None,
    kanji_options=None,
    stop_on_signals=False,
    print_fn=print,
):
    """Trains, checkpoints, exports and evaluates; see train.py's flags.

    Rerunning with the same `model_dir` resumes from its latest checkpoint
    (the same weights as an uninterrupted run); a different backbone, head,
    class count, embedding size, image size or ring on/off is an error.

    Args (the rest are the flags of train.py with the same names):
        data_dir: None for the embedded character set (`kanji.prepare`),
            else a directory with train/ (one folder per identity), and
            optionally test/ + pairs.txt (LFW layout) for the final table.
        skip_corrupt: (image folders) decode every training image once at
            the start and leave out those that fail (one warning); without
            it a corrupt image stops training with `TrainingDataError`.
        kanji_options: keyword arguments of `kanji.prepare` (data size).
        margin_warmup_steps: None for `DEFAULT_MARGIN_WARMUP_STEPS` of the
            head (0 for heads without a margin).
        embedding_block: None for `DEFAULT_EMBEDDING_BLOCK` of the head
            ("fc" where it has none).
        center_loss_weight: None for 0.003 with head "centerloss", else 0
            (off); > 0 adds center loss to any head.
        stop_at_step: stop with a checkpoint after this step (time-sliced
            jobs; the next run resumes).
        devices: device list of `build_strategy`.
        stop_on_signals: while training, SIGINT / SIGTERM stop after the
            current step with a checkpoint (`StopOnSignals`) and raise
            `TrainingInterrupted`; needs the main thread.
        print_fn: where progress lines go.

    Returns:
        dict with "step", "last" (stats of the last step), "export_dir",
        "verification" (a `metrics.VerificationResult` or None), "table"
        (the printed markdown table) and "trainer" (the `Trainer`).

    Raises:
        ArgumentError: a bad argument (names it and the fix).
        NonFiniteLossError: the loss became NaN/Inf (the last checkpoint is
            kept).
        TrainingInterrupted: a signal stopped training (`stop_on_signals`);
            the current step was checkpointed.
        CheckpointWriteError: a checkpoint could not be written; the
            earlier ones are intact.
        TrainingDataError: a training image could not be decoded.
        ValueError: `model_dir` holds a checkpoint of another architecture.
    """
    arguments = dict(locals())
    arguments.pop("print_fn")
    arguments.pop("stop_on_signals")
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
        arguments["image_size"] = image_size
    _check_arguments(arguments)
    if margin_warmup_steps is None:
        margin_warmup_steps = DEFAULT_MARGIN_WARMUP_STEPS.get(head, 0)
    if embedding_block is None:
        embedding_block = DEFAULT_EMBEDDING_BLOCK.get(head, "fc")
    center_loss_weight = center_loss_weight_for(head, center_loss_weight)
    arguments.update(
        margin_warmup_steps=margin_warmup_steps,
        embedding_block=embedding_block,
        center_loss_weight=center_loss_weight,
    )
    from ring_loss_tf import data

    strategy = build_strategy(devices)
    if batch_size % strategy.num_replicas_in_sync:
        n = strategy.num_replicas_in_sync
        raise ArgumentError(
            "batch_size", batch_size,
            f"not divisible by the {n} replicas",
            f"use a multiple of {n}, e.g. {max(1, batch_size // n) * n}",
        )
    chief = _is_chief(strategy)
    if data_dir is None:
        from ring_loss_tf import kanji

        options = dict(kanji_options or {})
        options.setdefault("seed", seed)
        options.setdefault("progress", chief)
        root = pathlib.Path(kanji.prepare(**options))
        image_size = image_size or (options.get("image_size", 32),) * 2
        channels = channels or KANJI_CHANNELS
        augment = augment or "characters"
        arguments["augment"] = augment
    else:
        root = pathlib.Path(data_dir)
        image_size = image_size or FACE_IMAGE_SIZE
        channels = channels or FACE_CHANNELS
        augment = augment or "face"
        arguments["augment"] = augment
    if embedding_dim is None:
        embedding_dim = 128 if backbone == "small_cnn" else 512
    # A folder per identity under train/, or insightface's train.rec.
    train_path = root / "train" if (root / "train").is_dir() else root
    source = data.open_training_source(train_path, skip_corrupt=skip_corrupt)
    num_classes = source.num_classes
    if steps is None:
        steps = max(1, math.ceil(epochs * source.num_examples / batch_size))
    config = _config(arguments, num_classes, image_size, channels,
                     embedding_dim)
    if data_dir is None:
        # evaluate.py finds the same embedded set from this alone.
        config["kanji_options"] = {
            k: v for k, v in options.items() if k != "progress"
        }
    if chief:
        check_resume_config(model_dir, config)
    settings = model_settings(config)

    policy = _mixed_precision_policy(mixed_precision)
    previous_policy = keras.config.dtype_policy()
    if policy:
        keras.config.set_dtype_policy(policy)
    keras.utils.set_random_seed(seed)
    try:

        def model_fn():
            return build_models(**settings)

        schedule = LearningRate(
            lr, steps, lr_schedule, warmup_steps=warmup_steps
        )
        trainer = Trainer(
            strategy,
            model_fn,
            global_batch_size=batch_size,
            learning_rate=schedule,
            optimizer=optimizer,
            momentum=momentum,
            weight_decay=weight_decay,
            jit=jit,
            model_dir=model_dir,
            max_to_keep=max_to_keep,
            mixed_precision=policy,
        )
    finally:
        keras.config.set_dtype_policy(previous_policy)
    try:
        dataset = data.training_dataset(
            source,
            batch_size=batch_size,
            image_size=tuple(image_size),
            channels=channels,
            augment=augment,
            seed=seed,
        )
    except tf.errors.InvalidArgumentError as error:  # in-memory decoding
        raise _data_error(error, trainer) from None
    iterator = iter(dataset)
    restored = trainer.attach_checkpoint(iterator, max_to_keep=max_to_keep)
    if chief:
        start = int(trainer.step.numpy())
        ring_text = f"RingLoss(λ={lambda_ring}) → " if lambda_ring else ""
        if center_loss_weight:
            ring_text += f"CenterLoss(λ={center_loss_weight}) → "
        head_text = head
        if margin_warmup_steps and head in MARGIN_HEADS:
            head_text += f" (margin from step {margin_warmup_steps + 1})"
        if embedding_block != "fc":
            head_text += f", embedding block {embedding_block}"
        print_fn(
            f"{'Resuming from ' + restored if restored else 'Training'}: "
            f"{backbone} → {ring_text}{head_text}, {num_classes} classes, "
            f"{source.num_examples} images, "
            f"batch {batch_size} on {strategy.num_replicas_in_sync} "
            f"replica(s), steps {start}→{steps}, jit={jit}, "
            f"mixed_precision={policy or 'off'}"
        )
    writer = None
    if chief:
        writer = tf.summary.create_file_writer(
            str(pathlib.Path(model_dir) / "train")
        )
    stopper = StopOnSignals(print_fn=print_fn) if stop_on_signals else None
    try:
        with stopper or contextlib.nullcontext():
            last = run_loop(
                trainer,
                iterator,
                steps,
                checkpoint_every=checkpoint_every,
                log_every=log_every,
                stop_at_step=stop_at_step,
                print_fn=print_fn,
                summary_writer=writer,
                stop_requested=stopper,
            )
    finally:
        trainer.close()
        if writer is not None:
            writer.close()
    result = {
        "step": int(trainer.step.numpy()),
        "last": last,
        "export_dir": None,
        "verification": None,
        "table": None,
        "trainer": trainer,
    }
    if result["step"] < steps or not chief:
        return result
    if export:
        from ring_loss_tf import export as export_lib

        result["export_dir"] = export_lib.export_saved_model(
            trainer.models.embedding_model,
            pathlib.Path(model_dir) / EXPORT_DIR,
            overwrite=True,
        )
        print_fn(f"Exported the embedding model to {result['export_dir']}")
    pairs_path = root / "pairs.txt"
    if evaluate and pairs_path.is_file() and (root / "test").is_dir():
        verification = evaluate_verification(
            trainer.models.embedding_model, pairs_path, root / "test",
            image_size, channels,
        )
        table = format_verification_table(
            verification, f"Verification on unseen identities ({pairs_path})"
        )
        result["verification"] = verification
        result["table"] = table
        print_fn(table)
    return result
