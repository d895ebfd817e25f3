"""Models: backbones, their assembly with a head, the sharded head.

- `backbones`: SphereFace, iResNet, MobileFaceNet, the small CNN.
- `assembly`: backbone + embedding + Ring loss + head (`build_model`, ...).
- `sharded_head`: a margin head split over the replicas (Partial FC).
"""

from ring_loss_tf.forwarding import forward

# The names of `ring_loss_tf.models` before it was a package
# (ring_loss_tf/models.py), kept for code that imports them from here;
# loaded on first use so that the package's TensorFlow-free modules import
# without TensorFlow.
__getattr__ = forward(
    "ring_loss_tf.models",
    "ring_loss_tf.models.assembly",
    (
        "Models",
        "all_layers",
        "build_models",
        "checkpoint_error",
        "decayed_variables",
        "first_line",
        "l2softmax_head",
        "load_training_models",
        "margin_layer",
        "restore_checkpoint",
        "softmax_head",
    ),
)
