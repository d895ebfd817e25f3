"""The layers on every Keras 3 backend: JAX and PyTorch as well as TensorFlow.

Keras fixes its backend when it is imported, so each backend runs in its own
process: tests/layers/test_layers.py and tests/layers/test_heads.py (the
same float64 NumPy references, and the release 0.1 `.keras` file) under
KERAS_BACKEND=jax and =torch, and a `.keras` file handed round the backends,
tensorflow → jax → torch → tensorflow, each loading the previous one's file
and saving its own (the session's own backend in this process). The two
layer runs start together when this module starts and run beside the
`.keras` test; their tests only wait for them.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

import keras

from tests import keras_file_worker

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OTHER_BACKENDS = ("jax", "torch")
CHAIN = ("tensorflow", "jax", "torch", "tensorflow")
TIMEOUT = 600
# Run under each other backend (tests/BUILD gives this target them as data).
LAYER_MODULES = ("tests/layers/test_layers.py", "tests/layers/test_heads.py")


def backend_env(backend):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    env["JAX_PLATFORMS"] = "cpu"  # no probing for accelerators
    env["PYTHONPATH"] = os.pathsep.join(
        [ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    )
    return env


@pytest.fixture(scope="module", autouse=True)
def layer_runs():
    """The layer and head tests under each other backend, started together.

    Autouse: both start with the module, so the `.keras` test below runs
    while they do, and the tests that check them only wait.
    """
    runs = {
        backend: subprocess.Popen(
            [sys.executable, "-m", "pytest", *LAYER_MODULES, "-q", "-n", "0",
             "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning"],
            cwd=ROOT,
            env=backend_env(backend),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for backend in OTHER_BACKENDS
    }
    yield runs
    for process in runs.values():
        if process.poll() is None:
            process.kill()
            process.wait()


def _load_npz(path):
    with np.load(path) as archive:
        return {key: archive[key] for key in archive.files}


def _worker(backend, out_dir, in_dir):
    """One hand-over: in this process if it runs `backend`, else a child."""
    if backend == keras.backend.backend():
        keras_file_worker.main(str(out_dir), in_dir and str(in_dir))
        return
    command = [sys.executable, "-m", "tests.keras_file_worker", str(out_dir)]
    if in_dir is not None:
        command.append(str(in_dir))
    result = subprocess.run(
        command, cwd=ROOT, env=backend_env(backend), capture_output=True,
        text=True, timeout=TIMEOUT, check=False,
    )
    assert result.returncode == 0, (backend, result.stderr[-5000:])


def test_keras_files_load_across_backends(tmp_path):
    """R, radius_initialized, centers and iterations survive every hand-over."""
    previous = None
    for i, backend in enumerate(CHAIN):
        out_dir = tmp_path / f"{i}-{backend}"
        out_dir.mkdir()
        _worker(backend, out_dir, previous)
        if previous is not None:
            saved = _load_npz(previous / "saved.npz")
            loaded = _load_npz(out_dir / "loaded.npz")
            where = f"saved under {CHAIN[i - 1]}, loaded under {backend}"
            if backend != "tensorflow":
                assert not loaded["imported_tensorflow"], (
                    f"importing ring_loss_tf under {backend} imported "
                    "TensorFlow"
                )
            weight_keys = sorted(k for k in saved if k.startswith("weight:"))
            assert weight_keys == sorted(
                k for k in loaded if k.startswith("weight:")
            ), where
            for key in weight_keys:
                # Exactly the saved values (JAX holds int64 as int32).
                np.testing.assert_array_equal(
                    loaded[key], saved[key], err_msg=f"{key}, {where}"
                )
            assert saved["weight:ring/radius_initialized"] == 1.0
            assert saved["weight:head/iterations"] == 2  # 2 fit steps
            assert np.any(saved["weight:center/centers"] != 0)
            # The first batch initialised R (from 1.0) before training it.
            assert abs(saved["weight:ring/radius"] - 1.0) > 1.0, where
            np.testing.assert_allclose(
                loaded["logits"], saved["logits"], rtol=1e-5, atol=1e-5,
                err_msg=where,
            )
            # A loaded model trains on: no re-initialisation of R, and
            # the A-Softmax schedule continues at t = 3.
            assert loaded["after:radius"] == saved["weight:ring/radius"]
            assert loaded["after:iterations"] == 3
            np.testing.assert_allclose(
                loaded["after:lambda"], max(5.0, 1000.0 / (1 + 0.12 * 3)),
                rtol=1e-6,
            )
        previous = out_dir


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_layer_module_passes_under_backend(backend, layer_runs):
    output, _ = layer_runs[backend].communicate(timeout=TIMEOUT)
    closing = output.strip().splitlines()[-1]
    print(f"KERAS_BACKEND={backend}: {closing}")
    assert layer_runs[backend].returncode == 0, output[-5000:]
    # Every collected test ran and passed: none failed, skipped or errored.
    assert " passed" in closing, closing
    for word in ("failed", "skipped", "error", "xfail", "deselected"):
        assert word not in closing, closing
