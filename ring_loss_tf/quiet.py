"""Keeps TensorFlow's own log out of what the entry points print.

The commands (`ring-loss-train` and the others of ring_loss_tf/commands/,
`python train.py`, `python evaluate.py`, `python -m ring_loss_tf.export`)
print the project's lines and the warnings that matter, nothing else. What
TensorFlow 2.21 would add, and where each is stopped:

- C++ lines logged while TensorFlow loads, before absl::InitializeLog
  ("oneDNN custom operations are on", "Could not find cuda drivers", then
  the cuInit failure of a machine without a GPU driver). They are written
  whatever TF_CPP_MIN_LOG_LEVEL says, so `import_tensorflow` captures file
  descriptor 2 while TensorFlow is imported and drops them.
- Later C++ INFO and WARNING lines (the SavedModel reader's and the TFLite
  converter's): TF_CPP_MIN_LOG_LEVEL=2, set before the import unless the
  user set it.
- Python INFO lines through absl logging (SavedModel writing, checkpoint
  sharding, the distribution strategy): absl.app raises the verbosity to
  INFO; the commands set it back to WARNING unless --verbosity was given
  (`ring_loss_tf.commands.common.quiet_tensorflow`: flags stay out of the
  library).

Importing the package from other code changes nothing: `ring_loss_tf`
calls `import_tensorflow` on import only under `python -m
ring_loss_tf.export` or `.align` (`is_module_entry_point`); the commands
call it after checking their flags (`is_script_entry_point`). This module
imports nothing but the standard library, so that the package can use it
before TensorFlow is imported.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from typing import Iterable

SCRIPTS = ("train.py", "evaluate.py")  # beside the package
MODULES = (
    "ring_loss_tf.export", "ring_loss_tf.data.align", "ring_loss_tf.data.convert"
)  # python -m
# The installed commands ([project.scripts] of pyproject.toml).
COMMANDS = (
    "ring-loss-train", "ring-loss-evaluate", "ring-loss-export",
    "ring-loss-align", "ring-loss-convert",
)
COMMAND_PACKAGE = "ring_loss_tf.commands"

_STARTUP_NOISE = (
    r"WARNING: All log messages before absl::InitializeLog\(\) is called "
    r"are written to STDERR",
    # An absl INFO line: I<mmdd> <time> <thread> <file>:<line>] ...
    r"I\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] .*",
)
_NO_DRIVER = "Could not find cuda drivers on your machine"
# Follows _NO_DRIVER when no GPU driver is installed: no news then.
_CUINIT_FAILED = r"E\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] failed call to cuInit: .*"


def is_script_entry_point() -> bool:
    """Whether this process runs a command (ring_loss_tf/commands/): an
    installed one, `python -m ring_loss_tf.commands.<name>`, `python -c`
    code that imports one, or train.py or evaluate.py of this checkout.

    The package then leaves the layers, and so TensorFlow, to load on first
    use, and the command checks its flags first.
    """
    module = _module_being_started()
    if module is not None and module.startswith(COMMAND_PACKAGE + "."):
        return True
    if _code_being_run() is not None:
        return COMMAND_PACKAGE in _code_being_run()
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file and os.path.basename(main_file) in COMMANDS:
        return True
    if not main_file or os.path.basename(main_file) not in SCRIPTS:
        return False
    here = os.path.dirname(os.path.realpath(__file__))
    return os.path.dirname(os.path.realpath(main_file)) == (
        os.path.dirname(here)
    )


def _code_being_run():
    """The code of `python -c code`, else None."""
    if sys.argv[:1] != ["-c"]:
        return None
    argv = getattr(sys, "orig_argv", [])
    for i, arg in enumerate(argv[1:], start=1):
        if arg == "-c":
            return argv[i + 1] if i + 1 < len(argv) else None
        if arg.startswith("-c"):
            return arg[2:]
    return None


def is_module_entry_point() -> bool:
    """Whether this process runs `python -m` one of `MODULES`."""
    return _module_being_started() in MODULES


def _module_being_started():
    """The module of `python -m module` while its package is imported.

    Python sets sys.argv[0] to "-m" until the module is found; the package
    is imported before then, so only sys.orig_argv names the module.
    """
    if sys.argv[:1] != ["-m"]:
        return None
    argv = getattr(sys, "orig_argv", [])
    for i, arg in enumerate(argv[1:], start=1):
        if arg == "-m":
            return argv[i + 1] if i + 1 < len(argv) else None
        if arg.startswith("-m"):
            return arg[2:]
    return None


@contextlib.contextmanager
def dropped_lines(patterns: Iterable[str], more_patterns=None):
    """Captures file descriptor 2 in the block, then writes back its lines
    except those matching one of `patterns` (`re.fullmatch`).

    C and C++ code writes to the descriptor, not to `sys.stderr`, so only
    the descriptor catches it. If the block raises, every line is written
    back. `more_patterns(text)`, given all the captured text, returns more
    patterns to drop (a line that is noise only after another).
    """
    patterns = list(patterns)
    sys.stderr.flush()
    saved = os.dup(2)
    capture = tempfile.TemporaryFile()
    failed = True
    try:
        os.dup2(capture.fileno(), 2)
        yield
        failed = False
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        capture.seek(0)
        text = capture.read().decode(errors="replace")
        capture.close()
        if not failed and more_patterns is not None:
            patterns += list(more_patterns(text))
        kept = [
            line
            for line in text.splitlines(keepends=True)
            if failed
            or not any(re.fullmatch(p, line.rstrip("\n")) for p in patterns)
        ]
        if kept:
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def _cuinit_without_driver(text):
    return [_CUINIT_FAILED] if _NO_DRIVER in text else []


def import_tensorflow():
    """Imports TensorFlow without its start-up log (see the module doc).

    With TF_CPP_MIN_LOG_LEVEL=0 (asked for INFO) or TensorFlow already
    imported, it only imports.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules or os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0":
        import tensorflow  # noqa: F401

        return
    with dropped_lines(_STARTUP_NOISE, more_patterns=_cuinit_without_driver):
        import tensorflow as tf

        # CUDA is initialised, and its failure logged, at the first query.
        tf.config.list_physical_devices()
