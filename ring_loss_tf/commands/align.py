"""Aligns a folder of face photos: five landmarks → a warped crop.

    ring-loss-align --input_dir=photos --output_dir=aligned \\
        --template=sphereface [--all_faces] [--landmarks=5pts.txt]

(or `python -m ring_loss_tf.data.align ...`). Finds five landmarks per face with
MTCNN (`pip install "ring_loss_tf[align]"`), or reads them from
--landmarks, and warps each face onto the template's points: sphereface
gives the 112x96 crops SphereFace and the Ring loss paper train on,
arcface insightface's 112x112. Identity sub-folders are kept; a rerun skips
the images already done; images without a face are listed in
<output_dir>/no_face.txt. `ring_loss_tf.data.align` describes the transform.

--input and --output (this command's earlier spellings) still work as
--input_dir and --output_dir.
"""

import pathlib

from absl import flags

from ring_loss_tf import config as config_lib
from ring_loss_tf.commands import common

NAME = "ring-loss-align"
# ring_loss_tf.data.align's, repeated: that module imports TensorFlow.
TEMPLATE_NAMES = ("arcface", "sphereface")
NO_FACE_ACTIONS = ("skip", "center_crop")
NO_FACE_FILE = "no_face.txt"

FLAGS = common.new_flags()
flags.DEFINE_string(
    "input_dir",
    None,
    "Folder of photos (identity sub-folders are kept).",
    flag_values=FLAGS,
)
flags.DEFINE_alias("input", "input_dir", flag_values=FLAGS)
flags.DEFINE_string(
    "output_dir",
    None,
    "Folder for the aligned crops (outside --input_dir).",
    flag_values=FLAGS,
)
flags.DEFINE_alias("output", "output_dir", flag_values=FLAGS)
flags.DEFINE_enum(
    "template",
    "sphereface",
    TEMPLATE_NAMES,
    "sphereface: 112x96; arcface: 112x112.",
    flag_values=FLAGS,
)
flags.DEFINE_boolean(
    "all_faces",
    False,
    "Every face as <name>_<k>, not only the largest one.",
    flag_values=FLAGS,
)
flags.DEFINE_string(
    "landmarks",
    None,
    "Five-point list instead of detection (path x1 y1 ... x5 y5 [score] "
    "per face).",
    flag_values=FLAGS,
)
flags.DEFINE_enum(
    "on_no_face",
    "skip",
    NO_FACE_ACTIONS,
    "What to write for an image without a face.",
    flag_values=FLAGS,
)
flags.DEFINE_integer(
    "min_face_size",
    20,
    "Smallest face MTCNN looks for, in pixels.",
    flag_values=FLAGS,
)
flags.DEFINE_integer(
    "num_workers", 2, "Images processed at once.", flag_values=FLAGS
)
flags.DEFINE_integer(
    "max_image_pixels",
    config_lib.MAX_IMAGE_PIXELS,
    "Skip (and list) images of more pixels, width x height, read before "
    "decoding (default 8192x8192).",
    flag_values=FLAGS,
)


def _fail(message):
    common.fail(NAME, message)


def _check_flags():
    """Exits with one line on a missing or out-of-range flag."""
    if not FLAGS.input_dir:
        _fail(
            "--input_dir is required: the folder of photos, e.g. "
            "--input_dir=photos."
        )
    if not FLAGS.output_dir:
        _fail(
            "--output_dir is required: where the aligned crops go, e.g. "
            "--output_dir=aligned."
        )
    if FLAGS.num_workers < 1 or FLAGS.min_face_size < 1:
        _fail("--num_workers and --min_face_size must be >= 1.")
    if FLAGS.max_image_pixels < 1:
        _fail(
            f"--max_image_pixels={FLAGS.max_image_pixels}: must be >= 1 "
            "(e.g. 67108864, 8192x8192)."
        )


def main(argv):
    """Aligns as the flags say; returns the exit status."""
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]} (flags are --name=value).")
    _check_flags()
    # TensorFlow loads only now, without its start-up log.
    common.quiet_tensorflow()
    from ring_loss_tf.data import align

    try:
        points = (
            align.read_landmarks_file(FLAGS.landmarks)
            if FLAGS.landmarks
            else None
        )
        summary = align.align_folder(
            FLAGS.input_dir,
            FLAGS.output_dir,
            template=FLAGS.template,
            landmarks=points,
            all_faces=FLAGS.all_faces,
            on_no_face=FLAGS.on_no_face,
            num_workers=FLAGS.num_workers,
            min_face_size=FLAGS.min_face_size,
            max_pixels=FLAGS.max_image_pixels,
        )
    except (FileNotFoundError, ImportError, ValueError) as error:
        _fail(str(error))
    listed = (
        f", listed in {pathlib.Path(FLAGS.output_dir) / NO_FACE_FILE}"
        if summary.no_face
        else ""
    )
    print(
        f"Aligned {summary.aligned} of {summary.images} images "
        f"({summary.faces_written} faces) into {FLAGS.output_dir}; "
        f"{summary.already_done} were done before; "
        f"{len(summary.no_face)} without a face{listed}."
    )
    return 0


def call(argv):
    """Runs the command in this process (tests); returns its status."""
    return common.call(FLAGS, main, argv, NAME)


def run(argv=None):
    """The `ring-loss-align` command (and `python -m ring_loss_tf.data.align`)."""
    common.run(FLAGS, main, __doc__, argv)


if __name__ == "__main__":
    run()
