"""Export of the embedding model: SavedModel, TFLite, ONNX, `.keras`.

The SavedModel holds the preprocessing, so a deployment needs neither this
package nor Keras custom objects (`tf.saved_model.load`, TF Serving):

- `serving_default`: `images`, uint8 `(batch, height, width, 3)` RGB of any
  height × width → `embedding` (raw, float32 `(batch, embedding_dim)`) and
  `normalized_embedding` (L2-normalised; ring loss makes the norm itself
  meaningful, so both are returned).
- `serve_image_bytes`: `image_bytes`, a string batch `(batch,)` of encoded
  JPEG/PNG/BMP/GIF files (each of its own size) → the same two outputs.
- `serve`: the backbone alone, float32 images already at the input size and
  normalised (what the training pipeline feeds it) → the raw embedding.

Preprocessing, as the training pipeline (`ring_loss_tf.data.pipeline`) does it:
colour → grey with the ITU-R 601-2 weights (rounded) for one-channel
backbones; bilinear resize with antialiasing to the input size (the filter
of `tf.image.resize(..., antialias=True)`, written as two small matrix
products so that TFLite and ONNX convert it; an image at the input size
passes through exactly); then (x − 127.5) / 128. Unlike the training
pipeline the resized pixels are not rounded to whole grey levels (a
difference below half a grey level, and rounding would make the converted
models disagree at ties).

The training-only parts (heads, RingLoss's loss) are not exported.
`model.tflite` (TFLite builtins only) and `model.onnx` (tf2onnx, dynamic
batch, height and width) are converted from `serving_default` of the
written SavedModel and checked against the Keras model before the export is
moved into place: a converter can return a model that runs and is wrong
(a dropped normalisation, permuted outputs), and only a comparison shows it.

Everything is written to a temporary directory beside the target and renamed
into place: an interrupted or failed export leaves the previous one intact.

Command line (reads a training `--model_dir`: config.json + checkpoint;
ring_loss_tf/commands/export.py):

    ring-loss-export --model_dir=runs/sm_r --output_dir=exported \
        [--tflite] [--onnx] [--keras] [--overwrite]

or `python -m ring_loss_tf.export` with the same flags.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import warnings

import keras
import numpy as np
import tensorflow as tf

from ring_loss_tf import quiet
from ring_loss_tf.errors import first_line

SERVING_SIGNATURE = "serving_default"
BYTES_SIGNATURE = "serve_image_bytes"
BACKBONE_SIGNATURE = "serve"
TFLITE_FILE = "model.tflite"
ONNX_FILE = "model.onnx"
KERAS_FILE = "training_model.keras"
ONNX_OPSET = 17
ONNX_INSTALL = "pip install 'ring_loss_tf[onnx]' (tf2onnx==1.17.*, onnxruntime)"
# A converted model must give each check image an embedding within this of
# the Keras one, relative to its norm (Ring loss makes the norm meaningful),
# and at this cosine or above (what verification scores depend on). Float
# reordering moves embeddings by about 1e-6 of their norm; a pixel whose
# luma rounds the other way at a tie moves a 32×32 grey model's by about
# 3e-4. A permuted, rescaled or misaligned output is off by far more.
RELATIVE_TOLERANCE = 1e-2
MIN_COSINE = 0.9999
_XNNPACK_NOTICE = r"INFO: Created TensorFlow Lite XNNPACK delegate for CPU\."
# ITU-R 601-2 luma, as Pillow and `ring_loss_tf.data.images.to_channels`.
_LUMA = (0.299, 0.587, 0.114)


class ExportError(RuntimeError):
    """A conversion failed, its output does not match the Keras model, or
    the export could not be written (the previous one is then intact)."""


def _input_geometry(embedding_model):
    shape = tuple(embedding_model.inputs[0].shape)
    if (
        len(shape) != 4
        or any(not isinstance(d, int) for d in shape[1:])
        or shape[3] not in (1, 3)
    ):
        raise ValueError(
            "`embedding_model` must take images (batch, height, width, 1 or "
            f"3) of a fixed size. Received input shape: {shape}"
        )
    return shape[1], shape[2], shape[3]


def _resize_matrix(in_size: tf.Tensor, out_size: int) -> tf.Tensor:
    """(out_size, in_size) weights of the antialiased bilinear resize.

    Row o holds max(0, 1 − |s + ½ − c_o| / k), s = 0 … in_size − 1, with the
    sample centre c_o = (o + ½) · in/out and the kernel width k = max(in/out,
    1), normalised to sum 1: the triangle kernel of TensorFlow's
    ScaleAndTranslate op (`tf.image.resize(..., antialias=True)`). For
    in_size == out_size it is the identity exactly.
    """
    in_float = tf.cast(in_size, tf.float32)
    inv_scale = 1.0 / (float(out_size) / in_float)
    one_over_kernel_scale = 1.0 / tf.maximum(inv_scale, 1.0)
    centres = (tf.range(out_size, dtype=tf.float32) + 0.5) * inv_scale
    sources = tf.cast(tf.range(in_size), tf.float32) + 0.5
    distance = tf.abs(sources[None, :] - centres[:, None])
    weights = tf.nn.relu(1.0 - distance * one_over_kernel_scale)
    # Row sums as a product with ones: TFLite's SUM over one axis of this
    # dynamically shaped matrix summed all of it (TF 2.21).
    sums = tf.matmul(weights, tf.ones_like(sources)[:, None])
    return weights / sums


def preprocess(images: tf.Tensor, image_size, channels: int) -> tf.Tensor:
    """uint8/float RGB (b, h, w, 3), values 0..255 → the backbone's input.

    Returns float32 `(b, *image_size, channels)`, normalised (x − 127.5)/128.
    """
    height, width = image_size
    x = tf.cast(images, tf.float32)
    if channels == 1:
        x = tf.reduce_sum(x * tf.constant(_LUMA), axis=-1, keepdims=True)
        x = tf.clip_by_value(tf.round(x), 0.0, 255.0)
    shape = tf.shape(x)
    rows = _resize_matrix(shape[1], height)  # (H, h)
    cols = _resize_matrix(shape[2], width)  # (W, w)
    c = x.shape[-1]
    # Plain 2-D products, the form every converter handles:
    # (b·w·c, h) @ rows.T, then (b·H·c, w) @ cols.T.
    x = tf.reshape(tf.transpose(x, [0, 2, 3, 1]), [-1, shape[1]])
    x = tf.matmul(x, tf.transpose(rows))
    x = tf.reshape(x, [shape[0], shape[2], c, height])  # (b, w, c, H)
    x = tf.reshape(tf.transpose(x, [0, 3, 2, 1]), [-1, shape[2]])
    x = tf.matmul(x, tf.transpose(cols))
    x = tf.reshape(x, [shape[0], height, c, width])  # (b, H, c, W)
    x = tf.transpose(x, [0, 1, 3, 2])
    return (x - 127.5) / 128.0


def _decode(contents):
    # JPEG with the accurate integer IDCT, as the training pipeline decodes.
    is_jpeg = tf.equal(tf.strings.substr(contents, 0, 2), b"\xff\xd8")
    image = tf.cond(
        is_jpeg,
        lambda: tf.io.decode_jpeg(
            contents, channels=3, dct_method="INTEGER_ACCURATE"
        ),
        lambda: tf.io.decode_image(
            contents, channels=3, expand_animations=False
        ),
    )
    return tf.ensure_shape(image, [None, None, 3])


def l2_normalize(embeddings: tf.Tensor) -> tf.Tensor:
    """x / ‖x‖₂ per row; Σx² clamped at float32's smallest normal number.

    The clamp leaves every non-zero norm unchanged (an additive epsilon
    would shrink small norms, the very quantity Ring loss studies) and maps
    a zero row to zero.
    """
    squares = tf.reduce_sum(tf.square(embeddings), axis=-1, keepdims=True)
    tiny = float(np.finfo(np.float32).tiny)
    return embeddings * tf.math.rsqrt(tf.maximum(squares, tiny))


def _archive(embedding_model):
    height, width, channels = _input_geometry(embedding_model)

    def embed(x):
        return tf.cast(embedding_model(x, training=False), tf.float32)

    def outputs(x):
        embedding = embed(x)
        return {
            "embedding": embedding,
            "normalized_embedding": l2_normalize(embedding),
        }

    def serve_images(images):
        return outputs(preprocess(images, (height, width), channels))

    def serve_bytes(image_bytes):
        def one(contents):
            image = _decode(contents)[None]
            return preprocess(image, (height, width), channels)[0]

        x = tf.map_fn(
            one,
            image_bytes,
            fn_output_signature=tf.TensorSpec(
                (height, width, channels), tf.float32
            ),
        )
        return outputs(x)

    archive = keras.export.ExportArchive()
    archive.track(embedding_model)
    archive.add_endpoint(
        SERVING_SIGNATURE,
        serve_images,
        input_signature=[
            tf.TensorSpec((None, None, None, 3), tf.uint8, name="images")
        ],
    )
    archive.add_endpoint(
        BYTES_SIGNATURE,
        serve_bytes,
        input_signature=[tf.TensorSpec((None,), tf.string, name="image_bytes")],
    )
    archive.add_endpoint(
        BACKBONE_SIGNATURE,
        embed,
        input_signature=[
            tf.TensorSpec(
                (None, height, width, channels), tf.float32, name="images"
            )
        ],
    )
    return archive


def _check_images(embedding_model, seed=0):
    """A uint8 batch at the input size and the Keras embeddings of it."""
    height, width, channels = _input_geometry(embedding_model)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (3, height, width, 3), dtype=np.uint8)
    x = preprocess(tf.constant(images), (height, width), channels)
    expected = tf.cast(embedding_model(x, training=False), tf.float32)
    return images, expected.numpy()


def _parity(got, expected):
    """Per-row ‖got − expected‖ / ‖expected‖ and cosine, in float64.

    A row is compared with its own norm, but not below a millionth of the
    batch's largest (nor zero): an embedding at or near zero (a blank image,
    a model that outputs zeros) is judged against the batch instead of
    dividing its float noise by zero. Such a row has no direction: its
    cosine is 1 if the other row is near zero too, else 0. NaN stays NaN.
    """
    got = np.asarray(got, np.float64)
    expected = np.asarray(expected, np.float64)
    norm = np.linalg.norm(expected, axis=-1)
    got_norm = np.linalg.norm(got, axis=-1)
    floor = max(
        1e-6 * float(np.max(norm, initial=0.0)),
        float(np.finfo(np.float32).tiny),
    )
    difference = np.linalg.norm(got - expected, axis=-1)
    relative = difference / np.maximum(norm, floor)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = np.sum(got * expected, axis=-1) / (got_norm * norm)
    small, got_small = norm < floor, got_norm < floor
    cosine = np.where(
        small | got_small, np.where(small & got_small, 1.0, 0.0), cosine
    )
    cosine = np.where(np.isnan(relative), np.nan, cosine)
    return relative, cosine


def _compare(name, got, expected):
    """Raises ExportError unless `got` matches the Keras `expected` rows."""
    got = np.asarray(got)
    if got.shape != expected.shape:
        raise ExportError(
            f"{name}: the converted model's embeddings have shape "
            f"{got.shape}, the Keras model's {expected.shape}; the export was "
            "not written. Please report it with your TensorFlow and converter "
            "versions."
        )
    relative, cosine = _parity(got, expected)
    # NaN fails both comparisons.
    passed = (relative <= RELATIVE_TOLERANCE) & (cosine >= MIN_COSINE)
    if not passed.all():
        badness = np.fmax(
            relative / RELATIVE_TOLERANCE, (1.0 - cosine) / (1.0 - MIN_COSINE)
        )
        worst = int(np.argmax(np.where(np.isnan(badness), np.inf, badness)))
        raise ExportError(
            f"{name}: the converted model's embedding of check image "
            f"{worst + 1} of {len(relative)} differs from the Keras model's "
            f"by {relative[worst]:.3g} of its norm, cosine "
            f"{cosine[worst]:.6f} (allowed: at most {RELATIVE_TOLERANCE:g}, "
            f"cosine at least {MIN_COSINE:g}); the export was not written. "
            "Please report it with your TensorFlow and converter versions."
        )


def _convert_tflite(saved_model_dir, path):
    converter = tf.lite.TFLiteConverter.from_saved_model(
        str(saved_model_dir), signature_keys=[SERVING_SIGNATURE]
    )
    path.write_bytes(converter.convert())


def _run_tflite(path, images):
    # The check's own interpreter: its deprecation in favour of ai_edge_litert
    # and its XNNPACK notice are nothing the user can act on.
    with warnings.catch_warnings(), quiet.dropped_lines([_XNNPACK_NOTICE]):
        warnings.filterwarnings(
            "ignore", r"\s*Warning: tf.lite.Interpreter is deprecated"
        )
        interpreter = tf.lite.Interpreter(model_path=str(path))
        runner = interpreter.get_signature_runner(SERVING_SIGNATURE)
        return runner(images=images)["embedding"]


def _convert_onnx(saved_model_dir, path):
    command = [
        sys.executable,
        "-m",
        "tf2onnx.convert",
        "--saved-model",
        str(saved_model_dir),
        "--signature_def",
        SERVING_SIGNATURE,
        "--opset",
        str(ONNX_OPSET),
        "--output",
        str(path),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    unsupported = [
        line for line in result.stderr.splitlines() if "Unsupported ops" in line
    ]
    if result.returncode or unsupported or not path.is_file():
        tail = (unsupported or result.stderr.strip().splitlines() or ["?"])[-1]
        raise ExportError(f"tf2onnx failed on {saved_model_dir}: {tail}")


def _run_onnx(path, images):
    import onnxruntime

    session = onnxruntime.InferenceSession(
        str(path), providers=["CPUExecutionProvider"]
    )
    names = [output.name for output in session.get_outputs()]
    outputs = session.run(None, {"images": images})
    return outputs[names.index("embedding")]


def require_onnx():
    missing = [
        module
        for module in ("tf2onnx", "onnxruntime")
        if importlib.util.find_spec(module) is None
    ]
    if missing:
        raise ImportError(
            f"ONNX export needs {' and '.join(missing)}: {ONNX_INSTALL}."
        )


def _is_replaceable(path):
    # Never delete a directory that is not an export (or empty) on overwrite.
    return path.is_dir() and (
        (path / "saved_model.pb").is_file() or not any(path.iterdir())
    )


def export_saved_model(
    embedding_model: keras.Model,
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    tflite: bool = False,
    onnx: bool = False,
    training_model: keras.Model | None = None,
) -> pathlib.Path:
    """Writes `embedding_model` with its preprocessing to `output_dir`.

    See the module docstring for the signatures. Each converted model is
    checked against `embedding_model` on random images before anything is
    moved into place: each embedding within `RELATIVE_TOLERANCE` (1e-2) of
    its norm and at cosine `MIN_COSINE` (0.9999) or above.

    Args:
        embedding_model: a `keras.Model` from normalised images (batch,
            height, width, 1 or 3) to embeddings (a backbone of
            `ring_loss_tf.models.backbones`).
        output_dir: the SavedModel directory to create.
        overwrite: replace an existing export (or empty directory) at
            `output_dir`; without it an existing path is an error.
        tflite: also write `output_dir/model.tflite`.
        onnx: also write `output_dir/model.onnx` (needs the `onnx` extra).
        training_model: if given, also write it with its heads and losses to
            `output_dir/training_model.keras` for fine-tuning (loading it
            needs `import ring_loss_tf`).

    Returns:
        `output_dir` as a `pathlib.Path`.

    Raises:
        FileExistsError: `output_dir` exists and `overwrite` is False, or it
            is not an export directory.
        ImportError: `onnx=True` without tf2onnx / onnxruntime installed.
        ExportError: a conversion failed or does not match the Keras model.
    """
    output_dir = pathlib.Path(output_dir)
    if not isinstance(embedding_model, keras.Model):
        raise TypeError(
            "`embedding_model` must be a keras.Model from images to "
            f"embeddings. Received: {type(embedding_model).__name__}"
        )
    _input_geometry(embedding_model)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(
            f"{output_dir}: the export directory already exists; pass "
            "overwrite=True (--overwrite) to replace it or choose another "
            "directory."
        )
    if output_dir.exists() and not _is_replaceable(output_dir):
        raise FileExistsError(
            f"{output_dir}: exists and is not an export (no saved_model.pb) "
            "nor empty; refusing to replace it. Choose another directory."
        )
    if onnx:
        require_onnx()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(
        tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent)
    )
    try:
        target = staging / "export"
        _archive(embedding_model).write_out(str(target), verbose=False)
        images, expected = _check_images(embedding_model)
        loaded = tf.saved_model.load(str(target))
        got = loaded.signatures[SERVING_SIGNATURE](images=tf.constant(images))
        _compare("SavedModel", got["embedding"].numpy(), expected)
        del loaded
        if tflite:
            _convert_tflite(target, target / TFLITE_FILE)
            _compare(
                "TFLite", _run_tflite(target / TFLITE_FILE, images), expected
            )
        if onnx:
            _convert_onnx(target, target / ONNX_FILE)
            _compare("ONNX", _run_onnx(target / ONNX_FILE, images), expected)
        if training_model is not None:
            training_model.save(str(target / KERAS_FILE))
        _move_into_place(target, output_dir, staging)
    except (OSError, tf.errors.OpError) as error:
        raise ExportError(
            f"Could not write the export to {output_dir} "
            f"({first_line(error)}); "
            + ("the previous export there is intact"
               if output_dir.exists() else "nothing was written there")
            + ". Free disk space (or raise the file size limit, `ulimit -f`)"
            " and export again."
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def _move_into_place(new, output_dir, staging):
    previous = None
    if output_dir.exists():
        # The rename needs a free name; the old export is restored if it
        # fails, and deleted with `staging` if it succeeds.
        previous = staging / "previous"
        os.rename(output_dir, previous)
    try:
        os.rename(new, output_dir)
    except OSError:
        if previous is not None:
            os.rename(previous, output_dir)
        raise


if __name__ == "__main__":
    from ring_loss_tf.commands import export as _command

    _command.run()
