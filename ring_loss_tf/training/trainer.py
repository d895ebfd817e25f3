"""The distributed step: `Trainer`.

One training step, for a global batch of B examples on N replicas:

    each replica r, inside tf.function(jit_compile=jit):
        L_r = Σ_{i ∈ batch_r} CE_i / B  +  (Σ model.losses + wd/2 Σ‖W‖²) / N
        g_r = ∂L_r/∂θ
    outside the compiled function: g = Σ_r g_r (all-reduce), apply_gradients

so g is the gradient of the mean cross-entropy over the global batch plus the
regularisers, whatever N is: two replicas give the update one device gives on
the same batch (tested). The split is forced: Keras cannot compile the whole
`strategy.run` under `MirroredStrategy` (`model.compile(jit_compile=True)`
fails there), so only the per-replica forward and backward pass is compiled
and the all-reduce and update run outside it. The forward pass of the ring
loss uses R initialised eagerly before the first step
(`RingLoss.initialize_radius`), so the compiled step holds no cross-replica
variable assignment.

Input: global batch s is a fixed, seeded set of examples and augmentation
draws, and replica r holds rows [r·B/N, (r+1)·B/N) of it. Each worker's
pipeline (`data.training_dataset` under `distribute_datasets_from_function`)
reads and decodes only its replicas' rows. So the examples of a step do not
depend on the number of replicas or workers, N replicas give exactly the
one-device result, and the input's state is the step: a resumed run builds
its pipeline from the restored step.

Gradients can be all-reduced in bfloat16 or float16 (`all_reduce_dtype`):
half the bytes on the wire, at the price of rounding each replica's gradient
and the sum to 8 (bfloat16) or 11 (float16) significant bits; float16 can
also overflow or flush tiny gradients to zero.
"""

from __future__ import annotations

import collections.abc
import pathlib
import shutil

import keras
import tensorflow as tf

from ring_loss_tf import layers
from ring_loss_tf.cluster import tf_config_workers
from ring_loss_tf.models import assembly as models_lib
from ring_loss_tf.config import ALL_REDUCE_DTYPES
from ring_loss_tf.config import OPTIMIZERS
from ring_loss_tf.config import check_replicas
from ring_loss_tf.errors import CheckpointWriteError
from ring_loss_tf.errors import ConfigError
from ring_loss_tf.errors import WorkersDisagreeError
from ring_loss_tf.errors import first_line
from ring_loss_tf.layers.ops import safe_norm
from ring_loss_tf.models.sharded_head import ShardedHead
from ring_loss_tf.training.checkpoints import remove_unfinished_checkpoints
from ring_loss_tf.training.checkpoints import scratch_directory
from ring_loss_tf.training.distribution import is_chief
from ring_loss_tf.training.distribution import jit_by_default
from ring_loss_tf.training.schedules import LearningRate

# SphereFace's solver: lr × 0.1 at 16k and 24k of 28k iterations.


def _all_reduce_in(optimizer, dtype):
    """Makes `optimizer` sum the replicas' gradients in `dtype`.

    Keras 3's TensorFlow optimizer all-reduces inside `apply_gradients`
    through `_all_reduce_sum_gradients`; wrapping it casts around that one
    collective. tests/training/test_trainer.py checks that the update then
    differs from the float32 one by bfloat16 rounding, so a Keras that stops
    calling the method fails a test instead of silently summing in float32.
    """
    if dtype not in ALL_REDUCE_DTYPES:
        raise ConfigError(
            "all_reduce_dtype", dtype, "unknown type",
            f"use one of {', '.join(ALL_REDUCE_DTYPES)}",
        )
    reduce_sum = optimizer._all_reduce_sum_gradients

    def reduce_in_dtype(grads_and_vars):
        pairs = [
            (None if g is None else tf.cast(g, dtype), v)
            for g, v in grads_and_vars
        ]
        return [
            (None if g is None else tf.cast(g, v.dtype), v)
            for g, v in reduce_sum(pairs)
        ]

    optimizer._all_reduce_sum_gradients = reduce_in_dtype


# What `_forward_backward_fn` reports for each step, in this order.
STAT_NAMES = (
    "loss", "cross_entropy", "ring_loss", "weight_decay", "feature_norm"
)


