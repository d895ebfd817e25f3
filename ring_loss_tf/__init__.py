"""Ring loss (Zheng, Pal, Savvides, CVPR 2018) for TensorFlow 2 / Keras 3.

The layers are importable from the top level (`ring_loss_tf.RingLoss`, ...).
The package follows the data flow, each subpackage importing only those
before it: `data` (sources, pipeline, images, alignment, evaluation sets) →
`models` (backbones, assembly, sharded head) → `training` (the step, the
loop) → `evaluation` (embedder, metrics, protocols, reports) → `export`;
`layers` holds what every Keras backend runs (`keras.ops` only); `config`,
`registry`, `cluster` and `errors` need no TensorFlow. The subpackages are
imported where they are used so that the layers work on every backend.

Importing the package imports the layers, which registers them with Keras
(a `.keras` file holding them then loads). Only in a command
(`ring_loss_tf.commands`: the installed `ring-loss-*` programs, train.py,
evaluate.py) do they load on first use (PEP 562), so that the command
checks its flags, which needs no TensorFlow, before TensorFlow starts.
"""

from ring_loss_tf import quiet as _quiet

# Only in `python -m ring_loss_tf.export` or `.align`: their output is
# the project's lines (ring_loss_tf/quiet.py), and the package is imported
# before the module can say so. The commands call
# `quiet.import_tensorflow` themselves, after their flag checks; elsewhere
# importing the package leaves TensorFlow's logging as it is.
if _quiet.is_module_entry_point():
    _quiet.import_tensorflow()

# Public name → the module of `ring_loss_tf.layers` that defines it.
_PUBLIC = {
    "ArcFace": "heads",
    "ASoftmax": "heads",
    "CosFace": "heads",
    "CosineClassifier": "heads",
    "MARGINS": "heads",
    "a_softmax_logits": "heads",
    "a_softmax_margin": "heads",
    "arcface_logits": "heads",
    "arcface_margin": "heads",
    "class_cosines": "heads",
    "cosface_logits": "heads",
    "cosface_margin": "heads",
    "no_margin": "heads",
    "BatchNorm": "blocks",
    "CenterLoss": "feature_losses",
    "GroupedConv2D": "blocks",
    "L2Constrained": "feature_losses",
    "RingLoss": "ring",
    "center_loss": "feature_losses",
    "l2_constrained": "feature_losses",
    "ring_loss": "ring",
    "safe_norm": "ops",
}

__all__ = list(_PUBLIC)
__version__ = "0.3.0"


if not _quiet.is_script_entry_point():
    from ring_loss_tf import layers as _layers  # noqa: E402

    for _name in _PUBLIC:
        globals()[_name] = getattr(_layers, _name)


def __getattr__(name):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module("ring_loss_tf.layers"), name)
    raise AttributeError(f"module 'ring_loss_tf' has no attribute {name!r}")


def __dir__():
    # The public names are module globals once the layers are imported.
    return sorted(set(globals()) | set(_PUBLIC))
