"""Tests of the training sources (ring_loss_tf/sources.py): the same images
as a folder, a .rec and TFRecord shards give the same batches; TFRecord
indexing and its one-line errors."""

import pathlib
import re
import struct

import numpy as np
import pytest
import tensorflow as tf

from ring_loss_tf import config as config_lib
from ring_loss_tf.data import convert
from ring_loss_tf.data import pipeline
from ring_loss_tf.data import sources
from ring_loss_tf.errors import ConfigError
from tests.data_files import constant_png
from tests.data_files import example_bytes
from tests.data_files import folder_examples
from tests.data_files import random_images
from tests.data_files import write_tfrecords

COUNTS = [5, 4, 6]  # 15 images: 5 steps of 8 pass two epoch boundaries


def global_batches(dataset, steps, per_step):
    """The first `steps` steps, each its `per_step` per-replica batches
    concatenated."""
    iterator = iter(dataset)
    out = []
    for _ in range(steps):
        parts = [next(iterator) for _ in range(per_step)]
        out.append(tuple(np.concatenate([p[i].numpy() for p in parts])
                         for i in range(2)))
    return out


@pytest.fixture(scope="module")
def three_formats(tmp_path_factory):
    """One set of images as a folder, a .rec (converter), TFRecord shards
    (converter, 4 records a shard) and TFRecord shards written here with
    tf.io.TFRecordWriter (two shards, train/ layout)."""
    base = tmp_path_factory.mktemp("formats")
    folder = random_images(base / "folder" / "train", COUNTS)
    convert.convert(base / "folder", base / "rec", "rec")
    convert.convert(base / "folder", base / "shards", "tfrecord",
                    records_per_shard=4)
    records = [example_bytes(image, label)
               for image, label in folder_examples(folder)]
    write_tfrecords(base / "plain" / "train", [records[:7], records[7:]],
                    name="part-{}.tfrecord")
    return {name: base / name for name in ("folder", "rec", "shards",
                                           "plain")}


def test_find_detects_each_layout(three_formats):
    kinds = {name: sources.find(root)[0].name
             for name, root in three_formats.items()}
    assert kinds == {"folder": "folder", "rec": "recordio",
                     "shards": "tfrecord", "plain": "tfrecord"}
    shards = sorted(p.name for p in three_formats["shards"].iterdir())
    assert shards == [
        "train-00000-of-00004.tfrecord", "train-00000-of-00004.tfrecord.idx",
        "train-00001-of-00004.tfrecord", "train-00001-of-00004.tfrecord.idx",
        "train-00002-of-00004.tfrecord", "train-00002-of-00004.tfrecord.idx",
        "train-00003-of-00004.tfrecord", "train-00003-of-00004.tfrecord.idx",
    ]


def test_every_format_reads_the_same_bytes_and_labels(three_formats):
    expected = folder_examples(three_formats["folder"] / "train")
    for name, root in three_formats.items():
        source = sources.open_root(root)
        assert (source.num_classes, source.num_examples) == (3, 15), name
        got = [source.read(i)[:2] for i in range(source.num_examples)]
        assert got == expected, name


@pytest.mark.parametrize("workers", [1, 2])
def test_every_format_gives_the_folder_batches(three_formats, workers):
    """Bit-identical global batches (pixels, augmentation, labels) for each
    step, on one pipeline and on two pipelines of two replicas each (the
    two workers' rows together), past two epoch boundaries."""
    common = dict(batch_size=8, image_size=(8, 8), channels=1,
                  augment="face", seed=5)
    steps = 5

    def batches(root, **kwargs):
        source = sources.open_root(root)
        if workers == 1:
            return global_batches(
                pipeline.training_dataset(source, **common, **kwargs), steps, 1
            )
        halves = [
            global_batches(pipeline.training_dataset(
                source,
                input_context=tf.distribute.InputContext(
                    num_input_pipelines=2, input_pipeline_id=k,
                    num_replicas_in_sync=4,
                ),
                **common, **kwargs,
            ), steps, 2)
            for k in range(2)
        ]
        return [tuple(np.concatenate([a[i], b[i]]) for i in range(2))
                for a, b in zip(*halves)]

    # The reference: the folder, streamed, on one device.
    folder = sources.open_root(three_formats["folder"])
    reference = global_batches(pipeline.training_dataset(
        folder, **common, in_memory=False), steps, 1)
    for name, root in three_formats.items():
        got = batches(root)
        for step in range(steps):
            for i in range(2):
                np.testing.assert_array_equal(
                    got[step][i], reference[step][i], err_msg=name
                )
    # Not vacuous: the labels vary, and augmentation moved pixels.
    assert len(set(np.concatenate([b[1] for b in reference]).tolist())) == 3
    plain = global_batches(pipeline.training_dataset(
        folder, **{**common, "augment": "none"}), steps, 1)
    assert any(not np.array_equal(a[0], b[0])
               for a, b in zip(reference, plain))


