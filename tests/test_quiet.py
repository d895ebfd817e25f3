"""The entry points print the project's lines, not TensorFlow's log.

train.py, evaluate.py and `python -m ring_loss_tf.export` run as a user
runs them (no TF_CPP_MIN_LOG_LEVEL in the environment) on a tiny embedded
set, and every line of their stdout and stderr must be one the project
writes or a warning it passes through, each listed below (issue 15). Then
`ring_loss_tf.quiet` on its own: what it drops from file descriptor 2, what
it keeps, and that importing the package from other code changes nothing.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

from ring_loss_tf import quiet

REPO = pathlib.Path(__file__).resolve().parents[1]

TRAIN_LINES = [
    r"Generating the KanjiVG data set: \d+/72 +[\d.]+s elapsed, +[\d.]+s left",
    r"Training: small_cnn → RingLoss\(λ=0\.01\) → softmax, 10 classes, 40 "
    r"images, batch 8 on 1 replica\(s\), steps 0→4, jit=False, "
    r"mixed_precision=off",
    r"step [124]/4  loss [\d.]+  ce [\d.]+  ring [\d.]+  R [\d.]+  \|F\| "
    r"[\d.]+  lr [\d.e-]+  [\d.]+ img/s(  ETA \d+s)?",
    r"Exported the embedding model to \S+/run/export",
    r"Verification on unseen identities \(\S+/pairs\.txt\): \d+ genuine, "
    r"\d+ impostor pairs",
    r"\| 10-fold accuracy \| TAR@FAR=1e-3 \| TAR@FAR=1e-4 \|",
    r"\|---\|---\|---\|",
    r"\| [\d.]+% ± [\d.]+ \| \S+ \| \S+ \|",
]
EVALUATE_LINES = [
    r"No data flag: the embedded test split at \S+",
    r"Model run: metric=cosine, flip=False",
    r"  Verification \(10-fold accuracy mean ± std; TAR in %, n/a: FAR below "
    r"1/impostors\)",
    r"  set +genuine/impostor +accuracy %( +TAR@1e-0\d)+ +EER % +AUC %",
    r"  kanji-test( 1/2)? +\d+/\d+ +[\d.]+ ± [\d.]+( +(n/a|[\d.]+))+",
    r"  Feature norms \(kanji-test\): mean [\d.]+, std .*",
    r"    1/2 resolution \(probe side\): mean norm [\d.]+, .*",
    r"  Identification: \d+ probes vs \d+ gallery \+ \d+ distractors: "
    r"rank-1 [\d.]+%, rank-5 [\d.]+%",
    r"",
    r"Wrote \S+/eval/results\.json(, \S+\.png)+",
]
EXPORT_LINES = [
    r"Exported \S+/run to \S+/exported: assets, fingerprint\.pb, model\.onnx, "
    r"model\.tflite, saved_model\.pb, training_model\.keras, variables",
]
# Warnings the project passes through: its own DataWarning (skipped image
# folders or files), followed by Python's line of source. These runs have
# none; TensorFlow's and the converters' warnings are not passed through.
PASSED_THROUGH = [r"\S+\.py:\d+: DataWarning: .+"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The three commands on one tiny run, as a user's shell runs them."""
    root = tmp_path_factory.mktemp("quiet")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = str(REPO)
    python = sys.executable
    commands = {
        "train.py": [
            python, str(REPO / "train.py"), f"--model_dir={root / 'run'}",
            f"--cache_dir={root / 'cache'}", "--num_train_identities=10",
            "--num_test_identities=8", "--train_samples_per_identity=4",
            "--test_samples_per_identity=4", "--steps=4", "--batch_size=8",
            "--log_every=2", "--warmup_steps=0", "--lr=0.01",
            "--lambda_ring=0.01", "--nojit",
        ],
        "evaluate.py": [
            python, str(REPO / "evaluate.py"), f"--model={root / 'run'}",
            f"--output_dir={root / 'eval'}", "--low_res=2",
        ],
        "export": [
            python, "-m", "ring_loss_tf.export",
            f"--model_dir={root / 'run'}", f"--output={root / 'exported'}",
            "--tflite", "--onnx", "--keras",
        ],
    }
    return {
        name: subprocess.run(
            command, cwd=root, env=env, capture_output=True, text=True,
            timeout=600,
        )
        for name, command in commands.items()
    }


