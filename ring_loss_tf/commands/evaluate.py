"""Evaluates an embedding model: verification, identification, low resolution.

Quick start (after `ring-loss-train`, on the embedded KanjiVG test split:
500 unseen characters, the 10-fold pairs.txt and a gallery/probe/distractor
split of them):

    ring-loss-evaluate --model=runs/default --low_res=2,4,8
                                            (or: python evaluate.py ...)

prints a table, and writes results.json and PNG plots (ROC on a log-FAR axis,
CMC, feature-norm histograms) to --output_dir. What it prints for the quick
start's model, with the commands that produce it, is in the docs.

Template verification (IJB-B/C; meta/ and loose_crop/ as insightface's IJB
evaluation reads them), or the embedded set's template variant:

    ring-loss-evaluate --model=runs/casia/export --ijb_dir=/data/IJBC --flip
    ring-loss-evaluate --model=runs/default --embedded_templates

On face data:

    ring-loss-evaluate --model=runs/casia/export \\
        --lfw_dir=/data/lfw --pairs=/data/lfw/pairs.txt \\
        --bin=/data/agedb_30.bin,/data/cfp_fp.bin \\
        --gallery=/data/mf/gallery --probes=/data/mf/probes \\
        --distractors=/data/mf/distractors_1M.npy

--model is an exported SavedModel directory or a training --model_dir (its
export/ is used); the model's own layers are not needed to load it.
--compare=other_run,... evaluates more models on the same data and overlays
their curves in the plots.

A SavedModel is a program: evaluating one runs the operations its author
put in it, so evaluate models from sources you trust. Before loading, the
graph is read and a model holding operations that read or write files, use
the network or call Python (WriteFile, PyFunc, ...) is refused with one
line naming the operation; --trust_saved_model loads it anyway.

The embedded set's flags (--cache_dir, --num_*_identities, --kanji_seed,
...) are the settings of the same names of `ring_loss_tf.config.TrainConfig`
(`config.EMBEDDED_SET`); a training --model_dir's config.json gives them
unless a flag is given.
"""

import os
import pathlib
import re
import sys

from absl import flags

# The configuration module imports no TensorFlow: flags are checked first.
from ring_loss_tf import config as config_lib
from ring_loss_tf.commands import common
from ring_loss_tf.errors import ConfigError

NAME = "ring-loss-evaluate"
FLAGS = common.new_flags()

flags.DEFINE_string(
    "model",
    None,
    "SavedModel directory, or a training --model_dir holding export/.",
    flag_values=FLAGS,
)
# The spelling of the other commands for a training directory.
flags.DEFINE_alias("model_dir", "model", flag_values=FLAGS)
flags.DEFINE_boolean(
    "trust_saved_model",
    False,
    "Load --model and --compare even if their graph holds operations that "
    "read or write files, use the network or call Python (refused by "
    "default: a SavedModel is a program, and evaluating it runs them).",
    flag_values=FLAGS,
)
flags.DEFINE_list(
    "compare",
    [],
    "More models (same forms as --model) evaluated on the same data; their "
    "curves are overlaid in the plots.",
    flag_values=FLAGS,
)

# Data. With none of these: the embedded KanjiVG test split.
flags.DEFINE_string(
    "lfw_dir",
    None,
    "LFW-layout image directory (<identity>/<identity>_"
    "<nnnn>.<ext>); needs --pairs.",
    flag_values=FLAGS,
)
flags.DEFINE_string(
    "pairs", None, "LFW-format pairs.txt over --lfw_dir.", flag_values=FLAGS
)
flags.DEFINE_list(
    "bin",
    [],
    "insightface verification .bin files (lfw.bin, "
    "cfp_fp.bin, agedb_30.bin), comma-separated.",
    flag_values=FLAGS,
)
flags.DEFINE_string(
    "gallery",
    None,
    "Identification gallery: a folder per identity.",
    flag_values=FLAGS,
)
flags.DEFINE_string(
    "probes",
    None,
    "Identification probes: a folder per identity (names "
    "matching --gallery).",
    flag_values=FLAGS,
)
flags.DEFINE_string(
    "distractors",
    None,
    "Identification distractors: a folder of image folders, or a .npy of "
    "precomputed embeddings (n, embedding_dim), memory-mapped.",
    flag_values=FLAGS,
)
flags.DEFINE_list(
    "ijb_dir",
    [],
    "Template protocols (IJB-B/C) in insightface's layout: each a directory "
    "with meta/<name>_face_tid_mid.txt, meta/<name>_template_pair_label.txt, "
    "optional meta/<name>_name_5pts_score.txt and loose_crop/.",
    flag_values=FLAGS,
)
flags.DEFINE_boolean(
    "embedded_templates",
    False,
    "Also verify templates of the embedded set's template variant "
    "(unseen test characters, several hands per template).",
    flag_values=FLAGS,
)
common.define_settings(FLAGS, config_lib.EMBEDDED_SET)