def test_each_worker_reads_only_its_rows(three_formats, monkeypatch):
    """A pipeline of worker 1 of 2 reads exactly the examples of its half
    of each global batch (by global index), not the whole batch."""
    source = sources.open_root(three_formats["shards"])
    reads = []
    original = sources.TFRecordSource.read

    def counting(self, index):
        reads.append(index)
        return original(self, index)

    monkeypatch.setattr(sources.TFRecordSource, "read", counting)
    dataset = pipeline.training_dataset(
        source, batch_size=8, image_size=(8, 8), channels=1, augment="none",
        seed=5, input_context=tf.distribute.InputContext(
            num_input_pipelines=2, input_pipeline_id=1,
            num_replicas_in_sync=2,
        ), repeat=False,
    )
    list(dataset)
    positions = tf.range(4, 8, dtype=tf.int64)  # rows 4..7 of step 0
    expected = pipeline.shuffled_index(positions, tf.constant(5, tf.int64), 15)
    assert sorted(reads) == sorted(expected.numpy().tolist())


# --------------------------------------------------------------------------
# The index


def small_shards(directory, count=5, **kwargs):
    records = [example_bytes(constant_png(10 * k + 1), k % 2)
               for k in range(count)]
    return write_tfrecords(directory, [records], **kwargs)


def test_index_is_written_beside_the_shard_and_reused(tmp_path,
                                                      monkeypatch):
    (shard,) = small_shards(tmp_path / "set")
    source = sources.open_source(tmp_path / "set")
    index = shard.with_name(shard.name + ".idx")
    lines = index.read_text().splitlines()
    assert lines[0].startswith("# ring_loss_tf TFRecord index 1 size=")
    # Offsets from TFRecord framing: 12-byte header, data, 4-byte CRC.
    offsets = [int(line.split("\t")[0]) for line in lines[1:]]
    raw = shard.read_bytes()
    position, expected = 0, []
    while position < len(raw):
        expected.append(position)
        position += 16 + struct.unpack_from("<Q", raw, position)[0]
    assert offsets == expected and source.num_examples == 5

    def no_scan(shard):
        raise AssertionError("scanned again")

    monkeypatch.setattr(sources, "scan_tfrecord", no_scan)
    again = sources.open_source(tmp_path / "set")
    assert [again.read(i)[1] for i in range(5)] == [0, 1, 0, 1, 0]


def test_a_changed_shard_is_indexed_again(tmp_path):
    (shard,) = small_shards(tmp_path / "set")
    assert sources.open_source(tmp_path / "set").num_examples == 5
    small_shards(tmp_path / "set", count=7)  # rewritten: another size
    assert sources.open_source(tmp_path / "set").num_examples == 7


