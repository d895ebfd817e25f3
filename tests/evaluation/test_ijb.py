"""Tests of template verification (ring_loss_tf/ijb.py, IJB-B/C layout), the
embedded template variant (ring_loss_tf/kanji_templates.py) and
evaluate.py --ijb_dir: pooling, scores and TAR@FAR against brute-force
float64 NumPy (and insightface's rule against its ijb_11.py on sklearn's
ROC), and one-line errors for bad meta files."""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_curve

from ring_loss_tf.data import align
from ring_loss_tf.evaluation import ijb
from ring_loss_tf.data import kanji
from ring_loss_tf.data import kanji_templates
from ring_loss_tf.evaluation import metrics
from ring_loss_tf.evaluation.embedder import load_embedder
from tests import eval_world

REPO = pathlib.Path(__file__).resolve().parents[2]


def brute_pool(features, template_ids, media_ids):
    """Per template: the sum over its media of the mean of the media's
    images, L2-normalised; loops in float64."""
    out = {}
    for t in sorted(set(template_ids.tolist())):
        total = np.zeros(features.shape[1])
        in_t = template_ids == t
        for m in sorted(set(media_ids[in_t].tolist())):
            total += features[in_t & (media_ids == m)].mean(axis=0)
        out[t] = total / np.linalg.norm(total)
    return out


def brute_tar(scores, issame, far):
    """Best TAR over every threshold whose FAR is <= far; None below one
    impostor."""
    genuine, impostor = scores[issame], scores[~issame]
    if far * len(impostor) < 1:
        return None
    best = 0.0
    for threshold in np.r_[scores, np.inf]:
        if np.mean(impostor >= threshold) <= far:
            best = max(best, np.mean(genuine >= threshold))
    return best


