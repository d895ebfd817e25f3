"""The command-line programs: one module per command, all absl flags.

    ring-loss-train      (python train.py)            commands/train.py
    ring-loss-evaluate   (python evaluate.py)         commands/evaluate.py
    ring-loss-export     (python -m ring_loss_tf.export)  commands/export.py
    ring-loss-align      (python -m ring_loss_tf.data.align)   commands/align.py

Each module defines its flags on its own `flags.FlagValues` (`FLAGS`), so
that importing two commands in one process does not collide on a shared
name such as --output_dir; `run()`, the installed entry point, adds them to
absl's global flags and parses them with `absl.app`. Flags are checked
before TensorFlow loads (`ring_loss_tf.quiet`). The library itself takes a
configuration object and never imports `absl.flags`.

This package's `__init__` imports nothing, so a command's flag check costs
no TensorFlow import.
"""
