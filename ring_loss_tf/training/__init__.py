"""Training: the distributed step and the loop around it.

- `distribution`: the strategy, the XLA default, which worker is the chief.
- `trainer`: the distributed step (`Trainer`).
- `schedules`: the learning-rate schedule.
- `checkpoints`: unfinished checkpoint files, a worker's scratch directory.
- `signals`: SIGINT / SIGTERM as a request to stop after the step.
- `loop`: `train(config)`, from a configuration to a trained run
  (`TrainResult`).
"""

from ring_loss_tf.forwarding import forward

# The names of `ring_loss_tf.training` before it was a package
# (ring_loss_tf/training.py), kept for code that imports them from here;
# loaded on first use so that the package's TensorFlow-free modules import
# without TensorFlow.
__getattr__ = forward(
    "ring_loss_tf.training",
    "ring_loss_tf.training.loop",
    (
        "EXPORT_DIR",
        "NonFiniteLossError",
        "TrainingDataError",
        "TrainResult",
        "TrainingInterrupted",
        "WorkerLostError",
        "check_resume_config",
        "data_error",
        "first_line",
        "run_loop",
        "train",
        "write_histogram",
        "write_scalar",
    ),
)
