"""Converts a training set between formats: folder, RecordIO, TFRecord.

    ring-loss-convert --input_dir=faces --output_dir=shards --to=tfrecord

(or `python -m ring_loss_tf.data.convert ...`). Reads a folder per
identity, a `train.rec` + `train.idx` or `train-*.tfrecord` shards and
writes TFRecord shards (`--to=tfrecord`) or a `.rec` (`--to=rec`) holding
the same examples in the same global order, so a run on the output trains
on the very batches it would have on the input. A bad record stops it with
one line naming the file and the record, and an output directory that
already holds a training set is refused. `ring_loss_tf.data.convert`
describes the layouts.

--input and --output (this command's earlier spellings) still work as
--input_dir and --output_dir.
"""

from absl import flags

from ring_loss_tf.commands import common

NAME = "ring-loss-convert"
# ring_loss_tf.data.convert's and .sources', repeated: this module imports
# no TensorFlow before the flags are checked.
FORMATS = ("tfrecord", "rec")
RECORDS_PER_SHARD = 10000
IMAGE_KEY = "image/encoded"
LABEL_KEY = "image/class/label"

FLAGS = common.new_flags()
flags.DEFINE_string(
    "input_dir", None,
    "The training set to read: a folder per identity, a .rec (or its "
    "directory), or a directory of train-*.tfrecord shards.",
    flag_values=FLAGS,
)
flags.DEFINE_alias("input", "input_dir", flag_values=FLAGS)
flags.DEFINE_string(
    "output_dir", None,
    "The directory to write; it must not hold a training set already.",
    flag_values=FLAGS,
)
flags.DEFINE_alias("output", "output_dir", flag_values=FLAGS)
flags.DEFINE_enum("to", None, list(FORMATS), "The output format.",
                  flag_values=FLAGS)
flags.DEFINE_string("tfrecord_image_key", IMAGE_KEY,
                    "The tf.train.Example feature of the encoded image.",
                    flag_values=FLAGS)
flags.DEFINE_string("tfrecord_label_key", LABEL_KEY,
                    "The tf.train.Example feature of the class label.",
                    flag_values=FLAGS)
flags.DEFINE_integer("records_per_shard", RECORDS_PER_SHARD,
                     "TFRecord output: records per shard.",
                     flag_values=FLAGS)


def _fail(message):
    common.fail(NAME, message)


def main(argv):
    """Converts as the flags say; returns the exit status."""
    if len(argv) > 1:
        _fail(f"unexpected arguments {' '.join(argv[1:])}; pass settings "
              "as --flag=value")
    for name, example in (("input_dir", "faces"), ("output_dir", "shards"),
                          ("to", "tfrecord")):
        if not FLAGS[name].value:
            _fail(f"--{name} is required, e.g. --{name}={example}")
    if FLAGS.records_per_shard < 1:
        _fail(f"--records_per_shard={FLAGS.records_per_shard}: must be "
              ">= 1; use e.g. 10000")
    common.quiet_tensorflow()
    from ring_loss_tf.data import convert

    try:
        convert.convert(
            FLAGS.input_dir, FLAGS.output_dir, FLAGS.to,
            image_key=FLAGS.tfrecord_image_key,
            label_key=FLAGS.tfrecord_label_key,
            records_per_shard=FLAGS.records_per_shard,
            progress=lambda line: print(line, flush=True),
        )
    except (ValueError, OSError) as error:
        _fail(str(error))
    return 0


def call(argv):
    """Runs the command in this process (tests); returns its status."""
    return common.call(FLAGS, main, argv, NAME)


def run(argv=None):
    """The `ring-loss-convert` command (and `python -m
    ring_loss_tf.data.convert`)."""
    common.run(FLAGS, main, __doc__, argv)


if __name__ == "__main__":
    run()
