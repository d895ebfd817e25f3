"""The errors training raises, each one line a user can act on.

Imports no TensorFlow: `train.py` catches `ConfigError` before TensorFlow
loads, and `export.py` shares `first_line` with the trainer.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad setting, with its name, so `train.py` names the flag.

    `str(error)` is one line: "<setting>=<value>: <problem>; <fix>", and the
    setting is the field name of `ring_loss_tf.config.TrainConfig` (the flag
    of the same name in train.py).
    """

    def __init__(self, setting, value, problem, fix):
        self.setting = setting
        self.value = value
        self.problem = problem
        self.fix = fix
        super().__init__(f"{setting}={value!r}: {problem}; {fix}")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; training stopped before saving it."""

    def __init__(self, message, step):
        super().__init__(message)
        self.step = step


class TrainingInterrupted(Exception):
    """A stop was requested (e.g. SIGTERM); the current step was saved.

    Attributes: `reason` (e.g. "SIGTERM"), `step`, `checkpoint` (its path,
    None without a model_dir or on a non-chief worker).
    """

    def __init__(self, reason, step, checkpoint, chief=True):
        self.reason = reason
        self.step = step
        self.checkpoint = checkpoint
        if checkpoint:
            saved = f"checkpoint {checkpoint} holds it"
        elif not chief:
            saved = "the chief worker wrote its checkpoint"
        else:
            saved = "nothing was saved (no model_dir)"
        super().__init__(f"Stopped by {reason} after step {step}; {saved}.")


class TrainingDataError(ValueError):
    """A training image could not be decoded (one line, naming the file when
    TensorFlow's message does, and the fix)."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, file size limit, ...).

    The checkpoints written before it are intact.
    """


class WorkersDisagreeError(RuntimeError):
    """The workers of a multi-worker run restored different steps."""


class WorkerLostError(RuntimeError):
    """A multi-worker run lost a peer (it died, or the network failed); the
    checkpoints written before are intact."""


class WorkerMissingError(WorkerLostError):
    """A worker of a multi-worker run did not start within the start-up
    timeout (`rendezvous.wait_for_peers`); nothing was written."""


class StartupInterrupted(Exception):
    """A signal stopped a worker while it waited for the others to start;
    nothing was written. `reason`: the signal's name, e.g. "SIGTERM"."""

    def __init__(self, reason, message):
        self.reason = reason
        super().__init__(message)


def first_line(error) -> str:
    """The first line of an OSError's / tf.errors.OpError's message."""
    text = str(getattr(error, "message", None) or error).strip()
    return text.splitlines()[0] if text else type(error).__name__
