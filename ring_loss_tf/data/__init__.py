"""Data: from files to training batches and evaluation sets.

- `pipeline`: the training pipeline (sources, per-worker exact order).
- `images`: decoding, resizing, augmentation, the pixel budget.
- `recordio`: insightface `.rec`/`.idx`.
- `kanji`, `kanji_templates`: the embedded default set and its template
  variant.
- `align`: photos to aligned crops (five landmarks to a template).
- `eval_sets`: the evaluation formats (pairs.txt, `.bin`, folders).
"""

from ring_loss_tf.forwarding import forward

# The names of `ring_loss_tf.data` before it was a package
# (ring_loss_tf/data.py), kept for code that imports them from here;
# loaded on first use so that the package's TensorFlow-free modules import
# without TensorFlow.
__getattr__ = forward(
    "ring_loss_tf.data",
    "ring_loss_tf.data.pipeline",
    (
        "AUGMENTATIONS",
        "CORRUPT_IMAGE_FIX",
        "DataWarning",
        "IMAGE_EXTENSIONS",
        "IN_MEMORY_LIMIT_BYTES",
        "MAX_IMAGE_PIXELS",
        "RECORD_ERROR",
        "TrainingSource",
        "augment_batch",
        "decode_image",
        "decode_native",
        "find_corrupt_images",
        "find_corrupt_records",
        "image_bytes_ok",
        "is_image_file",
        "list_image_folder",
        "load_encoded_images",
        "load_images",
        "normalize",
        "open_training_source",
        "resize_image",
        "shuffled_index",
        "training_dataset",
    ),
)
