"""A margin head sharded over the replicas (Partial FC).

With C identities the replicated head keeps on every replica the kernel
(D × C), its momentum, its gradient and its normalised copy, and sums the
kernel's gradient across replicas every step. Here replica k keeps only
the columns [start_k, stop_k) of the kernel and their momentum, as
insightface's Partial FC (arcface_torch) does. One step, replica k, global
batch of B rows on N replicas:

    X, Y     = all-gather of the replicas' features and labels    (B × D, B)
    S_k      = kept columns: every label of Y in the shard, plus the other
               columns whose u_j < r, u = uniform(seed, step) over all C
    z_k      = margin(cos(X, W[:, S_k]), ‖X‖, Y in S_k)         (B × |S_k|)
    LSE_i    = log Σ_k Σ_j exp z_k,ij     (a max and a sum across replicas)
    CE       = Σ_i (LSE_i − z_i,y_i) / B                 (the same on all k)
    ∂CE/∂z_k = (exp(z_k − LSE) − onehot) / B
    ∂CE/∂X   = Σ_k ∂z_k/∂X · ∂CE/∂z_k  (an all-reduce of B × D); replica k
               back-propagates its own rows through the backbone
    W_k     ← SGD with momentum on ∂CE/∂W_k + wd · W_k, on replica k alone,
               kept columns only

The margin functions and their schedules are the replicated heads'
(`heads.CosineClassifier.training_logits`), which act column by column, so
with r = 1 the loss, every gradient and the update equal the replicated
head's (tests/models/test_sharded_head.py, on 2 and 4 devices). Only features,
labels, two numbers per row and the features' gradient cross replicas: the
head's gradient is never all-reduced. The sampled columns are a function of
(seed, step, class), so they do not depend on the number of replicas; a
column left out of a step gets no gradient, and neither its momentum nor
weight decay moves it: the paper's sparse update (README, "Sharded head",
for why not arcface_torch's V2 behaviour). Unlike arcface_torch,
which keeps exactly ⌊r·C_k⌋ columns per shard, the count here varies from
step to step around r·C (a Bernoulli draw per class is what keeps the set
independent of the sharding).

Each process holds the shards of its own replicas; its checkpoint holds
them as `head/kernels/k` and `head/momenta/k` (k counted in the file) with
`head/layout` saying which they are. On several workers each worker saves
its shards (`Trainer.attach_checkpoint`); a run of one process resumed
with another number of replicas re-shards them
(`ShardedHead.restore_resharded`).
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from ring_loss_tf.layers.heads import class_cosines
from ring_loss_tf.layers.heads import target_mask

# The initial kernel is drawn in blocks of this many columns, block b from
# the seed (seed, b): the same classes get the same centres whatever the
# number of shards, and no replica draws more than its own columns.
INIT_BLOCK = 8192


def shard_bounds(num_classes, num_shards):
    """[(start, stop)] of each shard's columns: as even as integers allow."""
    return [
        (k * num_classes // num_shards, (k + 1) * num_classes // num_shards)
        for k in range(num_shards)
    ]


def initial_columns(embedding_dim, num_classes, start, stop, seed):
    """Columns [start, stop) of a Glorot-uniform D × C kernel, as float32
    NumPy. Block b of INIT_BLOCK columns comes from the stateless seed
    (seed, b), so a column's value depends only on (seed, its class)."""
    limit = math.sqrt(6.0 / (embedding_dim + num_classes))
    parts = []
    for block in range(start // INIT_BLOCK, (stop - 1) // INIT_BLOCK + 1):
        values = tf.random.stateless_uniform(
            (embedding_dim, INIT_BLOCK), seed=(seed, block),
            minval=-limit, maxval=limit,
        ).numpy()
        first = block * INIT_BLOCK
        parts.append(
            values[:, max(start, first) - first : min(stop, first + INIT_BLOCK)
                   - first]
        )
    return np.concatenate(parts, axis=1)


def kept_columns(labels, start, stop, num_classes, sample_rate, seed, step):
    """The shard's columns a step uses (local indices, ascending): every
    class in `labels` that the shard holds, and each other class j whose
    u_j < sample_rate, u = uniform over all `num_classes` from (seed,
    step). All of them when `sample_rate` is 1."""
    if sample_rate >= 1:
        return tf.range(stop - start, dtype=tf.int32)
    u = tf.random.stateless_uniform(
        (num_classes,), seed=tf.stack([tf.cast(seed, tf.int64),
                                       tf.cast(step, tf.int64)]),
    )[start:stop]
    local = tf.cast(labels, tf.int32) - start
    inside = tf.boolean_mask(local, (local >= 0) & (local < stop - start))
    positive = tf.scatter_nd(
        inside[:, None], tf.ones_like(inside, tf.bool), (stop - start,)
    )
    keep = positive | (u < sample_rate)
    return tf.cast(tf.where(keep)[:, 0], tf.int32)


def saved_layout(checkpoint):
    """(first shard, shards in all, shards in the file) of a checkpoint's
    sharded head; None when it holds none."""
    reader = tf.train.load_checkpoint(checkpoint)
    key = "head/layout/.ATTRIBUTES/VARIABLE_VALUE"
    if not reader.has_tensor(key):
        return None
    return tuple(int(v) for v in reader.get_tensor(key))


def _saved(reader, name, count):
    return np.concatenate(
        [reader.get_tensor(f"head/{name}/{k}/.ATTRIBUTES/VARIABLE_VALUE")
         for k in range(count)],
        axis=1,
    )


def _all_gather(context, value, device):
    """`context.all_gather` along axis 0, with the value placed on the
    replica's `device`: a worker with one replica hands out tensors without
    a device, which MultiWorkerMirroredStrategy's gather refuses
    ("destinations can not be empty")."""
    with tf.device(device):
        value = tf.identity(value)
    return context.all_gather(value, axis=0)


def _positions(columns, labels, start):
    """Each label's position among the kept `columns`, −1 for a class of
    another shard (the margin functions give such a row no margin)."""
    local = tf.cast(labels, tf.int32) - start
    # A sentinel past every column keeps the search in range when no
    # column is kept.
    extended = tf.concat([columns, [tf.int32.max]], axis=0)
    position = tf.searchsorted(extended, local)
    found = tf.gather(extended, position)
    return tf.where(tf.equal(found, local), position, -1)


class ShardedHead(tf.Module):
    """The class centres of a margin head, split over the replicas.

    Args:
        margin_head: a `heads.CosineClassifier` (`ASoftmax`, `CosFace`,
            `ArcFace`, not built) giving the margin, its arguments, the
            warm-up and A-Softmax's λ schedule.
        embedding_dim: D.
        sample_rate: r, the fraction of negative classes a step keeps.
        seed: seed of the initial centres and of the sampling.

    The step counter `iterations` (margin warm-up, λ) is created here, under
    the strategy's scope; the shards by `build(devices)`, outside it.
    """

    def __init__(self, margin_head, embedding_dim, sample_rate=1.0,
                 seed=None):
        super().__init__(name="sharded_head")
        self.margin_head = margin_head
        self.num_classes = margin_head.num_classes
        self.embedding_dim = int(embedding_dim)
        self.sample_rate = float(sample_rate)
        self.seed = 0 if seed is None else int(seed)
        self.margin_warmup_steps = margin_head.margin_warmup_steps
        self.iterations = tf.Variable(
            0, dtype=tf.int64, trainable=False, name="iterations",
            synchronization=tf.VariableSynchronization.ON_READ,
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )
        # The margin head's λ and warm-up read this count.
        margin_head.iterations = self.iterations
        self.kernels = []
        self.momenta = []
        self.bounds = []
        self.first_shard = 0

    def build(self, devices, first_shard=0, total_shards=None):
        """Creates one shard of kernel and momentum on each of `devices`
        (call outside a strategy's scope: they are plain variables).

        Args:
            devices: this process's replica devices, in replica order.
            first_shard: the global replica id of `devices[0]` (a worker
                of a multi-worker run holds shards first_shard, …).
            total_shards: replicas in all (default: `len(devices)`).
        """
        total = len(devices) if total_shards is None else total_shards
        if self.num_classes < total:
            raise ValueError(
                f"Cannot shard {self.num_classes} classes over "
                f"{total} replicas: each needs at least one class. "
                "Train with fewer replicas or without head sharding."
            )
        self.first_shard = first_shard
        self.devices = list(devices)
        self.bounds = shard_bounds(self.num_classes, total)
        kernels, momenta = [], []
        local_bounds = self.bounds[first_shard:first_shard + len(devices)]
        for k, (device, (start, stop)) in enumerate(
            zip(devices, local_bounds), start=first_shard
        ):
            with tf.device(device):
                kernels.append(tf.Variable(
                    initial_columns(self.embedding_dim, self.num_classes,
                                    start, stop, self.seed + 1),
                    name=f"kernel_{k}",
                ))
                momenta.append(tf.Variable(
                    tf.zeros((self.embedding_dim, stop - start)),
                    trainable=False, name=f"momentum_{k}",
                ))
        self.kernels = kernels
        self.momenta = momenta
        # Saved with the shards: which of them a checkpoint file holds.
        self.layout = tf.Variable(
            [first_shard, total, len(devices)], dtype=tf.int64,
            trainable=False, name="layout",
        )

    @property
    def num_shards(self):
        """Shards in all (this process holds `len(self.kernels)`)."""
        return len(self.bounds)

    def _local_bounds(self):
        return self.bounds[self.first_shard:
                           self.first_shard + len(self.kernels)]

    def kernel(self):
        """This process's columns of the kernel (NumPy; all D × C on one
        machine): its shards side by side."""
        return np.concatenate([k.numpy() for k in self.kernels], axis=1)

    def assign_kernel(self, kernel):
        """Sets this process's shards from a whole D × C kernel."""
        for variable, (start, stop) in zip(self.kernels,
                                           self._local_bounds()):
            variable.assign(kernel[:, start:stop])

    def restore_resharded(self, checkpoint):
        """Restores the head from `checkpoint` saved with another number of
        shards: the saved shards side by side, cut as this run's are."""
        reader = tf.train.load_checkpoint(checkpoint)
        first, total, count = saved_layout(checkpoint)
        if count != total:
            raise ValueError(
                f"{checkpoint} holds shards {first}..{first + count - 1} of "
                f"a head sharded over {total} replicas on several workers "
                "(each worker saves its own): resume with the same workers "
                "and devices per worker."
            )
        kernel = _saved(reader, "kernels", count)
        if kernel.shape != (self.embedding_dim, self.num_classes):
            raise ValueError(
                f"{checkpoint} holds a head of shape {kernel.shape}, this "
                f"run's is {(self.embedding_dim, self.num_classes)}: resume "
                "with the data and embedding size it was trained with."
            )
        velocity = _saved(reader, "momenta", count)
        for variable, value in ((self.kernels, kernel),
                                (self.momenta, velocity)):
            for shard, (start, stop) in zip(variable, self._local_bounds()):
                shard.assign(value[:, start:stop])
        self.iterations.assign(
            reader.get_tensor("head/iterations/.ATTRIBUTES/VARIABLE_VALUE")
        )

    def layout_matches(self, checkpoint):
        """Whether `checkpoint` holds exactly this process's shards."""
        return saved_layout(checkpoint) == (
            self.first_shard, self.num_shards, len(self.kernels))

    def margin_step(self):
        return self.margin_head.margin_step()

    def current_lambda(self):
        current = getattr(self.margin_head, "current_lambda", None)
        return None if current is None else current()

    # -- one replica's step ------------------------------------------------

    def replica_gradients(self, features, labels, shard, step):
        """Cross-entropy and gradients on replica `shard` (inside
        `strategy.run`, not compiled: it calls collectives).

        Returns:
            (cross_entropy over the global batch (the same on every
            replica), ∂CE/∂features of this replica's rows, ∂CE/∂W_shard,
            the kept columns as a 0/1 float32 mask over the shard's, or
            None when every column is kept).
        """
        context = tf.distribute.get_replica_context()
        rows = tf.shape(features)[0]
        device = self.devices[shard - self.first_shard]
        x = _all_gather(context, tf.cast(tf.stop_gradient(features),
                                         tf.float32), device)
        y = _all_gather(context, tf.cast(labels, tf.int32), device)
        batch = tf.cast(tf.shape(x)[0], tf.float32)
        start, stop = self.bounds[shard]
        kernel = self.kernels[shard - self.first_shard]
        columns = kept_columns(y, start, stop, self.num_classes,
                               self.sample_rate, self.seed, step)
        local_labels = _positions(columns, y, start)
        t = None
        if self.margin_head.counts_steps:
            self.iterations.assign_add(1)
            t = self.iterations - self.margin_warmup_steps
        with tf.GradientTape() as tape:
            tape.watch(x)
            weights = (kernel if self.sample_rate >= 1
                       else tf.gather(kernel, columns, axis=1))
            cos, norms = class_cosines(x, weights)
            z = self.margin_head.training_logits(cos, norms, local_labels, t)
        # Sum over shards of exp(z − m), m the row's largest logit anywhere.
        row_max = tf.reduce_max(
            _all_gather(context,
                        tf.stop_gradient(tf.reduce_max(z, axis=1))[None],
                        device),
            axis=0,
        )
        shifted = tf.exp(z - row_max[:, None])
        total = context.all_reduce("SUM", tf.reduce_sum(shifted, axis=1))
        lse = row_max + tf.math.log(total)
        target = target_mask(local_labels, tf.shape(z)[1])
        target_logit = context.all_reduce(
            "SUM", tf.reduce_sum(target * z, axis=1)
        )
        cross_entropy = tf.reduce_sum(lse - target_logit) / batch
        dz = (shifted / total[:, None] - target) / batch
        dx, dkernel = tape.gradient(z, [x, kernel], output_gradients=dz)
        dx = context.all_reduce("SUM", dx)
        replica = context.replica_id_in_sync_group
        own = dx[replica * rows : (replica + 1) * rows]
        kept = None
        if self.sample_rate < 1:
            kept = tf.scatter_nd(columns[:, None],
                                 tf.ones_like(columns, tf.float32),
                                 (stop - start,))
        return (
            cross_entropy,
            tf.cast(own, features.dtype),
            tf.convert_to_tensor(dkernel),
            kept,
        )

    def apply_sgd(self, shard, gradient, kept, learning_rate, momentum,
                  weight_decay):
        """Keras' SGD update of the kept columns of shard `shard`, with
        weight decay wd·W in the gradient (as the trainer's wd/2·‖W‖² term
        gives the replicated kernel): m ← −g·lr + m·μ, W ← W + m. Columns a
        sampled step left out keep their centre and momentum, as the
        Partial FC paper updates only the sampled centres (arcface_torch's
        PartialFC_V2 under torch's SGD moves them by their stale momentum
        and decay instead).
        Returns ½·wd·‖W‖² of the kept columns before the update (the
        shard's share of the weight-decay term)."""
        local = shard - self.first_shard
        kernel, velocity = self.kernels[local], self.momenta[local]
        # Every column is kept at r = 1: no mask to apply.
        mask = 1.0 if kept is None else kept[None, :]
        decay = 0.5 * weight_decay * tf.reduce_sum(tf.square(kernel) * mask)
        gradient = gradient + weight_decay * kernel
        if momentum:
            step = -gradient * learning_rate + velocity * momentum
            if kept is not None:
                step = mask * step + (1 - mask) * velocity
            velocity.assign(step)
            kernel.assign_add(velocity if kept is None else mask * velocity)
        else:
            kernel.assign_sub(mask * gradient * learning_rate)
        return decay
