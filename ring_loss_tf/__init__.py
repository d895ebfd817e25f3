"""Ring loss (Zheng, Pal, Savvides, CVPR 2018) for TensorFlow 2 / Keras 3.

The layers and heads are importable from the top level; data, training, metrics and
export live in their own modules (`ring_loss_tf.data`, ...), imported where
they are used so that the layers work on every Keras backend.
"""

from ring_loss_tf import quiet as _quiet

# Only in train.py, evaluate.py and `python -m ring_loss_tf.export`: their
# output is the project's lines (ring_loss_tf/quiet.py); elsewhere importing
# the package leaves TensorFlow's logging as it is.
if _quiet.is_entry_point():
    _quiet.import_tensorflow()

from ring_loss_tf.heads import ArcFace
from ring_loss_tf.heads import ASoftmax
from ring_loss_tf.heads import CosFace
from ring_loss_tf.heads import CosineClassifier
from ring_loss_tf.heads import MARGINS
from ring_loss_tf.heads import a_softmax_logits
from ring_loss_tf.heads import a_softmax_margin
from ring_loss_tf.heads import arcface_logits
from ring_loss_tf.heads import arcface_margin
from ring_loss_tf.heads import class_cosines
from ring_loss_tf.heads import cosface_logits
from ring_loss_tf.heads import cosface_margin
from ring_loss_tf.heads import no_margin
from ring_loss_tf.layers import BatchNorm
from ring_loss_tf.layers import CenterLoss
from ring_loss_tf.layers import L2Constrained
from ring_loss_tf.layers import RingLoss
from ring_loss_tf.layers import center_loss
from ring_loss_tf.layers import l2_constrained
from ring_loss_tf.layers import ring_loss
from ring_loss_tf.layers import safe_norm

__version__ = "0.1.0"
