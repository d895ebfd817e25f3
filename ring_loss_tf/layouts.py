"""Where a training set sits under `--data_dir`, per format, without
TensorFlow: the detect half of `ring_loss_tf.data.sources.FORMATS`.

    recordio    <root>/train.rec (+ train.idx), or <root>/train/train.rec
    tfrecord    <root>/train-*.tfrecord, or <root>/train/*.tfrecord
    folder      <root>/train/<identity>/*.jpg

The configuration check (`ring_loss_tf.config`) uses `find` before
TensorFlow loads; `ring_loss_tf.data.sources` pairs each layout with the function
that opens it.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Callable


def detect_recordio(path: pathlib.Path) -> pathlib.Path | None:
    """A `.rec` file, or the `train.rec` of a directory."""
    if path.is_file():
        return path if path.suffix == ".rec" else None
    rec = path / "train.rec"
    return rec if rec.is_file() else None


def tfrecord_shards(path: pathlib.Path) -> list[pathlib.Path]:
    """`train-*.tfrecord` in `path`, or every `*.tfrecord` of a directory
    named train; sorted."""
    if not path.is_dir():
        return []
    shards = sorted(path.glob("train-*.tfrecord"))
    if not shards and path.name == "train":
        shards = sorted(path.glob("*.tfrecord"))
    return [s for s in shards if s.is_file()]


def detect_tfrecord(path: pathlib.Path) -> pathlib.Path | None:
    return path if tfrecord_shards(path) else None


def detect_folder(path: pathlib.Path) -> pathlib.Path | None:
    return path if path.is_dir() else None


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a format sits on disk.

    Attributes:
        name: the format, as the sources' `kind`.
        detect: path -> the path to open, or None.
        at_root: whether the set may sit at the data root itself (a
            folder's identities must be under <root>/train).
        description: how the layout reads in messages.
    """

    name: str
    detect: Callable[[pathlib.Path], pathlib.Path | None]
    at_root: bool
    description: str


# The first that detects a path wins.
LAYOUTS = (
    Layout("recordio", detect_recordio, True, "train.rec"),
    Layout("tfrecord", detect_tfrecord, True, "train-*.tfrecord shards"),
    Layout("folder", detect_folder, False, "train/ folder"),
)

# "train/ folder, train-*.tfrecord shards or train.rec", for messages.
DESCRIPTION = ", ".join(x.description for x in LAYOUTS[:0:-1]) + (
    " or " + LAYOUTS[0].description
)


def find(root: str | os.PathLike):
    """(Layout, path to open) of the training set under a data root, or
    None: <root>/train first (any layout), then the root itself."""
    root = pathlib.Path(root)
    train = root / "train"
    if train.is_dir():
        for layout in LAYOUTS:
            found = layout.detect(train)
            if found is not None:
                return layout, found
    for layout in LAYOUTS:
        if layout.at_root:
            found = layout.detect(root)
            if found is not None:
                return layout, found
    return None


def default_cache_dir() -> pathlib.Path:
    """Where generated data sets and indexes are kept: $RING_LOSS_TF_CACHE,
    else $XDG_CACHE_HOME/ring_loss_tf, else ~/.cache/ring_loss_tf."""
    if os.environ.get("RING_LOSS_TF_CACHE"):
        return pathlib.Path(os.environ["RING_LOSS_TF_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    return pathlib.Path(base) / "ring_loss_tf"
