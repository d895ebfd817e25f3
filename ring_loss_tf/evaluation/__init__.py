"""Evaluation: embeddings, metrics, protocols and reports.

- `embedder`: images to embeddings (a model, a `.keras` file, a SavedModel).
- `metrics`: verification (TAR at FAR, 10-fold accuracy), identification.
- `protocols`: pairs, identification, low-resolution matching.
- `ijb`: the IJB-B/C template protocol.
- `report`: the tables and the report file.
"""

from ring_loss_tf.forwarding import forward

# The names of `ring_loss_tf.evaluation` before it was a package
# (ring_loss_tf/evaluation.py), kept for code that imports them from here;
# loaded on first use so that the package's TensorFlow-free modules import
# without TensorFlow.
__getattr__ = forward(
    "ring_loss_tf.evaluation",
    "ring_loss_tf.evaluation.protocols",
    (
        "Embedder",
        "LOW_RES_SIDES",
        "ModelReport",
        "TRAINING_FARS",
        "all_pairs_tar",
        "downsample",
        "embed_folder",
        "evaluate_identification",
        "evaluate_model",
        "evaluate_verification",
        "identify_copies",
        "load_distractor_embeddings",
        "load_embedder",
        "norm_ratio",
        "pair_indices",
        "resolve_model_path",
        "verify_embedded",
        "verify_pairs",
    ),
)
