"""Checkpoint files: what a killed run left unfinished, and the scratch
directory where a non-chief worker writes its copies."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import tempfile

import tensorflow as tf

from ring_loss_tf.errors import ConfigError
from ring_loss_tf.errors import first_line


_CHECKPOINT_FILE = re.compile(r"ckpt-(\d+)(_temp|\.index|\.data-.*)$")


def remove_unfinished_checkpoints(directory):
    """Deletes what a killed run left of checkpoints it had not finished.

    TensorFlow writes ckpt-N_temp/, merges it into ckpt-N.index and
    ckpt-N.data-*, and only then names ckpt-N in the `checkpoint` index
    (atomically). A kill before that leaves a temporary directory or a
    partial ckpt-N.index; neither is ever read (the index names the last
    complete checkpoint), and the resumed run writes ckpt-N again. Without
    a `checkpoint` index only the temporary directories go: checkpoint
    files nothing names may be a user's copy.

    Returns:
        The names removed.
    """
    directory = pathlib.Path(directory)
    latest = tf.train.latest_checkpoint(str(directory))
    newest = -1
    if latest:
        match = _CHECKPOINT_FILE.match(pathlib.Path(latest).name + ".index")
        newest = int(match.group(1)) if match else -1
    removed = []
    for path in sorted(directory.glob("ckpt-*")):
        match = _CHECKPOINT_FILE.match(path.name)
        if match is None:
            continue
        unfinished = latest is not None and int(match.group(1)) > newest
        if match.group(2) == "_temp" or unfinished:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def scratch_directory(scratch_dir):
    """A new directory for a worker's checkpoint copies, in `scratch_dir`
    (made if missing; None: the system's temporary directory).

    Raises:
        ConfigError: it cannot be made there (a file, no permission, ...).
    """
    try:
        if scratch_dir is not None:
            os.makedirs(scratch_dir, exist_ok=True)
        return pathlib.Path(
            tempfile.mkdtemp(prefix="ring_loss_tf-worker-", dir=scratch_dir)
        )
    except OSError as error:
        raise ConfigError(
            "worker_scratch_dir", scratch_dir,
            f"cannot make a directory there ({first_line(error)})",
            "give a writable directory, or omit it to use the system's "
            "temporary directory",
        ) from None
