"""Tests of the training input pipeline (ring_loss_tf/data.py), on image
folders and on RecordIO files (the reader itself:
tests/data/test_recordio.py)."""

import pathlib
import re
import struct
import warnings

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from ring_loss_tf.data import pipeline
from tests.data_files import constant_png
from tests.data_files import damage_rec
from tests.data_files import encode
from tests.data_files import make_folder
from tests.data_files import pack
from tests.data_files import smooth_rgb
from tests.data_files import write_rec
from tests.data_files import write_records

RNG = np.random.default_rng(0)


def labels_and_values(dataset):
    """All (label, first pixel grey level) pairs a dataset yields."""
    out = []
    for images, labels in dataset:
        grey = np.rint(images.numpy()[:, 0, 0, 0] * 128 + 127.5).astype(int)
        out.extend(zip(labels.numpy().tolist(), grey.tolist()))
    return out


# --------------------------------------------------------------------------
# Folders and bad input


def test_list_image_folder(tmp_path):
    root = make_folder(tmp_path / "set", [2, 3])
    (root / "empty_one").mkdir()
    (root / "id00" / "notes.txt").write_text("not an image")
    with pytest.warns(
        pipeline.DataWarning, match=r"1 identity folder.*empty_one"
    ):
        paths, labels, names = pipeline.list_image_folder(root)
    assert names == ["id00", "id01"]
    np.testing.assert_array_equal(labels, [0, 0, 1, 1, 1])
    assert [pathlib.Path(p).name for p in paths] == [
        "0.png", "1.png", "0.png", "1.png", "2.png"
    ]


def test_missing_dir_and_no_images(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        pipeline.open_training_source(tmp_path / "nowhere")
    (tmp_path / "hollow" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="No images found in .*hollow"):
        with pytest.warns(pipeline.DataWarning):
            pipeline.open_training_source(tmp_path / "hollow")


@pytest.mark.parametrize("in_memory", [True, False])
def test_corrupt_image_error_names_the_file(tmp_path, in_memory):
    root = make_folder(tmp_path / "set", [3, 3])
    bad = root / "id01" / "1.png"
    bad.write_bytes(bad.read_bytes()[:30])  # truncated
    source = pipeline.open_training_source(root)
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=r"(?s)truncated.*id01/1\.png"
    ):
        list(pipeline.training_dataset(
            source, batch_size=6, image_size=(8, 8), channels=1,
            augment="none", seed=0, repeat=False, in_memory=in_memory,
        ))


def test_skip_corrupt_skips_and_counts_in_one_warning(tmp_path):
    root = make_folder(tmp_path / "set", [3, 3])
    (root / "id00" / "2.png").write_bytes(b"garbage")
    cut = root / "id01" / "0.png"
    cut.write_bytes(cut.read_bytes()[:-20])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        source = pipeline.open_training_source(root, skip_corrupt=True)
    messages = [str(w.message) for w in caught
                if issubclass(w.category, pipeline.DataWarning)]
    assert len(messages) == 1 and "Skipped 2 corrupt" in messages[0]
    assert source.num_examples == 4 and source.num_skipped == 2
    dataset = pipeline.training_dataset(
        source, batch_size=4, image_size=(8, 8), channels=1, augment="none",
        seed=0, repeat=False,
    )
    got = sorted(labels_and_values(dataset))
    assert got == [(0, 1), (0, 2), (1, 12), (1, 13)]


@pytest.mark.parametrize("in_memory", [True, False])
def test_an_image_over_the_pixel_budget_is_refused_by_name(tmp_path,
                                                           in_memory):
    root = make_folder(tmp_path / "set", [3, 3])  # 8 x 8 images
    (root / "id01" / "2.png").write_bytes(constant_png(5, size=(9, 8)))
    source = pipeline.open_training_source(root)
    common = dict(batch_size=6, image_size=(8, 8), channels=1,
                  augment="face", seed=3, repeat=False, in_memory=in_memory)
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=r"(?s)Image larger than the pixel budget of 71 .*File:.*"
              r"id01/2\.png \(8x9 pixels\)",
    ):
        list(pipeline.training_dataset(source, max_pixels=71, **common))
    # At the budget, and with the default one: the batches of no budget.
    unlimited = list(
        pipeline.training_dataset(source, max_pixels=None, **common)
    )
    for budget in (72, pipeline.MAX_IMAGE_PIXELS):
        batches = list(pipeline.training_dataset(source, max_pixels=budget,
                                             **common))
        assert len(batches) == len(unlimited) == 1
        for (a, la), (b, lb) in zip(batches, unlimited):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(la, lb)


