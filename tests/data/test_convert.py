"""Tests of the converter (ring_loss_tf/convert.py) and of train.py on
TFRecord shards, the converter's and tf.io.TFRecordWriter's."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

from ring_loss_tf.data import convert
from ring_loss_tf.data import recordio
from ring_loss_tf.data import sources
from tests.data_files import example_bytes
from tests.data_files import folder_examples
from tests.data_files import make_lfw
from tests.data_files import random_images
from tests.data_files import write_tfrecords

REPO = pathlib.Path(__file__).resolve().parents[2]


def run(args, cwd, module=None, timeout=600):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    command = ([sys.executable, "-m", module] if module
               else [sys.executable, str(REPO / "train.py")])
    return subprocess.run([*command, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def examples(root):
    source = sources.open_root(root)
    return [source.read(i)[:2] for i in range(source.num_examples)]


def test_round_trip_keeps_bytes_labels_and_order(tmp_path):
    folder = random_images(tmp_path / "folder" / "train", [3, 4, 2])
    expected = folder_examples(folder)
    lines = []
    written = convert.convert(tmp_path / "folder", tmp_path / "a",
                              "tfrecord", records_per_shard=4,
                              progress=lines.append)
    assert [p.name for p in written] == [
        f"train-0000{k}-of-00003.tfrecord" for k in range(3)
    ]
    assert lines[-1] == (
        f"Wrote 9 images of 3 classes from {tmp_path / 'folder'} to "
        f"{tmp_path / 'a'} (tfrecord: train-00000-of-00003.tfrecord, "
        "train-00001-of-00003.tfrecord, train-00002-of-00003.tfrecord)"
    )
    assert "read 9/9 images" in lines
    convert.convert(tmp_path / "a", tmp_path / "b", "rec")
    convert.convert(tmp_path / "b", tmp_path / "c", "tfrecord")
    for name in "abc":
        assert examples(tmp_path / name) == expected, name
    # The .rec follows insightface's layout: header record 0 (first image
    # id, end), images 1..9, one identity record per class.
    reader = recordio.RecordIOReader(tmp_path / "b" / "train.rec")
    header, payload = reader.read_image(0)
    assert (header.flag, list(header.label), payload) == (2, [10.0, 13.0],
                                                          b"")
    identities = [list(reader.read_image(k)[0].label) for k in (10, 11, 12)]
    assert identities == [[1.0, 4.0], [4.0, 8.0], [8.0, 10.0]]


def test_a_payload_holding_the_magic_number_is_split(tmp_path):
    """dmlc framing: the magic number at an aligned position splits a
    record in parts, which the reader joins again."""
    image = (b"\x89PNG\r\n\x1a\n" + b"\x00" * 4
             + recordio.MAGIC.to_bytes(4, "little") + b"tail")
    # 24-byte IRHeader + image: the magic sits at offset 36, aligned.
    write_tfrecords(tmp_path / "in", [[example_bytes(image, 0),
                                       example_bytes(image[:12], 1)]])
    convert.convert(tmp_path / "in", tmp_path / "out", "rec")
    assert examples(tmp_path / "out") == [(image, 0), (image[:12], 1)]
    raw = (tmp_path / "out" / "train.rec").read_bytes()
    assert raw.count(recordio.MAGIC.to_bytes(4, "little")) > 5


def test_existing_output_is_refused_and_kept(tmp_path):
    random_images(tmp_path / "folder" / "train", [2, 2])
    convert.convert(tmp_path / "folder", tmp_path / "out", "rec")
    before = (tmp_path / "out" / "train.rec").read_bytes()
    with pytest.raises(ValueError, match=(
        f"^{re.escape(str(tmp_path / 'out'))} already holds a training set "
        r"\(train.rec\); choose another --output_dir or delete it first.$"
    )):
        convert.convert(tmp_path / "folder", tmp_path / "out", "tfrecord")
    assert (tmp_path / "out" / "train.rec").read_bytes() == before
    assert not list((tmp_path / "out").glob("*.tfrecord*"))


def test_bad_input_names_the_file_and_leaves_no_output(tmp_path):
    folder = random_images(tmp_path / "folder" / "train", [2, 3])
    bad = folder / "id01" / "1.png"
    bad.write_bytes(b"not a picture")
    with pytest.raises(ValueError, match=(
        f"^{re.escape(str(bad))}: 13 bytes that are not an image"
    )):
        convert.convert(tmp_path / "folder", tmp_path / "out", "tfrecord",
                        records_per_shard=2)
    assert list((tmp_path / "out").iterdir()) == []
    records = [example_bytes(b"\x89PNG\r\n\x1a\n", 0),
               example_bytes(b"\x89PNG", 1, label_key="y")]
    (shard,) = write_tfrecords(tmp_path / "shards", [records])
    with pytest.raises(ValueError,
                       match=f"^{re.escape(str(shard))} record 1: no int64"):
        convert.convert(tmp_path / "shards", tmp_path / "out2", "rec")
    assert not (tmp_path / "out2" / "train.rec").exists()


def test_command_prints_progress_and_refuses_in_one_line(tmp_path):
    random_images(tmp_path / "folder" / "train", [3, 3])
    args = [f"--input_dir={tmp_path / 'folder'}",
            f"--output_dir={tmp_path / 'o'}", "--to=tfrecord"]
    result = run(args, tmp_path, module="ring_loss_tf.data.convert")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [
        f"read {k}/6 images" for k in range(1, 7)
    ] + [
        f"Wrote 6 images of 2 classes from {tmp_path / 'folder'} to "
        f"{tmp_path / 'o'} (tfrecord: train-00000-of-00001.tfrecord)"
    ]
    again = run(args, tmp_path, module="ring_loss_tf.data.convert")
    assert again.returncode == 2
    assert again.stderr.strip().splitlines()[-1] == (
        f"ring-loss-convert: error: {tmp_path / 'o'} already holds a "
        "training set (train-00000-of-00001.tfrecord); choose another "
        "--output_dir or delete it first."
    )


def tiny_train(data_dir, tmp_path, *extra):
    return run([
        f"--data_dir={data_dir}", f"--model_dir={tmp_path / 'run'}",
        "--image_size=16", "--channels=1", "--steps=3", "--batch_size=4",
        "--log_every=1", "--warmup_steps=0", "--lr=0.01", "--nojit",
        *extra,
    ], tmp_path)


def test_train_on_converted_shards_and_evaluate(tmp_path):
    """Shards beside an LFW-layout test/ + pairs.txt: train, export and the
    final verification table."""
    from ring_loss_tf.data import eval_sets

    random_images(tmp_path / "folder" / "train", [4, 4, 4])
    shards = tmp_path / "shards"
    convert.convert(tmp_path / "folder", shards, "tfrecord",
                    records_per_shard=5)
    make_lfw(shards / "test", [3] * 20)
    eval_sets.make_pairs_file(shards / "test", shards / "pairs.txt",
                              pairs_per_fold=2)
    result = tiny_train(shards, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^Training: .* 3 classes, 12 images", result.stdout,
                     re.M), result.stdout
    assert re.search(r"^step 3/3  loss [\d.]+", result.stdout, re.M)
    assert (tmp_path / "run" / "export").is_dir()
    assert re.search(r"\| 10-fold accuracy \| TAR@FAR=1e-3 \|",
                     result.stdout), result.stdout


def test_train_on_tf_writer_shards_with_other_keys(tmp_path):
    """Shards written by plain tf.io.TFRecordWriter code (train/ layout,
    other feature names given by flag)."""
    folder = random_images(tmp_path / "folder", [3, 3])
    records = [example_bytes(image, label, image_key="jpg",
                             label_key="cls")
               for image, label in folder_examples(folder)]
    write_tfrecords(tmp_path / "data" / "train", [records[:4], records[4:]],
                    name="shard{}.tfrecord")
    result = tiny_train(tmp_path / "data", tmp_path,
                        "--tfrecord_image_key=jpg",
                        "--tfrecord_label_key=cls")
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^Training: .* 2 classes, 6 images", result.stdout,
                     re.M), result.stdout
    wrong = run([f"--data_dir={tmp_path / 'data'}",
                 f"--model_dir={tmp_path / 'run2'}", "--image_size=16",
                 "--channels=1", "--steps=1", "--batch_size=4", "--nojit"],
                tmp_path)
    assert wrong.returncode == 2
    assert wrong.stderr.strip().splitlines()[-1] == (
        f"train.py: error: {tmp_path / 'data' / 'train' / 'shard0.tfrecord'}"
        " record 0: no bytes feature 'image/encoded' (its features: cls, "
        "jpg). Name the image feature with --tfrecord_image_key."
    )