def _foreign_lines(output, ours):
    """The lines of `output` that are neither ours nor passed through."""
    foreign = []
    lines = output.splitlines()
    after_warning = False
    for line in lines:
        if any(re.fullmatch(p, line) for p in ours):
            after_warning = False
        elif any(re.fullmatch(p, line) for p in PASSED_THROUGH):
            after_warning = True
        elif after_warning and line.startswith("  "):
            after_warning = False  # the warning's line of source
        else:
            foreign.append(line)
    return foreign


@pytest.mark.parametrize(
    "name, ours",
    [
        ("train.py", TRAIN_LINES),
        ("evaluate.py", EVALUATE_LINES),
        ("export", EXPORT_LINES),
    ],
)
def test_entry_points_print_only_the_project_lines(runs, name, ours):
    result = runs[name]
    assert result.returncode == 0, result.stderr[-3000:]
    foreign = _foreign_lines(result.stdout, ours) + _foreign_lines(
        result.stderr, ours
    )
    assert not foreign, "\n".join(foreign)
    # The patterns are not vacuous: each command printed its last line.
    assert re.fullmatch(ours[-1], result.stdout.splitlines()[-1])


def _c_write(text):
    """Writes to file descriptor 2 as C++ code does, past sys.stderr."""
    os.write(2, text.encode())


def test_dropped_lines_drops_the_patterns_and_keeps_the_rest(capfd):
    with quiet.dropped_lines([r"I\d+ noise.*"]):
        _c_write("I0000 noise from C++\nW0000 a warning\nI0001 noise 2\n")
    assert capfd.readouterr().err == "W0000 a warning\n"


def test_dropped_lines_keeps_everything_if_the_block_raises(capfd):
    with pytest.raises(ImportError, match="simulated"):
        with quiet.dropped_lines([r"I\d+ noise.*"]):
            _c_write("I0000 noise before the failure\n")
            raise ImportError("simulated")
    assert capfd.readouterr().err == "I0000 noise before the failure\n"


@pytest.mark.parametrize(
    "startup, kept",
    [
        # No GPU driver installed: the cuInit failure that follows is no news.
        (
            "I0000 00:00:1.5 12 cudart_stub.cc:31] Could not find cuda drivers"
            " on your machine, GPU will not be used.\n"
            "E0000 00:00:1.6 12 cuda_platform.cc:52] failed call to cuInit: "
            "INTERNAL: CUDA error\n",
            "",
        ),
        # A driver that fails is: the GPU will not be used.
        (
            "E0000 00:00:1.6 12 cuda_platform.cc:52] failed call to cuInit: "
            "INTERNAL: CUDA error\n",
            "E0000 00:00:1.6 12 cuda_platform.cc:52] failed call to cuInit: "
            "INTERNAL: CUDA error\n",
        ),
    ],
)
def test_startup_filter_drops_cuinit_only_without_a_driver(
    capfd, startup, kept
):
    with quiet.dropped_lines(
        quiet._STARTUP_NOISE, more_patterns=quiet._cuinit_without_driver
    ):
        _c_write(
            "WARNING: All log messages before absl::InitializeLog() is "
            "called are written to STDERR\n"
            "I0000 00:00:1796172536.125686    3048 port.cc:153] oneDNN custom "
            "operations are on.\n" + startup
        )
    assert capfd.readouterr().err == kept


_IMPORTER = """
import logging, os, sys
{imports}
print(os.environ.get("TF_CPP_MIN_LOG_LEVEL"), logging.getLogger().level,
      logging.getLogger("tensorflow").level)
"""


def _import_in_new_process(imports, cwd):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run(
        [sys.executable, "-c", _IMPORTER.format(imports=imports)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_importing_the_package_elsewhere_changes_no_logging(tmp_path):
    # Importing the package registers its layers with Keras, so it loads
    # TensorFlow as `import tensorflow` would, and leaves its log alone.
    results = {
        imports: _import_in_new_process(imports, tmp_path)
        for imports in ("import tensorflow", "import ring_loss_tf",
                        "import ring_loss_tf; ring_loss_tf.RingLoss")
    }
    for result in results.values():
        # TensorFlow's start-up log is the caller's to see or silence.
        assert "oneDNN custom operations are on" in result.stderr
    assert len({result.stdout for result in results.values()}) == 1, results