# --------------------------------------------------------------------------
# The training pipeline


@pytest.mark.parametrize("in_memory", [True, False])
def test_training_dataset_epoch_labels_shapes_and_order(tmp_path, in_memory):
    root = make_folder(tmp_path / "set", [3, 4, 5])
    source = pipeline.open_training_source(root)
    assert (source.num_classes, source.num_examples) == (3, 12)
    assert source.class_names == ["id00", "id01", "id02"]

    def epoch(seed, **kwargs):
        dataset = pipeline.training_dataset(
            source, batch_size=4, image_size=(8, 8), channels=3,
            augment="none", seed=seed, repeat=False, in_memory=in_memory,
            **kwargs,
        )
        return labels_and_values(dataset)

    first = epoch(0)
    # Every example exactly once, each with its own label.
    expected = sorted(
        (label, 10 * label + k + 1)
        for label, count in enumerate([3, 4, 5]) for k in range(count)
    )
    assert sorted(first) == expected
    assert epoch(0) == first  # seeded: the same order again
    assert epoch(1) != first and sorted(epoch(1)) == expected

    images, labels = next(iter(pipeline.training_dataset(
        source, batch_size=5, image_size=(10, 6), channels=3,
        augment="face", seed=0, in_memory=in_memory,
    )))
    assert images.shape == (5, 10, 6, 3) and images.dtype == tf.float32
    assert labels.shape == (5,) and labels.dtype == tf.int32
    # Grey files become three equal channels.
    np.testing.assert_array_equal(images[..., 0], images[..., 2])


def test_training_dataset_epochs_differ_and_repeat(tmp_path):
    root = make_folder(tmp_path / "set", [4, 4])
    source = pipeline.open_training_source(root)
    dataset = pipeline.training_dataset(
        source, batch_size=8, image_size=(8, 8), channels=1, augment="none",
        seed=3,
    )
    iterator = iter(dataset)
    epochs = [labels_and_values([next(iterator)]) for _ in range(3)]
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled each epoch


def test_training_dataset_rgb_to_grey(tmp_path):
    directory = tmp_path / "set" / "a"
    directory.mkdir(parents=True)
    rgb = smooth_rgb(8, 8)
    (directory / "x.png").write_bytes(encode(rgb, "PNG"))
    source = pipeline.open_training_source(tmp_path / "set")
    images, _ = next(iter(pipeline.training_dataset(
        source, batch_size=1, image_size=(8, 8), channels=1,
        augment="none", seed=0,
    )))
    grey = np.asarray(Image.fromarray(rgb).convert("L")).astype(float)
    got = images.numpy()[0, ..., 0] * 128 + 127.5
    assert np.abs(got - grey).max() <= 1


def random_folder(root, counts, size=(8, 8)):
    """root/<idNN>/<k>.png of random grey pixels (so shifts and flips
    show)."""
    rng = np.random.default_rng(7)
    for label, count in enumerate(counts):
        directory = pathlib.Path(root) / f"id{label:02d}"
        directory.mkdir(parents=True)
        for k in range(count):
            pixels = rng.integers(0, 256, size, dtype=np.uint8)
            Image.fromarray(pixels).save(directory / f"{k}.png")
    return pathlib.Path(root)


def global_batches(dataset, steps, per_step):
    """The first `steps` steps of a pipeline, each its `per_step`
    per-replica batches concatenated."""
    iterator = iter(dataset)
    out = []
    for _ in range(steps):
        parts = [next(iterator) for _ in range(per_step)]
        out.append(tuple(np.concatenate([p[i].numpy() for p in parts])
                         for i in range(2)))
    return out


