"""Tests of the evaluation formats (ring_loss_tf/eval_data.py): LFW pairs,
make_pairs_file, identification folders and insightface .bin files."""

import os
import pathlib
import pickle

import numpy as np
import pytest
import tensorflow as tf

from ring_loss_tf.data import pipeline
from ring_loss_tf.data import eval_sets
from tests.data_files import CallsAFunction
from tests.data_files import constant_png
from tests.data_files import encode
from tests.data_files import make_lfw
from tests.data_files import pgm
from tests.data_files import smooth_rgb
from tests.data_files import write_bin


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
    pairs = eval_sets.read_lfw_pairs(pairs_path, lfw, channels=1)
    np.testing.assert_array_equal(pairs.issame, [True, False, True, False])
    np.testing.assert_array_equal(pairs.fold, [0, 0, 1, 1])
    assert pairs.images.shape == (6, 6, 5, 1)  # each image once
    value = lambda i: int(pairs.images[i, 0, 0, 0])
    got = [(value(a), value(b)) for a, b in zip(pairs.left, pairs.right)]
    assert got == [(1, 3), (2, 31), (31, 32), (61, 1)]
    resized = eval_sets.read_lfw_pairs(pairs_path, lfw, image_size=(4, 4),
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
        # An image with itself scores as a match whatever the model.
        ("1\t1\nPerson_0\t1\tPerson_1\t1\n\nPerson_1\t2\tPerson_1\t2\n",
         r"pairs\.txt line 4: 'Person_1 2 Person_1 2' pairs image 2 of "
         r"'Person_1' with itself"),
    ],
)
def test_read_lfw_pairs_errors(tmp_path, text, message):
    lfw = make_lfw(tmp_path / "lfw", [2, 2])
    (tmp_path / "pairs.txt").write_text(text)
    with pytest.raises(ValueError, match=message):
        eval_sets.read_lfw_pairs(tmp_path / "pairs.txt", lfw)


def test_repeated_pairs_are_kept_with_one_warning_naming_the_lines(
        tmp_path):
    lfw = make_lfw(tmp_path / "lfw", [3, 2])
    pairs_path = tmp_path / "pairs.txt"
    pairs_path.write_text(
        "2\t2\n"
        "Person_0\t1\t2\n"
        "Person_0\t1\tPerson_1\t1\n"
        "Person_0\t2\t1\n"  # line 4: line 2's pair, the other way round
        "Person_1\t1\tPerson_0\t2\n"
        "Person_0\t1\t3\n"
        "Person_1\t2\tPerson_0\t3\n"
        "Person_0\t1\t2\n"  # line 8: line 2's again
        "Person_1\t1\tPerson_0\t2\n"  # line 9: line 5's
    )
    with pytest.warns(pipeline.DataWarning) as caught:
        pairs = eval_sets.read_lfw_pairs(pairs_path, lfw, channels=1)
    assert len(caught) == 1
    assert str(caught[0].message) == (
        f"{pairs_path}: 3 pair line(s) repeat an earlier pair (first: line "
        "4, 'Person_0 2 1', is the pair of line 2); each repeat counts "
        "again in the accuracy. Replace the repeats with new pairs."
    )
    assert len(pairs.issame) == 8  # kept: the folds stay as the file says


def test_ordinal():
    expected = {1: "1st", 2: "2nd", 3: "3rd", 4: "4th", 10: "10th",
                11: "11th", 12: "12th", 13: "13th", 21: "21st", 22: "22nd",
                23: "23rd", 101: "101st", 111: "111th", 112: "112th",
                1013: "1013th"}
    assert {n: eval_sets.ordinal(n) for n in expected} == expected


def test_read_lfw_pairs_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="LFW image directory"):
        eval_sets.read_lfw_pairs(tmp_path / "pairs.txt", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="Pairs file not found"):
        eval_sets.read_lfw_pairs(tmp_path / "pairs.txt", tmp_path)


