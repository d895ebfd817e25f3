"""Trains a face/identity embedding with Ring loss; resumes, exports, evaluates.

Quick start (embedded KanjiVG character set, generated on first use):

    ring-loss-train --lambda_ring=0.01      (or: python train.py ...)

trains the small CNN with softmax + Ring loss on 1,000 characters on the
CPU (6 epochs, 938 steps of 256), checkpoints to --model_dir, exports the
embedding model to <model_dir>/export and prints 10-fold verification
accuracy and TAR@FAR on 500 unseen characters. Rerunning the same command
resumes from the last checkpoint. What it prints, with the command that
measures it again, is in the docs (docs/commands.md links to it).

Ctrl-C or SIGTERM stops after the current step with a checkpoint and prints
the command that resumes (exit status 128 + the signal number). A worker of
a multi-worker TF_CONFIG waits at most --startup_timeout seconds for the
others to start, saying whom it waits for; a signal stops that wait at once.

The paper's setting on a face folder (GPU):

    ring-loss-train --data_dir=/data/casia --backbone=sphereface20 \\
        --head=asoftmax --lambda_ring=0.01 --batch_size=256 --steps=28000 \\
        --margin_warmup_steps=0

(--margin_warmup_steps=0: the margin from the first step, as the paper
trains; the default for A-Softmax, ArcFace and CosFace is 200 steps without
it first, "Staged margin training" in the docs.)

Each flag is the field of the same name of `ring_loss_tf.config.TrainConfig`
(its help and default are the field's); flags are checked before TensorFlow
loads, and a bad one stops with one line naming the flag and the fix.
"""

import shlex
import signal
import sys

# The configuration module imports no TensorFlow: flags are checked first.
from ring_loss_tf import cluster
from ring_loss_tf import config as config_lib
from ring_loss_tf.commands import common
from ring_loss_tf.errors import ConfigError

NAME = "ring-loss-train"
FLAGS = common.new_flags()
SETTINGS = tuple(
    name for name, field in config_lib.FIELDS.items() if field.kind != "none"
)
common.define_settings(FLAGS, SETTINGS)


def _fail(flag, value, problem, fix):
    common.fail(NAME, f"--{flag}={value}: {problem}; {fix}")


def _config():
    """The `TrainConfig` of the flags, checked (exits on a bad flag)."""
    config = config_lib.make(**common.settings_of(FLAGS, SETTINGS))
    config_lib.check(config)
    return config


def main(argv):
    if len(argv) > 1:
        _fail(
            "",
            " ".join(argv[1:]),
            "unexpected arguments",
            "pass settings as --flag=value",
        )
    try:
        config = _config()
    except ConfigError as error:
        _fail(error.setting, error.value, error.problem, error.fix)
    # TensorFlow loads only now, without its start-up log.
    common.quiet_tensorflow()
    import tensorflow as tf

    replicas = config.run.cpu_replicas
    if replicas is not None and not tf.config.list_physical_devices("GPU"):
        cpus = tf.config.list_physical_devices("CPU")
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * replicas
        )
    from ring_loss_tf import errors
    from ring_loss_tf import export
    from ring_loss_tf.training import loop

    prog = common.program(NAME)
    try:
        loop.train(
            config,
            stop_on_signals=True,
            print_fn=lambda line: print(line, flush=True),
        )
    except ConfigError as error:
        _fail(error.setting, error.value, error.problem, error.fix)
    except errors.TrainingInterrupted as error:
        # 128 + signal number, as a shell reports a process it stopped.
        signum = getattr(signal.Signals, error.reason, signal.SIGTERM)
        print(
            f"{prog}: {error} Resume with: {_command_line()}", file=sys.stderr
        )
        sys.exit(128 + int(signum))
    except errors.StartupInterrupted as error:
        print(f"{prog}: {error}", file=sys.stderr)
        sys.exit(128 + int(getattr(signal.Signals, error.reason)))
    except KeyboardInterrupt:
        print(
            f"{prog}: interrupted; the checkpoints already in "
            f"{FLAGS.model_dir} are intact. Resume with: {_command_line()}",
            file=sys.stderr,
        )
        sys.exit(128 + int(signal.SIGINT))
    except (
        errors.NonFiniteLossError,
        errors.CheckpointWriteError,
        errors.WorkersDisagreeError,
        errors.WorkerLostError,
    ) as error:
        print(f"{prog}: {error}", file=sys.stderr)
        sys.exit(1)
    except (ValueError, FileNotFoundError) as error:
        # Resume/config mismatches and data errors already name the fix.
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(2)
    except export.ExportError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        sys.exit(1)
    except OSError as error:
        # A path the run could not read or write (a symbolic link loop, a
        # directory made read-only since the flags were checked).
        where = f": {error.filename}" if error.filename else ""
        print(
            f"{prog}: error: {error.strerror or error}{where}; fix or "
            "remove that path and rerun (the checkpoints already in "
            f"{FLAGS.model_dir} are intact).",
            file=sys.stderr,
        )
        sys.exit(1)


def _command_line():
    """This run's command, quoted for a shell (to resume it); under an srun
    step, the srun line that starts every task again."""
    command = common.command_line(NAME)
    if FLAGS.cluster in ("auto", "slurm") and cluster.slurm_step_size():
        nodes, tasks = cluster.slurm_step_size()
        command = ["srun", f"-N{nodes}", f"-n{tasks}", *command]
    return shlex.join(command)


def install():
    """Adds this command's flags to absl's global flags (`common.install`)."""
    common.install(FLAGS)


def run(argv=None):
    """The `ring-loss-train` command (and `python train.py`)."""
    common.run(FLAGS, main, __doc__, argv)


if __name__ == "__main__":
    run()
