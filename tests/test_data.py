"""Tests of the readers and the tf.data pipeline (ring_loss_tf/data.py)."""

import io
import os
import pathlib
import pickle
import struct
import warnings

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from ring_loss_tf import data
from ring_loss_tf import recordio
from tests.data_files import MAGIC
from tests.data_files import CallsAFunction
from tests.data_files import constant_png
from tests.data_files import encode
from tests.data_files import make_folder
from tests.data_files import make_lfw
from tests.data_files import pack
from tests.data_files import write_bin
from tests.data_files import write_rec
from tests.data_files import write_record

RNG = np.random.default_rng(0)


def pgm(array, maxval=255):
    """Binary PGM written by hand (independent of any decoder)."""
    h, w = array.shape
    header = f"P5\n{w} {h}\n{maxval}\n".encode()
    dtype = ">u2" if maxval > 255 else np.uint8
    return header + array.astype(dtype).tobytes()


def smooth_rgb(h=20, w=24):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack(
        [x * 250 // w, y * 250 // h, 250 - (x + y) * 200 // (w + h)], axis=-1
    ).astype(np.uint8)


def run_both(fn, *args):
    """fn(*args) eagerly and inside tf.data.Dataset.map, as numpy."""
    eager = fn(*args)
    dataset = tf.data.Dataset.from_tensors(args).map(fn)
    in_data = next(iter(dataset))
    return np.asarray(eager), np.asarray(in_data)


def labels_and_values(dataset):
    """All (label, first pixel grey level) pairs a dataset yields."""
    out = []
    for images, labels in dataset:
        grey = np.rint(images.numpy()[:, 0, 0, 0] * 128 + 127.5).astype(int)
        out.extend(zip(labels.numpy().tolist(), grey.tolist()))
    return out


# --------------------------------------------------------------------------
# Image ops: eagerly and inside tf.data, against Pillow / numpy


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "JPEG", "PGM", "GIF"])
def test_decode_image_matches_pillow(fmt):
    rgb = smooth_rgb()
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    if fmt == "PGM":
        contents, reference = pgm(grey), grey[..., None]
    elif fmt == "GIF":
        contents = encode(grey, "GIF")
        reference = np.asarray(Image.open(io.BytesIO(contents)).convert("L"))
        reference = reference[..., None]
    else:
        # 4:4:4 JPEG: decoders differ in how they upsample chroma.
        options = {"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}
        contents = encode(rgb, fmt, **options)
        reference = np.asarray(Image.open(io.BytesIO(contents)).convert("RGB"))
    channels = reference.shape[-1]
    eager, in_data = run_both(
        lambda c: data.decode_image(c, channels, "x"), tf.constant(contents)
    )
    np.testing.assert_array_equal(eager, in_data)
    tolerance = 2 if fmt == "JPEG" else 0
    assert np.abs(eager.astype(int) - reference).max() <= tolerance


def test_decode_pgm_16_bit():
    samples = RNG.integers(0, 1001, size=(5, 7))
    contents = pgm(samples, maxval=1000)
    eager, in_data = run_both(
        lambda c: data.decode_image(c, 1, "x"), tf.constant(contents)
    )
    np.testing.assert_array_equal(eager, in_data)
    np.testing.assert_array_equal(
        eager[..., 0], np.rint(samples * 255.0 / 1000).astype(np.uint8)
    )


def test_to_channels_grey_to_rgb_and_rgb_to_grey():
    rgb = smooth_rgb()
    eager, in_data = run_both(lambda x: data.to_channels(x, 1), rgb)
    np.testing.assert_array_equal(eager, in_data)
    # Pillow's L = R*299/1000 + G*587/1000 + B*114/1000 (rounded).
    pillow = np.asarray(Image.fromarray(rgb).convert("L"))
    assert np.abs(eager[..., 0].astype(int) - pillow).max() <= 1
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], -1)
    np.testing.assert_array_equal(data.to_channels(rgba, 3), rgb)
    grey = rgb[..., :1]
    eager, in_data = run_both(lambda x: data.to_channels(x, 3), grey)
    np.testing.assert_array_equal(eager, np.repeat(grey, 3, axis=-1))
    np.testing.assert_array_equal(in_data, eager)
    with pytest.raises(ValueError, match="must be 1 or 3"):
        data.to_channels(grey, 2)


