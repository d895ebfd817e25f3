"""train.py as a user runs it: flag errors, and one tiny end-to-end run.

Every bad flag must stop at start with exactly one line naming the flag and
the fix (these run before TensorFlow is imported, so they are quick). The
end-to-end run trains a few steps on a tiny embedded set, and the printed
table is recomputed here from the exported SavedModel alone.
"""

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(args, cwd, timeout=600):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--head=svm"],
         r"--head=svm: unknown head; use one of softmax, asoftmax, "
         r"l2softmax, centerloss, cosface, arcface"),
        (["--lambda_ring=-0.01"],
         r"--lambda_ring=-0.01: must be >= 0; use 0 to disable"),
        (["--cpu_replicas=2", "--batch_size=255"],
         r"--batch_size=255: not divisible by the 2 replicas.*use a multiple "
         r"of 2, e.g. 254"),
        (["--data_dir=/no/such/faces"],
         r"--data_dir=/no/such/faces: no such directory; give a directory "
         r"holding train/"),
        (["--backbone=vgg"], r"--backbone=vgg: unknown backbone"),
        (["--ring_radius=-2"], r"--ring_radius=-2: must be auto or a positive"),
        (["--head=asoftmax", "--margin=5"],
         r"--margin=5.0: A-Softmax's margin m must be 1, 2, 3 or 4"),
        (["--steps=0"], r"--steps=0: must be positive"),
        (["--image_size=4"], r"--image_size=4: expected SIZE or HEIGHT,WIDTH"),
        (["--test_samples_per_identity=1"],
         r"--test_samples_per_identity=1: must be >= 2"),
        (["--margin_warmup_steps=-5", "--head=arcface"],
         r"--margin_warmup_steps=-5: must be an integer >= 0"),
        (["--margin_warmup_steps=100"],
         r"--margin_warmup_steps=100: the softmax head has no margin to warm "
         r"up; use it with --head=asoftmax/cosface/arcface"),
        (["--embedding_block=ln"],
         r"--embedding_block=ln: unknown embedding block; use one of fc, bn"),
        (["--center_loss_weight=-1"],
         r"--center_loss_weight=-1.0: must be a finite number >= 0"),
    ],
)
def test_flag_errors_stop_with_one_line(tmp_path, args, pattern):
    result = _run([f"--model_dir={tmp_path / 'run'}", *args], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    assert re.search(r"^train\.py: error: " + pattern, lines[0]), lines[0]
    assert not (tmp_path / "run").exists()


def test_data_dir_without_train_folder(tmp_path):
    (tmp_path / "faces").mkdir()
    result = _run([f"--data_dir={tmp_path / 'faces'}"], tmp_path)
    assert result.returncode == 2
    assert "has no train/ folder or train.rec" in result.stderr


def test_model_dir_that_is_a_file_is_refused_and_kept(tmp_path):
    model_file = tmp_path / "model.keras"
    model_file.write_bytes(b"precious")
    result = _run([f"--model_dir={model_file}"], tmp_path)
    assert result.returncode == 2
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    assert re.search(
        r"^train\.py: error: --model_dir=.*model\.keras: is a file, not a "
        r"directory; give a new or existing directory", lines[0]
    ), lines[0]
    assert model_file.read_bytes() == b"precious"


def test_tiny_end_to_end_run_exports_and_prints_the_table(tmp_path):
    from ring_loss_tf import eval_data
    from ring_loss_tf import images
    from ring_loss_tf import metrics

    model_dir = tmp_path / "run"
    cache = tmp_path / "cache"
    result = _run(
        [
            f"--model_dir={model_dir}",
            f"--cache_dir={cache}",
            "--num_train_identities=10",
            "--num_test_identities=8",
            "--train_samples_per_identity=4",
            "--test_samples_per_identity=4",
            "--steps=4",
            "--batch_size=8",
            "--log_every=2",
            "--warmup_steps=0",
            "--lr=0.01",
            "--lambda_ring=0.01",
            "--nojit",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert re.search(r"^Training: small_cnn → RingLoss\(λ=0.01\) → softmax, "
                     r"10 classes, 40 images", out, re.M), out
    progress = re.findall(
        r"^step (\d)/4  loss [\d.]+  ce [\d.]+  ring [\d.]+  R [\d.]+  "
        r"\|F\| [\d.]+  lr [\d.e-]+  \d+ img/s", out, re.M)
    assert progress == ["1", "2", "4"], out
    export_dir = model_dir / "export"
    assert f"Exported the embedding model to {export_dir}" in out
    assert (model_dir / "config.json").is_file()
    assert tf.train.latest_checkpoint(str(model_dir)).endswith("ckpt-4")
    assert list((model_dir / "train").iterdir())  # TensorBoard events
    match = re.search(
        r"\| 10-fold accuracy \| TAR@FAR=1e-3 \| TAR@FAR=1e-4 \|\n"
        r"\|---\|---\|---\|\n"
        r"\| ([\d.]+)% ± ([\d.]+) \| (\S+) \| (\S+) \|",
        out,
    )
    assert match, out
    # Recompute the table from the export alone.
    (root,) = cache.glob("kanji-*")
    pairs = eval_data.read_lfw_pairs(root / "pairs.txt", root / "test",
                                     image_size=(32, 32), channels=1)
    loaded = tf.saved_model.load(str(export_dir))
    embeddings = loaded.serve(images.normalize(pairs.images)).numpy()
    scores = metrics.pair_scores(embeddings[pairs.left],
                                 embeddings[pairs.right])
    expected = metrics.verify(scores, pairs.issame, fold=pairs.fold)
    assert float(match.group(1)) == pytest.approx(
        100 * expected.accuracy_mean, abs=0.006)
    assert float(match.group(2)) == pytest.approx(
        100 * expected.accuracy_std, abs=0.006)
    assert np.all(np.isfinite(embeddings))
    # evaluate.py finds the same embedded set from config.json alone.
    evaluated = subprocess.run(
        [sys.executable, str(REPO / "evaluate.py"), f"--model={model_dir}"],
        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO),
                               TF_CPP_MIN_LOG_LEVEL="2"),
        capture_output=True, text=True, timeout=600,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert f"No data flag: the embedded test split at {root}" in (
        evaluated.stdout), evaluated.stdout
    assert re.search(
        rf"^  kanji-test +{pairs.issame.sum()}/{(~pairs.issame).sum()} +"
        rf"{re.escape(match.group(1))} ± "
        rf"{re.escape(match.group(2))} ", evaluated.stdout, re.M
    ), evaluated.stdout


def test_corrupt_training_image_one_line_then_skip_corrupt(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for identity in ("a", "b"):
        folder = tmp_path / "faces" / "train" / identity
        folder.mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 256, (16, 16), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    bad = tmp_path / "faces" / "train" / "b" / "2.png"
    bad.write_bytes(b"not an image at all")
    flags = [
        f"--data_dir={tmp_path / 'faces'}", "--image_size=16",
        "--channels=1", "--batch_size=4", "--steps=2", "--warmup_steps=0",
        "--noevaluate", "--noexport", "--nojit", "--log_every=1",
    ]
    result = _run([f"--model_dir={tmp_path / 'run'}", *flags], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [l for l in result.stderr.splitlines()
             if l.startswith("train.py:")]
    assert lines == [
        "train.py: error: Corrupt or truncated image file. Remove or replace "
        "the file, or skip such files with skip_corrupt=True "
        f"(--skip_corrupt). File: {bad}"
    ], result.stderr[-3000:]
    skipped = _run([f"--model_dir={tmp_path / 'run2'}", "--skip_corrupt",
                    *flags], tmp_path)
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert f"Skipped 1 corrupt or truncated image(s) in {tmp_path / 'faces'}"\
        in skipped.stderr, skipped.stderr[-3000:]
    assert "2 classes, 7 images" in skipped.stdout, skipped.stdout


_LAST_STEP = re.compile(r"^step (\d+)/\1 .* ce ([\d.]+) .*\|F\| ([\d.]+)",
                        re.MULTILINE)


def test_asoftmax_default_warmup_keeps_features_from_collapsing(tmp_path):
    """Without the margin warm-up A-Softmax collapses (‖F‖ → 0, the
    cross-entropy stays at ln C); with train.py's default it learns."""
    common = [
        "--head=asoftmax", "--lambda_ring=0", f"--cache_dir={tmp_path / 'k'}",
        "--num_train_identities=500", "--train_samples_per_identity=6",
        "--num_test_identities=20", "--test_samples_per_identity=2",
        "--batch_size=64", "--steps=400", "--log_every=400",
        "--evaluate=false", "--export=false",
    ]
    finals = {}
    for name, extra in (("default", []), ("none", ["--margin_warmup_steps=0"])):
        result = _run([*common, *extra, f"--model_dir={tmp_path / name}"],
                      tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        match = _LAST_STEP.search(result.stdout)
        assert match, result.stdout
        finals[name] = float(match.group(2)), float(match.group(3))
    chance = np.log(500)
    collapsed_ce, collapsed_norm = finals["none"]
    assert collapsed_ce > 0.97 * chance and collapsed_norm < 1.0, finals
    trained_ce, trained_norm = finals["default"]
    assert trained_ce < 0.85 * chance and trained_norm > 5.0, finals
