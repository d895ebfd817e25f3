"""Test-session setup shared by every test module.

The CPU is split into two logical devices before TensorFlow initialises, so
distributed tests can compare two replicas against one device (design.md §3).
This must run before anything touches a TensorFlow device, hence here.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if os.environ.get("KERAS_BACKEND", "tensorflow") == "tensorflow":
    import tensorflow as tf

    _cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
    )
