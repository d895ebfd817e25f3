"""Test-session setup shared by every test module.

The CPU is split into four logical devices before TensorFlow initialises, so
distributed tests can compare two replicas against one device: on a machine
without GPUs, MirroredStrategy(["/cpu:0", "/cpu:1"]) needs those logical
devices. TensorFlow fixes its devices when it initialises them, so this must
run before anything touches a TensorFlow device, hence here.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if os.environ.get("KERAS_BACKEND", "tensorflow") == "tensorflow":
    import importlib.util
    import pathlib

    # TensorFlow's start-up lines bypass pytest's capture in pytest-xdist
    # workers; ring_loss_tf/quiet.py drops them. It is loaded from its file
    # because importing the package would import TensorFlow first.
    _package = pathlib.Path(__file__).absolute().parents[1] / "ring_loss_tf"
    _spec = importlib.util.spec_from_file_location(
        "tests_quiet", _package / "quiet.py"
    )
    _quiet = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_quiet)
    _quiet.import_tensorflow()
    import tensorflow as tf

    _cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 4
    )

import pytest  # noqa: E402

from tests.slow_set import is_slow  # noqa: E402


# Modules whose tests are independent of each other's fixtures: under
# pytest-xdist (pyproject.toml's `-n auto --dist loadgroup`) each of their
# tests may go to any worker. Every other module runs whole on one worker,
# so its module-scoped fixtures (a trained run, a SLURM cluster on fixed
# ports, a fresh virtualenv) are built once.
SPREAD = {"test_docs.py"}


# First: pytest-xdist reads the xdist_group marks in its own hook.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if is_slow(item.path.name, item.name, item.originalname):
            item.add_marker(pytest.mark.slow)
        if item.path.name not in SPREAD:
            item.add_marker(pytest.mark.xdist_group(item.path.name))
