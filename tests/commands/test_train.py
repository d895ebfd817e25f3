"""train.py as a user runs it: flag errors, and one tiny end-to-end run.

Every bad flag must stop at start with exactly one line naming the flag and
the fix (these run before TensorFlow is imported, so they are quick). The
end-to-end run trains a few steps on a tiny embedded set, and the printed
table is recomputed here from the exported SavedModel alone.
"""

import contextlib
import importlib
import json
import os
import pathlib
import shutil
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

from tests.data_files import damage_rec
from tests.data_files import write_rec

REPO = pathlib.Path(__file__).resolve().parents[2]


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
         r"l2softmax, centerloss, cosface, arcface$"),
        (["--lambda_ring=-0.01"],
         r"--lambda_ring=-0\.01: must be a finite number >= 0; use 0 to "
         r"disable the ring loss or e\.g\. 0\.01$"),
        (["--cpu_replicas=2", "--batch_size=255"],
         r"--batch_size=255: not divisible by the 2 replicas "
         r"\(cpu_replicas=2\); use a multiple of 2, e\.g\. 254$"),
        (["--data_dir=/no/such/faces"],
         r"--data_dir=/no/such/faces: no such directory; give a directory "
         r"holding train/ \(a folder per identity\), or omit it to use the "
         r"embedded character set$"),
        (["--backbone=vgg"],
         r"--backbone=vgg: unknown backbone; use one of small_cnn, "),
        (["--ring_radius=-2"],
         r"--ring_radius=-2\.0: must be auto or a positive number; use auto "
         r"\(mean norm of the first batch\) or e\.g\. 20$"),
        (["--ring_radius=abc"],
         r"--ring_radius=abc: must be auto or a positive number; use auto "),
        (["--head=asoftmax", "--margin=5"],
         r"--margin=5\.0: the asoftmax head's margin must be one of 1, 2, "
         r"3, 4; use 4 or omit it$"),
        (["--steps=0"],
         r"--steps=0: must be a positive integer; use e\.g\. 1000$"),
        (["--image_size=4"],
         r"--image_size=4: must be SIZE or HEIGHT,WIDTH, each >= 8; use "
         r"e\.g\. 32 or 112,96$"),
        (["--test_samples_per_identity=1"],
         r"--test_samples_per_identity=1: must be >= 2 \(genuine pairs need "
         r"two images\); use e\.g\. 10$"),
        (["--kanji_image_size=4"],
         r"--kanji_image_size=4: must be an integer >= 8; use e\.g\. 32$"),
        (["--margin_warmup_steps=-5", "--head=arcface"],
         r"--margin_warmup_steps=-5: must be an integer >= 0; use 0 to start "
         r"with the margin, or e\.g\. 200$"),
        (["--margin_warmup_steps=100"],
         r"--margin_warmup_steps=100: the softmax head has no margin to warm "
         r"up; use it with head asoftmax/cosface/arcface, or omit it$"),
        (["--embedding_block=ln"],
         r"--embedding_block=ln: unknown embedding block; use one of fc, "
         r"bn, gdc$"),
        (["--center_loss_weight=-1"],
         r"--center_loss_weight=-1\.0: must be a finite number >= 0; use 0 "
         r"to disable center loss or e\.g\. 0\.003$"),
        (["--max_to_keep=0"],
         r"--max_to_keep=0: must be a positive integer; use e\.g\. \d+$"),
        (["--stop_at_step=0"],
         r"--stop_at_step=0: must be a positive integer; use e\.g\. 1000, or "
         r"omit it$"),
        (["--startup_timeout=-1"],
         r"--startup_timeout=-1: must be an integer >= 0 \(seconds\); use "
         r"e\.g\. 600, or 0 to wait without a limit$"),
        (["--seed=-5"],
         r"--seed=-5: must be an integer in 0 \.\. 2\*\*32 - 1; use e\.g\. "
         r"0$"),
        (["--seed=100000000000000000000000"],
         r"--seed=100000000000000000000000: must be an integer in 0 \.\. "
         r"2\*\*32 - 1; use e\.g\. 0$"),
        (["--image_size=20000"],
         r"--image_size=20000: a side of more than 1024 pixels \(the limit\) "
         r"would need gigabytes per batch; use e\.g\. 112 or 224$"),
        (["--embedding_dim=1000000000"],
         r"--embedding_dim=1000000000: is more than 8192 \(the limit; the "
         r"head holds embedding_dim x num_classes weights\); use e\.g\. 128 "
         r"or 512$"),
    ],
)
def test_flag_errors_stop_with_one_line(tmp_path, args, pattern):
    result = _run([f"--model_dir={tmp_path / 'run'}", *args], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    assert re.search(r"^train\.py: error: " + pattern, lines[0]), lines[0]
    assert not (tmp_path / "run").exists()


def _without_root_override():
    # root writes through permission bits. Dropping that capability from
    # the bounding set before exec makes train.py see a read-only directory
    # as any other user does.
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_read_only_model_dir_is_refused_at_the_flag_check(tmp_path):
    directory = tmp_path / "read_only"
    directory.mkdir()
    (directory / "kept").write_text("kept")
    directory.chmod(0o555)
    try:
        for model_dir in (directory, directory / "new_run"):
            result = subprocess.run(
                [sys.executable, str(REPO / "train.py"),
                 f"--model_dir={model_dir}"],
                cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)),
                capture_output=True, text=True, timeout=120,
                preexec_fn=(_without_root_override if os.geteuid() == 0
                            else None),
            )
            assert result.returncode == 2, result.stderr[-2000:]
            lines = [l for l in result.stderr.splitlines() if l.strip()]
            assert lines == [
                f"train.py: error: --model_dir={model_dir}: is not writable "
                "(read-only directory or file system); give a directory you "
                "can write to, or change its permissions"
            ], result.stderr[-2000:]
        assert [p.name for p in directory.iterdir()] == ["kept"]
    finally:
        directory.chmod(0o755)


