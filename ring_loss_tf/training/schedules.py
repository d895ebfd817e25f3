"""Learning-rate schedules: warm-up, then step, cosine or constant decay."""

from __future__ import annotations

import math

import keras
import tensorflow as tf

# SphereFace's solver: lr × 0.1 at 16k and 24k of 28k iterations.
STEP_BOUNDARIES = (16 / 28, 24 / 28)


@keras.saving.register_keras_serializable(package="ring_loss_tf")
class LearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """lr(t) = base · warm-up(t) · decay(t), t = optimizer step (from 0).

    warm-up(t) = min(1, (t + 1) / warmup_steps) (1 without warm-up);
    decay: "step" × 0.1 at each fraction of `total_steps` in `boundaries`
    (SphereFace: 16k and 24k of 28k), "cosine" ½(1 + cos(π · t/total_steps)),
    "constant" 1.
    """

    def __init__(
        self,
        base,
        total_steps,
        schedule="cosine",
        warmup_steps=0,
        boundaries=STEP_BOUNDARIES,
    ):
        self.base = float(base)
        self.total_steps = int(total_steps)
        self.schedule = schedule
        self.warmup_steps = int(warmup_steps)
        self.boundaries = tuple(float(b) for b in boundaries)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        total = float(max(self.total_steps, 1))
        if self.schedule == "cosine":
            progress = tf.minimum(step / total, 1.0)
            factor = 0.5 * (1.0 + tf.cos(math.pi * progress))
        elif self.schedule == "step":
            factor = tf.constant(1.0)
            for fraction in self.boundaries:
                factor *= tf.where(step >= round(fraction * total), 0.1, 1.0)
        else:
            factor = tf.constant(1.0)
        if self.warmup_steps > 0:
            factor *= tf.minimum(1.0, (step + 1.0) / self.warmup_steps)
        return self.base * factor

    def get_config(self):
        return {
            "base": self.base,
            "total_steps": self.total_steps,
            "schedule": self.schedule,
            "warmup_steps": self.warmup_steps,
            "boundaries": list(self.boundaries),
        }
