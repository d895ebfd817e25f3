"""The installed commands: `pip install -e .` into a new virtualenv, then
`ring-loss-train --lambda_ring=0.01 --steps=5` and every command's --help.

The new virtualenv sees this one's packages (a .pth line naming this
interpreter's site-packages) so that nothing is downloaded but the build
backend; it holds this checkout, installed editable, and its four scripts.
Slow (tests/slow_set.py): the virtualenv and the install.
"""

import os
import pathlib
import re
import subprocess
import sys
import sysconfig

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
COMMANDS = (
    "ring-loss-train",
    "ring-loss-evaluate",
    "ring-loss-export",
    "ring-loss-align",
)


def _run(command, **kwargs):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=900, **kwargs
    )


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """bin/ of a new virtualenv with this checkout installed."""
    root = tmp_path_factory.mktemp("venv")
    made = _run(
        [sys.executable, "-m", "venv", "--system-site-packages", str(root)]
    )
    assert made.returncode == 0, made.stderr
    python = root / "bin" / "python"
    purelib = _run(
        [
            str(python),
            "-c",
            "import sysconfig; print(sysconfig.get_paths()" "['purelib'])",
        ]
    ).stdout.strip()
    # This interpreter's packages (TensorFlow, Keras, absl), not its .pth
    # files: its own editable install of ring_loss_tf stays out.
    (pathlib.Path(purelib) / "outer_packages.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n"
    )
    installed = _run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "-e",
            str(REPO),
        ],
        cwd=root,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    return root / "bin"


def test_the_install_puts_each_command_on_the_path(venv):
    for command in COMMANDS:
        assert (venv / command).is_file(), command
    where = _run(
        [
            str(venv / "python"),
            "-c",
            "import ring_loss_tf; print(ring_loss_tf.__file__)",
        ],
        cwd=venv,
    )
    assert where.stdout.strip() == str(
        REPO / "ring_loss_tf" / "__init__.py"
    ), where


@pytest.mark.parametrize("command", COMMANDS)
def test_each_installed_command_prints_its_help(venv, command):
    result = _run([str(venv / command), "--help"], cwd=venv)
    assert result.returncode == 1, result.stderr  # absl's --help status
    assert "--helpfull" in result.stdout, result.stdout
    own = re.findall(r"^  --(?:\[no\])?(\w+):", result.stdout, re.M)
    assert len(own) >= 5, result.stdout  # the command's own flags


def test_an_installed_command_checks_flags_before_tensorflow(venv, tmp_path):
    result = _run(
        [str(venv / "ring-loss-train"), "--lambda_ring=0.01", "--steps=0"],
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "ring-loss-train: error: --steps=0: must be a positive integer; "
        "use e.g. 1000"
    ]
    # The script itself, run as its own __main__, imports no TensorFlow.
    script = venv / "ring-loss-train"
    probe = _run(
        [
            str(venv / "python"),
            "-c",
            "import atexit, runpy, sys\n"
            "atexit.register(lambda: print('tensorflow imported:', "
            "'tensorflow' in sys.modules, file=sys.stderr))\n"
            f"sys.argv = [{str(script)!r}, '--steps=0']\n"
            f"runpy.run_path({str(script)!r}, run_name='__main__')\n",
        ],
        cwd=tmp_path,
    )
    assert probe.returncode == 2, probe.stderr
    assert probe.stderr.splitlines()[-1] == "tensorflow imported: False"


def test_installed_train_runs_five_steps(venv, tmp_path):
    result = _run(
        [
            str(venv / "ring-loss-train"),
            "--lambda_ring=0.01",
            "--steps=5",
            f"--model_dir={tmp_path / 'run'}",
            f"--cache_dir={tmp_path / 'cache'}",
            "--num_train_identities=10",
            "--num_test_identities=8",
            "--train_samples_per_identity=4",
            "--test_samples_per_identity=4",
            "--batch_size=8",
            "--log_every=5",
            "--warmup_steps=0",
            "--nojit",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^step 5/5 ", result.stdout, re.M), result.stdout
    assert (tmp_path / "run" / "export" / "saved_model.pb").is_file()