def test_data_dir_without_train_folder(tmp_path):
    (tmp_path / "faces").mkdir()
    result = _run([f"--data_dir={tmp_path / 'faces'}"], tmp_path)
    assert result.returncode == 2
    assert ("has no train/ folder, train-*.tfrecord shards or train.rec"
            in result.stderr)


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
    from ring_loss_tf.data import eval_sets
    from ring_loss_tf.data import images
    from ring_loss_tf.evaluation import metrics

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
        r"\|F\| [\d.]+  lr [\d.e-]+  [\d.]+ img/s", out, re.M)
    assert progress == ["1", "2", "4"], out
    export_dir = model_dir / "export"
    assert f"Exported the embedding model to {export_dir}" in out
    saved = json.loads((model_dir / "config.json").read_text())
    assert saved["version"] == 2
    assert saved["data"]["cache_dir"] == str(cache)
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
    pairs = eval_sets.read_lfw_pairs(root / "pairs.txt", root / "test",
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



FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"


def _release_0_1_run(tmp_path):
    """A copy of the run release 0.1.0 wrote (version-1 config.json), its
    embedded set moved to tmp_path/cache and generated there."""
    from ring_loss_tf.data import kanji

    model_dir = tmp_path / "run"
    shutil.copytree(FIXTURES / "release_0_1_run", model_dir)
    path = model_dir / "config.json"
    saved = json.loads(path.read_text())
    assert "version" not in saved  # version 1
    saved["kanji_options"]["cache_dir"] = str(tmp_path / "cache")
    path.write_text(json.dumps(saved, indent=2))
    # The set 0.1.0 trained on: its kanji_options, kanji.prepare's default
    # image size (0.1.0 had no flag for it).
    root = kanji.prepare(num_workers=1, progress=False,
                         **saved["kanji_options"])
    return model_dir, root


def test_release_0_1_run_exports_and_evaluates_on_its_embedded_set(tmp_path):
    model_dir, root = _release_0_1_run(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    exported = subprocess.run(
        [sys.executable, "-m", "ring_loss_tf.export",
         f"--model_dir={model_dir}", f"--output={model_dir / 'export'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    # --model=<model_dir>/export: config.json is found one level up.
    evaluated = subprocess.run(
        [sys.executable, str(REPO / "evaluate.py"),
         f"--model={model_dir / 'export'}", f"--output_dir={tmp_path / 'e'}",
         "--noplots"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert f"No data flag: the embedded test split at {root}" in (
        evaluated.stdout), evaluated.stdout
    assert re.search(r"^  kanji-test +\d+/\d+ +[\d.]+ ± [\d.]+ ",
                     evaluated.stdout, re.M), evaluated.stdout


@contextlib.contextmanager
def _evaluate_data_plan(monkeypatch, tmp_path, **values):
    """evaluate.py's `_data_plan` with its flags set to `values`; yields the
    keyword arguments it gives `kanji.prepare` (which is not run)."""
    from absl import flags
    from absl.testing import flagsaver

    from ring_loss_tf.data import kanji

    module = importlib.import_module("evaluate")
    given = {}

    def prepare(**options):
        given.update(options)
        return tmp_path / "set"

    monkeypatch.setattr(kanji, "prepare", prepare)
    parsed_here = not flags.FLAGS.is_parsed()
    if parsed_here:
        flags.FLAGS(["evaluate.py"])
    # The command reads its own flag set, which shares absl's flags: it
    # counts as parsed once they are (an earlier test may have parsed them).
    command_flags = module.FLAGS
    command_parsed_here = not command_flags.is_parsed()
    if command_parsed_here:
        command_flags.mark_as_parsed()
    try:
        with flagsaver.flagsaver(**values):
            # Flags set here count as given on the command line.
            for name in values:
                flags.FLAGS[name].present = 1
            module._data_plan()
            yield given
    finally:
        if command_parsed_here:
            command_flags.unparse_flags()
        if parsed_here:
            flags.FLAGS.unparse_flags()


def test_evaluate_reads_the_embedded_set_of_either_config_version(
    tmp_path, monkeypatch
):
    from ring_loss_tf import config as config_lib

    version_1, _ = _release_0_1_run(tmp_path / "v1")
    with _evaluate_data_plan(monkeypatch, tmp_path,
                             model=str(version_1)) as given:
        pass
    assert given == dict(
        cache_dir=str(tmp_path / "v1" / "cache"), seed=0,
        num_train_identities=12, num_test_identities=6,
        train_samples_per_identity=6, test_samples_per_identity=3,
        image_size=32, pairs_per_fold=1000,
    )
    version_2 = tmp_path / "v2"
    config_lib.save(config_lib.make(
        cache_dir="/sets", seed=4, num_test_identities=7,
        kanji_image_size=24,
    ), version_2)
    # Flags given win over the run's settings; the others come from it.
    with _evaluate_data_plan(monkeypatch, tmp_path,
                             model=str(version_2 / "export"),
                             num_test_identities=9) as given:
        pass
    assert given == dict(
        cache_dir="/sets", seed=4, num_train_identities=1000,
        num_test_identities=9, train_samples_per_identity=40,
        test_samples_per_identity=10, image_size=24, pairs_per_fold=1000,
    )


def test_evaluate_takes_every_setting_of_the_embedded_set(
    tmp_path, monkeypatch
):
    # No config.json: the flags alone pick the set, with train.py's names.
    with _evaluate_data_plan(monkeypatch, tmp_path,
                             model=str(tmp_path / "plain"),
                             kanji_image_size=24, pairs_per_fold=50,
                             seed=3, num_train_identities=20) as given:
        pass
    assert given == dict(
        cache_dir=None, seed=3, num_train_identities=20,
        num_test_identities=500, train_samples_per_identity=40,
        test_samples_per_identity=10, image_size=24, pairs_per_fold=50,
    )
    # --kanji_seed names the set whatever --seed says, as in train.py.
    with _evaluate_data_plan(monkeypatch, tmp_path,
                             model=str(tmp_path / "plain"),
                             seed=3, kanji_seed=8) as given:
        pass
    assert given["seed"] == 8


def test_evaluate_reads_the_seed_of_a_version_1_embedded_set(
    tmp_path, monkeypatch
):
    # 0.1.0's training.train(seed=0, kanji_options={"seed": 5, ...}).
    model_dir = tmp_path / "run"
    shutil.copytree(FIXTURES / "release_0_1_run", model_dir)
    saved = json.loads((model_dir / "config.json").read_text())
    saved["kanji_options"]["seed"] = 5
    (model_dir / "config.json").write_text(json.dumps(saved))
    with _evaluate_data_plan(monkeypatch, tmp_path,
                             model=str(model_dir)) as given:
        pass
    assert given["seed"] == 5


@pytest.mark.parametrize(
    "text, problem",
    [
        ("[1, 2]", r"expected a JSON object"),
        ("{not json", r"is not valid JSON"),
        ('{"version": 2, "data": {}, "model": {"lr": 1}, "optim": {}, '
         '"run": {}}', r"unknown setting model\.lr"),
        ('{"version": 9}', r"version 9 is not one this ring_loss_tf reads"),
    ],
)
def test_evaluate_refuses_a_bad_config_json_in_one_line(
    tmp_path, monkeypatch, text, problem
):
    (tmp_path / "run").mkdir()
    path = tmp_path / "run" / "config.json"
    path.write_text(text)
    with pytest.raises(SystemExit) as caught:
        with _evaluate_data_plan(monkeypatch, tmp_path,
                                 model=str(tmp_path / "run")):
            pass
    message = str(caught.value.code)
    assert "\n" not in message
    assert re.match(
        rf"^evaluate\.py: {re.escape(str(path))}.*{problem}.*; pass the data "
        r"flags \(--cache_dir, --num_\*\) instead\.$", message
    ), message


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


@pytest.mark.parametrize("damage, key", [
    ("truncated", 50), ("length", 50), ("unending", 50),
])
def test_unreadable_rec_record_exits_at_once_with_one_line(
    tmp_path, damage, key
):
    """A .rec record that cannot be read (cut short, a length past the end
    of the file, a multi-part record that never ends) stops train.py with
    one line naming the record and a fix that works for .rec sets, and
    the process exits within seconds of it: it used to hang, destroying
    the input pipeline while a thread of its RecordIO reader waited for
    the interpreter it was shutting down."""
    # Enough records that several reads are in flight when one fails.
    directory, _ = write_rec(tmp_path / "faces", [40] * 10)
    rec = damage_rec(directory, key, damage)
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"),
         f"--model_dir={tmp_path / 'run'}", f"--data_dir={directory}",
         "--image_size=16", "--channels=1", "--batch_size=32", "--steps=30",
         "--warmup_steps=0", "--noevaluate", "--noexport", "--nojit",
         "--log_every=1"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )
    watchdog = threading.Timer(600, process.kill)
    watchdog.start()
    try:
        lines = []
        for line in process.stderr:
            lines.append(line)
            if line.startswith("train.py:"):
                printed = time.monotonic()
                break
        else:
            pytest.fail("no error line:\n" + "".join(lines)[-3000:])
        rest = process.communicate(timeout=60)[1]
        exited = time.monotonic() - printed
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
    assert exited < 30, exited
    assert process.returncode == 2, "".join(lines)[-3000:] + rest
    errors = [l for l in rest.splitlines() if l.startswith("train.py:")]
    assert errors == [], rest
    # Cut short or never ending, every record from `key` on is unreadable.
    match = re.fullmatch(
        rf"train\.py: error: {re.escape(str(rec))} record (\d+): truncated "
        r"RecordIO file: wanted \d+ bytes at offset \d+, the file has \d+ "
        r"bytes\. Copy the \.rec and \.idx again, or rerun with "
        r"skip_corrupt=True \(--skip_corrupt\): it reads every record once "
        r"at the start and leaves out those that fail\.( The last "
        r"checkpoint \S+ is intact\.)?\n",
        lines[-1],
    )
    assert match, lines[-1]
    bad = int(match.group(1))
    assert bad == key if damage == "length" else bad >= key


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
