"""Export of the embedding model as a TensorFlow SavedModel.

The SavedModel has one serving signature, `serve`, taking a float32 batch of
normalised images `(batch_size, height, width, channels)` (what the data
pipeline feeds the backbone) and returning float32 embeddings
`(batch_size, embedding_dim)`. It loads with `tf.saved_model.load` in a
process where `ring_loss_tf` cannot be imported (design.md §3).

The directory is written beside the target under a temporary name and renamed
into place, so a reader never sees a half-written export.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

import keras


def export_saved_model(
    embedding_model: keras.Model,
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes `embedding_model` to `output_dir` as a SavedModel.

    Args:
        embedding_model: a `keras.Model` from images to embeddings (a
            backbone of `ring_loss_tf.backbones`).
        output_dir: the SavedModel directory to create.
        overwrite: replace an existing `output_dir`; without it an existing
            directory is an error.

    Returns:
        `output_dir` as a `pathlib.Path`.

    Raises:
        FileExistsError: `output_dir` exists and `overwrite` is False.
    """
    output_dir = pathlib.Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(
            f"{output_dir}: the export directory already exists; pass "
            "overwrite=True to replace it or choose another directory."
        )
    if not isinstance(embedding_model, keras.Model):
        raise TypeError(
            "`embedding_model` must be a keras.Model from images to "
            f"embeddings. Received: {type(embedding_model).__name__}"
        )
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(
        tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent)
    )
    previous = None
    try:
        target = staging / "saved_model"
        embedding_model.export(str(target), format="tf_saved_model", verbose=False)
        if output_dir.exists():
            # Move the old export aside first: the rename below needs a free
            # name, and the old one is restored if that rename fails.
            previous = staging / "previous"
            os.rename(output_dir, previous)
        try:
            os.rename(target, output_dir)
        except OSError:
            if previous is not None:
                os.rename(previous, output_dir)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir
