"""The paper's baseline feature losses: l2-constrained softmax
(`l2_constrained` / `L2Constrained`) and center loss (`center_loss` /
`CenterLoss`). Each layer has its stateless function twin.
"""

import keras
from keras import ops

from ring_loss_tf.layers.ops import PACKAGE
from ring_loss_tf.layers.ops import check_num_classes
from ring_loss_tf.layers.ops import check_positive
from ring_loss_tf.layers.ops import check_rank2
from ring_loss_tf.layers.ops import embeddings_shape
from ring_loss_tf.layers.ops import float32
from ring_loss_tf.layers.ops import normalize
from ring_loss_tf.layers.ops import replica_local_weight
from ring_loss_tf.layers.ops import with_labels


# --------------------------------------------------------------------------
# The paper's baselines: l2-constrained softmax and center loss
# --------------------------------------------------------------------------


def l2_constrained(embeddings, alpha):
    """α · x / ‖x‖  (Ranjan et al. 2017); a zero vector stays zero."""
    return alpha * normalize(float32(embeddings))


@keras.saving.register_keras_serializable(package=PACKAGE)
class L2Constrained(keras.layers.Layer):
    """Scales every feature to norm α before the classifier (L2-softmax).

    Follow it with `keras.layers.Dense(num_classes)` for the paper's
    l2-constrained softmax row (α = 10, 20, 30).

    Args:
        alpha: the fixed norm α.

    Input shape: `(batch_size, embedding_dim)`. Output shape: the same,
    float32.
    Reference: https://arxiv.org/abs/1703.09507
    """

    def __init__(self, alpha=16.0, **kwargs):
        super().__init__(**kwargs)
        self.alpha = check_positive("alpha", alpha)

    def build(self, input_shape):
        check_rank2(self, input_shape)

    def call(self, embeddings):
        return l2_constrained(embeddings, self.alpha)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config["alpha"] = self.alpha
        return config


def center_loss(embeddings, centers, labels, loss_weight):
    """λ/(2m) · Σ_i ‖x_i − c_{y_i}‖²  (Wen et al. 2016, eq. 3 with the 1/m)."""
    x = float32(embeddings)
    own = ops.take(float32(centers), _labels(labels), axis=0)
    return loss_weight * 0.5 * ops.mean(ops.sum(ops.square(x - own), axis=-1))


def center_update(embeddings, centers, labels, alpha):
    """Wen et al.'s center update:
    c_j ← c_j − α·Σ_{y_i=j}(c_j − x_i)/(1 + n_j)."""
    x = float32(embeddings)
    centers = float32(centers)
    labels = _labels(labels)
    num_classes = ops.shape(centers)[0]
    mask = ops.one_hot(labels, num_classes, dtype="float32")  # (m, C)
    counts = ops.sum(mask, axis=0)  # n_j
    sums = ops.matmul(ops.transpose(mask), x)  # Σ_{y_i=j} x_i
    delta = (counts[:, None] * centers - sums) / (1.0 + counts[:, None])
    return centers - alpha * delta


def _labels(labels):
    return ops.cast(ops.reshape(labels, (-1,)), "int32")


@keras.saving.register_keras_serializable(package=PACKAGE)
class CenterLoss(keras.layers.Layer):
    """Center loss (Wen et al. 2016): pulls features to their class center.

    Adds  λ/(2m) · Σ_i ‖x_i − c_{y_i}‖²  with `add_loss` and returns the
    embeddings unchanged. The centers are the non-trainable weight
    `centers` (float32), updated during training after the loss is taken,
    by the paper's rule with rate α. Under several replicas each replica
    updates from its own batch and the results are averaged.

    Args:
        num_classes: number of identities.
        loss_weight: λ.
        alpha: the center learning rate α.

    Input: `[embeddings (batch_size, embedding_dim), labels (batch_size,)]`.
    Output: the embeddings.
    Reference: https://ydwen.github.io/papers/WenECCV16.pdf
    """

    def __init__(self, num_classes, loss_weight=0.003, alpha=0.5, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = check_num_classes(num_classes)
        self.loss_weight = check_positive(
            "loss_weight", loss_weight, allow_zero=True
        )
        self.alpha = check_positive("alpha", alpha, allow_zero=True)

    def build(self, input_shape):
        shape = embeddings_shape(self, input_shape)
        self.centers = replica_local_weight(
            self,
            "centers",
            (self.num_classes, shape[-1]),
            "zeros",
            "float32",
            "mean",
        )

    def call(self, inputs, training=None):
        embeddings, labels = with_labels(self, inputs)
        centers = ops.convert_to_tensor(self.centers)
        self.add_loss(
            center_loss(embeddings, centers, labels, self.loss_weight)
        )
        if training:
            frozen = ops.stop_gradient(float32(embeddings))
            self.centers.assign(
                center_update(frozen, centers, labels, self.alpha)
            )
        return embeddings

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_classes": self.num_classes,
                "loss_weight": self.loss_weight,
                "alpha": self.alpha,
            }
        )
        return config
