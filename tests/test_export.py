"""Tests of ring_loss_tf.export: the SavedModel, TFLite, ONNX, `.keras`, CLI.

Every export is compared with the Keras embedding model in this process on
the same images; the preprocessing reference is written here from its
definition ((x − 127.5) / 128, `tf.image.resize(..., antialias=True)`, the
601-2 luma), and the L2 normalisation against float64 NumPy.
"""

import io
import json
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from ring_loss_tf.models import backbones
from ring_loss_tf import config as config_lib
from ring_loss_tf.evaluation import embedder
from ring_loss_tf import export
from ring_loss_tf.data import kanji
from ring_loss_tf import layers
from ring_loss_tf.models import assembly as models_lib
from ring_loss_tf import registry
from ring_loss_tf.training import loop
from ring_loss_tf.commands import export as export_command
from tests import hidden_package
from tests.tiny_runs import batches
from tests.tiny_runs import model_fn

SIZE = (16, 12)
SAVED_MODEL_CLI = pathlib.Path(sys.executable).with_name("saved_model_cli")


def _tiny(channels=3, seed=3):
    return backbones.small_cnn(
        input_shape=(*SIZE, channels),
        embedding_dim=8,
        seed=seed,
        widths=(4, 4, 4),
    )


def _images(shape, seed):
    return np.random.default_rng(seed).integers(0, 256, shape, np.uint8)


def _reference(model, images):
    """Keras embeddings of uint8 RGB images, resized in the test."""
    x = tf.cast(images, tf.float32)
    if tuple(images.shape[1:3]) != SIZE:
        x = tf.image.resize(x, SIZE, antialias=True)
    return model((x - 127.5) / 128.0, training=False).numpy()


def _luma(images):
    """601-2 luma in float64, rounded; nudges images off rounding ties.

    A luma within 1e-3 of k + ½ rounds either way in float32, so the blue
    value of such pixels is changed (in place) until none is left.
    """
    weights = np.array([0.299, 0.587, 0.114])
    while True:
        luma = images.astype(np.float64) @ weights
        ties = np.abs(luma - np.floor(luma) - 0.5) < 1e-3
        if not ties.any():
            return np.round(luma)
        images[..., 2][ties] ^= 1


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _encode(image, fmt):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = _tiny()
    path = tmp_path_factory.mktemp("export") / "model"
    export.export_saved_model(model, path, tflite=True, onnx=True)
    return model, path


_HIDDEN_WORKER = hidden_package.PREAMBLE + textwrap.dedent("""
    import numpy as np
    import tensorflow as tf
    inputs = np.load(sys.argv[2])
    loaded = tf.saved_model.load(sys.argv[1])
    images = loaded.signatures["serving_default"]
    encoded = loaded.signatures["serve_image_bytes"]
    out = {}
    for key in ("at_size", "other_size"):
        result = images(images=tf.constant(inputs[key]))
        for name, value in result.items():
            out[f"{key}/{name}"] = value.numpy()
    files = [open(name, "rb").read() for name in sys.argv[4:]]
    result = encoded(image_bytes=tf.constant(files))
    for name, value in result.items():
        out[f"bytes/{name}"] = value.numpy()
    np.savez(sys.argv[3], **out)
    """)