# Protocol.
flags.DEFINE_list(
    "low_res",
    [],
    "Low-resolution factors, e.g. 2,4,8: probe images "
    "downsampled by each and resized back.",
    flag_values=FLAGS,
)
flags.DEFINE_enum(
    "low_res_side",
    "probe",
    ["probe", "both"],
    "Downsample the probe (right) image of each pair, or both.",
    flag_values=FLAGS,
)
flags.DEFINE_boolean(
    "flip",
    False,
    "Embed image + horizontal mirror (sum of both).",
    flag_values=FLAGS,
)
flags.DEFINE_enum(
    "metric",
    "cosine",
    ["cosine", "l2"],
    "Pair score: cosine similarity, or minus the squared "
    "Euclidean distance of the raw embeddings.",
    flag_values=FLAGS,
)
flags.DEFINE_integer("max_rank", 100, "CMC length.", flag_values=FLAGS)
flags.DEFINE_boolean(
    "detector_score",
    True,
    "Template protocols: weight each image's features by the detector score "
    "of the 5-point file before pooling (as insightface's IJB evaluation).",
    flag_values=FLAGS,
)

# Model input.
flags.DEFINE_string(
    "signature",
    None,
    "SavedModel signature (default serving_default).",
    flag_values=FLAGS,
)
flags.DEFINE_string(
    "output_key",
    None,
    "Signature output with the embedding (default "
    "'embedding', or the only output).",
    flag_values=FLAGS,
)
flags.DEFINE_enum(
    "input_normalization",
    "auto",
    ["auto", "none", "unit"],
    "For float model inputs: auto = (x - 127.5) / 128 as in "
    "training, none = 0..255, unit = x / 255.",
    flag_values=FLAGS,
)
flags.DEFINE_integer(
    "batch_size", 256, "Images per model call.", flag_values=FLAGS
)

# Output.
flags.DEFINE_string(
    "output_dir",
    "eval_results",
    "Where results.json and the PNG plots go.",
    flag_values=FLAGS,
)
flags.DEFINE_boolean(
    "plots", True, "Write PNG plots (needs matplotlib).", flag_values=FLAGS
)


def _fail(message):
    sys.exit(f"{common.program(NAME)}: {message}")


def _check_flags():
    if not FLAGS.model:
        _fail(
            "--model is required: a SavedModel directory or a training "
            "--model_dir."
        )
    if bool(FLAGS.lfw_dir) != bool(FLAGS.pairs):
        _fail(
            "--lfw_dir and --pairs go together (the images and the "
            "pairs.txt over them)."
        )
    ident = [FLAGS.gallery, FLAGS.probes]
    if any(ident) and not all(ident):
        _fail("--gallery and --probes go together.")
    if FLAGS.distractors and not FLAGS.gallery:
        _fail("--distractors needs --gallery and --probes.")
    for flag in ("lfw_dir", "pairs", "gallery", "probes", "distractors"):
        value = getattr(FLAGS, flag)
        if value and not os.path.exists(value):
            _fail(f"--{flag}={value}: no such file or directory.")
    for path in FLAGS.bin:
        if not os.path.isfile(path):
            _fail(f"--bin: {path}: no such file.")
    for path in FLAGS.ijb_dir:
        if not os.path.isdir(os.path.join(path, "meta")):
            _fail(
                f"--ijb_dir: {path}: no meta/ directory; pass the directory "
                "holding meta/ and loose_crop/ (e.g. /data/IJBC)."
            )
    factors = []
    for value in FLAGS.low_res:
        try:
            factor = float(value)
            if not factor >= 1:
                raise ValueError
        except ValueError:
            _fail(
                f"--low_res: {value!r} is not a factor >= 1 (e.g. "
                "--low_res=2,4,8)."
            )
        factors.append(int(factor) if factor.is_integer() else factor)
    if FLAGS.max_rank < 1 or FLAGS.batch_size < 1:
        _fail("--max_rank and --batch_size must be >= 1.")
    try:
        _embedded_config(FLAGS.model)
    except ConfigError as error:
        _fail(
            f"--{error.setting}={error.value}: {error.problem}; "
            f"{error.fix}."
        )
    return factors


