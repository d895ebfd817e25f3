"""Exports the embedding model of a training run: SavedModel, TFLite, ONNX.

    ring-loss-export --model_dir=runs/sm_r --output_dir=exported \\
        [--tflite] [--onnx] [--keras] [--overwrite]

(or `python -m ring_loss_tf.export ...`). Reads the run's config.json and
last checkpoint and writes a SavedModel whose `serving_default` takes uint8
RGB images of any size (the preprocessing is inside); --tflite and --onnx
add converted models, each checked against the Keras model before the
export is moved into place; --keras adds the training model with its heads.
An existing --output_dir is replaced only with --overwrite, and a failed
export leaves the previous one intact. `ring_loss_tf.export` describes the
signatures and the preprocessing.

--output (this command's earlier spelling) still works as --output_dir.
"""

import pathlib
import sys

from absl import flags

from ring_loss_tf.commands import common

NAME = "ring-loss-export"
# ring_loss_tf.export's, repeated: that module imports TensorFlow.
KERAS_FILE = "training_model.keras"
ONNX_INSTALL = "pip install 'ring_loss_tf[onnx]' (tf2onnx==1.17.*, onnxruntime)"

FLAGS = common.new_flags()
flags.DEFINE_string(
    "model_dir",
    None,
    "Training directory (config.json + checkpoint).",
    flag_values=FLAGS,
)
flags.DEFINE_string(
    "output_dir", None, "SavedModel directory to write.", flag_values=FLAGS
)
flags.DEFINE_alias("output", "output_dir", flag_values=FLAGS)
flags.DEFINE_boolean(
    "tflite", False, "Also write model.tflite.", flag_values=FLAGS
)
flags.DEFINE_boolean(
    "onnx",
    False,
    f"Also write model.onnx ({ONNX_INSTALL}).",
    flag_values=FLAGS,
)
flags.DEFINE_boolean(
    "keras",
    False,
    f"Also write {KERAS_FILE} (with the heads).",
    flag_values=FLAGS,
)
flags.DEFINE_boolean(
    "overwrite",
    False,
    "Replace an existing export at --output_dir.",
    flag_values=FLAGS,
)


def _fail(message):
    common.fail(NAME, message)


def _check_flags():
    """Exits with one line on a missing or conflicting flag."""
    if not FLAGS.model_dir:
        _fail(
            "--model_dir is required: the training directory "
            "(config.json + checkpoint), e.g. --model_dir=runs/default."
        )
    if not FLAGS.output_dir:
        _fail(
            "--output_dir is required: the SavedModel directory to "
            "write, e.g. --output_dir=exported."
        )
    if pathlib.Path(FLAGS.output_dir).exists() and not FLAGS.overwrite:
        _fail(
            f"--output_dir={FLAGS.output_dir} already exists; add "
            "--overwrite to replace it or choose another directory."
        )


def main(argv):
    """Exports as the flags say; returns the exit status."""
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]} (flags are --name=value).")
    _check_flags()
    # TensorFlow loads only now, without its start-up log.
    common.quiet_tensorflow()
    from ring_loss_tf import export
    from ring_loss_tf.models import assembly

    try:
        if FLAGS.onnx:
            export.require_onnx()
        trained = assembly.load_training_models(FLAGS.model_dir)
        path = export.export_saved_model(
            trained.embedding_model,
            FLAGS.output_dir,
            overwrite=FLAGS.overwrite,
            tflite=FLAGS.tflite,
            onnx=FLAGS.onnx,
            training_model=trained.train_model if FLAGS.keras else None,
        )
    except (
        FileExistsError,
        FileNotFoundError,
        ImportError,
        ValueError,
    ) as error:
        _fail(str(error))
    except export.ExportError as error:
        # The export could not be made: not a usage error.
        print(f"{common.program(NAME)}: error: {error}", file=sys.stderr)
        return 1
    written = [p.name for p in sorted(path.iterdir())]
    print(f"Exported {FLAGS.model_dir} to {path}: {', '.join(written)}")
    return 0


def call(argv):
    """Runs the command in this process (tests); returns its status."""
    return common.call(FLAGS, main, argv, NAME)


def run(argv=None):
    """The `ring-loss-export` command (and `python -m ring_loss_tf.export`)."""
    common.run(FLAGS, main, __doc__, argv)


if __name__ == "__main__":
    run()
