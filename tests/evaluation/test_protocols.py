"""Tests of ring_loss_tf.evaluation.protocols and evaluate.py, end to end.

The tiny model of tests/eval_world.py (with a layer class defined only
there) is trained for a few steps on tiny synthetic images and exported;
every figure is checked against an independent path: the Keras model called
directly on images normalised here, scores and metrics in NumPy, scikit-
learn's AUC, brute-force ranks. evaluate.py runs in a subprocess, where the
layer class cannot be imported, so loading there proves the SavedModel
needs no model code.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from sklearn.metrics import roc_auc_score

from ring_loss_tf.data import pipeline
from ring_loss_tf.data import eval_sets
from ring_loss_tf.evaluation import protocols
from ring_loss_tf.evaluation import metrics
from tests import eval_world

REPO = pathlib.Path(__file__).resolve().parents[2]
SIZE = eval_world.SIZE
NUM_IDS = eval_world.NUM_IDS
PER_ID = eval_world.PER_ID
_name = eval_world.identity
_reference_pair_embeddings = eval_world.reference_pair_embeddings


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return eval_world.build_world(tmp_path_factory.mktemp("eval"))


def _embedder(world, which="float", **kwargs):
    path = world["root"] / ("run" if which == "float" else "uint8_model")
    return protocols.load_embedder(path, **kwargs)


@pytest.mark.parametrize("metric,flip", [("cosine", False), ("l2", True)])
def test_verification_end_to_end(world, metric, flip):
    root = world["root"]
    pairs = eval_sets.read_lfw_pairs(root / "pairs.txt", root / "lfw")
    out = protocols.evaluate_verification(
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
    low = protocols.downsample(images, 4)
    blocks = images.reshape(3, 2, 4, 3, 4, 1).astype(np.float64)
    mean = blocks.mean(axis=(2, 4))
    up = tf.image.resize(mean, (8, 12), method="bilinear").numpy()
    np.testing.assert_allclose(low, np.clip(np.round(up), 0, 255), atol=1)
    np.testing.assert_array_equal(protocols.downsample(images, 1), images)
    with pytest.raises(ValueError, match="factor must be ≥ 1"):
        protocols.downsample(images, 0.5)


def test_low_resolution_probe_side(world):
    root = world["root"]
    pairs = eval_sets.read_lfw_pairs(root / "pairs.txt", root / "lfw")
    out = protocols.evaluate_verification(
        _embedder(world), pairs, low_res=(2,)
    )
    low = out["low_res"][2]
    ref = world["reference"]
    full = ref(pairs.images)
    small = ref(protocols.downsample(pairs.images, 2))
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
    out = protocols.evaluate_identification(
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
    again = protocols.evaluate_identification(
        _embedder(world),
        root / "gallery",
        root / "probes",
        tmp_path / "d.npy",
    )
    np.testing.assert_array_equal(again["result"].ranks, want)
    np.save(tmp_path / "bad.npy", np.zeros((4, 5), np.float32))
    with pytest.raises(ValueError, match=r"bad.npy.*\(n, 8\)"):
        protocols.evaluate_identification(
            _embedder(world),
            root / "gallery",
            root / "probes",
            tmp_path / "bad.npy",
        )


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
    report = protocols.evaluate_model(
        _embedder(world),
        verification_sets={
            "tiny": lambda size, channels: eval_sets.read_bin(
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


# ---------------------------------------------------------------------------
# The functions train.py's final table and bench/reproduce.py call.


def _brute_tar(scores, issame, far):
    """Highest TAR of any threshold whose FAR is ≤ far (None: unresolved)."""
    impostors = np.sum(~issame)
    if far < 1 / impostors:
        return None
    best = 0.0
    for t in np.r_[np.inf, scores]:
        if np.mean(scores[~issame] >= t) <= far:
            best = max(best, np.mean(scores[issame] >= t))
    return best


def test_verify_pairs_on_a_keras_model_matches_numpy(world):
    root = world["root"]
    result = protocols.verify_pairs(
        world["model"], root / "pairs.txt", root / "lfw"
    )
    ea, eb = _reference_pair_embeddings(world)
    scores = np.sum(ea * eb, 1) / (
        np.linalg.norm(ea, axis=1) * np.linalg.norm(eb, axis=1)
    )
    issame = np.array([r[1] for r in world["rows"]])
    fold = np.array([r[2] for r in world["rows"]])
    want = metrics.verify(scores, issame, fold=fold)
    np.testing.assert_allclose(result.fold_accuracies, want.fold_accuracies)
    assert result.accuracy_mean == pytest.approx(want.accuracy_mean)
    assert result.accuracy_std == pytest.approx(want.accuracy_std)
    assert result.auc == pytest.approx(roc_auc_score(issame, scores))
    assert (result.num_genuine, result.num_impostor) == (6, 6)
    # train.py's FARs: 6 impostors resolve neither.
    assert result.tar_at_far == {1e-3: None, 1e-4: None}
    resolved = protocols.verify_pairs(
        world["model"], root / "pairs.txt", root / "lfw", fars=(0.2, 0.5)
    )
    for far in (0.2, 0.5):
        assert resolved.tar_at_far[far] == _brute_tar(scores, issame, far)
    # The exported SavedModel, as an Embedder, gives the same figures.
    exported = protocols.verify_pairs(
        _embedder(world), root / "pairs.txt", root / "lfw", fars=(0.2, 0.5)
    )
    np.testing.assert_allclose(
        exported.fold_accuracies, resolved.fold_accuracies
    )
    assert exported.tar_at_far == resolved.tar_at_far


def _brute_all_pairs(a, b, labels):
    """float64 cosines of a_i with b_j and same-label flags, all i < j."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    ii, jj = np.triu_indices(len(a), k=1)
    return np.sum(a[ii] * b[jj], axis=1), labels[ii] == labels[jj]


