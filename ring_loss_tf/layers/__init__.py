"""The layers: what every Keras backend runs (`keras.ops` only).

- `ring`: Ring loss (`ring_loss`, `RingLoss`), the paper's method.
- `feature_losses`: the paper's baselines, l2-constrained softmax and
  center loss.
- `heads`: the cosine classifier and its margins (A-Softmax, CosFace,
  ArcFace).
- `blocks`: the backbone blocks the distributed step needs (`BatchNorm`,
  `GroupedConv2D`).
- `ops`: the small shared pieces (argument checks, `safe_norm`, float32).

Each layer has a stateless function twin (`ring_loss` / `RingLoss`, ...): the
layer owns the weights and the training-time state, the function holds the
maths. Everything is computed in float32, also under a mixed-precision policy.
Importing this package registers the layers with Keras, so a `.keras` file
holding them loads. Users import them from the top level
(`ring_loss_tf.RingLoss`, ...); `ring_loss_tf.layers.RingLoss` works too.
"""

from ring_loss_tf.layers.blocks import BatchNorm
from ring_loss_tf.layers.blocks import GroupedConv2D
from ring_loss_tf.layers.blocks import grouped_conv2d
from ring_loss_tf.layers.feature_losses import CenterLoss
from ring_loss_tf.layers.feature_losses import L2Constrained
from ring_loss_tf.layers.feature_losses import center_loss
from ring_loss_tf.layers.feature_losses import center_update
from ring_loss_tf.layers.feature_losses import l2_constrained
from ring_loss_tf.layers.heads import MARGINS
from ring_loss_tf.layers.heads import ArcFace
from ring_loss_tf.layers.heads import ASoftmax
from ring_loss_tf.layers.heads import CosFace
from ring_loss_tf.layers.heads import CosineClassifier
from ring_loss_tf.layers.heads import a_softmax_lambda
from ring_loss_tf.layers.heads import a_softmax_logits
from ring_loss_tf.layers.heads import a_softmax_margin
from ring_loss_tf.layers.heads import a_softmax_psi
from ring_loss_tf.layers.heads import arcface_logits
from ring_loss_tf.layers.heads import arcface_margin
from ring_loss_tf.layers.heads import class_cosines
from ring_loss_tf.layers.heads import cosface_logits
from ring_loss_tf.layers.heads import cosface_margin
from ring_loss_tf.layers.heads import no_margin
from ring_loss_tf.layers.ops import safe_norm
from ring_loss_tf.layers.ring import RingLoss
from ring_loss_tf.layers.ring import ring_loss

__all__ = [
    "ASoftmax",
    "ArcFace",
    "BatchNorm",
    "CenterLoss",
    "CosFace",
    "CosineClassifier",
    "GroupedConv2D",
    "L2Constrained",
    "MARGINS",
    "RingLoss",
    "a_softmax_lambda",
    "a_softmax_logits",
    "a_softmax_margin",
    "a_softmax_psi",
    "arcface_logits",
    "arcface_margin",
    "center_loss",
    "center_update",
    "class_cosines",
    "cosface_logits",
    "cosface_margin",
    "grouped_conv2d",
    "l2_constrained",
    "no_margin",
    "ring_loss",
    "safe_norm",
]