def _cached(loader):
    """Reads a set once per (image_size, channels), shared by --compare."""
    cache = {}

    def load(size, channels):
        key = (tuple(size) if size else None, channels)
        if key not in cache:
            cache[key] = loader(size, channels)
        return cache[key]

    return load


def _template_plan():
    """{name: TemplateProtocol} of --ijb_dir and --embedded_templates."""
    from ring_loss_tf.evaluation import ijb

    protocols = {}
    for path in FLAGS.ijb_dir:
        protocol = ijb.read_protocol(path)
        protocols[protocol.name] = protocol
    if FLAGS.embedded_templates:
        from ring_loss_tf.data import kanji_templates

        options = _kanji_options()
        root = kanji_templates.prepare(
            **{
                name: options[name]
                for name in (
                    "cache_dir",
                    "seed",
                    "num_train_identities",
                    "num_test_identities",
                    "image_size",
                )
                if name in options
            }
        )
        print(f"The embedded template variant at {root}")
        protocols[kanji_templates.NAME] = ijb.read_protocol(root)
    return protocols


def _kanji_options():
    """The embedded set's `kanji.prepare` options: the flags given, then
    the trained model's config.json, then the defaults."""
    return config_lib.kanji_options(_embedded_config(FLAGS.model))


def _embedded_config(model):
    """A `TrainConfig` holding the embedded set's settings (checked)."""
    given = common.settings_of(
        FLAGS, config_lib.EMBEDDED_SET, present_only=True
    )
    trained = _trained_config(model)
    if trained is None:
        config = config_lib.make(
            **common.settings_of(FLAGS, config_lib.EMBEDDED_SET)
        )
    else:
        if "seed" in given and "kanji_seed" not in given:
            # --seed names the set, as it does for train.py.
            given["kanji_seed"] = None
        config = config_lib.replace(trained, **given)
    config_lib.check(config, parts=("data",))
    return config


def _data_plan():
    """(verification sets {name: loader}, identification dict or None)."""
    from ring_loss_tf.data import eval_sets

    sets, ident = {}, None
    if FLAGS.lfw_dir:
        sets[pathlib.Path(FLAGS.pairs).stem] = (
            lambda size, channels: eval_sets.read_lfw_pairs(
                FLAGS.pairs,
                FLAGS.lfw_dir,
                image_size=size,
                channels=channels,
            )
        )
    for path in FLAGS.bin:
        name = pathlib.Path(path).stem
        sets[name] = lambda size, channels, path=path: eval_sets.read_bin(
            path, image_size=size, channels=channels
        )
    if FLAGS.gallery:
        ident = {
            "gallery": FLAGS.gallery,
            "probes": FLAGS.probes,
            "distractors": FLAGS.distractors,
        }
    if sets or ident or FLAGS.ijb_dir:
        return {k: _cached(v) for k, v in sets.items()}, ident
    from ring_loss_tf.data import kanji

    root = kanji.prepare(**_kanji_options())
    print(f"No data flag: the embedded test split at {root}")
    sets["kanji-test"] = lambda size, channels: eval_sets.read_lfw_pairs(
        root / "pairs.txt", root / "test", image_size=size, channels=channels
    )
    ident = {
        "gallery": root / "identification" / "gallery",
        "probes": root / "identification" / "probes",
        "distractors": root / "identification" / "distractors",
    }
    return {k: _cached(v) for k, v in sets.items()}, ident