def test_all_pairs_tar_matches_brute_force():
    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(12), 4)
    centres = rng.normal(size=(12, 6))
    full = centres[labels] + 0.8 * rng.normal(size=(48, 6))
    low = full + 0.5 * rng.normal(size=(48, 6))
    fars = (1e-4, 1e-3, 1e-2, 0.1)
    for others in (None, low):
        got = protocols.all_pairs_tar(
            full.astype(np.float32),
            labels,
            fars=fars,
            others=None if others is None else others.astype(np.float32),
        )
        scores, same = _brute_all_pairs(
            full, full if others is None else others, labels
        )
        assert got["num_genuine"] == 12 * 6 == np.sum(same)
        assert got["num_impostor"] == 48 * 47 // 2 - 72
        assert got["tar_at_far"] == {
            f"{far:g}": _brute_tar(scores, same, far) for far in fars
        }
    assert list(got["tar_at_far"]) == ["0.0001", "0.001", "0.01", "0.1"]
    assert got["tar_at_far"]["0.0001"] is None  # 1,056 impostors


def test_pair_indices_reuse_the_embeddings_of_the_folder(world):
    root, ref = world["root"], world["reference"]
    pairs = eval_sets.read_lfw_pairs(root / "pairs.txt", root / "lfw")
    paths, labels, _ = eval_sets.read_image_folder(root / "lfw", load=False)
    images = pipeline.load_images(paths, image_size=None, channels=None)
    left, right = protocols.pair_indices(pairs, paths)
    np.testing.assert_array_equal(images[left], pairs.images[pairs.left])
    np.testing.assert_array_equal(images[right], pairs.images[pairs.right])
    full = ref(images)
    got = protocols.verify_embedded(full[left], full[right], pairs)
    want = protocols.evaluate_verification(_embedder(world), pairs)
    np.testing.assert_allclose(
        got.fold_accuracies, want["result"].fold_accuracies
    )
    assert got.auc == pytest.approx(want["result"].auc)
    with pytest.raises(ValueError, match="not among the 3 given paths"):
        protocols.pair_indices(pairs, paths[:3])


def test_identify_copies_matches_brute_ranks(world):
    root, ref = world["root"], world["reference"]
    paths, labels, class_names = eval_sets.read_image_folder(
        root / "lfw", load=False
    )
    names = np.asarray(class_names)[labels]
    images = pipeline.load_images(paths, image_size=None, channels=None)
    full = ref(images).astype(np.float32)
    got = protocols.identify_copies(full, names, paths, root, max_rank=10)
    index = {(p.split(os.sep)[-2], p.split(os.sep)[-1]): i
             for i, p in enumerate(map(str, paths))}

    def part(folder):
        files = sorted((root / folder).glob("*/*"))
        return [index[(f.parent.name, f.name)] for f in files]

    g, p, d = part("gallery"), part("probes"), part("distractors")
    want = _brute_ranks(full[p], names[p], full[g], names[g], full[d])
    np.testing.assert_array_equal(got.ranks, want)
    assert got.num_gallery == 6 and got.num_distractors == 16


def test_norm_ratio_leaves_out_zero_full_norms():
    full = np.array([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    low = np.array([[0.0, 5.0], [1.0, 1.0], [2.0, 0.0]])
    assert protocols.norm_ratio(full, low) == pytest.approx(1.5)