@pytest.mark.parametrize("in_memory", [True, False])
def test_worker_pipelines_hold_their_rows_of_the_one_device_batch(
    tmp_path, in_memory
):
    """2 pipelines × 2 replicas each: pipeline k yields the batches of
    replicas 2k and 2k + 1, together the one-device global batch, pixels
    and augmentation draws included, across an epoch boundary."""
    source = pipeline.open_training_source(random_folder(tmp_path, [5, 4, 6]))
    common = dict(batch_size=8, image_size=(8, 8), channels=1,
                  augment="face", seed=5, in_memory=in_memory)
    steps = 5  # 40 rows: past the 15-image epoch twice
    whole = global_batches(
        pipeline.training_dataset(source, **common), steps, 1
    )
    halves = [
        global_batches(pipeline.training_dataset(
            source,
            input_context=tf.distribute.InputContext(
                num_input_pipelines=2, input_pipeline_id=k,
                num_replicas_in_sync=4,
            ),
            **common,
        ), steps, 2)
        for k in range(2)
    ]
    for step in range(steps):
        for i in range(2):  # images, labels
            np.testing.assert_array_equal(
                np.concatenate([halves[0][step][i], halves[1][step][i]]),
                whole[step][i],
            )
    # The draws matter: augmentation changed the pixels (not vacuous).
    plain = global_batches(pipeline.training_dataset(
        source, **{**common, "augment": "none"}), steps, 1)
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(whole, plain))


def test_pipeline_from_a_step_continues_the_stream(tmp_path):
    """Resuming builds the pipeline at the restored step: the same batches
    as the uninterrupted stream from there on."""
    source = pipeline.open_training_source(random_folder(tmp_path, [3, 4]))
    common = dict(batch_size=3, image_size=(8, 8), channels=1,
                  augment="face", seed=2)
    whole = global_batches(pipeline.training_dataset(source, **common), 7, 1)
    later = global_batches(
        pipeline.training_dataset(source, start_step=4, **common), 3, 1
    )
    for a, b in zip(whole[4:], later):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


def test_pipelines_must_split_the_batch_evenly(tmp_path):
    source = pipeline.open_training_source(make_folder(tmp_path / "set", [4]))
    with pytest.raises(ValueError, match="must split evenly over 3"):
        pipeline.training_dataset(
            source, batch_size=4, image_size=(8, 8), channels=1,
            augment="none", seed=0,
            input_context=tf.distribute.InputContext(
                num_input_pipelines=1, input_pipeline_id=0,
                num_replicas_in_sync=3,
            ),
        )


@pytest.mark.parametrize("in_memory", [True, False])
def test_folder_iterator_checkpoint_restores_the_next_batches(
    tmp_path, in_memory
):
    root = make_folder(tmp_path / "set", [3, 4, 3])
    source = pipeline.open_training_source(root)

    def make():
        return pipeline.training_dataset(
            source, batch_size=3, image_size=(8, 8), channels=1,
            augment="face", seed=11, in_memory=in_memory,
        )

    check_checkpoint(make, tmp_path / "ckpt")


def check_checkpoint(make, prefix):
    iterator = iter(make())
    first = next(iterator)
    for _ in range(4):  # mid-epoch, past the first epoch boundary
        next(iterator)
    saved = tf.train.Checkpoint(iterator=iterator).save(str(prefix))
    want = [next(iterator) for _ in range(6)]
    restored = iter(make())
    next(restored)  # a different position, overwritten by the restore
    tf.train.Checkpoint(iterator=restored).restore(saved).assert_consumed()
    got = [next(restored) for _ in range(6)]
    for (wx, wy), (gx, gy) in zip(want, got):
        np.testing.assert_array_equal(wx, gx)
        np.testing.assert_array_equal(wy, gy)
    # Not trivially equal: the stream moved on from where it started.
    assert not np.array_equal(want[0][0], first[0])


def test_training_dataset_argument_errors(tmp_path):
    source = pipeline.open_training_source(
        make_folder(tmp_path / "set", [2, 2])
    )
    good = dict(batch_size=2, image_size=(8, 8), channels=1, augment="none",
                seed=0)
    rec, _ = write_rec(tmp_path / "rec", [2, 2])
    with pytest.raises(ValueError, match="needs a folder source"):
        pipeline.training_dataset(pipeline.open_training_source(rec), **good,
                              in_memory=True)
    for bad, message in [
        (dict(augment="flip"), "augment"),
        (dict(channels=2), "channels"),
        (dict(image_size=8), "image_size"),
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=5, repeat=False), "no whole batch"),
    ]:
        with pytest.raises(ValueError, match=message):
            pipeline.training_dataset(source, **{**good, **bad})