def _trained_config(model):
    """The `TrainConfig` of the run that trained `model`, from its
    <model_dir>/config.json (for --model=<model_dir> or <model_dir>/export;
    any version train.py has written); None if none, or if that run trained
    on a data directory."""
    if not model:
        return None
    model = pathlib.Path(model)
    for directory in (model, model.parent):
        path = directory / config_lib.CONFIG_FILE
        if not path.is_file():
            continue
        try:
            trained = config_lib.load(directory)
        except (ValueError, TypeError) as error:
            _fail(
                f"{path} is not a config.json train.py writes ({error}); "
                "pass the data flags (--cache_dir, --num_*) instead."
            )
        if trained.data.data_dir is not None:
            return None
        return trained
    return None


# The image checks' messages: an assertion "[<text> File:] [b'<path>']", or
# "<text> File: <name> (<reason>)" from the decoder.
_CORRUPT_IMAGE = re.compile(
    r"Corrupt or truncated image file\..*?File:\]?\s*"
    r"(?:\[b?['\"]?(?P<quoted>.*?)['\"]?\]|(?P<name>.*))$"
)


def _image_error(error):
    """One line for TensorFlow's error while reading an evaluation set."""
    text = getattr(error, "message", None) or str(error)
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    line = re.sub(r"\s*\[Op:.*", "", line).strip()
    match = _CORRUPT_IMAGE.search(line)
    if match:
        name = match.group("quoted") or match.group("name")
        return (
            f"Corrupt or truncated image file: {name.strip()}. Remove or "
            "replace it: an evaluation set is read whole (there is no "
            "--skip_corrupt here)."
        )
    return f"Could not read the evaluation images: {line}"


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]} (flags are --name=value).")
    factors = _check_flags()
    # TensorFlow loads only now, without its start-up log.
    common.quiet_tensorflow()
    import tensorflow as tf

    from ring_loss_tf.data import eval_sets
    from ring_loss_tf.evaluation import protocols as protocols_lib
    from ring_loss_tf.evaluation import report as report_lib
    sets, ident = _data_plan()
    try:
        templates = _template_plan()
    except (FileNotFoundError, ValueError) as error:
        _fail(str(error))
    reports = []
    for model in [FLAGS.model] + list(FLAGS.compare):
        try:
            embedder = protocols_lib.load_embedder(
                model,
                signature=FLAGS.signature,
                output_key=FLAGS.output_key,
                input_normalization=FLAGS.input_normalization,
                batch_size=FLAGS.batch_size,
                trust_saved_model=FLAGS.trust_saved_model,
            )
        except (FileNotFoundError, ValueError) as error:
            _fail(str(error))
        try:
            report = protocols_lib.evaluate_model(
                embedder,
                verification_sets=sets,
                identification=ident,
                metric=FLAGS.metric,
                flip=FLAGS.flip,
                low_res=factors,
                low_res_side=FLAGS.low_res_side,
                max_rank=FLAGS.max_rank,
                templates=templates,
                detector_score=FLAGS.detector_score,
            )
        except (
            FileNotFoundError,
            ValueError,
            eval_sets.UnsafePickleError,
        ) as error:
            # Our readers' messages name the file, line and fix.
            _fail(str(error))
        except tf.errors.OpError as error:  # decoding, named by our checks
            _fail(_image_error(error))
        reports.append(report)
        reports[-1].model["path"] = str(model)
    print(report_lib.format_table(reports))
    command = " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])
    written = report_lib.write_outputs(
        reports,
        FLAGS.output_dir,
        plots=FLAGS.plots,
        extra={"command": command},
    )
    print("Wrote " + ", ".join(str(p) for p in written))


def install():
    """Adds this command's flags to absl's global flags (`common.install`)."""
    common.install(FLAGS)


def run(argv=None):
    """The `ring-loss-evaluate` command (and `python evaluate.py`)."""
    common.run(FLAGS, main, __doc__, argv)


if __name__ == "__main__":
    run()