def insightface_tar(scores, issame, far):
    """insightface's ijb_11.py: sklearn's default ROC, flipped, the TAR of
    the point of least |FPR - far| (min over (distance, index))."""
    fpr, tpr, _ = roc_curve(issame, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    _, i = min(list(zip(abs(fpr - far), range(len(fpr)))))
    return tpr[i]


def synthetic_protocol(rng, num_subjects=12):
    """Template ids, media ids, features and template pairs: 2 templates per
    subject, media of 1-4 images, features near the subject's direction."""
    directions = rng.normal(size=(num_subjects, 16))
    rows, subject_of = [], {}
    media = 100
    for s in range(num_subjects):
        for half in range(2):
            t = 1000 + 2 * s + half
            subject_of[t] = s
            for _ in range(rng.integers(1, 4)):
                media += 1
                for _ in range(rng.integers(1, 5)):
                    rows.append((t, media, s))
    rows = np.array(rows)
    features = directions[rows[:, 2]] + rng.normal(0, 1.2, (len(rows), 16))
    features *= rng.uniform(0.5, 3, (len(rows), 1))  # norms are kept
    templates = sorted(subject_of)
    left, right = np.triu_indices(len(templates), k=1)
    left, right = np.array(templates)[left], np.array(templates)[right]
    issame = np.array([subject_of[a] == subject_of[b]
                       for a, b in zip(left, right)])
    return rows[:, 0], rows[:, 1], features, left, right, issame


def test_pooling_and_scores_match_brute_force():
    rng = np.random.default_rng(0)
    tids, mids, features, left, right, issame = synthetic_protocol(rng)
    templates, pooled = ijb.pool_templates(features, tids, mids)
    reference = brute_pool(features, tids, mids)
    assert templates.tolist() == sorted(reference)
    np.testing.assert_allclose(pooled, [reference[t] for t in templates],
                               atol=1e-6)
    scores = ijb.template_pair_scores(pooled, templates, left, right,
                                      chunk_size=7)
    want = np.array([reference[a] @ reference[b]
                     for a, b in zip(left, right)])
    np.testing.assert_allclose(scores, want, atol=1e-6)
    result = metrics.verify(scores, issame, fars=(1e-3, 1e-2, 0.05, 0.1))
    for far in (1e-3, 1e-2, 0.05, 0.1):
        assert result.tar_at_far[far] == brute_tar(want, issame, far)
    assert result.tar_at_far[1e-3] is None  # 264 impostor pairs
    assert 0 < result.tar_at_far[0.05] < 1


def test_media_pooling_is_order_independent_and_weighs_media_equally():
    rng = np.random.default_rng(1)
    tids, mids, features, *_ = synthetic_protocol(rng)
    templates, pooled = ijb.pool_templates(features, tids, mids)
    order = rng.permutation(len(tids))
    again = ijb.pool_templates(features[order], tids[order], mids[order])
    assert again[0].tolist() == templates.tolist()
    np.testing.assert_allclose(again[1], pooled, atol=1e-6)
    # Chunks in any order give the same sums as all rows at once.
    pooler = ijb.TemplatePooler(tids, mids)
    for chunk in np.array_split(order, 5)[::-1]:
        pooler.add(chunk, features[chunk])
    np.testing.assert_allclose(pooler.result()[1], pooled, atol=1e-6)
    # A media of 3 copies of x weighs as much as one image y: x + y.
    x, y = np.eye(2)
    _, two_media = ijb.pool_templates(
        np.array([x, x, x, y]), np.array([5, 5, 5, 5]), np.array([1, 1, 1, 2])
    )
    np.testing.assert_allclose(two_media[0], (x + y) / np.sqrt(2), atol=1e-7)


# --------------------------------------------------------------------------
# Files


def write_protocol(root, rng, *, landmarks=True, num_subjects=4, name="ijbx",
                   size=(28, 24)):
    """A tiny IJB-layout protocol: loose crops (grey, larger than the
    model's input) of eval_world-like subjects, with their landmarks."""
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    bases = rng.integers(0, 256, (num_subjects,) + size)
    _, points = align.template_points("arcface", size)
    rows, lmk_rows, subject_of, media = [], [], {}, 0
    for s in range(num_subjects):
        for half in range(2):
            t = 10 * s + half + 1
            subject_of[t] = s
            for _ in range(1 + (s + half) % 3):
                media += 1
                for _ in range(1 + media % 2):
                    noise = rng.normal(0, 40, size)
                    image = np.clip(bases[s] + noise, 0, 255).astype(np.uint8)
                    name_i = f"{len(rows) + 1}.png"
                    Image.fromarray(image).save(root / "loose_crop" / name_i)
                    jitter = points + rng.normal(0, 0.7, (5, 2))
                    score = rng.uniform(0.5, 1)
                    rows.append(f"{name_i} {t} {media}")
                    lmk_rows.append(
                        name_i + " " + " ".join(f"{v:.3f}" for v in
                                                jitter.ravel())
                        + f" {score:.4f}")
    (root / "meta" / f"{name}_face_tid_mid.txt").write_text(
        "\n".join(rows) + "\n")
    if landmarks:
        (root / "meta" / f"{name}_name_5pts_score.txt").write_text(
            "\n".join(lmk_rows) + "\n")
    templates = sorted(subject_of)
    pairs = [f"{a} {b} {int(subject_of[a] == subject_of[b])}"
             for i, a in enumerate(templates) for b in templates[i + 1:]]
    (root / "meta" / f"{name}_template_pair_label.txt").write_text(
        "\n".join(pairs) + "\n")
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return eval_world.build_world(tmp_path_factory.mktemp("eval"))


def reference_templates(world, root, flip, detector_score):
    """The protocol computed by hand: each loose crop aligned eagerly by its
    landmarks, embedded by the Keras model, pooled and scored in NumPy.

    Returns (scores, issame, the norms of the plain features f(x))."""
    meta = root / "meta"
    rows = [l.split() for l in
            (meta / "ijbx_face_tid_mid.txt").read_text().splitlines()]
    lmk = [l.split() for l in
           (meta / "ijbx_name_5pts_score.txt").read_text().splitlines()]
    features, plain_norms = [], []
    for (name, _, _), fields in zip(rows, lmk):
        image = np.asarray(Image.open(root / "loose_crop" / name))[..., None]
        points = np.array(fields[1:11], float).reshape(5, 2)
        crop = align.align_face(image, points, "arcface", (16, 16)).numpy()
        f = world["reference"](crop[None])[0]
        plain_norms.append(np.linalg.norm(np.asarray(f, np.float64)))
        if flip:
            f = f + world["reference"](crop[None, :, ::-1])[0]
        if detector_score:
            f = f * float(fields[11])
        features.append(f)
    pooled = brute_pool(np.array(features),
                        np.array([int(r[1]) for r in rows]),
                        np.array([int(r[2]) for r in rows]))
    pairs = np.loadtxt(meta / "ijbx_template_pair_label.txt", dtype=int)
    scores = np.array([pooled[a] @ pooled[b] for a, b, _ in pairs])
    return scores, pairs[:, 2].astype(bool), np.array(plain_norms)


@pytest.mark.parametrize("flip, detector_score", [(False, True),
                                                  (True, False)])
def test_evaluate_templates_end_to_end(world, tmp_path, flip,
                                       detector_score):
    root = write_protocol(tmp_path / "IJBX", np.random.default_rng(2))
    protocol = ijb.read_protocol(root)
    assert protocol.name == "ijbx" and protocol.landmarks.shape[1:] == (5, 2)
    out = ijb.evaluate_templates(
        load_embedder(world["root"] / "run"), protocol, flip=flip,
        detector_score=detector_score, chunk_size=5,
        fars=(0.05, 0.1, 0.5),
    )
    scores, issame, norms = reference_templates(world, root, flip,
                                                detector_score)
    r = out["result"]
    assert (r.num_genuine, r.num_impostor) == (4, 24)
    order = np.argsort(-scores)
    np.testing.assert_allclose(r.roc.thresholds[1:],
                               np.unique(scores.astype(np.float32))[::-1],
                               atol=1e-5)
    for far in (0.05, 0.1, 0.5):
        assert r.tar_at_far[far] == brute_tar(scores, issame, far), order
        # insightface's rule, as its ijb_11.py computes it.
        assert r.tar_at_far_nearest[far] == insightface_tar(scores, issame,
                                                            far)
    assert out["num_templates"] == 8
    # Norms of plain f(x), with --flip too, as the pair sets report them.
    assert out["norms"]["count"] == len(norms)
    np.testing.assert_allclose(
        [out["norms"][k] for k in ("mean", "min", "max")],
        [norms.mean(), norms.min(), norms.max()], rtol=1e-5)


def test_embedded_template_variant(tmp_path):
    settings = dict(num_train_identities=3, num_test_identities=5,
                    num_identities=4, media_per_template=3, image_size=16)
    root = kanji_templates.prepare(cache_dir=tmp_path, **settings)
    protocol = ijb.read_protocol(root)
    assert protocol.landmarks is None
    # 4 characters x 2 templates x media of 1, 2, 3 frames.
    assert len(protocol.image_paths) == 4 * 2 * 6
    assert len(protocol.left) == 28 and protocol.issame.sum() == 4
    _, test_ids = kanji.split_identities(0, 3, 5)
    first = np.asarray(Image.open(protocol.image_paths[0]))
    np.testing.assert_array_equal(first, kanji.render_sample(
        test_ids[0], seed=0, split="test", sample=0, image_size=16))
    # Templates t and t+1 of one character hold no shared hand.
    second = np.asarray(Image.open(protocol.image_paths[6]))
    np.testing.assert_array_equal(second, kanji.render_sample(
        test_ids[0], seed=0, split="test", sample=3, image_size=16))
    copy = kanji_templates.prepare(cache_dir=tmp_path / "again", **settings)
    assert [p.read_bytes() for p in sorted(root.rglob("*.png"))] == [
        p.read_bytes() for p in sorted(copy.rglob("*.png"))]


@pytest.mark.parametrize(
    "edit, message",
    [
        (("face_tid_mid", 2, "2.png 1"),
         r"ijbx_face_tid_mid\.txt line 2: expected 'image template_id "
         r"media_id' with integer ids, found '2\.png 1'"),
        (("face_tid_mid", 1, "1.png one 1"),
         r"ijbx_face_tid_mid\.txt line 1: expected 'image template_id"),
        (("face_tid_mid", 3, "missing.png 1 1"),
         r"ijbx_face_tid_mid\.txt line 3: image 'missing\.png' not found in "
         r"\S+loose_crop"),
        (("template_pair_label", 2, "1 99 0"),
         r"ijbx_template_pair_label\.txt line 2: template id 99 is not in "
         r"\S+ijbx_face_tid_mid\.txt"),
        (("template_pair_label", 4, "1 2"),
         r"ijbx_template_pair_label\.txt line 4: expected 'template_id "
         r"template_id label' \(integers\), found '1 2'"),
        (("template_pair_label", 1, "1 2 2"),
         r"ijbx_template_pair_label\.txt line 1: label 2 is not 0 or 1"),
        (("name_5pts_score", 2, "9.png 1 2 3 4 5 6 7 8 9 10 1"),
         r"ijbx_name_5pts_score\.txt line 2: found image '9\.png', expected "
         r"'2\.png', as line 2 of ijbx_face_tid_mid\.txt"),
        (("name_5pts_score", 1, "1.png 1 2 3"),
         r"ijbx_name_5pts_score\.txt line 1: expected a path and 10 "
         r"landmark coordinates"),
        # One coordinate short: read as ten points and a score before.
        (("name_5pts_score", 2, "2.png 1 2 3 4 5 6 7 8 9 0.9"),
         r"ijbx_name_5pts_score\.txt line 2: 11 fields, the file's other "
         r"lines have 12 \(image, 10 landmark coordinates, detector "
         r"score\); a coordinate or the score is missing"),
        # The score alone missing: weighted 1.0 among scored lines before.
        (("name_5pts_score", 1, "1.png 1 2 3 4 5 6 7 8 9 10"),
         r"ijbx_name_5pts_score\.txt line 1: 11 fields, the file's other "
         r"lines have 12"),
        (("name_5pts_score", 2, "2.png 1 2 3 4 5 6 7 8 9 10 -0.5"),
         r"ijbx_name_5pts_score\.txt line 2: detector score '-0\.5' is not "
         r"a positive finite number"),
        (("name_5pts_score", 3, "3.png 1 2 3 4 5 6 7 8 9 10 0"),
         r"ijbx_name_5pts_score\.txt line 3: detector score '0' is not"),
        (("name_5pts_score", 2, "2.png 1 2 3 4 5 6 7 8 9 10 nan"),
         r"ijbx_name_5pts_score\.txt line 2: detector score 'nan' is not"),
        (("name_5pts_score", 2, "2.png 1 2 3 4 5 6 7 8 9 10 high"),
         r"ijbx_name_5pts_score\.txt line 2: detector score 'high' is not"),
        (("name_5pts_score", 2, "2.png 7 9 7 9 7 9 7 9 7 9 0.9"),
         r"ijbx_name_5pts_score\.txt line 2: the five landmarks lie within "
         r"0 px of each other"),
        # A path out of loose_crop/ to a file that exists.
        (("face_tid_mid", 2, "../meta/ijbx_face_tid_mid.txt 1 1"),
         r"ijbx_face_tid_mid\.txt line 2: image path "
         r"'\.\./meta/ijbx_face_tid_mid\.txt' leaves \S+loose_crop "
         r"\(an absolute path or '\.\.'\)"),
        (("face_tid_mid", 1, "/etc/hostname 1 1"),
         r"ijbx_face_tid_mid\.txt line 1: image path '/etc/hostname' "
         r"leaves"),
    ],
)
def test_bad_meta_files_give_one_line_errors(tmp_path, edit, message):
    root = write_protocol(tmp_path / "IJBX", np.random.default_rng(3))
    which, line, text = edit
    path = root / "meta" / f"ijbx_{which}.txt"
    lines = path.read_text().splitlines()
    lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises((ValueError, FileNotFoundError)) as raised:
        ijb.read_protocol(root)
    assert len(str(raised.value).splitlines()) == 1
    assert re.search(message, str(raised.value)), (
        str(raised.value))


def test_a_five_point_file_without_scores_weighs_every_image_alike(
        tmp_path):
    root = write_protocol(tmp_path / "IJBX", np.random.default_rng(3))
    path = root / "meta" / "ijbx_name_5pts_score.txt"
    lines = [" ".join(line.split()[:11])
             for line in path.read_text().splitlines()]
    path.write_text("\n".join(lines) + "\n")
    protocol = ijb.read_protocol(root)
    assert np.all(protocol.detector_scores == 1.0)
    np.testing.assert_allclose(
        protocol.landmarks[1].ravel(), [float(v) for v in
                                        lines[1].split()[1:]], rtol=1e-6)
    assert protocol.landmark_lines.tolist() == list(
        range(1, len(lines) + 1))


def test_landmarks_far_outside_their_image_are_refused(world, tmp_path):
    root = write_protocol(tmp_path / "IJBX", np.random.default_rng(3))
    path = root / "meta" / "ijbx_name_5pts_score.txt"
    lines = path.read_text().splitlines()
    # The loose crops are 24 wide, 28 high: x = 40 is 16 px to the right.
    lines[2] = "3.png 10 10 20 10 15 15 40 20 20 20 0.9"
    path.write_text("\n".join(lines) + "\n")
    protocol = ijb.read_protocol(root)
    with pytest.raises(ValueError) as raised:
        ijb.evaluate_templates(load_embedder(world["root"] / "run"),
                               protocol, chunk_size=5)
    message = str(raised.value)
    assert len(message.splitlines()) == 1
    assert re.search(r"ijbx_name_5pts_score\.txt line 3: landmark \(40, "
                     r"20\) lies far outside its image \S+3\.png "
                     r"\(24x28\), which would give a black crop", message), (
        message)
    # Within half an image of the border is a face at the edge: kept.
    lines[2] = "3.png -11 10 20 10 15 15 35 20 20 41 0.9"
    path.write_text("\n".join(lines) + "\n")
    ijb.evaluate_templates(load_embedder(world["root"] / "run"),
                           ijb.read_protocol(root), chunk_size=5)


def test_missing_meta_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"directory not found"):
        ijb.read_protocol(tmp_path / "nothing")
    (tmp_path / "IJBX" / "meta").mkdir(parents=True)
    with pytest.raises(FileNotFoundError,
                       match=r"expected one \*_face_tid_mid\.txt, found 0"):
        ijb.read_protocol(tmp_path / "IJBX")
    root = write_protocol(tmp_path / "IJBY", np.random.default_rng(4))
    os.unlink(root / "meta" / "ijbx_template_pair_label.txt")
    with pytest.raises(FileNotFoundError,
                       match=r"Template pair file not found: \S+"
                             r"ijbx_template_pair_label\.txt"):
        ijb.read_protocol(root)