# --------------------------------------------------------------------------
# RecordIO (files from the writers of tests/data_files.py)

@pytest.mark.parametrize("header, vector_label", [(True, False),
                                                  (False, True)])
def test_recordio_training_source(tmp_path, header, vector_label):
    directory, _ = write_rec(tmp_path / "rec", [3, 2, 4], header, vector_label)
    for path in (directory, directory / "train.rec"):
        source = pipeline.open_training_source(path)
        assert source.kind == "recordio"
        assert (source.num_classes, source.num_examples) == (3, 9)
    dataset = pipeline.training_dataset(
        source, batch_size=3, image_size=(8, 8), channels=3, augment="none",
        seed=0, repeat=False,
    )
    got = labels_and_values(dataset)
    expected = sorted(
        (c, 20 * c + i + 1) for c, n in enumerate([3, 2, 4]) for i in range(n)
    )
    assert sorted(got) == expected


def test_recordio_iterator_checkpoint_restores_the_next_batches(tmp_path):
    directory, _ = write_rec(tmp_path / "rec", [3, 4, 3])
    source = pipeline.open_training_source(directory)

    def make():
        return pipeline.training_dataset(
            source, batch_size=3, image_size=(8, 8), channels=1,
            augment="face", seed=2,
        )

    check_checkpoint(make, tmp_path / "ckpt")


def test_recordio_corrupt_image_names_the_record(tmp_path):
    directory = write_records(tmp_path / "rec", [
        pack(0.0, constant_png(5)), pack(1.0, constant_png(6)[:20]),
    ])
    source = pipeline.open_training_source(directory)
    dataset = pipeline.training_dataset(
        source, batch_size=2, image_size=(8, 8), channels=1, augment="none",
        seed=0, repeat=False,
    )
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"(?s)truncated.*record 1 of .*train\.rec"):
        list(dataset)


def test_in_memory_and_streaming_give_the_same_batches(tmp_path):
    root = tmp_path / "set"
    for label in range(3):
        (root / f"id{label}").mkdir(parents=True)
        for k in range(5):
            image = RNG.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
            (root / f"id{label}" / f"{k}.png").write_bytes(
                encode(image, "PNG"))
    source = pipeline.open_training_source(root)
    streams = [
        iter(pipeline.training_dataset(
            source, batch_size=4, image_size=(8, 6), channels=1,
            augment="face", seed=9, in_memory=in_memory,
        ))
        for in_memory in (True, False)
    ]
    for _ in range(8):  # two epochs
        (a, la), (b, lb) = next(streams[0]), next(streams[1])
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)


def test_shuffled_index_is_a_permutation_per_epoch():
    n = 37
    positions = np.arange(3 * n)
    eager = pipeline.shuffled_index(positions, 5, n).numpy()
    scalar = [int(pipeline.shuffled_index(p, 5, n)) for p in positions[:5]]
    in_data = np.concatenate(list(
        tf.data.Dataset.from_tensor_slices(positions).batch(10).map(
            lambda p: pipeline.shuffled_index(p, 5, n)
        ).as_numpy_iterator()
    ))
    np.testing.assert_array_equal(eager, in_data)
    np.testing.assert_array_equal(eager[:5], scalar)
    epochs = eager.reshape(3, n)
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[0], np.arange(n))
    other_seed = pipeline.shuffled_index(positions[:n], 6, n).numpy()
    assert not np.array_equal(other_seed, epochs[0])


def _set_label(directory, key, label):
    """Overwrites the IRHeader label of record `key` (a flag-0 record) in
    directory/train.rec, at its offset from train.idx."""
    idx = (directory / "train.idx").read_text().split()
    offset = dict(zip(map(int, idx[::2]), map(int, idx[1::2])))[key]
    rec = directory / "train.rec"
    contents = bytearray(rec.read_bytes())
    # 8 bytes of framing, then IRHeader (uint32 flag, float32 label, ...).
    assert struct.unpack_from("<I", contents, offset + 8)[0] == 0
    struct.pack_into("<f", contents, offset + 12, label)
    rec.write_bytes(bytes(contents))


