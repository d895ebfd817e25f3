"""The four commands (ring_loss_tf/commands/): one dialect.

Each command's entry point (what `ring-loss-train` and the others call) runs
in a subprocess as `python -c "from ring_loss_tf.commands.X import run;
run()" ...`: a bad flag stops it with one line naming the command, before
TensorFlow is imported; --help prints its description and its own flags;
neither its --help nor its module docstring holds a measured figure (a
percentage or a duration: those live in the docs, beside the command that
measures them). The installed commands themselves are tested in
test_install.py (slow: it makes a virtualenv).
"""

import importlib
import os
import pathlib
import re
import subprocess
import sys

import pytest

from ring_loss_tf import config as config_lib
from ring_loss_tf import quiet
from ring_loss_tf.commands import align as align_command
from ring_loss_tf.commands import common
from ring_loss_tf.commands import evaluate as evaluate_command
from ring_loss_tf.commands import export as export_command
from ring_loss_tf.commands import train as train_command

REPO = pathlib.Path(__file__).resolve().parents[2]
COMMANDS = {
    "train": train_command,
    "evaluate": evaluate_command,
    "export": export_command,
    "align": align_command,
}

# A measured figure: a percentage ("97.4 %", "97.42%") or a duration
# ("3 min 31 s", "58 s", "1.5 h", "200 ms", "4 minutes").
FIGURE = re.compile(
    r"\b\d+(?:[.,]\d+)?\s?%"
    r"|\b\d+(?:\.\d+)?\s?(?:h|min|s|ms|sec|hours?|minutes?|seconds?)\b"
)


def _entry_point(name, *args, cwd=None):
    """Runs the command's `run()` as the installed script does; the last
    stderr line says whether TensorFlow was imported by then."""
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('tensorflow imported:', "
        "'tensorflow' in sys.modules, file=sys.stderr))\n"
        f"from ring_loss_tf.commands.{name} import run\n"
        "run()\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd or REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_entry_points_import_this_checkout():
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import ring_loss_tf.commands.train, sys; "
            "print(sys.modules['ring_loss_tf'].__file__)",
        ],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.stdout.strip() == str(
        REPO / "ring_loss_tf" / "__init__.py"
    ), result


@pytest.mark.parametrize(
    "name, args, message",
    [
        (
            "train",
            ["--lambda_ring=0.01", "--steps=0"],
            r"ring-loss-train: error: --steps=0: must be a positive integer; "
            r"use e\.g\. 1000",
        ),
        (
            "train",
            ["--lambda_ring=0.01", "--image_size=3"],
            r"ring-loss-train: error: --image_size=3: must be SIZE or "
            r"HEIGHT,WIDTH, each >= 8; use e\.g\. 32 or 112,96",
        ),
        (
            "evaluate",
            [],
            r"ring-loss-evaluate: --model is required: a SavedModel directory "
            r"or a training --model_dir\.",
        ),
        (
            "evaluate",
            ["--model=m", "--kanji_image_size=4"],
            r"ring-loss-evaluate: --kanji_image_size=4: must be an integer "
            r">= 8; use e\.g\. 32\.",
        ),
        (
            "export",
            ["--model_dir=run"],
            r"ring-loss-export: error: --output_dir is required: the "
            r"SavedModel directory to write, e\.g\. --output_dir=exported\.",
        ),
        (
            "align",
            ["--input_dir=in", "--output_dir=out", "--num_workers=0"],
            r"ring-loss-align: error: --num_workers and --min_face_size must "
            r"be >= 1\.",
        ),
        (
            "align",
            ["--output_dir=out"],
            r"ring-loss-align: error: --input_dir is required: the folder of "
            r"photos, e\.g\. --input_dir=photos\.",
        ),
    ],
)
def test_a_bad_flag_is_one_line_before_tensorflow_loads(
    tmp_path, name, args, message
):
    result = _entry_point(name, *args, cwd=tmp_path)
    assert result.returncode in (1, 2), result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 2, result.stderr
    assert re.fullmatch(message, lines[0]), lines[0]
    assert lines[1] == "tensorflow imported: False"
    assert not list(tmp_path.iterdir())  # nothing written


def test_an_unexpected_argument_is_one_line(tmp_path):
    for name in COMMANDS:
        result = _entry_point(name, "stray", cwd=tmp_path)
        line, imported = result.stderr.splitlines()
        assert re.match(
            rf"ring-loss-{name}: .*unexpected arguments", line
        ), line
        assert "stray" in line and "--" in line, line
        assert imported == "tensorflow imported: False"


@pytest.fixture(scope="module")
def helps():
    """{command: (stdout of --help, its status)}."""
    return {name: _entry_point(name, "--help") for name in COMMANDS}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_gives_the_description_and_the_commands_own_flags(helps, name):
    result = helps[name]
    assert result.returncode == 1, result.stderr  # absl's --help status
    module = COMMANDS[name]
    text = result.stdout
    assert text.startswith(module.__doc__.splitlines()[0]), text[:200]
    listed = set(re.findall(r"^  --(?:\[no\])?(\w+):", text, re.M))
    own = {flag.name for flag in module.FLAGS._flags().values()}
    assert listed == own, sorted(listed ^ own)
    assert "tensorflow imported: False" in result.stderr