def test_saved_model_serves_without_the_package(exported, tmp_path):
    model, path = exported
    at_size = _images((2, *SIZE, 3), 0)
    other_size = _images((3, 23, 17, 3), 1)
    jpeg_image = _images((20, 15, 3), 2)
    files = [_encode(at_size[0], "PNG"), _encode(jpeg_image, "JPEG")]
    file_names = [str(tmp_path / "a.png"), str(tmp_path / "b.jpg")]
    for name, contents in zip(file_names, files):
        pathlib.Path(name).write_bytes(contents)
    np.savez(tmp_path / "in.npz", at_size=at_size, other_size=other_size)
    env = hidden_package.env(tmp_path)
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _HIDDEN_WORKER,
            str(path),
            str(tmp_path / "in.npz"),
            str(tmp_path / "out.npz"),
            *file_names,
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    cli = subprocess.run(
        [str(SAVED_MODEL_CLI), "show", "--dir", str(path), "--all"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    _, stderr = worker.communicate()
    assert worker.returncode == 0, stderr[-3000:]
    out = np.load(tmp_path / "out.npz")

    # The JPEG reference decodes as the graph documents it (accurate IDCT).
    decoded = tf.io.decode_jpeg(
        files[1], channels=3, dct_method="INTEGER_ACCURATE"
    ).numpy()
    expected = {
        "at_size": _reference(model, at_size),
        "other_size": _reference(model, other_size),
        "bytes": np.concatenate(
            [_reference(model, at_size[:1]), _reference(model, decoded[None])]
        ),
    }
    for key, embedding in expected.items():
        np.testing.assert_allclose(
            out[f"{key}/embedding"],
            embedding,
            rtol=0,
            atol=1e-5,
            err_msg=key,
        )
        np.testing.assert_allclose(
            out[f"{key}/normalized_embedding"],
            _unit(embedding),
            rtol=0,
            atol=1e-6,
            err_msg=key,
        )
    # A PNG at the input size is exactly the uint8 batch.
    np.testing.assert_array_equal(
        out["bytes/embedding"][0], out["at_size/embedding"][0]
    )

    assert cli.returncode == 0, cli.stderr[-3000:]
    text = cli.stdout
    for signature in ("serving_default", "serve_image_bytes"):
        assert f"signature_def['{signature}']:" in text, text
    serving = text.split("signature_def['serving_default']:")[1]
    serving = serving.split("signature_def[")[0]
    assert "inputs['images'] tensor_info:" in serving
    assert "dtype: DT_UINT8" in serving
    assert "shape: (-1, -1, -1, 3)" in serving
    for output in ("embedding", "normalized_embedding"):
        assert f"outputs['{output}'] tensor_info:" in serving
    encoded = text.split("signature_def['serve_image_bytes']:")[1]
    assert "inputs['image_bytes'] tensor_info:" in encoded
    assert "dtype: DT_STRING" in encoded.split("outputs[")[0]


@pytest.mark.parametrize("shape", [(2, *SIZE, 3), (3, 9, 31, 3)])
def test_tflite_matches_keras(exported, shape):
    model, path = exported
    images = _images(shape, 4)
    interpreter = tf.lite.Interpreter(model_path=str(path / "model.tflite"))
    result = interpreter.get_signature_runner("serving_default")(images=images)
    embedding = _reference(model, images)
    np.testing.assert_allclose(result["embedding"], embedding, atol=1e-4)
    np.testing.assert_allclose(
        result["normalized_embedding"], _unit(embedding), atol=1e-4
    )


def test_onnx_matches_keras_with_dynamic_batch(exported):
    import onnxruntime

    model, path = exported
    session = onnxruntime.InferenceSession(
        str(path / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    batch, height, width, channels = session.get_inputs()[0].shape
    assert not isinstance(batch, int) and channels == 3
    names = [o.name for o in session.get_outputs()]
    for shape in [(1, *SIZE, 3), (5, *SIZE, 3), (2, 21, 14, 3)]:
        images = _images(shape, 5)
        result = dict(zip(names, session.run(None, {"images": images})))
        embedding = _reference(model, images)
        np.testing.assert_allclose(result["embedding"], embedding, atol=1e-4)
        np.testing.assert_allclose(
            result["normalized_embedding"], _unit(embedding), atol=1e-4
        )


def test_grey_backbone_takes_rgb_and_uses_the_601_luma(tmp_path):
    model = _tiny(channels=1)
    path = export.export_saved_model(model, tmp_path / "grey")
    images = _images((2, *SIZE, 3), 6)
    luma = _luma(images)
    expected = model((luma[..., None].astype(np.float32) - 127.5) / 128.0)
    loaded = tf.saved_model.load(str(path))
    got = loaded.signatures["serving_default"](images=tf.constant(images))
    np.testing.assert_allclose(got["embedding"], expected, atol=1e-5)
    # The backbone-only signature keeps the training engineer's contract.
    x = (images[..., :1].astype(np.float32) - 127.5) / 128.0
    np.testing.assert_allclose(loaded.serve(x), model(x), atol=1e-5)


def test_l2_normalize_keeps_tiny_norms_and_maps_zero_to_zero():
    # ‖x‖ = 5e-10: tf.math.l2_normalize's Σx² ≥ 1e-12 clamp would give 5e-4.
    x = np.array([[3e-10, 4e-10], [0.0, 0.0], [1.0, -2.0]], np.float32)
    got = export.l2_normalize(tf.constant(x)).numpy()
    np.testing.assert_allclose(got[0], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(got[1], [0.0, 0.0])
    np.testing.assert_allclose(got[2], _unit(x[2:])[0], rtol=1e-6)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A training dir after 300 steps on a tiny embedded set (~12 s).

    Trained, not fresh: its embeddings have norms near 8 and it is the kind
    of model whose TFLite embedding differs by a grey level's worth where a
    check pixel's luma rounds the other way (issue 15).
    """
    root = tmp_path_factory.mktemp("trained")
    config = config_lib.make(
        model_dir=str(root / "run"),
        cache_dir=str(root / "cache"),
        num_train_identities=20,
        num_test_identities=8,
        train_samples_per_identity=8,
        test_samples_per_identity=4,
        batch_size=32,
        steps=300,
        warmup_steps=20,
        evaluate=False,
        export=False,
    )
    # Generated here in one process, so training finds it cached.
    kanji.prepare(num_workers=1, progress=False,
                  **config_lib.kanji_options(config))
    loop.train(config, print_fn=lambda line: None)
    return root / "run"


def _relative_and_cosine(got, expected):
    """The reference of the parity check: per row, in float64."""
    got = np.asarray(got, np.float64)
    expected = np.asarray(expected, np.float64)
    norms = np.linalg.norm(expected, axis=1)
    relative = np.linalg.norm(got - expected, axis=1) / norms
    cosine = np.sum(got * expected, axis=1) / (
        np.linalg.norm(got, axis=1) * norms
    )
    return relative, cosine


def test_cli_exports_a_trained_model_to_tflite_and_onnx(
    trained, tmp_path, capsys
):
    output = tmp_path / "exported"
    status = export_command.call(
        [f"--model_dir={trained}", f"--output={output}", "--tflite", "--onnx"]
    )
    assert status == 0, capsys.readouterr().err
    models = models_lib.load_training_models(trained)
    images, expected = export._check_images(models.embedding_model)
    interpreter = tf.lite.Interpreter(model_path=str(output / "model.tflite"))
    lite = interpreter.get_signature_runner("serving_default")(images=images)
    relative, cosine = _relative_and_cosine(lite["embedding"], expected)
    assert np.all(relative <= 1e-2) and np.all(cosine >= 0.9999)
    assert np.all(np.linalg.norm(expected, axis=1) > 1)  # trained, not zero


def _corrupt(expected, how):
    if how == "rows permuted":
        return expected[[1, 2, 0]]
    if how == "dimensions permuted":
        return expected[:, np.random.default_rng(0).permutation(128)]
    if how == "scaled by 1.1":
        return expected * 1.1
    if how == "scaled by 0.5":
        return expected * 0.5
    if how == "one component off":
        got = expected.copy()
        got[1, 5] += 0.1 * np.linalg.norm(expected[1])
        return got
    if how == "NaN":
        got = expected.copy()
        got[2, 0] = np.nan
        return got
    raise ValueError(how)


@pytest.mark.parametrize(
    "how",
    [
        "rows permuted",
        "dimensions permuted",
        "scaled by 1.1",
        "scaled by 0.5",
        "one component off",
        "NaN",
    ],
)
def test_parity_check_refuses_a_wrong_conversion(trained, how):
    models = models_lib.load_training_models(trained)
    _, expected = export._check_images(models.embedding_model)
    got = _corrupt(expected, how).astype(np.float32)
    relative, cosine = _relative_and_cosine(got, expected)
    with np.errstate(invalid="ignore"):
        badness = np.fmax(relative / 1e-2, (1 - cosine) / (1 - 0.9999))
    worst = int(np.nanargmax(badness)) if how != "NaN" else 2
    with pytest.raises(export.ExportError) as info:
        export._compare("TFLite", got, expected)
    message = str(info.value)
    assert "\n" not in message
    assert re.fullmatch(
        rf"TFLite: the converted model's embedding of check image "
        rf"{worst + 1} of 3 differs from the Keras model's by "
        rf"{re.escape(f'{relative[worst]:.3g}')} of its norm, cosine "
        rf"{re.escape(f'{cosine[worst]:.6f}')} \(allowed: at most 0\.01, "
        r"cosine at least 0\.9999\); the export was not written\. Please "
        r"report it with your TensorFlow and converter versions\.",
        message,
    ), message


def test_parity_check_accepts_float_noise_and_refuses_a_wrong_shape(trained):
    models = models_lib.load_training_models(trained)
    _, expected = export._check_images(models.embedding_model)
    noise = np.random.default_rng(1).normal(size=expected.shape)
    # 1e-3 of each norm: well inside the tolerance, 10× the one-pixel effect.
    got = expected + 1e-3 / np.sqrt(128) * noise * np.linalg.norm(
        expected, axis=1, keepdims=True
    )
    export._compare("ONNX", got.astype(np.float32), expected)
    with pytest.raises(
        export.ExportError,
        match=r"^ONNX: the converted model's embeddings have shape \(3, 64\), "
        r"the Keras model's \(3, 128\); the export was not written\.",
    ):
        export._compare("ONNX", expected[:, :64], expected)


def test_parity_check_with_zero_embeddings():
    expected = np.array([[3.0, 4.0], [0.0, 0.0], [0.0, 0.0]], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division by zero
        # A zero row is judged against the batch's largest norm (5).
        export._compare(
            "TFLite", expected + [[0, 0], [0, 0], [1e-9, 0]], expected
        )
        with pytest.raises(
            export.ExportError,
            match=r"check image 3 of 3 differs from the Keras model's by "
            r"2e\+05 of its norm, cosine 0\.000000",
        ):
            export._compare("TFLite", expected + [[0, 0], [0, 0], [1, 0]],
                            expected)
        # All zero (a dead model): only zeros match it.
        zeros = np.zeros((3, 2), np.float32)
        export._compare("ONNX", zeros, zeros)
        with pytest.raises(export.ExportError, match=r"cosine 0\.000000"):
            export._compare("ONNX", zeros + [1e-3, 0], zeros)


def test_a_model_of_zero_embeddings_exports(tmp_path):
    model = _tiny()
    for variable in model.variables:
        variable.assign(tf.zeros_like(variable))
    path = export.export_saved_model(model, tmp_path / "zero", tflite=True)
    interpreter = tf.lite.Interpreter(model_path=str(path / "model.tflite"))
    images = np.zeros((2, *SIZE, 3), np.uint8)  # a blank image too
    lite = interpreter.get_signature_runner("serving_default")(images=images)
    np.testing.assert_array_equal(lite["embedding"], 0.0)
    np.testing.assert_array_equal(lite["normalized_embedding"], 0.0)


def test_export_refuses_a_wrong_tflite_conversion_end_to_end(
    trained, tmp_path, monkeypatch, capsys
):
    real_run_tflite = export._run_tflite

    def permuted(path, images):
        return real_run_tflite(path, images)[:, ::-1]

    monkeypatch.setattr(export, "_run_tflite", permuted)
    output = tmp_path / "exported"
    status = export_command.call(
        [f"--model_dir={trained}", f"--output={output}", "--tflite"]
    )
    assert status == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert re.fullmatch(
        r"ring-loss-export: error: TFLite: the converted model's embedding "
        r"of check image \d "
        r"of 3 differs from the Keras model's by [\d.]+ of its norm, cosine "
        r"-?[\d.]+ \(allowed: at most 0\.01, cosine at least 0\.9999\); the "
        r"export was not written\. .*",
        lines[0],
    ), lines[0]
    assert list(tmp_path.iterdir()) == []  # no export, no staging left


def _save_fingerprint(path):
    return {
        p.relative_to(path): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def old_export(tmp_path_factory):
    model = _tiny(seed=1)
    path = tmp_path_factory.mktemp("old") / "model"
    export.export_saved_model(model, path)
    return model, path


@pytest.mark.parametrize("stage", ["save", "tflite"])
def test_failed_export_keeps_the_previous_one(
    tmp_path, monkeypatch, stage, old_export
):
    old_model, old_path = old_export
    target = tmp_path / "model"
    shutil.copytree(old_path, target)
    before = _save_fingerprint(target)

    def fail(*args, **kwargs):
        if stage == "save":  # half a SavedModel, then the crash
            (pathlib.Path(args[1]) / "variables").mkdir(parents=True)
            (pathlib.Path(args[1]) / "saved_model.pb").write_bytes(b"\0")
        raise OSError("disk full (simulated)")

    if stage == "save":
        monkeypatch.setattr(tf.saved_model, "save", fail)
    else:
        monkeypatch.setattr(export, "_convert_tflite", fail)
    with pytest.raises(
        export.ExportError,
        match=r"^Could not write the export to .*model \(disk full "
        r"\(simulated\)\); the previous export there is intact\. Free disk",
    ):
        export.export_saved_model(
            _tiny(seed=2), target, overwrite=True, tflite=True
        )
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert _save_fingerprint(target) == before
    images = _images((2, *SIZE, 3), 7)
    loaded = tf.saved_model.load(str(target))
    got = loaded.signatures["serving_default"](images=tf.constant(images))
    np.testing.assert_allclose(
        got["embedding"], _reference(old_model, images), atol=1e-5
    )


def test_existing_directory_needs_overwrite_and_must_be_an_export(tmp_path):
    model = _tiny()
    target = tmp_path / "model"
    target.mkdir()
    with pytest.raises(
        FileExistsError, match="already exists; pass " "overwrite=True"
    ):
        export.export_saved_model(model, target)
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not an export .* refusing"):
        export.export_saved_model(model, target, overwrite=True)
    assert (target / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_rejects_a_model_without_a_fixed_image_input(tmp_path):
    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs))
    with pytest.raises(
        ValueError,
        match="of a fixed size. Received input "
        r"shape: \(None, None, None, 3\)",
    ):
        export.export_saved_model(model, tmp_path / "model")
    assert not list(tmp_path.iterdir())


def _training_dir(tmp_path):
    """A model_dir as train() leaves it: config.json and a checkpoint."""
    # The other settings at their defaults, resolved as train() saves them.
    model_dir = tmp_path / "run"
    config = config_lib.resolve(
        config_lib.make(
            model_dir=str(model_dir),
            backbone="small_cnn",
            head="asoftmax",
            lambda_ring=0.01,
            ring_radius=2.5,
            image_size=SIZE,
            channels=1,
            embedding_dim=8,
            seed=0,
        ),
        num_classes=5,
    )
    loop.check_resume_config(config)
    models = models_lib.build_models(config)
    # Weights unlike a fresh build from the same seed, so a missing restore
    # shows.
    rng = np.random.default_rng(8)
    for variable in models.train_model.variables:
        if variable.dtype == "float32":
            factor = rng.uniform(0.7, 1.3, variable.shape)
            variable.assign(variable * factor.astype(np.float32))
    checkpoint = tf.train.Checkpoint(model=models.train_model)
    tf.train.CheckpointManager(checkpoint, str(model_dir), 3).save(7)
    return model_dir, models


def test_cli_exports_a_training_dir_and_the_keras_round_trip(tmp_path, capsys):
    model_dir, models = _training_dir(tmp_path)
    output = tmp_path / "exported"
    status = export_command.call(
        [
            f"--model_dir={model_dir}",
            f"--output={output}",
            "--keras",
            "--tflite",
        ]
    )
    assert status == 0
    assert f"Exported {model_dir} to {output}" in capsys.readouterr().out
    images = _images((3, *SIZE, 3), 9)
    luma = _luma(images)
    x = (luma[..., None].astype(np.float32) - 127.5) / 128.0
    expected = models.embedding_model(x).numpy()
    loaded = tf.saved_model.load(str(output))
    got = loaded.signatures["serving_default"](images=tf.constant(images))
    np.testing.assert_allclose(got["embedding"], expected, atol=1e-5)
    interpreter = tf.lite.Interpreter(model_path=str(output / "model.tflite"))
    lite = interpreter.get_signature_runner("serving_default")(images=images)
    np.testing.assert_allclose(lite["embedding"], expected, atol=1e-4)

    # The full training model, heads included, for fine-tuning.
    restored = keras.saving.load_model(output / "training_model.keras")
    labels = np.array([0, 3, 4], np.int32)
    for want, have in zip(
        models.train_model([x, labels], training=False),
        restored([x, labels], training=False),
    ):
        np.testing.assert_allclose(have, want, atol=1e-6)
    want = {v.path: v.numpy() for v in models.train_model.variables}
    have = {v.path: v.numpy() for v in restored.variables}
    assert want.keys() == have.keys()
    for key in want:
        np.testing.assert_array_equal(have[key], want[key], err_msg=key)


def test_cli_errors_are_one_line_with_the_fix(tmp_path, capsys, monkeypatch):
    def error(argv):
        with pytest.raises(SystemExit) as info:
            export_command.call(argv)
        assert info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        return lines[-1]

    missing = tmp_path / "nothing"
    assert f"{missing / 'config.json'} not found: --model_dir must be" in (
        error([f"--model_dir={missing}", f"--output={tmp_path / 'o'}"])
    )
    (tmp_path / "o").mkdir()
    assert "already exists; add --overwrite to replace it" in error(
        [f"--model_dir={missing}", f"--output={tmp_path / 'o'}"]
    )
    real_find_spec = export.importlib.util.find_spec
    monkeypatch.setattr(
        export.importlib.util,
        "find_spec",
        lambda name: None if name == "tf2onnx" else real_find_spec(name),
    )
    line = error(
        [f"--model_dir={missing}", f"--output={tmp_path / 'p'}", "--onnx"]
    )
    assert "ONNX export needs tf2onnx: pip install 'ring_loss_tf[onnx]'" in line
    assert not (tmp_path / "p").exists()


def test_export_refuses_existing_dir_and_round_trips(tmp_path):
    built = model_fn()()
    target = tmp_path / "exported"
    target.mkdir()
    with pytest.raises(FileExistsError, match="already exists; pass "
                       "overwrite=True"):
        export.export_saved_model(built.embedding_model, target)
    assert export.export_saved_model(
        built.embedding_model, target, overwrite=True
    ) == target
    assert [p.name for p in tmp_path.iterdir()] == ["exported"]
    loaded = tf.saved_model.load(str(target))
    images = batches(1)[0][0]
    np.testing.assert_allclose(
        loaded.serve(images).numpy(),
        built.embedding_model(images).numpy(),
        atol=1e-5,
    )


# --------------------------------------------------------------------------
# Our exports pass the check evaluate.py makes before loading a SavedModel
# (no file, network or Python-callback operation in any function).


@pytest.mark.parametrize("name", list(registry.BACKBONES))
def test_every_backbone_export_passes_the_saved_model_check(tmp_path, name):
    model = registry.load(registry.BACKBONES[name])(
        input_shape=(24, 20, 3), embedding_dim=16, seed=0
    )
    images = np.random.default_rng(0).integers(0, 256, (4, 24, 20, 3))
    x = (images.astype(np.float32) - 127.5) / 128.0
    # Moving statistics of these images, as after training: a new
    # iResNet-100's inference-mode embeddings overflow to NaN.
    norms = [l for l in model.layers if isinstance(l, layers.BatchNorm)]
    for layer in norms:
        layer.momentum = 0.0
    model(x, training=True)
    path = export.export_saved_model(model, tmp_path / name)
    embedder.check_saved_model(path)
    # It holds the decoding and the saver, so the check had work to do.
    ops = {op for op, _ in embedder.saved_model_ops(path)}
    assert "ReadVariableOp" in ops, sorted(ops)
    assert any(op.startswith("Decode") for op in ops), sorted(ops)
    loaded = embedder.load_embedder(path)
    np.testing.assert_allclose(loaded(images.astype(np.uint8)),
                               model(x, training=False), rtol=1e-4, atol=1e-4)


def test_a_trained_runs_export_passes_the_saved_model_check(
    trained, tmp_path, capsys
):
    output = tmp_path / "exported"
    assert export_command.call(
        [f"--model_dir={trained}", f"--output={output}"]
    ) == 0
    embedder.check_saved_model(output)
    embedder.load_embedder(output)


def test_export_with_config_json_of_another_head_is_one_line(
    tmp_path, capsys
):
    model_dir, _ = _training_dir(tmp_path)
    config_path = model_dir / "config.json"
    saved = json.loads(config_path.read_text())
    saved["model"]["head"] = "cosface"
    saved["model"]["embedding_block"] = "bn"
    config_path.write_text(json.dumps(saved))
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    with pytest.raises(SystemExit) as info:
        export_command.call([f"--model_dir={model_dir}",
                             f"--output={tmp_path / 'out'}"])
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert re.fullmatch(
        r".*error: Checkpoint .*/run/ckpt-7 does not fit the model these "
        r"settings build \(another backbone, head, embedding size or class "
        r"count\); the checkpoints in .*/run are unchanged\. Restore the "
        r"config\.json "
        r"of the run that wrote it in .*/run\.", lines[-1]
    ), lines
    # One line, named by the command.
    assert lines[-1].startswith("ring-loss-export: error: "), lines
    assert not any("Traceback" in line for line in lines), lines
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before
    assert not (tmp_path / "out").exists()
