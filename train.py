"""Trains a face/identity embedding with Ring loss; resumes, exports, evaluates.

Quick start (embedded KanjiVG character set, generated on first use):

    python train.py --lambda_ring=0.01

trains the small CNN with softmax + Ring loss on 1,000 characters on the
CPU (6 epochs, 938 steps of 256), checkpoints to --model_dir, exports the
embedding model to <model_dir>/export and prints 10-fold verification
accuracy and TAR@FAR on 500 unseen characters. Rerunning the same command
resumes from the last checkpoint. The figures it prints, its time and
memory, and the command that measures them again are in the README
(Training).

Ctrl-C or SIGTERM stops after the current step with a checkpoint and prints
the command that resumes (exit status 128 + the signal number). A worker of
a multi-worker TF_CONFIG waits at most --startup_timeout seconds for the
others to start, saying whom it waits for; a signal stops that wait at once.

The paper's setting on a face folder (GPU):

    python train.py --data_dir=/data/casia --backbone=sphereface20 \\
        --head=asoftmax --lambda_ring=0.01 --batch_size=256 --steps=28000 \\
        --margin_warmup_steps=0

(--margin_warmup_steps=0: the margin from the first step, as the paper
trains; the default for A-Softmax, ArcFace and CosFace is 200 steps without
it first, README "Staged margin training".)

Each flag is the field of the same name of `ring_loss_tf.config.TrainConfig`
(its help and default are the field's); flags are checked before TensorFlow
loads, and a bad one stops with one line naming the flag and the fix.
"""

import shlex
import signal
import sys

from absl import app
from absl import flags

# The configuration module imports no TensorFlow: flags are checked first.
from ring_loss_tf import config as config_lib
from ring_loss_tf.errors import ConfigError

FLAGS = flags.FLAGS

_DEFINE = {
    "str": flags.DEFINE_string,
    "size": flags.DEFINE_string,
    "radius": flags.DEFINE_string,
    "int": flags.DEFINE_integer,
    "float": flags.DEFINE_float,
    "bool": flags.DEFINE_boolean,
}


def _define_flags():
    """One flag per setting of `TrainConfig`, with its name, default and
    help (`ring_loss_tf.config`)."""
    for name, field in config_lib.FIELDS.items():
        if field.kind == "none":
            continue
        default = field.default
        if field.kind == "size" and default is not None:
            default = ",".join(str(v) for v in default)
        elif field.kind == "radius":
            default = str(default)
        _DEFINE[field.kind](name, default, field.help)


_define_flags()


def _fail(flag, value, problem, fix):
    print(f"train.py: error: --{flag}={value}: {problem}; {fix}",
          file=sys.stderr)
    sys.exit(2)


def _config():
    """The `TrainConfig` of the flags, checked (exits on a bad flag)."""
    settings = {}
    for name, field in config_lib.FIELDS.items():
        if field.kind == "none":
            continue
        value = FLAGS[name].value
        if field.kind == "size":
            value = config_lib.parse_image_size(value)
        elif field.kind == "radius":
            value = config_lib.parse_radius(value)
        settings[name] = value
    config = config_lib.make(**settings)
    config_lib.check(config)
    return config


def main(argv):
    if len(argv) > 1:
        _fail("", " ".join(argv[1:]), "unexpected arguments",
              "pass settings as --flag=value")
    try:
        config = _config()
    except ConfigError as error:
        _fail(error.setting, error.value, error.problem, error.fix)
    # TensorFlow loads only now, without its start-up log
    # (ring_loss_tf/quiet.py).
    from ring_loss_tf import quiet

    quiet.absl_warnings_only()
    quiet.import_tensorflow()
    import tensorflow as tf

    replicas = config.run.cpu_replicas
    if replicas is not None and not tf.config.list_physical_devices("GPU"):
        cpus = tf.config.list_physical_devices("CPU")
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * replicas
        )
    from ring_loss_tf import errors
    from ring_loss_tf import export
    from ring_loss_tf import training

    try:
        training.train(
            config,
            stop_on_signals=True,
            print_fn=lambda line: print(line, flush=True),
        )
    except ConfigError as error:
        _fail(error.setting, error.value, error.problem, error.fix)
    except errors.TrainingInterrupted as error:
        # 128 + signal number, as a shell reports a process it stopped.
        signum = getattr(signal.Signals, error.reason, signal.SIGTERM)
        print(f"train.py: {error} Resume with: {_command_line()}",
              file=sys.stderr)
        sys.exit(128 + int(signum))
    except errors.StartupInterrupted as error:
        print(f"train.py: {error}", file=sys.stderr)
        sys.exit(128 + int(getattr(signal.Signals, error.reason)))
    except KeyboardInterrupt:
        print(
            "train.py: interrupted; the checkpoints already in "
            f"{FLAGS.model_dir} are intact. Resume with: {_command_line()}",
            file=sys.stderr,
        )
        sys.exit(128 + int(signal.SIGINT))
    except (errors.NonFiniteLossError, errors.CheckpointWriteError,
            errors.WorkersDisagreeError, errors.WorkerLostError) as error:
        print(f"train.py: {error}", file=sys.stderr)
        sys.exit(1)
    except (ValueError, FileNotFoundError) as error:
        # Resume/config mismatches and data errors already name the fix.
        print(f"train.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    except export.ExportError as error:
        print(f"train.py: {error}", file=sys.stderr)
        sys.exit(1)
    except OSError as error:
        # A path the run could not read or write (a symbolic link loop, a
        # directory made read-only since the flags were checked).
        where = f": {error.filename}" if error.filename else ""
        print(f"train.py: error: {error.strerror or error}{where}; fix or "
              "remove that path and rerun (the checkpoints already in "
              f"{FLAGS.model_dir} are intact).", file=sys.stderr)
        sys.exit(1)


def _command_line():
    """This run's command, quoted for a shell (to resume it)."""
    return shlex.join(["python", *sys.argv])


if __name__ == "__main__":
    app.run(main)
