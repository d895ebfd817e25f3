"""Tests of ring_loss_tf.evaluation and evaluate.py, end to end.

A tiny Keras model (with a layer class defined only in this file) is trained
for a few steps on tiny synthetic images and exported; every figure is
checked against an independent path: the Keras model called directly on
images normalised here, scikit-learn's AUC, brute-force ranks. evaluate.py
runs in a subprocess, where this file's layer class cannot be imported, so
loading there proves the SavedModel needs no model code.
"""

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from sklearn.metrics import roc_auc_score

from ring_loss_tf import eval_data
from ring_loss_tf import evaluation
from ring_loss_tf import images
from ring_loss_tf import metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZE = 16
NUM_IDS = 10
PER_ID = 4


class Scale(keras.layers.Layer):
    """A custom layer known only to this test module."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(), initializer="ones")

    def call(self, x):
        return x * self.scale


def _name(k):
    return f"id{k:02d}"


def _write(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image[..., 0]).save(path)


def _pairs_lines():
    """2 folds x (3 genuine, 3 impostor); (line, issame, fold, a, b)."""
    rows = []
    for fold in range(2):
        for j in range(3):
            k = 5 * fold + j
            rows.append(
                (
                    f"{_name(k)}\t1\t{2 + j % 3}",
                    True,
                    fold,
                    (k, 1),
                    (k, 2 + j % 3),
                )
            )
        for j in range(3):
            k1, k2 = 5 * fold + j, 5 * fold + j + 2
            rows.append(
                (
                    f"{_name(k1)} {1 + j} {_name(k2)} {2 + j}",
                    False,
                    fold,
                    (k1, 1 + j),
                    (k2, 2 + j),
                )
            )
    return rows


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    bases = rng.integers(0, 256, size=(NUM_IDS, SIZE, SIZE, 1))
    images = {}
    for k in range(NUM_IDS):
        for n in range(1, PER_ID + 1):
            noise = rng.normal(0, 60, size=(SIZE, SIZE, 1))
            image = np.clip(bases[k] + noise, 0, 255).astype(np.uint8)
            images[(k, n)] = image
            name = f"{_name(k)}_{n:04d}.png"
            _write(root / "lfw" / _name(k) / name, image)
            if k < 6:
                part = "gallery" if n == 1 else "probes"
            else:
                part = "distractors"
            _write(root / part / _name(k) / name, image)
    rows = _pairs_lines()
    (root / "pairs.txt").write_text(
        "2 3\n" + "\n".join(r[0] for r in rows) + "\n"
    )

    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 1))
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(8)(x)
    embedding = Scale()(x)
    model = keras.Model(inputs, embedding)
    classifier = keras.Sequential([model, keras.layers.Dense(NUM_IDS)])
    classifier.compile(
        "adam",
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    keys = sorted(images)
    train_x = (np.stack([images[k] for k in keys]) - 127.5) / 128
    train_y = np.array([k for k, _ in keys])
    classifier.fit(train_x, train_y, epochs=3, batch_size=40, verbose=0)

    model_dir = root / "run"
    model.export(str(model_dir / "export"), verbose=False)

    class Uint8Serving(tf.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        @tf.function(
            input_signature=[tf.TensorSpec([None, SIZE, SIZE, 3], tf.uint8)]
        )
        def serve(self, images):
            x = (tf.cast(images[..., :1], tf.float32) - 127.5) / 128.0
            e = self.model(x)
            return {
                "embedding": e,
                "normalized_embedding": tf.math.l2_normalize(e, axis=1),
            }

    module = Uint8Serving(model)
    tf.saved_model.save(
        module,
        str(root / "uint8_model"),
        signatures={"serving_default": module.serve},
    )

    def reference(batch):
        x = (np.asarray(batch, np.float32) - 127.5) / 128.0
        return np.asarray(model(x, training=False), np.float64)

    return dict(
        root=root, images=images, rows=rows, model=model, reference=reference
    )


def _embedder(world, which="float", **kwargs):
    path = world["root"] / ("run" if which == "float" else "uint8_model")
    return evaluation.load_embedder(path, **kwargs)


def test_resolves_model_dir_and_reads_the_signature(world):
    e = _embedder(world)
    assert e.name == "run"  # named after the model_dir, not "export"
    assert e.describe()["image_size"] == [SIZE, SIZE]
    assert e.channels == 1 and e.input_dtype == tf.float32
    batch = np.stack(list(world["images"].values())[:9])
    np.testing.assert_allclose(
        e(batch), world["reference"](batch), rtol=1e-5, atol=1e-5
    )


def test_uint8_signature_gets_pixels_and_channels_adapted(world):
    e = _embedder(world, "uint8", batch_size=4)
    assert e.input_dtype == tf.uint8 and e.channels == 3
    assert e.output_key == "embedding"  # chosen among two outputs
    batch = np.stack(list(world["images"].values())[:9])  # grey, 1 channel
    np.testing.assert_allclose(
        e(batch), world["reference"](batch), rtol=1e-5, atol=1e-5
    )
    other = _embedder(world, "uint8", output_key="normalized_embedding")
    got = other(batch)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, rtol=1e-5)


def test_colour_images_become_pillow_grey_and_sizes_are_adapted(world):
    e = _embedder(world)
    rgb = np.random.default_rng(1).integers(0, 256, (5, SIZE, SIZE, 3))
    rgb = rgb.astype(np.uint8)
    grey = np.stack([np.asarray(Image.fromarray(x).convert("L")) for x in rgb])
    adapted = e.adapt(rgb) * 128 + 127.5
    # Pillow rounds in fixed point: at most one grey level apart.
    assert np.max(np.abs(adapted[..., 0] - grey)) <= 1
    # Other sizes are resized as the training pipeline resizes.
    big = np.random.default_rng(2).integers(0, 256, (3, 24, 20, 1))
    big = big.astype(np.uint8)
    want = np.stack([images.resize_image(x, (SIZE, SIZE)) for x in big])
    np.testing.assert_allclose(e.adapt(big) * 128 + 127.5, want)


def test_flip_sums_image_and_mirror(world):
    e = _embedder(world)
    batch = np.stack(list(world["images"].values())[:7])
    want = world["reference"](batch) + world["reference"](batch[:, :, ::-1])
    np.testing.assert_allclose(e(batch, flip=True), want, rtol=1e-5, atol=1e-5)


def _reference_pair_embeddings(world, flip=False):
    ref = world["reference"]
    a = np.stack([world["images"][r[3]] for r in world["rows"]])
    b = np.stack([world["images"][r[4]] for r in world["rows"]])
    ea, eb = ref(a), ref(b)
    if flip:
        ea, eb = ea + ref(a[:, :, ::-1]), eb + ref(b[:, :, ::-1])
    return ea, eb


@pytest.mark.parametrize("metric,flip", [("cosine", False), ("l2", True)])
def test_verification_end_to_end(world, metric, flip):
    root = world["root"]
    pairs = eval_data.read_lfw_pairs(root / "pairs.txt", root / "lfw")
    out = evaluation.evaluate_verification(
        _embedder(world), pairs, metric=metric, flip=flip
    )
    ea, eb = _reference_pair_embeddings(world, flip)
    if metric == "cosine":
        scores = (
            np.sum(ea * eb, 1)
            / np.linalg.norm(ea, axis=1)
            / (np.linalg.norm(eb, axis=1))
        )
    else:
        scores = -np.sum((ea - eb) ** 2, axis=1)
    issame = np.array([r[1] for r in world["rows"]])
    fold = np.array([r[2] for r in world["rows"]])
    r = out["result"]
    want = metrics.verify(scores, issame, fold=fold)
    np.testing.assert_allclose(r.fold_accuracies, want.fold_accuracies)
    assert r.auc == pytest.approx(roc_auc_score(issame, scores))
    assert 0.5 < r.auc  # the tiny trained model has learned something
    assert r.num_genuine == 6 and r.num_impostor == 6
    assert r.tar_at_far[0.1] is None  # 6 impostors cannot resolve 10%
    assert out["norms"]["count"] == len(pairs.images)


def test_downsample_is_block_mean_then_bilinear():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(3, 8, 12, 1)).astype(np.uint8)
    low = evaluation.downsample(images, 4)
    blocks = images.reshape(3, 2, 4, 3, 4, 1).astype(np.float64)
    mean = blocks.mean(axis=(2, 4))
    up = tf.image.resize(mean, (8, 12), method="bilinear").numpy()
    np.testing.assert_allclose(low, np.clip(np.round(up), 0, 255), atol=1)
    np.testing.assert_array_equal(evaluation.downsample(images, 1), images)
    with pytest.raises(ValueError, match="factor must be ≥ 1"):
        evaluation.downsample(images, 0.5)


def test_low_resolution_probe_side(world):
    root = world["root"]
    pairs = eval_data.read_lfw_pairs(root / "pairs.txt", root / "lfw")
    out = evaluation.evaluate_verification(
        _embedder(world), pairs, low_res=(2,)
    )
    low = out["low_res"][2]
    ref = world["reference"]
    full = ref(pairs.images)
    small = ref(evaluation.downsample(pairs.images, 2))
    scores = metrics.pair_scores(full[pairs.left], small[pairs.right])
    want = metrics.verify(scores, pairs.issame, fold=pairs.fold)
    np.testing.assert_allclose(
        low["result"].fold_accuracies, want.fold_accuracies
    )
    assert low["result"].auc == pytest.approx(want.auc)
    ratio = np.linalg.norm(small, axis=1) / np.linalg.norm(full, axis=1)
    assert low["norm_ratio"] == pytest.approx(np.mean(ratio), rel=1e-5)


def _brute_ranks(p, pl, g, gl, d):
    cand = np.concatenate([g, d])
    labels = np.r_[gl, np.full(len(d), "")]
    cand = cand / np.linalg.norm(cand, axis=1, keepdims=True)
    ranks = []
    for x, lab in zip(p, pl):
        s = cand @ (x / np.linalg.norm(x))
        ranks.append(1 + np.sum(s[labels != lab] >= s[labels == lab].max()))
    return np.array(ranks)


def test_identification_end_to_end(world, tmp_path):
    root, images, ref = world["root"], world["images"], world["reference"]
    out = evaluation.evaluate_identification(
        _embedder(world),
        root / "gallery",
        root / "probes",
        root / "distractors",
        max_rank=10,
    )
    g_keys = [(k, 1) for k in range(6)]
    p_keys = [(k, n) for k in range(6) for n in range(2, PER_ID + 1)]
    d_keys = [(k, n) for k in range(6, NUM_IDS) for n in range(1, PER_ID + 1)]
    g, p, d = (
        ref(np.stack([images[k] for k in keys]))
        for keys in (g_keys, p_keys, d_keys)
    )
    want = _brute_ranks(
        p, [_name(k) for k, _ in p_keys], g, [_name(k) for k, _ in g_keys], d
    )
    r = out["result"]
    np.testing.assert_array_equal(r.ranks, want)
    assert r.num_gallery == 6 and r.num_distractors == 16
    assert r.rank1 == np.mean(want == 1)
    # Precomputed distractor embeddings (.npy) give the same ranks.
    np.save(tmp_path / "d.npy", d.astype(np.float32))
    again = evaluation.evaluate_identification(
        _embedder(world),
        root / "gallery",
        root / "probes",
        tmp_path / "d.npy",
    )
    np.testing.assert_array_equal(again["result"].ranks, want)
    np.save(tmp_path / "bad.npy", np.zeros((4, 5), np.float32))
    with pytest.raises(ValueError, match=r"bad.npy.*\(n, 8\)"):
        evaluation.evaluate_identification(
            _embedder(world),
            root / "gallery",
            root / "probes",
            tmp_path / "bad.npy",
        )


def test_model_errors(world, tmp_path):
    with pytest.raises(FileNotFoundError, match="Model not found"):
        evaluation.resolve_model_path(tmp_path / "nothing")
    (tmp_path / "train_dir").mkdir()
    (tmp_path / "train_dir" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="without an exported model"):
        evaluation.resolve_model_path(tmp_path / "train_dir")
    with pytest.raises(FileNotFoundError, match="neither a SavedModel"):
        evaluation.resolve_model_path(tmp_path)
    with pytest.raises(ValueError, match="no output 'logits'"):
        _embedder(world, "uint8", output_key="logits")
    with pytest.raises(ValueError, match="no signature 'predict'"):
        _embedder(world, signature="predict")
    a, b = keras.Input((4, 4, 1)), keras.Input((4, 4, 1))
    two = keras.Model([a, b], keras.layers.Add()([a, b]))
    with pytest.raises(ValueError, match="2 inputs"):
        evaluation.Embedder(two)
    with pytest.raises(ValueError, match="input_normalization"):
        evaluation.Embedder(world["model"], input_normalization="imagenet")


def _run(args, cwd, timeout=240):
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, str(REPO / "evaluate.py")] + args,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_evaluate_py_end_to_end_with_compare(world, tmp_path):
    root = world["root"]
    out_dir = tmp_path / "out"
    proc = _run(
        [
            f"--model={root / 'run'}",
            f"--compare={root / 'uint8_model'}",
            f"--lfw_dir={root / 'lfw'}",
            f"--pairs={root / 'pairs.txt'}",
            f"--gallery={root / 'gallery'}",
            f"--probes={root / 'probes'}",
            f"--distractors={root / 'distractors'}",
            "--low_res=2",
            "--flip",
            f"--output_dir={out_dir}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Verification" in proc.stdout and "rank-1" in proc.stdout
    results = json.loads((out_dir / "results.json").read_text())
    first, second = results["models"]
    assert first["model"]["name"] == "run"
    assert second["model"]["input_dtype"] == "uint8"
    # In-process reference: the same protocol on the Keras model's outputs.
    ea, eb = _reference_pair_embeddings(world, flip=True)
    issame = np.array([r[1] for r in world["rows"]])
    fold = np.array([r[2] for r in world["rows"]])
    want = metrics.verify(metrics.pair_scores(ea, eb), issame, fold=fold)
    for model in (first, second):
        v = model["verification"]["pairs"]
        assert v["accuracy_mean"] == pytest.approx(want.accuracy_mean)
        assert v["auc"] == pytest.approx(want.auc)
        assert set(v["low_res"]) == {"2"}
        assert model["identification"]["num_distractors"] == 16
    for name in ("roc_pairs.png", "norms_pairs.png", "cmc.png"):
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_py_flag_and_data_errors(world, tmp_path):
    proc = _run(["--model=x", "--low_res=0.5"], tmp_path)
    assert proc.returncode != 0
    assert "--low_res: '0.5' is not a factor >= 1" in proc.stderr
    proc = _run(["--model=x", f"--lfw_dir={tmp_path}"], tmp_path)
    assert "--lfw_dir and --pairs go together" in proc.stderr
    bad = tmp_path / "pairs.txt"
    bad.write_text("1 1\nid00 1 2\nid00 1\n")
    proc = _run(
        [
            f"--model={world['root'] / 'run'}",
            f"--lfw_dir={world['root'] / 'lfw'}",
            f"--pairs={bad}",
        ],
        tmp_path,
    )
    assert proc.returncode != 0
    assert f"{bad} line 3" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bin_set_through_evaluate_model(world, tmp_path):
    import io
    import pickle

    rows = world["rows"]
    encoded = []
    for row in rows:
        for key in (row[3], row[4]):
            buffer = io.BytesIO()
            Image.fromarray(world["images"][key][..., 0]).save(
                buffer, format="PNG"
            )
            encoded.append(buffer.getvalue())
    issame = [r[1] for r in rows]
    with open(tmp_path / "tiny.bin", "wb") as file:
        pickle.dump((encoded, issame), file)
    report = evaluation.evaluate_model(
        _embedder(world),
        verification_sets={
            "tiny": lambda size, channels: eval_data.read_bin(
                tmp_path / "tiny.bin", image_size=size, channels=channels
            )
        },
    )
    r = report.verification["tiny"]["result"]
    ea, eb = _reference_pair_embeddings(world)
    scores = metrics.pair_scores(ea, eb)
    assert r.auc == pytest.approx(roc_auc_score(issame, scores))
    # insightface's folds: consecutive blocks of pairs.
    fold = np.arange(len(rows)) * 10 // len(rows)
    want = metrics.verify(scores, np.array(issame), fold=fold)
    np.testing.assert_allclose(r.fold_accuracies, want.fold_accuracies)
    table = evaluation.format_table([report])
    assert "tiny" in table and f"{100 * r.auc:.2f}" in table
    written = evaluation.write_outputs([report], tmp_path / "out", plots=False)
    saved = json.loads(written[0].read_text())
    assert saved["models"][0]["verification"]["tiny"]["auc"] == r.auc