def test_resize_image():
    image = smooth_rgb(40, 48)
    eager, in_data = run_both(lambda x: data.resize_image(x, (20, 24)), image)
    np.testing.assert_array_equal(eager, in_data)
    assert eager.shape == (20, 24, 3) and eager.dtype == np.float32
    np.testing.assert_array_equal(eager, np.rint(eager))  # whole grey levels
    # A 2x box average is what an antialiased 2x downsample approximates.
    box = image.astype(float).reshape(20, 2, 24, 2, 3).mean(axis=(1, 3))
    inner = (slice(2, -2), slice(2, -2))
    assert np.abs(eager[inner] - box[inner]).max() <= 3
    # The right size passes through unchanged; a constant stays constant.
    same, _ = run_both(lambda x: data.resize_image(x, (40, 48)), image)
    np.testing.assert_array_equal(same, image)
    flat = np.full((13, 17, 1), 77, np.uint8)
    np.testing.assert_array_equal(data.resize_image(flat, (32, 32)), 77)


def test_normalize():
    x = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
    eager, in_data = run_both(data.normalize, x)
    expected = (x.astype(np.float64) - 127.5) / 128
    np.testing.assert_allclose(eager, expected, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(in_data, eager)


def shifted_versions(image, shift):
    """Every crop of the symmetric-padded image at offsets within +-shift."""
    padded = np.pad(
        image, [(shift, shift), (shift, shift), (0, 0)], "symmetric"
    )
    h, w = image.shape[:2]
    return [
        padded[dy : dy + h, dx : dx + w]
        for dy in range(2 * shift + 1)
        for dx in range(2 * shift + 1)
    ]


@pytest.mark.parametrize("mode", ["face", "characters", "none"])
def test_augment_image(mode):
    image = RNG.uniform(0, 255, size=(32, 32, 1)).astype(np.float32)
    shift = data.max_translation((32, 32))
    assert shift == 2
    candidates = shifted_versions(image, shift)
    mirrored = shifted_versions(image[:, ::-1], shift)
    seeds = np.stack([np.full(40, 7), np.arange(40)], axis=1)
    in_data = tf.data.Dataset.from_tensor_slices(seeds).map(
        lambda k: data.augment_image(image, k, mode)
    )
    flips = 0
    for seed, from_data in zip(seeds, in_data):
        eager = np.asarray(data.augment_image(image, seed, mode))
        np.testing.assert_array_equal(eager, from_data)
        again = data.augment_image(image, seed, mode)
        np.testing.assert_array_equal(again, eager)  # same seed, same image
        if mode == "none":
            np.testing.assert_array_equal(eager, image)
            continue
        plain = any(np.array_equal(eager, c) for c in candidates)
        flipped = any(np.array_equal(eager, c) for c in mirrored)
        assert plain or flipped
        flips += flipped and not plain
    if mode == "face":
        assert 8 <= flips <= 32  # about half of 40
    else:
        assert flips == 0  # a mirrored character is another character
    with pytest.raises(ValueError, match="augment"):
        data.augment_image(image, seed, "flip")


def test_image_bytes_ok_catches_truncation_and_garbage():
    grey = np.asarray(Image.fromarray(smooth_rgb()).convert("L"))
    for contents in (
        encode(grey, "PNG"),
        encode(smooth_rgb(), "JPEG"),
        encode(grey, "BMP"),
        encode(grey, "GIF"),
        pgm(grey),
    ):
        assert bool(data.image_bytes_ok(contents))
        cut = contents[: len(contents) * 3 // 4]
        eager, in_data = run_both(data.image_bytes_ok, tf.constant(cut))
        assert not eager and not in_data, contents[:4]
    for garbage in (b"", b"hello world", b"\x89PNG\r\n\x1a\n"):
        assert not bool(data.image_bytes_ok(garbage))


# --------------------------------------------------------------------------
# Folders and bad input


def test_list_image_folder(tmp_path):
    root = make_folder(tmp_path / "set", [2, 3])
    (root / "empty_one").mkdir()
    (root / "id00" / "notes.txt").write_text("not an image")
    with pytest.warns(data.DataWarning, match=r"1 identity folder.*empty_one"):
        paths, labels, names = data.list_image_folder(root)
    assert names == ["id00", "id01"]
    np.testing.assert_array_equal(labels, [0, 0, 1, 1, 1])
    assert [pathlib.Path(p).name for p in paths] == [
        "0.png", "1.png", "0.png", "1.png", "2.png"
    ]


def test_missing_dir_and_no_images(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        data.open_training_source(tmp_path / "nowhere")
    (tmp_path / "hollow" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="No images found in .*hollow"):
        with pytest.warns(data.DataWarning):
            data.open_training_source(tmp_path / "hollow")


@pytest.mark.parametrize("in_memory", [True, False])
def test_corrupt_image_error_names_the_file(tmp_path, in_memory):
    root = make_folder(tmp_path / "set", [3, 3])
    bad = root / "id01" / "1.png"
    bad.write_bytes(bad.read_bytes()[:30])  # truncated
    source = data.open_training_source(root)
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=r"(?s)truncated.*id01/1\.png"
    ):
        list(data.training_dataset(
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
        source = data.open_training_source(root, skip_corrupt=True)
    messages = [str(w.message) for w in caught
                if issubclass(w.category, data.DataWarning)]
    assert len(messages) == 1 and "Skipped 2 corrupt" in messages[0]
    assert source.num_examples == 4 and source.num_skipped == 2
    dataset = data.training_dataset(
        source, batch_size=4, image_size=(8, 8), channels=1, augment="none",
        seed=0, repeat=False,
    )
    got = sorted(labels_and_values(dataset))
    assert got == [(0, 1), (0, 2), (1, 12), (1, 13)]


# --------------------------------------------------------------------------
# The training pipeline


@pytest.mark.parametrize("in_memory", [True, False])
def test_training_dataset_epoch_labels_shapes_and_order(tmp_path, in_memory):
    root = make_folder(tmp_path / "set", [3, 4, 5])
    source = data.open_training_source(root)
    assert (source.num_classes, source.num_examples) == (3, 12)
    assert source.class_names == ["id00", "id01", "id02"]

    def epoch(seed, **kwargs):
        dataset = data.training_dataset(
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

    images, labels = next(iter(data.training_dataset(
        source, batch_size=5, image_size=(10, 6), channels=3,
        augment="face", seed=0, in_memory=in_memory,
    )))
    assert images.shape == (5, 10, 6, 3) and images.dtype == tf.float32
    assert labels.shape == (5,) and labels.dtype == tf.int32
    # Grey files become three equal channels.
    np.testing.assert_array_equal(images[..., 0], images[..., 2])


def test_training_dataset_epochs_differ_and_repeat(tmp_path):
    root = make_folder(tmp_path / "set", [4, 4])
    source = data.open_training_source(root)
    dataset = data.training_dataset(
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
    source = data.open_training_source(tmp_path / "set")
    images, _ = next(iter(data.training_dataset(
        source, batch_size=1, image_size=(8, 8), channels=1,
        augment="none", seed=0,
    )))
    grey = np.asarray(Image.fromarray(rgb).convert("L")).astype(float)
    got = images.numpy()[0, ..., 0] * 128 + 127.5
    assert np.abs(got - grey).max() <= 1


def test_training_dataset_sharding_splits_one_order(tmp_path):
    root = make_folder(tmp_path / "set", [4, 4, 4])
    source = data.open_training_source(root)
    common = dict(batch_size=2, image_size=(8, 8), channels=1,
                  augment="none", seed=5, repeat=False, in_memory=False)
    whole = labels_and_values(data.training_dataset(source, **common))
    shards = [
        labels_and_values(data.training_dataset(
            source,
            input_context=tf.distribute.InputContext(
                num_input_pipelines=2, input_pipeline_id=k,
                num_replicas_in_sync=2,
            ),
            **common,
        ))
        for k in range(2)
    ]
    # Pipeline k takes positions k, k + 2, ... of the one global order.
    assert shards[0] == whole[0::2] and shards[1] == whole[1::2]


@pytest.mark.parametrize("in_memory", [True, False])
def test_folder_iterator_checkpoint_restores_the_next_batches(
    tmp_path, in_memory
):
    root = make_folder(tmp_path / "set", [3, 4, 3])
    source = data.open_training_source(root)

    def make():
        return data.training_dataset(
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
    source = data.open_training_source(make_folder(tmp_path / "set", [2, 2]))
    good = dict(batch_size=2, image_size=(8, 8), channels=1, augment="none",
                seed=0)
    rec, _ = write_rec(tmp_path / "rec", [2, 2])
    with pytest.raises(ValueError, match="needs a folder source"):
        data.training_dataset(data.open_training_source(rec), **good,
                              in_memory=True)
    for bad, message in [
        (dict(augment="flip"), "augment"),
        (dict(channels=2), "channels"),
        (dict(image_size=8), "image_size"),
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=5, repeat=False), "no whole batch"),
    ]:
        with pytest.raises(ValueError, match=message):
            data.training_dataset(source, **{**good, **bad})


# --------------------------------------------------------------------------
# RecordIO (files from the writers of tests/data_files.py)

def test_recordio_reader_framing_and_split_records(tmp_path):
    magic = struct.pack("<I", MAGIC)
    payloads = [
        b"",
        b"abc",
        b"abcd" + magic + b"xyz",  # split in two parts
        magic + b"1234" + magic + magic + b"tail!",  # first part empty
        bytes(range(256)) * 3,
    ]
    with open(tmp_path / "x.rec", "wb") as file:
        offsets = []
        for p in payloads:
            offsets.append(file.tell())
            write_record(file, p)
    (tmp_path / "x.idx").write_text(
        "".join(f"{k}\t{o}\n" for k, o in enumerate(offsets))
    )
    reader = recordio.RecordIOReader(tmp_path / "x.rec")
    assert [reader.read(k) for k in range(len(payloads))] == payloads
    assert reader.scan() == offsets
    # Without the index the file is scanned, with a warning.
    (tmp_path / "x.idx").unlink()
    with pytest.warns(UserWarning, match="No index file"):
        scanned = recordio.RecordIOReader(tmp_path / "x.rec")
    assert [scanned.read(k) for k in range(len(payloads))] == payloads


def test_recordio_unpack_header():
    header, image = recordio.unpack(pack(3.0, b"IMG", id1=9))
    assert (header.flag, header.label, header.id, image) == (0, 3.0, 9, b"IMG")
    header, image = recordio.unpack(pack([4.0, 2.5], b"IMG"))
    assert header.flag == 2 and image == b"IMG"
    np.testing.assert_array_equal(header.label, [4.0, 2.5])
    assert recordio.first_label(header) == 4.0


def test_recordio_errors(tmp_path):
    (tmp_path / "bad.rec").write_bytes(b"\x00" * 16)
    (tmp_path / "bad.idx").write_text("0\t0\n")
    reader = recordio.RecordIOReader(tmp_path / "bad.rec")
    with pytest.raises(ValueError, match="expected magic 0xced7230a"):
        reader.read(0)
    (tmp_path / "bad.idx").write_text("0\t0\nzero 4\n")
    with pytest.raises(ValueError, match=r"bad\.idx line 2: expected"):
        recordio.RecordIOReader(tmp_path / "bad.rec")
    (tmp_path / "cut.rec").write_bytes(
        struct.pack("<II", MAGIC, 100) + b"short"
    )
    (tmp_path / "cut.idx").write_text("0\t0\n")
    with pytest.raises(ValueError, match="truncated RecordIO file"):
        recordio.RecordIOReader(tmp_path / "cut.rec").read(0)


@pytest.mark.parametrize("header, vector_label", [(True, False),
                                                  (False, True)])
def test_recordio_training_source(tmp_path, header, vector_label):
    directory, _ = write_rec(tmp_path / "rec", [3, 2, 4], header, vector_label)
    for path in (directory, directory / "train.rec"):
        source = data.open_training_source(path)
        assert source.kind == "recordio"
        assert (source.num_classes, source.num_examples) == (3, 9)
    dataset = data.training_dataset(
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
    source = data.open_training_source(directory)

    def make():
        return data.training_dataset(
            source, batch_size=3, image_size=(8, 8), channels=1,
            augment="face", seed=2,
        )

    check_checkpoint(make, tmp_path / "ckpt")


def test_recordio_corrupt_image_names_the_record(tmp_path):
    directory = tmp_path / "rec"
    directory.mkdir()
    with open(directory / "train.rec", "wb") as file:
        write_record(file, pack(0.0, constant_png(5)))
        second = file.tell()
        write_record(file, pack(1.0, constant_png(6)[:20]))
    (directory / "train.idx").write_text(f"0\t0\n1\t{second}\n")
    source = data.open_training_source(directory)
    dataset = data.training_dataset(
        source, batch_size=2, image_size=(8, 8), channels=1, augment="none",
        seed=0, repeat=False,
    )
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"(?s)truncated.*record 1 of .*train\.rec"):
        list(dataset)


# --------------------------------------------------------------------------
# LFW pairs


def test_read_lfw_pairs(tmp_path):
    lfw = make_lfw(tmp_path / "lfw", [3, 2, 1])
    pairs_path = tmp_path / "pairs.txt"
    pairs_path.write_text(
        "2\t1\n"
        "Person_0\t1\t3\n"
        "Person_0\t2\tPerson_1\t1\n"
        "Person_1   1  2\n"  # spaces work as well as tabs
        "Person_2\t1\tPerson_0\t1\n"
    )
    pairs = data.read_lfw_pairs(pairs_path, lfw, channels=1)
    np.testing.assert_array_equal(pairs.issame, [True, False, True, False])
    np.testing.assert_array_equal(pairs.fold, [0, 0, 1, 1])
    assert pairs.images.shape == (6, 6, 5, 1)  # each image once
    value = lambda i: int(pairs.images[i, 0, 0, 0])
    got = [(value(a), value(b)) for a, b in zip(pairs.left, pairs.right)]
    assert got == [(1, 3), (2, 31), (31, 32), (61, 1)]
    resized = data.read_lfw_pairs(pairs_path, lfw, image_size=(4, 4),
                                  channels=3)
    assert resized.images.shape == (6, 4, 4, 3)


@pytest.mark.parametrize(
    "text, message",
    [
        ("1\t1\nPerson_0\t1\nPerson_0\t1\tPerson_1\t1\n",
         r"pairs\.txt line 2: expected 'name n1 n2' or 'name1 n1 name2 n2'"),
        ("1\t1\nPerson_0\t1\t2\nPerson_0\tx\tPerson_1\t1\n",
         r"pairs\.txt line 3: expected"),
        ("ten\n", r"pairs\.txt line 1: expected the header"),
        ("2\t1\nPerson_0\t1\t2\nPerson_0\t1\tPerson_1\t1\n",
         r"promises 2 folds x 2 x 1 = 4 pairs, found 2"),
        ("1\t1\nPerson_0\t1\t9\nPerson_0\t1\tPerson_1\t1\n",
         r"pairs\.txt line 2: no image 9 of 'Person_0'"),
    ],
)
def test_read_lfw_pairs_errors(tmp_path, text, message):
    lfw = make_lfw(tmp_path / "lfw", [2, 2])
    (tmp_path / "pairs.txt").write_text(text)
    with pytest.raises(ValueError, match=message):
        data.read_lfw_pairs(tmp_path / "pairs.txt", lfw)


def test_ordinal():
    expected = {1: "1st", 2: "2nd", 3: "3rd", 4: "4th", 10: "10th",
                11: "11th", 12: "12th", 13: "13th", 21: "21st", 22: "22nd",
                23: "23rd", 101: "101st", 111: "111th", 112: "112th",
                1013: "1013th"}
    assert {n: data.ordinal(n) for n in expected} == expected


def test_read_lfw_pairs_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="LFW image directory"):
        data.read_lfw_pairs(tmp_path / "pairs.txt", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="Pairs file not found"):
        data.read_lfw_pairs(tmp_path / "pairs.txt", tmp_path)


@pytest.mark.parametrize("num_identities", [25, 6])
def test_make_pairs_file_round_trip(tmp_path, num_identities):
    counts = [2 + i % 4 for i in range(num_identities)]
    lfw = make_lfw(tmp_path / "lfw", counts)
    out = data.make_pairs_file(lfw, tmp_path / "pairs.txt", num_folds=10,
                               pairs_per_fold=2, seed=4)
    again = data.make_pairs_file(lfw, tmp_path / "again.txt", num_folds=10,
                                 pairs_per_fold=2, seed=4)
    assert out.read_text() == again.read_text()  # seeded
    assert out.read_text().splitlines()[0] == "10\t2"
    pairs = data.read_lfw_pairs(out, lfw, channels=1)
    identity = [pathlib.Path(n).parent.name for n in pairs.names]
    keys = set()
    for k in range(10):
        fold = pairs.fold == k
        assert pairs.issame[fold].sum() == 2
        assert (~pairs.issame[fold]).sum() == 2
    for a, b, same in zip(pairs.left, pairs.right, pairs.issame):
        assert a != b and (identity[a] == identity[b]) == same
        key = (pairs.names[a], pairs.names[b])
        assert key not in keys and key[::-1] not in keys
        keys.add(key)
    if num_identities >= 20:  # identity-disjoint folds, as in LFW
        fold_of = {}
        for a, b, k in zip(pairs.left, pairs.right, pairs.fold):
            for i in (a, b):
                assert fold_of.setdefault(identity[i], k) == k


def test_make_pairs_file_positional_numbers_and_errors(tmp_path):
    root = tmp_path / "own"
    for name, files in {"alice": ["b.png", "a.png"], "bob": ["z.png"]}.items():
        (root / name).mkdir(parents=True)
        for v, f in enumerate(files):
            (root / name / f).write_bytes(constant_png(10 * len(name) + v))
    out = data.make_pairs_file(root, tmp_path / "p.txt", num_folds=1,
                               pairs_per_fold=1)
    pairs = data.read_lfw_pairs(out, root)
    names = sorted(pathlib.Path(n).name for n in pairs.names)
    assert names == ["a.png", "b.png", "z.png"][: len(names)]
    assert pairs.issame.tolist() == [True, False]
    with pytest.raises(ValueError, match="Lower `pairs_per_fold`"):
        data.make_pairs_file(root, tmp_path / "p.txt", num_folds=1,
                             pairs_per_fold=2)
    (root / "alice" / "alice_0001.png").write_bytes(constant_png(1))
    with pytest.raises(ValueError, match="mixes LFW-named files"):
        data.make_pairs_file(root, tmp_path / "p.txt", num_folds=1,
                             pairs_per_fold=1)


# --------------------------------------------------------------------------
# Image folders, load_images


def test_read_image_folder_and_load_images(tmp_path):
    root = tmp_path / "gallery"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    rgb = smooth_rgb(12, 10)
    (root / "a" / "1.jpg").write_bytes(encode(rgb, "JPEG", quality=95))
    (root / "b" / "1.pgm").write_bytes(pgm(rgb[..., 0]))
    images, labels, names = data.read_image_folder(root, channels=3)
    assert images.shape == (2, 12, 10, 3) and images.dtype == np.uint8
    assert names == ["a", "b"] and labels.tolist() == [0, 1]
    np.testing.assert_array_equal(images[1], np.repeat(rgb[..., :1], 3, -1))
    paths, _, _ = data.read_image_folder(root, load=False)
    grey = data.load_images(paths, image_size=(6, 5), channels=1)
    assert grey.shape == (2, 6, 5, 1)
    assert data.load_images(paths[:1], image_size=None, channels=None).shape \
        == (1, 12, 10, 3)  # channels of the first image
    (root / "b" / "2.png").write_bytes(encode(rgb[:5], "PNG"))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"(?s)differ in size.*b/2\.png"):
        data.read_image_folder(root)


# --------------------------------------------------------------------------
# insightface .bin


@pytest.mark.parametrize("protocol", [2, 4])
def test_read_bin(tmp_path, protocol):
    values = [10, 20, 30, 40, 50, 60]
    bins = [constant_png(v, (7, 6), mode="RGB") for v in values]
    bins[3] = np.frombuffer(bins[3], np.uint8)  # some files hold arrays
    issame = [True, False, True]
    if protocol == 4:
        issame = np.array(issame)
    write_bin(tmp_path / "x.bin", bins, issame, protocol)
    pairs = data.read_bin(tmp_path / "x.bin", num_folds=3)
    assert pairs.images.shape == (6, 7, 6, 3)
    np.testing.assert_array_equal(pairs.images[:, 0, 0, 0], values)
    np.testing.assert_array_equal(pairs.issame, [True, False, True])
    np.testing.assert_array_equal(pairs.left, [0, 2, 4])
    np.testing.assert_array_equal(pairs.right, [1, 3, 5])
    np.testing.assert_array_equal(pairs.fold, [0, 1, 2])
    grey = data.read_bin(tmp_path / "x.bin", image_size=(4, 4), channels=1)
    assert grey.images.shape == (6, 4, 4, 1)


def test_read_bin_refuses_code_and_non_pickles(tmp_path):
    witness = str(tmp_path / "created_by_the_pickle")
    write_bin(tmp_path / "evil.bin", [CallsAFunction(witness)], [True], 2)
    with pytest.raises(data.UnsafePickleError,
                       match=r"evil\.bin: refusing to load global"):
        data.read_bin(tmp_path / "evil.bin")
    assert not os.path.exists(witness)
    pickle.loads((tmp_path / "evil.bin").read_bytes())  # the file is live
    assert os.path.exists(witness)
    write_bin(tmp_path / "objects.bin",
              [np.array([b"a", None], dtype=object)], [True], 2)
    with pytest.raises(data.UnsafePickleError, match="refusing"):
        data.read_bin(tmp_path / "objects.bin")
    (tmp_path / "text.bin").write_text("hello, I am not a pickle")
    with pytest.raises(ValueError, match=r"text\.bin is not an insightface"):
        data.read_bin(tmp_path / "text.bin")
    write_bin(tmp_path / "odd.bin", [constant_png(1)], [True], 4)
    with pytest.raises(ValueError, match="expected 2 images per pair"):
        data.read_bin(tmp_path / "odd.bin")
    with pytest.raises(FileNotFoundError, match="not found"):
        data.read_bin(tmp_path / "none.bin")


@pytest.mark.parametrize("mode", ["face", "characters"])
def test_augment_batch_draws_per_image(mode):
    image = RNG.uniform(0, 255, size=(16, 16, 1)).astype(np.float32)
    batch = np.repeat(image[None], 24, axis=0)
    seed = np.array([3, 9], np.int64)
    eager, in_data = run_both(
        lambda x, k: data.augment_batch(x, k, mode), batch, seed
    )
    np.testing.assert_array_equal(eager, in_data)
    shift = data.max_translation((16, 16))
    candidates = shifted_versions(image, shift)
    mirrored = shifted_versions(image[:, ::-1], shift)
    kinds = set()
    for out in eager:
        plain = [np.array_equal(out, c) for c in candidates]
        flipped = [np.array_equal(out, c) for c in mirrored]
        assert any(plain) or (mode == "face" and any(flipped))
        kinds.add((any(plain) and not any(flipped), tuple(plain + flipped)))
    assert len(kinds) > 5  # each image draws its own shift (and flip)


def test_decode_fast_path_falls_back_for_other_formats():
    rgb = smooth_rgb()
    png, bmp = encode(rgb, "PNG"), encode(rgb, "BMP")
    for contents, expect in ((png, "jpeg"), (bmp, "png"), (png, "png")):
        eager, in_data = run_both(
            lambda c: data.decode_image(c, 3, "x", expect),
            tf.constant(contents),
        )
        np.testing.assert_array_equal(eager, rgb)
        np.testing.assert_array_equal(in_data, rgb)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"(?s)File:.*cut"):
        data.decode_image(png[:-30], 3, "cut", "png")
    with pytest.raises(ValueError, match="expect"):
        data.decode_image(png, 3, "x", "webp")


def test_in_memory_and_streaming_give_the_same_batches(tmp_path):
    root = tmp_path / "set"
    for label in range(3):
        (root / f"id{label}").mkdir(parents=True)
        for k in range(5):
            image = RNG.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
            (root / f"id{label}" / f"{k}.png").write_bytes(
                encode(image, "PNG"))
    source = data.open_training_source(root)
    streams = [
        iter(data.training_dataset(
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
    eager = data.shuffled_index(positions, 5, n).numpy()
    scalar = [int(data.shuffled_index(p, 5, n)) for p in positions[:5]]
    in_data = np.concatenate(list(
        tf.data.Dataset.from_tensor_slices(positions).batch(10).map(
            lambda p: data.shuffled_index(p, 5, n)
        ).as_numpy_iterator()
    ))
    np.testing.assert_array_equal(eager, in_data)
    np.testing.assert_array_equal(eager[:5], scalar)
    epochs = eager.reshape(3, n)
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[0], np.arange(n))
    other_seed = data.shuffled_index(positions[:n], 6, n).numpy()
    assert not np.array_equal(other_seed, epochs[0])