def test_the_repository_scripts_print_the_same_help(helps):
    for script, name in (("train.py", "train"), ("evaluate.py", "evaluate")):
        result = subprocess.run(
            [sys.executable, str(REPO / script), "--help"],
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 1, result.stderr  # absl's --help
        # The same but for absl's line naming the program (train.py:).
        assert _program_line_out(result.stdout) == _program_line_out(
            helps[name].stdout
        )


def _program_line_out(text):
    return re.sub(r"^\S+:\n", "", text, flags=re.M)


def test_the_figure_pattern_finds_figures_and_nothing_else():
    for text in (
        "97.4 %",
        "97.42%",
        "3 min 31 s",
        "58 s",
        "1.5 h",
        "took 200 ms",
        "about 4 minutes",
        "12,5 %",
    ):
        assert FIGURE.search(text), text
    for text in (
        "8192x8192",
        "112x96",
        "--steps=5",
        "(x - 127.5) / 128",
        "TAR@FAR 1e-3",
        "938 steps of 256",
        "5 stages",
        "3 hands",
        "--log_every=2",
        "a 12-d small_cnn",
    ):
        assert not FIGURE.search(text), text


@pytest.mark.parametrize("name", list(COMMANDS))
def test_no_measured_figure_in_help_or_module_docstrings(helps, name):
    module = COMMANDS[name]
    texts = {
        "--help": helps[name].stdout,
        module.__name__: module.__doc__,
    }
    for where, text in texts.items():
        found = [m.group(0) for m in FIGURE.finditer(text)]
        assert not found, (
            f"{where} states measured figures {found}: move them to the "
            "docs page beside the command that measures them."
        )


def test_no_measured_figure_in_the_scripts_and_command_library_modules():
    from ring_loss_tf.data import align
    from ring_loss_tf import export

    texts = {
        "train.py": (REPO / "train.py").read_text(),
        "evaluate.py": (REPO / "evaluate.py").read_text(),
        "ring_loss_tf.data.align": align.__doc__,
        "ring_loss_tf.export": export.__doc__,
        "ring_loss_tf.commands": importlib.import_module(
            "ring_loss_tf.commands"
        ).__doc__,
    }
    for where, text in texts.items():
        assert not FIGURE.findall(text), where


def test_shared_flags_have_one_spelling():
    names = {
        name: {
            f.name
            for f in module.FLAGS._flags().values()
            if not f.help.startswith("Alias for --")
        }
        for name, module in COMMANDS.items()
    }
    assert "output_dir" in names["evaluate"]
    assert {"model_dir", "output_dir"} <= names["export"]
    assert {"input_dir", "output_dir"} <= names["align"]
    assert {"model_dir", "data_dir"} <= names["train"]
    # No command spells a shared setting another way.
    for old in ("output", "input", "model_path", "outdir"):
        for name, flags_of in names.items():
            assert old not in flags_of, (name, old)


def test_the_old_spellings_still_work():
    cases = [
        (export_command, ["--output=x"], "output_dir", "x"),
        (align_command, ["--input=i"], "input_dir", "i"),
        (align_command, ["--output=o"], "output_dir", "o"),
        (evaluate_command, ["--model_dir=runs/a"], "model", "runs/a"),
    ]
    for module, argv, name, value in cases:
        module.FLAGS.unparse_flags()
        try:
            module.FLAGS(["prog", *argv])
            assert module.FLAGS[name].value == value, (argv, name)
        finally:
            module.FLAGS.unparse_flags()


def test_evaluate_takes_the_embedded_set_flags_of_train():
    for name in config_lib.EMBEDDED_SET:
        field = config_lib.FIELDS[name]
        for module in (train_command, evaluate_command):
            flag = module.FLAGS[name]
            assert flag.help == field.help, (module.__name__, name)
            assert flag.default == field.default, (module.__name__, name)
    assert {"kanji_image_size", "kanji_seed", "pairs_per_fold"} <= set(
        config_lib.EMBEDDED_SET
    )


def test_the_commands_copies_of_library_constants_agree():
    from ring_loss_tf.data import align
    from ring_loss_tf import export

    assert export_command.KERAS_FILE == export.KERAS_FILE
    assert export_command.ONNX_INSTALL == export.ONNX_INSTALL
    assert align_command.TEMPLATE_NAMES == tuple(sorted(align.TEMPLATES))
    assert align_command.NO_FACE_ACTIONS == tuple(align.NO_FACE_ACTIONS)
    assert align_command.NO_FACE_FILE == align.NO_FACE_FILE
    assert align_command.FLAGS["max_image_pixels"].default == (
        align.MAX_IMAGE_PIXELS
    )


def test_no_library_module_imports_absl_flags():
    package = REPO / "ring_loss_tf"
    for path in package.rglob("*.py"):
        if path.parent.name == "commands":
            continue
        text = path.read_text()
        assert not re.search(
            r"^\s*(from absl import flags|import absl\.flags|"
            r"from absl\.flags import)",
            text,
            re.M,
        ), path


def test_pyproject_installs_each_command():
    text = (REPO / "pyproject.toml").read_text()
    for installed, name in (
        ("ring-loss-train", "train"),
        ("ring-loss-evaluate", "evaluate"),
        ("ring-loss-export", "export"),
        ("ring-loss-align", "align"),
        ("ring-loss-convert", "convert"),
    ):
        assert f'{installed} = "ring_loss_tf.commands.{name}:run"' in text
        assert installed in common.COMMANDS
    # The package leaves TensorFlow to the command in each of them.
    assert set(quiet.COMMANDS) == set(common.COMMANDS)
    assert '"ring_loss_tf.*"' in text  # the subpackages are packaged