def test_read_only_shard_dir_puts_the_index_in_the_cache(tmp_path,
                                                         monkeypatch):
    (shard,) = small_shards(tmp_path / "set")
    real = sources.tempfile.mkstemp

    def refuse_beside(dir, **kwargs):
        if pathlib.Path(dir) == shard.parent:
            raise PermissionError(13, "Permission denied", str(dir))
        return real(dir=dir, **kwargs)

    monkeypatch.setattr(sources.tempfile, "mkstemp", refuse_beside)
    options = sources.Options(index_dir=str(tmp_path / "cache"))
    source = sources.open_source(tmp_path / "set", options)
    assert source.num_examples == 5
    assert not shard.with_name(shard.name + ".idx").exists()
    (cached,) = (tmp_path / "cache" / "tfrecord-index").iterdir()
    assert cached.name.endswith("-train-00000.tfrecord.idx")
    assert list(shard.parent.glob("*.tmp")) == []


def test_a_failed_index_write_keeps_the_old_index(tmp_path, monkeypatch):
    (shard,) = small_shards(tmp_path / "set")
    sources.open_source(tmp_path / "set")
    index = shard.with_name(shard.name + ".idx")
    before = index.read_text()
    small_shards(tmp_path / "set", count=6)

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sources.os, "replace", fail)
    with pytest.raises(OSError):
        sources.open_source(tmp_path / "set", sources.Options(
            index_dir=str(tmp_path / "cache")))
    assert index.read_text() == before
    assert list(shard.parent.glob("*.tmp")) == []


# --------------------------------------------------------------------------
# Bad records: one line naming the shard and the record


def open_error(directory, **options):
    with pytest.raises(ValueError) as caught:
        sources.open_source(directory, sources.Options(**options))
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_truncated_shard(tmp_path):
    (shard,) = small_shards(tmp_path / "set")
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-10])
    message = open_error(tmp_path / "set")
    assert message.startswith(f"{shard} record 4: truncated: the record "
                              f"needs {len(raw)} bytes, the shard has "
                              f"{len(raw) - 10}. Write the shard again")


def test_damaged_data_fails_its_checksum(tmp_path):
    (shard,) = small_shards(tmp_path / "set")
    raw = bytearray(shard.read_bytes())
    raw[-40] ^= 0xFF  # inside the last record's data
    shard.write_bytes(bytes(raw))
    assert open_error(tmp_path / "set").startswith(
        f"{shard} record 4: its data checksum does not match"
    )


def test_not_a_tfrecord_file(tmp_path):
    shard = tmp_path / "set" / "train-0.tfrecord"
    shard.parent.mkdir()
    shard.write_bytes(b"JFIF" * 10)
    assert open_error(tmp_path / "set").startswith(
        f"{shard} record 0: the length's checksum does not match"
    )


def test_wrong_key_names_the_feature_and_the_flag(tmp_path):
    records = [example_bytes(constant_png(1), 0),
               example_bytes(constant_png(2), 1, image_key="jpeg")]
    (shard,) = write_tfrecords(tmp_path / "set", [records])
    assert open_error(tmp_path / "set") == (
        f"{shard} record 1: no bytes feature 'image/encoded' (its features: "
        "image/class/label, jpeg). Name the image feature with "
        "--tfrecord_image_key."
    )
    message = open_error(tmp_path / "set", label_key="label")
    assert message.startswith(f"{shard} record 0: no int64 feature 'label'")
    assert message.endswith("--tfrecord_label_key.")


def test_other_key_names(tmp_path):
    records = [example_bytes(constant_png(k), k, image_key="img",
                             label_key="y") for k in range(3)]
    write_tfrecords(tmp_path / "set", [records])
    source = sources.open_source(tmp_path / "set", sources.Options(
        image_key="img", label_key="y"))
    assert [source.read(i)[:2] for i in range(3)] == [
        (constant_png(k), k) for k in range(3)
    ]


def test_non_image_bytes(tmp_path):
    records = [example_bytes(constant_png(1), 0),
               example_bytes(constant_png(2), 1),
               example_bytes(b"hello, world", 1)]
    (shard,) = write_tfrecords(tmp_path / "set", [records])
    assert open_error(tmp_path / "set").startswith(
        f"{shard} record 2: 'image/encoded' holds 12 bytes that are not an "
        "image (they start b'hello, w'"
    )