def run_evaluate(args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, str(REPO / "evaluate.py")] + args, cwd=cwd,
        env=env, capture_output=True, text=True, timeout=240,
    )


def test_evaluate_py_ijb_dir(world, tmp_path):
    root = write_protocol(tmp_path / "IJBX", np.random.default_rng(2))
    out_dir = tmp_path / "out"
    proc = run_evaluate([f"--model={world['root'] / 'run'}",
                         f"--ijb_dir={root}", f"--output_dir={out_dir}",
                         "--embedded_templates",
                         f"--cache_dir={tmp_path / 'cache'}",
                         "--num_train_identities=3",
                         "--num_test_identities=6"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ijbx templates" in proc.stdout
    verification = json.loads((out_dir / "results.json").read_text())[
        "models"][0]["verification"]
    # --ijb_dir is data: the embedded pair set is not evaluated as well.
    assert set(verification) == {"ijbx templates", "kanji templates"}
    entry = verification["ijbx templates"]
    scores, issame, _ = reference_templates(world, root, False, True)
    assert entry["tar_at_far"]["0.1"] == brute_tar(scores, issame, 0.1)
    assert entry["tar_at_far_nearest"]["0.1"] == insightface_tar(
        scores, issame, 0.1)
    assert "ijbx templates (insightface rule)" in proc.stdout
    assert entry["num_genuine"] == 4 and entry["num_impostor"] == 24
    # All 6 test characters, two templates each: 66 pairs.
    kanji_entry = verification["kanji templates"]
    assert (kanji_entry["num_genuine"], kanji_entry["num_impostor"]) == (
        6, 60)
    assert (out_dir / "roc_ijbx_templates.png").is_file()

    pairs = root / "meta" / "ijbx_template_pair_label.txt"
    pairs.write_text(pairs.read_text() + "1 77 1\n")
    proc = run_evaluate([f"--model={world['root'] / 'run'}",
                         f"--ijb_dir={root}"], tmp_path)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"evaluate.py: {pairs} line 29: template id 77 "
                           "is not in"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