@pytest.mark.parametrize("label, shown", [
    (float("nan"), "nan"), (-1.0, "-1.0"), (5.5, "5.5"), (3.0, "3.0"),
    (1e6, "1000000.0"),
])
def test_recordio_labels_are_checked_against_the_header(tmp_path, label,
                                                        shown):
    """With insightface's header record (here: 3 classes) each image
    record's label must be an integer below the count it claims; it is
    checked as the record is read (no extra pass over a large set)."""
    directory, _ = write_rec(tmp_path / "rec", [2, 2, 2])
    _set_label(directory, 3, label)
    source = pipeline.open_training_source(directory)
    assert (source.num_classes, source.num_examples) == (3, 6)
    dataset = pipeline.training_dataset(
        source, batch_size=2, image_size=(8, 8), channels=1,
        augment="none", seed=0, repeat=False,
    )
    rec = re.escape(str(directory / "train.rec"))
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=rf"Unreadable training record: {rec} record 3: class label "
              rf"{re.escape(shown)} is not an integer in 0 \.\. 2: the set "
              r"has 3 classes \(its header record 0 says how many\)\. The "
              r"file is not an insightface image \.rec, or it is corrupt: "
              r"re-create it with MXNet's im2rec\.",
    ):
        list(dataset)
    # Untouched, the same set reads every label as written.
    _set_label(directory, 3, 1.0)
    assert sorted(
        labels_and_values(
            pipeline.training_dataset(
                pipeline.open_training_source(directory),
                batch_size=2,
                image_size=(8, 8),
                channels=1,
                augment="none",
                seed=0,
                repeat=False,
            )
        )
    ) == sorted((c, 20 * c + i + 1) for c in range(3) for i in range(2))


def test_recordio_labels_without_header(tmp_path):
    """Without a header record every label is read at the start: a
    fractional one stops there, and a far too large one warns that most
    of the classes it makes have no image."""
    directory, _ = write_rec(tmp_path / "rec", [2, 2], header=False)
    _set_label(directory, 1, 0.5)
    with pytest.raises(ValueError, match=re.escape(
        f"{directory / 'train.rec'} record 1: class label 0.5 is not an "
        "integer in 0 .. 2**31 - 1."
    )):
        pipeline.open_training_source(directory)
    _set_label(directory, 1, 1e6)
    with pytest.warns(pipeline.DataWarning, match=re.escape(
        f"{directory / 'train.rec'}: labels run up to 1000000, but 999998 "
        "of those 1000001 classes have no image"
    )):
        source = pipeline.open_training_source(directory)
    assert source.num_classes == 1000001


@pytest.mark.parametrize("damage, key", [
    ("truncated", 6), ("length", 2), ("unending", 6),
])
def test_recordio_skip_corrupt_leaves_out_unreadable_records(
    tmp_path, damage, key
):
    """skip_corrupt reads every record once: one that cannot be read
    (cut short, a length past the end, parts that never end) or whose
    image does not decode is left out, with one warning naming it."""
    directory, _ = write_rec(tmp_path / "rec", [3, 3])
    rec = damage_rec(directory, key, damage)
    with pytest.warns(pipeline.DataWarning, match=re.escape(
        f"Skipped 1 unreadable or corrupt record(s) in {rec} (first: "
        f"record {key}: ValueError: {rec}: truncated RecordIO file"
    )):
        source = pipeline.open_training_source(directory, skip_corrupt=True)
    assert (source.num_classes, source.num_examples) == (2, 5)
    assert key not in source.keys.tolist()
    got = labels_and_values(pipeline.training_dataset(
        source, batch_size=5, image_size=(8, 8), channels=1, augment="none",
        seed=0, repeat=False,
    ))
    # Record k holds image i = k - 1 - 3c of class c (grey 20c + i + 1).
    expected = [(c, 20 * c + i + 1) for c in range(2) for i in range(3)
                if 1 + 3 * c + i != key]
    assert sorted(got) == expected


def test_recordio_skip_corrupt_leaves_out_undecodable_images(tmp_path):
    directory = write_records(tmp_path / "rec", [
        pack(0.0, constant_png(5)), pack(1.0, constant_png(6)[:20]),
        pack(1.0, constant_png(7)),
    ])
    with pytest.warns(pipeline.DataWarning,
                      match=r"Skipped 1 .*\(first: record 1: "):
        source = pipeline.open_training_source(directory, skip_corrupt=True)
    assert source.keys.tolist() == [0, 2]