def test_negative_label(tmp_path):
    records = [example_bytes(constant_png(1), 0),
               example_bytes(constant_png(2), -3)]
    (shard,) = write_tfrecords(tmp_path / "set", [records])
    assert open_error(tmp_path / "set").startswith(
        f"{shard} record 1: class label -3 is not in 0 .. 2**31 - 1"
    )


def test_image_damaged_after_indexing_names_the_record(tmp_path):
    """The decoder's check names the shard's record in the pipeline."""
    records = [example_bytes(constant_png(k), k % 2) for k in range(4)]
    (shard,) = write_tfrecords(tmp_path / "set", [records])
    source = sources.open_source(tmp_path / "set")
    raw = bytearray(shard.read_bytes())
    offset = int(source.offsets[0][3])
    end = raw.index(b"IEND", offset)
    raw[end:end + 4] = b"XXXX"  # same size, so the index still matches
    shard.write_bytes(bytes(raw))
    dataset = pipeline.training_dataset(
        source, batch_size=4, image_size=(8, 8), channels=1, augment="none",
        seed=0, repeat=False,
    )
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"(?s)truncated.*record 3 of .*train-00000"):
        list(dataset)


def test_skip_corrupt_leaves_out_bad_records(tmp_path):
    records = [example_bytes(constant_png(k), k % 2) for k in range(4)]
    records[2] = example_bytes(constant_png(9)[:30], 0)
    write_tfrecords(tmp_path / "set", [records])
    with pytest.warns(pipeline.DataWarning, match="Skipped 1 unreadable"):
        source = pipeline.open_training_source(tmp_path / "set",
                                           skip_corrupt=True)
    assert (source.num_examples, source.num_skipped) == (3, 1)
    assert [source.read(i)[0] for i in range(3)] == [
        constant_png(0), constant_png(1), constant_png(3)
    ]


def test_config_check_accepts_shards_and_refuses_empty_keys(tmp_path):
    small_shards(tmp_path / "root")
    config_lib.check(config_lib.make(data_dir=str(tmp_path / "root")))
    small_shards(tmp_path / "nested" / "train", name="x{}.tfrecord")
    config_lib.check(config_lib.make(data_dir=str(tmp_path / "nested")))
    with pytest.raises(ConfigError,
                       match="tfrecord_image_key.*must name a tf.train"):
        config_lib.check(config_lib.make(data_dir=str(tmp_path / "root"),
                                         tfrecord_image_key=""))


def test_a_record_error_in_training_keeps_its_own_fix():
    from ring_loss_tf.training import loop

    text = ("x/train-0.tfrecord record 3: its length does not match the "
            "index (the shard changed since it was indexed; delete "
            "x/train-0.tfrecord.idx).")
    error = loop.data_error(tf.errors.InvalidArgumentError(
        None, None, f"py_function failed: {pipeline.RECORD_ERROR}{text}\n..."))
    assert str(error).startswith(text + " Or rerun with skip_corrupt=True")
    assert ".idx again" not in str(error)


def test_damaged_shards_fail_in_one_line_naming_the_record(tmp_path):
    """Random byte flips and cuts: the shard opens with its records intact
    or fails with one ValueError line naming the shard and a record."""
    records = [example_bytes(constant_png(k), k % 3) for k in range(6)]
    (shard,) = write_tfrecords(tmp_path / "set", [records])
    good = shard.read_bytes()
    rng = np.random.default_rng(3)
    for trial in range(40):
        raw = bytearray(good)
        if trial % 4 == 0:
            raw = raw[: int(rng.integers(1, len(raw)))]
        else:
            raw[int(rng.integers(len(raw)))] ^= int(rng.integers(1, 256))
        shard.write_bytes(bytes(raw))
        shard.with_name(shard.name + ".idx").unlink(missing_ok=True)
        try:
            source = sources.open_source(tmp_path / "set")
        except ValueError as error:
            assert re.match(rf"^{re.escape(str(shard))} record [0-5]: "
                            r"[^\n]+$", str(error)), (trial, str(error))
        else:
            # A flip in a CRC-checked byte cannot pass: nothing else can.
            assert bytes(raw) == good, trial
            assert source.num_examples == 6