@pytest.mark.parametrize("num_identities", [25, 6])
def test_make_pairs_file_round_trip(tmp_path, num_identities):
    counts = [2 + i % 4 for i in range(num_identities)]
    lfw = make_lfw(tmp_path / "lfw", counts)
    out = eval_sets.make_pairs_file(lfw, tmp_path / "pairs.txt", num_folds=10,
                                    pairs_per_fold=2, seed=4)
    again = eval_sets.make_pairs_file(lfw, tmp_path / "again.txt", num_folds=10,
                                      pairs_per_fold=2, seed=4)
    assert out.read_text() == again.read_text()  # seeded
    assert out.read_text().splitlines()[0] == "10\t2"
    pairs = eval_sets.read_lfw_pairs(out, lfw, channels=1)
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
    out = eval_sets.make_pairs_file(root, tmp_path / "p.txt", num_folds=1,
                                    pairs_per_fold=1)
    pairs = eval_sets.read_lfw_pairs(out, root)
    names = sorted(pathlib.Path(n).name for n in pairs.names)
    assert names == ["a.png", "b.png", "z.png"][: len(names)]
    assert pairs.issame.tolist() == [True, False]
    with pytest.raises(ValueError, match="Lower `pairs_per_fold`"):
        eval_sets.make_pairs_file(root, tmp_path / "p.txt", num_folds=1,
                                  pairs_per_fold=2)
    (root / "alice" / "alice_0001.png").write_bytes(constant_png(1))
    with pytest.raises(ValueError, match="mixes LFW-named files"):
        eval_sets.make_pairs_file(root, tmp_path / "p.txt", num_folds=1,
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
    images, labels, names = eval_sets.read_image_folder(root, channels=3)
    assert images.shape == (2, 12, 10, 3) and images.dtype == np.uint8
    assert names == ["a", "b"] and labels.tolist() == [0, 1]
    np.testing.assert_array_equal(images[1], np.repeat(rgb[..., :1], 3, -1))
    paths, _, _ = eval_sets.read_image_folder(root, load=False)
    grey = pipeline.load_images(paths, image_size=(6, 5), channels=1)
    assert grey.shape == (2, 6, 5, 1)
    assert pipeline.load_images(
        paths[:1], image_size=None, channels=None
    ).shape == (
        1,
        12,
        10,
        3,
    )  # channels of the first image
    # Another size: resized to the first image's (a model that takes any
    # size still takes one batch of one size); a constant image stays
    # constant.
    (root / "b" / "2.png").write_bytes(
        encode(np.full((5, 7, 3), 77, np.uint8), "PNG"))
    mixed, _, _ = eval_sets.read_image_folder(root)
    assert mixed.shape == (3, 12, 10, 3)
    np.testing.assert_array_equal(mixed[2], 77)
    np.testing.assert_array_equal(mixed[0], images[0])


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
    pairs = eval_sets.read_bin(tmp_path / "x.bin", num_folds=3)
    assert pairs.images.shape == (6, 7, 6, 3)
    np.testing.assert_array_equal(pairs.images[:, 0, 0, 0], values)
    np.testing.assert_array_equal(pairs.issame, [True, False, True])
    np.testing.assert_array_equal(pairs.left, [0, 2, 4])
    np.testing.assert_array_equal(pairs.right, [1, 3, 5])
    np.testing.assert_array_equal(pairs.fold, [0, 1, 2])
    grey = eval_sets.read_bin(tmp_path / "x.bin", image_size=(4, 4), channels=1)
    assert grey.images.shape == (6, 4, 4, 1)


def test_read_bin_refuses_code_and_non_pickles(tmp_path):
    witness = str(tmp_path / "created_by_the_pickle")
    write_bin(tmp_path / "evil.bin", [CallsAFunction(witness)], [True], 2)
    with pytest.raises(eval_sets.UnsafePickleError,
                       match=r"evil\.bin: refusing to load global"):
        eval_sets.read_bin(tmp_path / "evil.bin")
    assert not os.path.exists(witness)
    pickle.loads((tmp_path / "evil.bin").read_bytes())  # the file is live
    assert os.path.exists(witness)
    write_bin(tmp_path / "objects.bin",
              [np.array([b"a", None], dtype=object)], [True], 2)
    with pytest.raises(eval_sets.UnsafePickleError, match="refusing"):
        eval_sets.read_bin(tmp_path / "objects.bin")
    (tmp_path / "text.bin").write_text("hello, I am not a pickle")
    with pytest.raises(ValueError, match=r"text\.bin is not an insightface"):
        eval_sets.read_bin(tmp_path / "text.bin")
    write_bin(tmp_path / "odd.bin", [constant_png(1)], [True], 4)
    with pytest.raises(ValueError, match="expected 2 images per pair"):
        eval_sets.read_bin(tmp_path / "odd.bin")
    with pytest.raises(FileNotFoundError, match="not found"):
        eval_sets.read_bin(tmp_path / "none.bin")