class StepStats(collections.abc.Mapping):
    """A step's statistics ({name: float}), kept on the device until read.

    The first value read copies them all to the host, which then waits for
    that step; until then training runs ahead (on a GPU, the next steps and
    the input pipeline overlap this one).
    """

    def __init__(self, tensors):
        self.tensors = tensors
        self._values = None

    def _read(self):
        if self._values is None:
            self._values = {
                k: float(v) for k, v in zip(
                    self.tensors,
                    tf.stack(list(self.tensors.values())).numpy(),
                )
            }
        return self._values

    def __getitem__(self, name):
        return self._read()[name]

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self):
        return len(self.tensors)

    def __repr__(self):
        return f"StepStats({self._read()!r})"


class Trainer:
    """Runs the custom distributed training loop on one `Models`.

    Args:
        strategy: a `tf.distribute` strategy (see `distribution.build_strategy`).
        model_fn: called without arguments under the strategy scope; returns
            a `Models`.
        global_batch_size: B, divisible by the number of replicas.
        learning_rate: float or `LearningRateSchedule`.
        optimizer: "sgd" (momentum) or "adam".
        momentum: SGD momentum.
        weight_decay: wd of the term wd/2 · Σ‖W‖² over `decayed_variables`.
        jit: compile the replica forward/backward with XLA (None:
            `distribution.jit_by_default`, on for GPUs, off on a CPU).
        model_dir: checkpoints and summaries (None: neither).
        max_to_keep: checkpoints kept.
        mixed_precision: None, "mixed_float16" (dynamic loss scaling) or
            "mixed_bfloat16". The policy must be set before `model_fn` runs;
            `training.train` does it.
        all_reduce_dtype: "float32" (exact), "bfloat16" or "float16": the
            type the gradients are summed across replicas in.
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
        jit=None,
        model_dir=None,
        max_to_keep=3,
        mixed_precision=None,
        all_reduce_dtype="float32",
    ):
        self.strategy = strategy
        self.num_replicas = strategy.num_replicas_in_sync
        check_replicas(global_batch_size, self.num_replicas)
        self.global_batch_size = global_batch_size
        self.per_replica_batch_size = global_batch_size // self.num_replicas
        self.weight_decay = float(weight_decay)
        self.jit = jit_by_default(strategy) if jit is None else bool(jit)
        self.model_dir = None if model_dir is None else pathlib.Path(model_dir)
        self.is_chief = is_chief(strategy)
        self.num_workers = max(1, len(tf_config_workers()))
        with strategy.scope():
            self.models = model_fn()
            if optimizer == "sgd":
                opt = keras.optimizers.SGD(learning_rate, momentum=momentum)
            elif optimizer == "adam":
                opt = keras.optimizers.Adam(learning_rate)
            else:
                raise ConfigError(
                    "optimizer", optimizer, "unknown optimizer",
                    f"use one of {', '.join(OPTIMIZERS)}",
                )
            self.mixed_precision = mixed_precision
            self.loss_scaling = mixed_precision == "mixed_float16"
            self.all_reduce_dtype = all_reduce_dtype
            if all_reduce_dtype != "float32":
                _all_reduce_in(opt, all_reduce_dtype)
            if self.loss_scaling:
                opt = keras.optimizers.LossScaleOptimizer(opt)
            self.optimizer = opt
            self.trainable = self.models.train_model.trainable_variables
            self.optimizer.build(self.trainable)
            self.step = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="global_step"
            )
        self.decayed = models_lib.decayed_variables(self.models.train_model)
        self.sharded = isinstance(self.models.head, ShardedHead)
        if self.sharded:
            self._build_shards(optimizer, momentum)
        self._forward_backward = tf.function(
            self._forward_backward_fn, jit_compile=self.jit
        )
        self._forward = tf.function(self._forward_fn, jit_compile=self.jit)
        self._train_step = tf.function(self._train_step_fn)
        self._train_loop = tf.function(self._train_loop_fn)
        self._split = tf.function(self._split_fn)
        # The first step whose statistics were not finite (0: none yet) and
        # those statistics, recorded inside the compiled step so the host
        # needs to read them only when it logs or saves.
        self._nonfinite_step = tf.Variable(
            0, dtype=tf.int64, trainable=False, name="nonfinite_step"
        )
        self._nonfinite_stats = tf.Variable(
            tf.zeros([len(STAT_NAMES)], tf.float32), trainable=False,
            name="nonfinite_stats",
        )
        self.checkpoint = None
        self.manager = None
        self._worker_dir = None

    def _task_index(self):
        resolver = self.strategy.cluster_resolver
        return f"{resolver.task_type}-{resolver.task_id}"

    def _build_shards(self, optimizer, momentum):
        """The sharded head's shards, one per local replica."""
        if optimizer != "sgd":
            raise ConfigError(
                "optimizer", optimizer,
                "a sharded head updates its shards with SGD only",
                "use --optimizer=sgd, or omit --head_sharding",
            )
        if self.loss_scaling:
            raise ConfigError(
                "mixed_precision", True,
                "float16 loss scaling is not supported with a sharded head",
                "train in float32 or bfloat16, or omit --head_sharding",
            )
        self.momentum = float(momentum)
        # The global replica ids of this process's devices, in order.
        ids = self.strategy.experimental_local_results(
            self.strategy.experimental_distribute_values_from_function(
                lambda context: context.replica_id_in_sync_group
            )
        )
        self.models.head.build(
            self.strategy.extended.worker_devices, first_shard=int(ids[0]),
            total_shards=self.num_replicas,
        )

    # -- checkpoints -------------------------------------------------------

    def attach_checkpoint(self, iterator=None, max_to_keep=3,
                          scratch_dir=None):
        """Creates the checkpoint of model, optimizer, step and `iterator`.

        On a multi-worker run only the chief writes to `model_dir`; the
        others write to a temporary directory (in `scratch_dir`, default the
        system's temporary directory) that is deleted: every worker must
        take part in saving. After restoring, the workers check that they
        all restored the same step.

        Raises:
            WorkersDisagreeError: the workers restored different steps.
            ValueError: the latest checkpoint is damaged or does not fit
                the model (`models.restore_checkpoint`).
        """
        items = {
            "model": self.models.train_model,
            "optimizer": self.optimizer,
            "step": self.step,
        }
        if self.sharded:
            items["head"] = self.models.head
        if iterator is not None:
            items["iterator"] = iterator
        self.checkpoint = tf.train.Checkpoint(**items)
        if self.model_dir is None:
            return None
        directory = self.model_dir
        if not self.is_chief and self.sharded:
            # Its checkpoints hold shards no other worker has: kept.
            directory = self.model_dir / self._task_index()
        elif not self.is_chief:
            self._worker_dir = scratch_directory(scratch_dir)
            directory = self._worker_dir
        if self.is_chief:
            remove_unfinished_checkpoints(directory)
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, str(directory), max_to_keep=max_to_keep
        )
        latest = tf.train.latest_checkpoint(str(self.model_dir))
        if self.sharded and self.num_workers > 1 and not self.is_chief:
            # Each worker restores its own shards, saved beside the chief's.
            latest = tf.train.latest_checkpoint(str(directory))
        if latest and self.sharded and (
            not self.models.head.layout_matches(latest)
        ):
            others = {k: v for k, v in items.items() if k != "head"}
            models_lib.restore_checkpoint(
                tf.train.Checkpoint(**others), latest, self.model_dir,
                partial=True,
            )
            self.models.head.restore_resharded(latest)
        elif latest:
            models_lib.restore_checkpoint(
                self.checkpoint, latest, self.model_dir
            )
        self._check_workers_agree_on_the_step(latest)
        return latest

    def _check_workers_agree_on_the_step(self, latest):
        """Every worker must continue from the same step: one that restored
        another checkpoint (its own copy of model_dir, a stale mount) would
        train the others' replicas of a different model."""
        if self.num_workers <= 1:
            return
        step = int(self.step.numpy())
        total = self.strategy.reduce(
            "SUM",
            self.strategy.experimental_distribute_values_from_function(
                lambda _: tf.constant(step, tf.int64)
            ),
            axis=None,
        )
        mean = int(total.numpy()) / self.num_replicas
        if self.any_worker(mean != step):
            raise WorkersDisagreeError(
                f"The workers restored different steps (this one: step "
                f"{step} from {latest or 'no checkpoint'} in "
                f"{self.model_dir}; the mean over the replicas: {mean:g}). "
                "Every worker must read the chief's model_dir: mount the "
                "same directory on each (or copy the chief's latest "
                "checkpoint to all) and start all workers again."
            )

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
            reason = first_line(error)
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

    def _regularisers(self):
        """The replica's (Σ model.losses, ring loss, wd/2·Σ‖W‖²), float32."""
        models = self.models
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
        return regularisation, ring, decay

    def _stats(self, loss, cross_entropy, ring, decay, embeddings):
        norms = tf.norm(tf.cast(embeddings, tf.float32), axis=-1)
        stats = {
            "loss": loss,
            "cross_entropy": cross_entropy,
            "ring_loss": ring / self.num_replicas,
            "weight_decay": decay,
            "feature_norm": tf.reduce_sum(norms) / self.global_batch_size,
        }
        return stats, norms

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
            regularisation, ring, decay = self._regularisers()
            # The all-reduce sums replicas: per-replica terms are divided by
            # the replica count, per-example terms by the global batch.
            loss = cross_entropy + (regularisation + decay) / self.num_replicas
            scaled = (
                self.optimizer.scale_loss(loss) if self.loss_scaling else loss
            )
        gradients = tape.gradient(scaled, self.trainable)
        stats, norms = self._stats(
            loss, cross_entropy, ring, decay / self.num_replicas, embeddings
        )
        return gradients, stats, norms

    def _forward_fn(self, images, labels):
        """A sharded head's replica: the model up to the head's features,
        and the replica's share of the regularisers (compiled when jit)."""
        features, embeddings = self.models.train_model(
            [images, labels], training=True
        )
        regularisation, ring, decay = self._regularisers()
        own = (regularisation + decay) / self.num_replicas
        return features, embeddings, own, ring, decay

    def _replica_step(self, images, labels):
        if self.sharded:
            return self._sharded_replica_step(images, labels)
        gradients, stats, norms = self._forward_backward(images, labels)
        # Outside the compiled function: the optimizer all-reduces (sums)
        # the gradients across replicas, then updates the mirrored weights.
        self.optimizer.apply_gradients(zip(gradients, self.trainable))
        return stats, norms

    def _sharded_replica_step(self, images, labels):
        """The step with a sharded head (see `sharded_head`): the backbone
        is compiled, the head's collectives are not; the backbone's
        gradients are all-reduced, the shard's never."""
        head = self.models.head
        context = tf.distribute.get_replica_context()
        shard = tf.get_static_value(context.replica_id_in_sync_group)
        with tf.GradientTape() as tape:
            features, embeddings, own, ring, decay = self._forward(
                images, labels
            )
        cross_entropy, feature_gradient, kernel_gradient, kept = (
            head.replica_gradients(features, labels, int(shard), self.step)
        )
        gradients = tape.gradient(
            [features, own], self.trainable,
            output_gradients=[feature_gradient, tf.ones_like(own)],
        )
        # Read before apply_gradients advances the optimizer's step.
        learning_rate = tf.cast(self.optimizer.learning_rate, tf.float32)
        shard_decay = head.apply_sgd(
            int(shard), kernel_gradient, kept, learning_rate, self.momentum,
            self.weight_decay,
        )
        self.optimizer.apply_gradients(zip(gradients, self.trainable))
        share = cross_entropy / self.num_replicas
        decay = decay / self.num_replicas + shard_decay
        loss = share + own + shard_decay
        return self._stats(loss, share, ring, decay, embeddings)

    def _train_step_fn(self, images, labels):
        stats, norms = self.strategy.run(
            self._replica_step, args=(images, labels)
        )
        reduced = {
            k: self.strategy.reduce(
                tf.distribute.ReduceOp.SUM, v, axis=None
            )
            for k, v in stats.items()
        }
        local_norms = tf.concat(
            self.strategy.experimental_local_results(norms), axis=0
        )
        self.step.assign_add(1)
        values = tf.stack([reduced[k] for k in STAT_NAMES])
        first = tf.logical_and(
            tf.logical_not(tf.reduce_all(tf.math.is_finite(values))),
            tf.equal(self._nonfinite_step, 0),
        )
        self._nonfinite_step.assign(
            tf.where(first, self.step.read_value(), self._nonfinite_step)
        )
        self._nonfinite_stats.assign(
            tf.where(first, values, self._nonfinite_stats)
        )
        return reduced, local_norms

    def _train_loop_fn(self, iterator, num_steps):
        # The first step outside the loop gives the loop variables their
        # structure; num_steps is a tensor, so one trace serves every length.
        stats, norms = self._train_step_fn(*self._next_batch(iterator))
        for _ in tf.range(num_steps - 1):
            stats, norms = self._train_step_fn(*self._next_batch(iterator))
        return stats, norms

    def _next_batch(self, iterator):
        images, labels = next(iterator)
        if self.num_replicas > 1 and not isinstance(
            images, tf.distribute.DistributedValues
        ):
            return self._split_fn(images, labels)
        return images, labels

    def _split_fn(self, images, labels):
        per_replica = self.per_replica_batch_size

        def rows(context):
            start = context.replica_id_in_sync_group * per_replica
            return (
                images[start : start + per_replica],
                labels[start : start + per_replica],
            )

        return self.strategy.experimental_distribute_values_from_function(
            rows
        )

    def per_replica(self, images, labels):
        """A global batch as per-replica values (replica r: rows
        [r·b, (r+1)·b)); values from a distributed dataset pass through."""
        if isinstance(images, tf.distribute.DistributedValues):
            return images, labels
        if self.num_replicas == 1:
            return images, labels
        return self._split(images, labels)

    def distribute_dataset(self, dataset_fn):
        """`dataset_fn(input_context)` as the strategy's per-worker
        pipelines (prefetched to the devices); see `data.training_dataset`
        for what a pipeline must yield.

        One replica on one worker reads the pipeline directly: the
        strategy's distributed iterator would only copy to the device it
        is already on, and its background work slowed an XLA step on a
        CPU by a fifth (bench/input.py --distributed).
        """
        if self.num_replicas == 1 and self.num_workers == 1:
            return dataset_fn(None)
        return self.strategy.distribute_datasets_from_function(dataset_fn)

    def initialize_radius(self, images):
        """R from the first global batch: the mean norm the first training
        step sees (BatchNorm normalising by the batch), each replica
        embedding its own rows and the sums all-reduced. The BatchNorm
        statistics this forward pass updates are put back, so the run is
        otherwise unchanged. No-op when R is restored."""
        ring = self.models.ring
        if ring is None:
            return None
        if ring.built and ring.is_radius_initialized():
            return ring.initialize_radius(mean_norm=ring.radius)
        images, _ = self.per_replica(images, images)
        embedding_model = self.models.embedding_model
        # In inference mode a new network's BatchNorms use their initial
        # statistics, which do not normalise: an iResNet's features are
        # then ~1e8 long where the first step sees ~23.
        saved = [
            (v, keras.ops.convert_to_numpy(v))
            for v in embedding_model.non_trainable_variables
        ]

        def norm_sum(x):
            embeddings = embedding_model(x, training=True)
            return tf.reduce_sum(
                safe_norm(tf.cast(embeddings, tf.float32))
            )

        @tf.function
        def replicas_norm_sum(images):
            return self.strategy.reduce(
                "SUM", self.strategy.run(norm_sum, args=(images,)),
                axis=None,
            )

        total = replicas_norm_sum(images)
        for variable, value in saved:
            variable.assign(value)
        return ring.initialize_radius(
            mean_norm=total / self.global_batch_size
        )

    def train_step(self, images, labels):
        """One step on a global batch (tensors, or per-replica values from
        `distribute_dataset`); returns (`StepStats`, local norms).

        Nothing here waits for the device: the statistics and the step
        counter stay on it until read (`StepStats`, `first_nonfinite`).
        """
        images, labels = self.per_replica(images, labels)
        stats, norms = self._train_step(images, labels)
        return StepStats(stats), norms

    def train_loop(self, iterator, num_steps):
        """`num_steps` steps in one compiled call, each on `next(iterator)`.

        `iterator` is a `tf.data` iterator or one of `distribute_dataset`
        (the batches are read inside the call); the step is the one of
        `train_step`, so K calls of it and one loop of K steps end with the
        same weights. Returns the last step's (`StepStats`, local norms).
        """
        stats, norms = self._train_loop(
            iterator, tf.constant(num_steps, tf.int32)
        )
        return StepStats(stats), norms

    def first_nonfinite(self):
        """(step, {name: float}) of the first step whose statistics were
        not finite, or None; reads one integer from the device."""
        step = int(self._nonfinite_step.numpy())
        if step == 0:
            return None
        values = self._nonfinite_stats.numpy()
        return step, {k: float(v) for k, v in zip(STAT_NAMES, values)}

    # -- state for logs ----------------------------------------------------

    def radius(self):
        ring = self.models.ring
        return None if ring is None else float(ring.radius.numpy())

    def head_lambda(self):
        """A-Softmax's λ of the last step (None: another head or warm-up)."""
        head = self.models.head
        if isinstance(getattr(head, "margin_head", head), layers.ASoftmax):
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


