"""The bad-input matrix: every bad input stops with one clear message.

One row per bad input: (name, setup, expected exception, expected message).
`setup(tmp)` builds the bad input under the test's temporary directory and
returns the call that must fail; the message pattern may name the directory
as `{tmp}`. Rows cover the data readers (image folders, RecordIO, LFW
pairs.txt, insightface .bin), evaluation's model and distractor inputs, and
the flag checks of train.py (through `loop.train` of a `TrainConfig`,
which train.py calls and whose `ConfigError` it prints as `--flag=value:
problem; fix`) and of
evaluate.py (its `_check_flags`, run in-process: it needs no TensorFlow),
and evaluate.py end to end (its `main`, in-process) on corrupt images,
`.bin` files and SavedModels crafted to run code.

Files are built with the writers of tests/data_files.py, which follow the
published formats independently of the readers.
"""

import contextlib
import importlib
import json
import re
import warnings

import numpy as np
import pytest
import tensorflow as tf

from ring_loss_tf.data import pipeline
from ring_loss_tf.data import eval_sets
from ring_loss_tf.evaluation import protocols
from ring_loss_tf import config
from ring_loss_tf.data import recordio
from ring_loss_tf.training import loop
from ring_loss_tf.errors import ConfigError
from ring_loss_tf.errors import TrainingDataError
from tests.data_files import CallsAFunction
from tests.data_files import constant_png
from tests.data_files import encode
from tests.data_files import make_folder
from tests.data_files import make_lfw
from tests.data_files import pack
from tests.data_files import write_bin
from tests.data_files import write_rec
from tests.data_files import write_record
from tests import saved_models

CORRUPT = (
    r"Corrupt or truncated image file\. Remove or replace the file, or skip "
    r"such files with skip_corrupt=True \(--skip_corrupt\)\. File:.*"
)
PAIRS_OK = "1\t1\nPerson_0\t1\t2\nPerson_0\t1\tPerson_1\t1\n"
# Two folds: what the 10-fold protocol needs at least.
PAIRS_2_FOLDS = PAIRS_OK.replace("1\t1\n", "2\t1\n", 1) + (
    "Person_1\t1\t2\nPerson_1\t1\tPerson_0\t2\n"
)


# --------------------------------------------------------------------------
# Setups: each builds one bad input and returns the call that must fail.


def _first_epoch(root):
    """Reads one epoch of the training pipeline over `root`."""

    def run():
        source = pipeline.open_training_source(root)
        list(pipeline.training_dataset(
            source, batch_size=2, image_size=(8, 8), channels=1,
            augment="none", seed=0, repeat=False,
        ))

    return run


def _folder_with(tmp, name, contents):
    """A 2 x 2 image folder whose id01/<name> holds `contents`."""
    root = make_folder(tmp / "set", [2, 2])
    (root / "id01" / name).write_bytes(contents)
    return _first_epoch(root)


def truncated_image(tmp):
    root = make_folder(tmp / "set", [2, 2])
    path = root / "id01" / "1.png"
    path.write_bytes(path.read_bytes()[:30])
    return _first_epoch(root)


def all_bad_identity(tmp):
    root = tmp / "set"
    for name, contents in (("a/0.png", b"junk"), ("b/0.png", b"")):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(contents)
    return lambda: pipeline.open_training_source(root, skip_corrupt=True)


def empty_identities(tmp):
    for name in ("a", "b"):
        (tmp / "set" / name).mkdir(parents=True)
    (tmp / "set" / "b" / "notes.txt").write_text("no images here")
    return lambda: pipeline.open_training_source(tmp / "set")


def rec_file(tmp, cut=None, idx=True, shift=0):
    """An insightface train.rec (3 images), optionally cut or mis-indexed."""
    directory, _ = write_rec(tmp / "rec", [2, 1])
    rec = directory / "train.rec"
    if cut is not None:
        # Inside the 8-byte framing header of record `cut`.
        offsets = (directory / "train.idx").read_text().split()[1::2]
        rec.write_bytes(rec.read_bytes()[: int(offsets[cut]) + 4])
    if not idx:
        (directory / "train.idx").unlink()
    if shift:
        lines = (directory / "train.idx").read_text().split()
        pairs = zip(lines[::2], lines[1::2])
        (directory / "train.idx").write_text(
            "".join(f"{k}\t{int(o) + shift}\n" for k, o in pairs)
        )
    return rec


def pairs_case(text):
    def setup(tmp):
        lfw = make_lfw(tmp / "lfw", [2, 2])
        (tmp / "pairs.txt").write_text(text)
        return lambda: eval_sets.read_lfw_pairs(tmp / "pairs.txt", lfw)

    return setup


def train_with(**settings):
    def setup(tmp):
        settings.setdefault("model_dir", str(tmp / "run"))
        settings.setdefault("steps", 1)  # only the one bad setting
        return lambda: loop.train(config.make(**settings))

    return setup


@contextlib.contextmanager
def _evaluate_flags(values):
    """evaluate.py's absl flags set to `values`, restored afterwards."""
    from absl import flags
    from absl.testing import flagsaver

    module = importlib.import_module("evaluate")
    parsed_here = not flags.FLAGS.is_parsed()
    if parsed_here:
        flags.FLAGS(["evaluate.py"])
    try:
        with flagsaver.flagsaver(**values):
            yield module
    finally:
        if parsed_here:
            flags.FLAGS.unparse_flags()


def evaluate_with(**values):
    def setup(tmp):
        resolved = {
            k: (str(tmp / v[5:]) if isinstance(v, str) and v.startswith("{tmp}")
                else [str(tmp / p[5:]) for p in v] if k == "bin" else v)
            for k, v in values.items()
        }
        resolved.setdefault("model", str(tmp / "model"))

        def run():
            with _evaluate_flags(resolved) as module:
                module._check_flags()

        return run

    return setup


def evaluate_main(**values):
    """evaluate.py's main with its flags set to `values` ("{tmp}..." paths
    under the test's directory); --model defaults to a plain SavedModel."""

    def setup(tmp):
        resolved = {
            k: (str(tmp / v[5:]) if isinstance(v, str) and v.startswith("{tmp}")
                else [str(tmp / p[5:]) for p in v] if k == "bin" else v)
            for k, v in values.items()
        }
        if "model" not in resolved:
            resolved["model"] = str(
                saved_models.save_plain(tmp / "plain_model")
            )
        resolved.setdefault("output_dir", str(tmp / "out"))
        resolved.setdefault("plots", False)

        def run():
            with _evaluate_flags(resolved) as module:
                module.main(["evaluate.py"])

        return run

    return setup


def _evaluate_corrupt_lfw_image(tmp):
    make_lfw(tmp / "lfw", [2, 2])
    (tmp / "lfw" / "Person_0" / "Person_0_0002.png").write_bytes(b"garbage")
    (tmp / "pairs.txt").write_text(PAIRS_OK)
    return evaluate_main(lfw_dir="{tmp}lfw", pairs="{tmp}pairs.txt")(tmp)


def _evaluate_bin_with_corrupt_image(tmp):
    png = constant_png(10, (4, 4))
    bad = png[:45] + bytes([png[45] ^ 0xFF]) + png[46:]
    write_bin(tmp / "mid.bin", [png, bad], [True], 2)
    return evaluate_main(bin=["{tmp}mid.bin"])(tmp)


def _evaluate_malicious_bin(tmp):
    witness = tmp / "created_by_the_pickle"
    write_bin(tmp / "evil.bin", [CallsAFunction(str(witness))], [True], 2)
    run = evaluate_main(bin=["{tmp}evil.bin"])(tmp)

    def call():
        try:
            run()
        finally:
            assert not witness.exists(), "the pickle ran code"

    return call


def _evaluate_model_that_writes_a_file(tmp):
    witness = tmp / "written_by_the_model"
    saved_models.save_crafted(tmp / "model", "write_file", witness)
    make_lfw(tmp / "lfw", [2, 2])
    (tmp / "pairs.txt").write_text(PAIRS_OK)
    run = evaluate_main(model="{tmp}model", lfw_dir="{tmp}lfw",
                        pairs="{tmp}pairs.txt")(tmp)

    def call():
        try:
            run()
        finally:
            assert not witness.exists(), "the model ran"

    return call


def _symlink_loop(tmp):
    make_folder(tmp / "set", [2, 2])
    (tmp / "set" / "id01" / "loop.png").symlink_to("loop.png")
    return lambda: pipeline.open_training_source(tmp / "set")


def _batch_larger_than_the_data(tmp):
    make_folder(tmp / "faces" / "train", [2, 2])
    run = train_with(data_dir=str(tmp / "faces"), batch_size=50_000_000,
                     image_size=(8, 8), channels=1)(tmp)

    def call():
        try:
            run()
        finally:
            # Refused before anything is written.
            assert not (tmp / "run").exists()

    return call


def _bad_idx_line(tmp):
    rec = rec_file(tmp)
    rec.with_suffix(".idx").write_text("0\t0\nzero 4\n")
    return lambda: pipeline.open_training_source(rec)


def _short_image_record(tmp):
    """A .rec whose record 0 is 4 bytes: no room for the IRHeader."""
    (tmp / "rec").mkdir()
    with open(tmp / "rec" / "train.rec", "wb") as file:
        write_record(file, b"abcd")
    (tmp / "rec" / "train.idx").write_text("0\t0\n")
    return lambda: pipeline.open_training_source(tmp / "rec")


def _rec_label(label):
    """A .rec without header record whose record 1 has class `label`."""

    def setup(tmp):
        (tmp / "rec").mkdir()
        with open(tmp / "rec" / "train.rec", "wb") as file:
            write_record(file, pack(0.0, constant_png(1)))
            second = file.tell()
            write_record(file, pack(label, constant_png(2)))
        (tmp / "rec" / "train.idx").write_text(f"0\t0\n1\t{second}\n")
        return lambda: pipeline.open_training_source(tmp / "rec")

    return setup


def _rec_header(a, b):
    """An insightface .rec (2 images) whose header record 0 says (a, b)."""

    def setup(tmp):
        (tmp / "rec").mkdir()
        records = [pack([a, b], b"")] + [pack(0.0, constant_png(1))] * 2
        with open(tmp / "rec" / "train.rec", "wb") as file:
            offsets = []
            for record in records:
                offsets.append(file.tell())
                write_record(file, record)
        (tmp / "rec" / "train.idx").write_text(
            "".join(f"{k}\t{o}\n" for k, o in enumerate(offsets))
        )
        return lambda: pipeline.open_training_source(tmp / "rec")

    return setup


def _idx_with(text):
    """A valid train.rec whose train.idx is `text`."""

    def setup(tmp):
        rec = rec_file(tmp)
        rec.with_suffix(".idx").write_text(text)
        return lambda: pipeline.open_training_source(rec)

    return setup


def _not_recordio(tmp):
    (tmp / "x.rec").write_bytes(b"this is not a RecordIO file at all")
    return lambda: pipeline.open_training_source(tmp / "x.rec")


def _malicious_bin(tmp):
    witness = tmp / "created_by_the_pickle"
    write_bin(tmp / "evil.bin", [CallsAFunction(str(witness))], [True], 2)

    def run():
        try:
            eval_sets.read_bin(tmp / "evil.bin")
        finally:
            assert not witness.exists(), "the pickle ran code"

    return run


def _text_bin(tmp):
    (tmp / "lfw.bin").write_text("hello, I am not a pickle")
    return lambda: eval_sets.read_bin(tmp / "lfw.bin")


def _bin_with_corrupt_middle(tmp):
    """A PNG with its header and IEND intact but its pixel data broken: it
    passes `image_bytes_ok`, and only the decoder notices."""
    png = constant_png(10, (4, 4))
    bad = png[:45] + bytes([png[45] ^ 0xFF]) + png[46:]
    write_bin(tmp / "mid.bin", [png, bad], [True], 2)
    return lambda: eval_sets.read_bin(tmp / "mid.bin", image_size=(4, 4),
                                      channels=1)


def _odd_bin(tmp):
    write_bin(tmp / "odd.bin", [constant_png(1)] * 3, [True], 4)
    return lambda: eval_sets.read_bin(tmp / "odd.bin")


def _corrupt_eval_image(tmp):
    (tmp / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return lambda: pipeline.load_images([tmp / "a.png"], image_size=None,
                                    channels=None)


def _model_is_file(tmp):
    (tmp / "model.keras").write_text("not a model")
    return lambda: protocols.resolve_model_path(tmp / "model.keras")


def _bad_distractors(tmp):
    (tmp / "d.npy").write_bytes(b"not numpy")
    return lambda: protocols.load_distractor_embeddings(tmp / "d.npy", 4)


def _root_is_a_text_file(tmp):
    (tmp / "x.txt").write_text("x")
    return lambda: pipeline.open_training_source(tmp / "x.txt")


def _pairs_missing(tmp):
    lfw = make_lfw(tmp / "lfw", [2])
    return lambda: eval_sets.read_lfw_pairs(tmp / "pairs.txt", lfw)


def _faces(tmp, counts):
    """DIR/faces/train: a folder per identity of 8 x 8 PNGs."""
    return make_folder(tmp / "faces" / "train", counts)


def _image_over_the_budget(tmp):
    train = _faces(tmp, [2, 2])
    (train / "id01" / "1.png").write_bytes(constant_png(9, size=(9, 8)))
    return train_with(data_dir=str(tmp / "faces"), max_image_pixels=71,
                      image_size=(32, 32), channels=1, batch_size=2)(tmp)


def _one_identity(tmp):
    _faces(tmp, [3])
    return train_with(data_dir=str(tmp / "faces"))(tmp)


def _data_dir_without_train(tmp):
    (tmp / "faces").mkdir()
    return train_with(data_dir=str(tmp / "faces"))(tmp)


# --------------------------------------------------------------------------
# The matrix: (name, setup, exception, message pattern).

InvalidArgument = tf.errors.InvalidArgumentError
UnsafePickle = eval_sets.UnsafePickleError

CASES = [
    # Image files of a training folder (errors name the file).
    ("corrupt image", lambda t: _folder_with(t, "1.png", b"garbage bytes"),
     InvalidArgument, CORRUPT + r"set/id01/1\.png"),
    ("truncated image", truncated_image,
     InvalidArgument, CORRUPT + r"set/id01/1\.png"),
    ("zero-byte image", lambda t: _folder_with(t, "2.png", b""),
     InvalidArgument, CORRUPT + r"set/id01/2\.png"),
    ("text file named .jpg",
     lambda t: _folder_with(t, "2.jpg", b"GIF89a, but text"),
     InvalidArgument, CORRUPT + r"set/id01/2\.jpg"),
    ("corrupt image in an evaluation set", _corrupt_eval_image,
     InvalidArgument, CORRUPT + r"a\.png"),
    ("training image over the pixel budget", _image_over_the_budget,
     TrainingDataError, r"^Image larger than the pixel budget of 71 "
                        r"\(max_image_pixels\): decoding it would take too "
                        r"much memory\. Downscale the file, or raise the "
                        r"budget \(--max_image_pixels of train\.py or of the "
                        r"aligner\)\. File: {tmp}/faces/train/id01/1\.png "
                        r"\(8x9 pixels\)$"),
    ("symbolic link loop in an identity folder", _symlink_loop,
     ValueError, r"^{tmp}/set/id01/loop\.png: cannot be read \(Too many "
                 r"levels of symbolic links\); remove it or make the link "
                 r"point to an image or folder\.$"),
    # Identity folders and roots.
    ("identity folders without images", empty_identities,
     ValueError, r"No images found in {tmp}/set: expected one sub-directory "
                 r"per identity holding .* files \(root/<identity>/<image>\)"),
    ("every image corrupt (skip_corrupt)", all_bad_identity,
     ValueError, r"^Every image in {tmp}/set is corrupt: all 2 files failed "
                 r"to decode \(first: {tmp}/set/a/0\.png: "
                 r"UnidentifiedImageError: .*\)\. Check that the files are "
                 r"images \(jpg/png/\.\.\.\) and copy the data set again, or "
                 r"point to another directory\.$"),
    ("missing training root",
     lambda t: lambda: pipeline.open_training_source(t / "nowhere"),
     FileNotFoundError, r"Data directory not found: {tmp}/nowhere\. Check "
                        r"the path \(a folder per identity"),
    ("training path is a file, not .rec",
     _root_is_a_text_file,
     ValueError, r"Training data must be a directory or a \.rec file\. "
                 r"Received: {tmp}/x\.txt"),
    ("missing LFW image directory",
     lambda t: lambda: eval_sets.read_lfw_pairs(t / "pairs.txt", t / "no_lfw"),
     FileNotFoundError, r"^LFW image directory not found: {tmp}/no_lfw\. "
                        r"Pass the directory holding one folder per "
                        r"identity, <identity>/<identity>_<nnnn>\.<ext>, "
                        r"that the pairs\.txt names refer to \(evaluate\.py "
                        r"--lfw_dir=DIR --pairs=DIR/pairs\.txt\)\.$"),
    # pairs.txt
    ("pairs.txt missing", _pairs_missing,
     FileNotFoundError, r"Pairs file not found: {tmp}/pairs\.txt"),
    ("pairs.txt empty", pairs_case("\n\n"),
     ValueError, r"{tmp}/pairs\.txt is empty \(format: a header "
                 r"'num_folds pairs_per_fold'"),
    ("pairs.txt wrong header", pairs_case("ten folds\n" + PAIRS_OK[5:]),
     ValueError, r"pairs\.txt line 1: expected the header 'num_folds "
                 r"pairs_per_fold', found 'ten folds'"),
    ("pairs.txt line with 2 fields",
     pairs_case("1\t1\nPerson_0\t1\nPerson_0\t1\tPerson_1\t1\n"),
     ValueError, r"pairs\.txt line 2: expected 'name n1 n2' or 'name1 n1 "
                 r"name2 n2' with integer n, found 'Person_0 1'"),
    ("pairs.txt line with 5 fields",
     pairs_case("1\t1\nPerson_0\t1\t2\nPerson_0\t1\tPerson_1\t1\t7\n"),
     ValueError, r"pairs\.txt line 3: expected 'name n1 n2' or 'name1 n1 "
                 r"name2 n2' with integer n, found 'Person_0 1 Person_1 1 7'"),
    ("pairs.txt fewer pairs than its header",
     pairs_case("2\t1\n" + PAIRS_OK[4:]),
     ValueError, r"pairs\.txt: the header \(line 1\) promises 2 folds x 2 x "
                 r"1 = 4 pairs, found 2 pair lines"),
    ("pairs.txt names a missing image",
     pairs_case("1\t1\nPerson_0\t1\t9\nPerson_0\t1\tPerson_1\t1\n"),
     ValueError, r"pairs\.txt line 2: no image 9 of 'Person_0': expected "
                 r"{tmp}/lfw/Person_0/Person_0_0009\.<ext>"),
    ("pairs.txt names a missing identity",
     pairs_case("1\t1\nPerson_0\t1\t2\nPerson_0\t1\tNobody\t1\n"),
     ValueError, r"pairs\.txt line 3: no image 1 of 'Nobody': expected "
                 r"{tmp}/lfw/Nobody/Nobody_0001\.<ext> \(or the 1st image "
                 r"of that folder\)\.$"),
    ("pairs.txt names image 22 of an identity",
     pairs_case("1\t1\nPerson_0\t1\t22\nPerson_0\t1\tPerson_1\t1\n"),
     ValueError, r"line 2: no image 22 of 'Person_0': .*\(or the 22nd image "
                 r"of that folder\)\.$"),
    ("pairs.txt pairs an image with itself",
     pairs_case("1\t1\nPerson_0\t2\t2\nPerson_0\t1\tPerson_1\t1\n"),
     ValueError, r"^{tmp}/pairs\.txt line 2: 'Person_0 2 2' pairs image 2 of "
                 r"'Person_0' with itself, a match whatever the model; name "
                 r"two different images \(format: "),
    ("pairs.txt identity name with a path",
     pairs_case("1\t1\nPerson_0\t1\t2\nPerson_0\t1\t../lfw/Person_1\t1\n"),
     ValueError, r"^{tmp}/pairs\.txt line 3: '\.\./lfw/Person_1' is not an "
                 r"identity folder name under {tmp}/lfw \(no '/', '\.' or "
                 r"'\.\.'\); format: "),
    # insightface .bin
    (".bin that is not a pickle", _text_bin,
     ValueError, r"{tmp}/lfw\.bin is not an insightface \.bin file \(a "
                 r"pickle of \(images, issame\)\): UnpicklingError"),
    # Found by tests/data/test_fuzz.py: the pickle error's own newline.
    (".bin of one persistent-id opcode",
     lambda t: (lambda: eval_sets.read_bin(t / "p.bin"))
     if (t / "p.bin").write_bytes(b"P") else None,
     ValueError, r"^{tmp}/p\.bin is not an insightface \.bin file \(a pickle "
                 r"of \(images, issame\)\): UnpicklingError: A load "
                 r"persistent id instruction was encountered, but no "
                 r"persistent_load function was specified\. near byte offset "
                 r"0\. Use a \.bin from insightface's datasets, or re-create "
                 r"it with their lfw2pack\.py \(a pickle of "
                 r"\(images, issame\)\)\.$"),
    # Found by tests/data/test_fuzz.py: the decoder's error named no image.
    (".bin image with a corrupt middle", _bin_with_corrupt_middle,
     InvalidArgument, CORRUPT + r"{tmp}/mid\.bin image 1 \(Invalid PNG "
                      r"data, size 73\)$"),
    # Found by tests/data/test_fuzz.py: b"" pickles (protocol 2) as a call of
    # bytes(), which was refused as unsafe.
    (".bin with an empty image",
     lambda t: (lambda: eval_sets.read_bin(t / "empty.bin"))
     if write_bin(t / "empty.bin", [b"", constant_png(1)], [True], 2) is None
     else None,
     InvalidArgument, CORRUPT + r"{tmp}/empty\.bin image 0"),
    (".bin whose images are not bytes",
     lambda t: (lambda: eval_sets.read_bin(t / "int.bin"))
     if write_bin(t / "int.bin", [5, 7], [True], 2) is None else None,
     ValueError, r"^{tmp}/int\.bin: image 0 is of type int, not encoded "
                 r"image bytes\. Use a \.bin from insightface's datasets"),
    (".bin whose issame is not booleans",
     lambda t: (lambda: eval_sets.read_bin(t / "str.bin"))
     if write_bin(t / "str.bin", [b"a", b"b"], ["yes"], 2) is None
     else None,
     ValueError, r"^{tmp}/str\.bin: expected a list of booleans as the "
                 r"second item of \(images, issame\), found list of <U3, "
                 r"shape \(1,\)\. Use a \.bin"),
    (".bin that runs code when unpickled", _malicious_bin,
     UnsafePickle, r"{tmp}/evil\.bin: refusing to load global "),
    (".bin with 3 images for 1 pair", _odd_bin,
     ValueError, r"odd\.bin: expected 2 images per pair, found 3 images for "
                 r"1 pairs\."),
    (".bin missing", lambda t: lambda: eval_sets.read_bin(t / "none.bin"),
     FileNotFoundError, r"Verification \.bin file not found: {tmp}/none\.bin"),
    # RecordIO
    ("truncated .rec (scanned, no .idx)",
     lambda t: (lambda rec: lambda: pipeline.open_training_source(rec))(
         rec_file(t, cut=2, idx=False)),
     ValueError, r"{tmp}/rec/train\.rec: truncated RecordIO file: wanted 8 "
                 r"bytes at offset \d+, the file has \d+ bytes\."),
    ("truncated .rec (read through its .idx)",
     lambda t: (lambda rec: lambda: recordio.RecordIOReader(rec).read(2))(
         rec_file(t, cut=2)),
     ValueError, r"{tmp}/rec/train\.rec: truncated RecordIO file"),
    ("image record shorter than its IRHeader", _short_image_record,
     ValueError, r"^{tmp}/rec/train\.rec record 0: 4 bytes, shorter than the "
                 r"24-byte IRHeader \(flag, label, id, id2\)\. The file is "
                 r"truncated or not an insightface image \.rec: re-create it "
                 r"with MXNet's im2rec, or check that the \.idx was written "
                 r"with this \.rec\.$"),
    ("image record with a NaN class label", _rec_label(float("nan")),
     ValueError, r"^{tmp}/rec/train\.rec record 1: class label nan is not an "
                 r"integer in 0 \.\. 2\*\*31 - 1\. The file is not an "
                 r"insightface image \.rec, or it is corrupt: re-create it "
                 r"with MXNet's im2rec\.$"),
    ("image record with a negative class label", _rec_label(-3.0),
     ValueError, r"record 1: class label -3\.0 is not an integer"),
    ("header record announcing 1e30 images", _rec_header(1e30, 2e30),
     ValueError, r"^{tmp}/rec/train\.rec: header record 0 says images are "
                 r"records 1\.\.\d+, but record 3 is not in the index \(3 "
                 r"records\)\. The file is truncated or not an insightface "
                 r"image \.rec"),
    ("header record with infinite labels",
     _rec_header(float("inf"), float("inf")),
     ValueError, r"^{tmp}/rec/train\.rec record 0: the header record's "
                 r"labels \(first image id, end\) = \(inf, inf\) are not "
                 r"finite\."),
    (".idx with a negative offset", _idx_with("0\t-8\n"),
     ValueError, r"{tmp}/rec/train\.idx line 1: expected 'key<TAB>offset' "
                 r"\(two integers 0 \.\. 2\*\*63 - 1\), found '0\\t-8'"),
    # Found by tests/data/test_fuzz.py: an OverflowError from NumPy.
    (".idx with a key beyond int64",
     _idx_with("0\t0\n9223372036854775808\t40\n"),
     ValueError, r"^{tmp}/rec/train\.idx line 2: expected 'key<TAB>offset' "
                 r"\(two integers 0 \.\. 2\*\*63 - 1\), found "
                 r"'9223372036854775808\\t40'\. Rewrite the index"),
    (".rec that is not RecordIO", _not_recordio,
     ValueError, r"{tmp}/x\.rec: not a RecordIO file: expected magic "
                 r"0xced7230a at offset 0, found 0x"),
    (".idx of another .rec (offsets off by 4)",
     lambda t: (lambda rec: lambda: pipeline.open_training_source(rec))(
         rec_file(t, shift=4)),
     ValueError, r"{tmp}/rec/train\.rec: not a RecordIO record at offset 4: "
                 r"expected magic 0xced7230a, found 0x[0-9a-f]{8}\. Is the "
                 r"\.idx file the one written with this \.rec\?"),
    (".idx with a malformed line", _bad_idx_line,
     ValueError, r"{tmp}/rec/train\.idx line 2: expected 'key<TAB>offset' "
                 r"\(two integers 0 \.\. 2\*\*63 - 1\), found 'zero 4'\. "
                 r"Rewrite the index, or delete it to have the \.rec "
                 r"scanned\.$"),
    # Evaluation inputs
    ("model path missing",
     lambda t: lambda: protocols.resolve_model_path(t / "nomodel"),
     FileNotFoundError, r"Model not found: {tmp}/nomodel\. Pass a SavedModel "
                        r"directory \(with saved_model\.pb\) or a training "
                        r"--model_dir \(with export/\)\."),
    ("model path is a file", _model_is_file,
     FileNotFoundError, r"{tmp}/model\.keras is neither a SavedModel "
                        r"directory \(no saved_model\.pb\) nor a training "
                        r"model_dir \(no export/saved_model\.pb\)\."),
    ("distractor embeddings not a .npy", _bad_distractors,
     ValueError, r"{tmp}/d\.npy: not a readable \.npy array of embeddings"),
    # train.py flags (loop.train checks its TrainConfig before any work)
    ("train --head=svm", train_with(head="svm"),
     ConfigError, r"^head='svm': unknown head; use one of softmax, "
                  r"asoftmax, l2softmax, centerloss, cosface, arcface$"),
    ("train --backbone=vgg", train_with(backbone="vgg"),
     ConfigError, r"^backbone='vgg': unknown backbone; use one of "),
    ("train --batch_size=0", train_with(batch_size=0),
     ConfigError, r"^batch_size=0: must be a positive integer; use e\.g\. "
                  r"256$"),
    ("train --lr=nan", train_with(lr=float("nan")),
     ConfigError, r"^lr=nan: must be a finite number > 0; use e\.g\. 0\.1$"),
    ("train --lambda_ring=-0.01", train_with(lambda_ring=-0.01),
     ConfigError, r"^lambda_ring=-0\.01: must be a finite number >= 0; "
                  r"use 0 to disable the ring loss or e\.g\. 0\.01$"),
    ("train --head=asoftmax --margin=5", train_with(head="asoftmax", margin=5),
     ConfigError, r"^margin=5: the asoftmax head's margin must be one of "
                  r"1, 2, 3, 4; use 4 or omit it$"),
    ("train --image_size=4", train_with(image_size=(4, 4)),
     ConfigError, r"^image_size=\(4, 4\): must be SIZE or HEIGHT,WIDTH, each "
                  r">= 8; use e\.g\. 32 or 112,96$"),
    ("train channels=2", train_with(channels=2),
     ConfigError, r"^channels=2: must be 1 or 3; use 1 \(grey\) or 3 "
                  r"\(RGB\)$"),
    ("train --data_dir missing",
     lambda t: train_with(data_dir=str(t / "no_faces"))(t),
     ConfigError, r"^data_dir='{tmp}/no_faces': no such directory; give a "
                  r"directory holding train/"),
    ("train --data_dir without train/", _data_dir_without_train,
     ConfigError, r"^data_dir='{tmp}/faces': has no train/ folder, "
                  r"train-\*\.tfrecord shards or train\.rec; put a folder of "
                  r"images per identity under <data_dir>/train "
                  r"\(docs/data-formats\.md\)$"),
    ("train on one identity", _one_identity,
     ConfigError, r"^data_dir='{tmp}/faces': holds 1 identity, and a "
                  r"classifier needs at least 2 identities; add a folder per "
                  r"identity under <data_dir>/train$"),
    ("train --num_train_identities=1", train_with(num_train_identities=1),
     ConfigError, r"^num_train_identities=1: must be >= 2 \(a classifier "
                  r"needs at least 2 identities\); use e\.g\. 1000$"),
    ("train --max_image_pixels=0", train_with(max_image_pixels=0),
     ConfigError, r"^max_image_pixels=0: must be a positive integer; use "
                  r"e\.g\. 67108864 \(8192x8192\)$"),
    ("train --model_dir=''", train_with(model_dir=""),
     ConfigError, r"^model_dir='': is empty; give a directory for "
                  r"checkpoints$"),
    ("train --seed=-5", train_with(seed=-5),
     ConfigError, r"^seed=-5: must be an integer in 0 \.\. 2\*\*32 - 1; "
                  r"use e\.g\. 0$"),
    ("train --seed=10**23", train_with(seed=10**23),
     ConfigError, r"^seed=100000000000000000000000: must be an integer in "
                  r"0 \.\. 2\*\*32 - 1; use e\.g\. 0$"),
    ("train --image_size=20000", train_with(image_size=(20000, 20000)),
     ConfigError, r"^image_size=\(20000, 20000\): a side of more than 1024 "
                  r"pixels \(the limit\) would need gigabytes per batch; use "
                  r"e\.g\. 112 or 224$"),
    ("train --embedding_dim=10**9", train_with(embedding_dim=10**9),
     ConfigError, r"^embedding_dim=1000000000: is more than 8192 \(the "
                  r"limit; the head holds embedding_dim x num_classes "
                  r"weights\); use e\.g\. 128 or 512$"),
    ("train --batch_size larger than the training set",
     _batch_larger_than_the_data,
     ConfigError, r"^batch_size=50000000: larger than the training set \(4 "
                  r"images\); use a batch of at most 4$"),
    # evaluate.py flags
    ("evaluate without --model", evaluate_with(model=""),
     SystemExit, r"^evaluate\.py: --model is required: a SavedModel "
                 r"directory or a training --model_dir\.$"),
    ("evaluate --low_res=0.5", evaluate_with(low_res=["0.5"]),
     SystemExit, r"^evaluate\.py: --low_res: '0\.5' is not a factor >= 1 "
                 r"\(e\.g\. --low_res=2,4,8\)\.$"),
    ("evaluate --low_res=abc", evaluate_with(low_res=["abc"]),
     SystemExit, r"^evaluate\.py: --low_res: 'abc' is not a factor >= 1"),
    ("evaluate --bin missing", evaluate_with(bin=["{tmp}none.bin"]),
     SystemExit, r"^evaluate\.py: --bin: {tmp}/none\.bin: no such file\.$"),
    ("evaluate --lfw_dir without --pairs", evaluate_with(lfw_dir="{tmp}"),
     SystemExit, r"^evaluate\.py: --lfw_dir and --pairs go together"),
    ("evaluate --lfw_dir missing",
     evaluate_with(lfw_dir="{tmp}no_lfw", pairs="{tmp}"),
     SystemExit, r"^evaluate\.py: --lfw_dir={tmp}/no_lfw: no such file or "
                 r"directory\.$"),
    ("evaluate --gallery without --probes", evaluate_with(gallery="{tmp}"),
     SystemExit, r"^evaluate\.py: --gallery and --probes go together\.$"),
    ("evaluate --max_rank=0", evaluate_with(max_rank=0),
     SystemExit, r"^evaluate\.py: --max_rank and --batch_size must be "
                 r">= 1\.$"),
    # evaluate.py on bad data and models, end to end
    ("evaluate.py: corrupt image in --lfw_dir", _evaluate_corrupt_lfw_image,
     SystemExit, r"^evaluate\.py: Corrupt or truncated image file: "
                 r"{tmp}/lfw/Person_0/Person_0_0002\.png\. Remove or "
                 r"replace it: an evaluation set is read whole \(there is "
                 r"no --skip_corrupt here\)\.$"),
    ("evaluate.py: .bin with a corrupt image",
     _evaluate_bin_with_corrupt_image,
     SystemExit, r"^evaluate\.py: Corrupt or truncated image file: "
                 r"{tmp}/mid\.bin image 1 \(.+\)\. Remove or replace it: "
                 r"an evaluation set is read whole"),
    ("evaluate.py: .bin that would run code", _evaluate_malicious_bin,
     SystemExit, r"^evaluate\.py: {tmp}/evil\.bin: refusing to load global "
                 r"posix\.mkdir: a \.bin may hold only bytes, lists, tuples, "
                 r"bools and numpy arrays$"),
    ("evaluate.py: SavedModel that writes a file",
     _evaluate_model_that_writes_a_file,
     SystemExit, r"^evaluate\.py: Refusing to load the SavedModel "
                 r"{tmp}/model: its graph holds a WriteFile operation "
                 r"\(function '.+', node '.+'\), which reads or writes "
                 r"files; a SavedModel is a program and would run it\. If "
                 r"you trust where the model comes from, pass "
                 r"--trust_saved_model \(trust_saved_model=True\)\.$"),
]


def test_matrix_has_distinct_rows():
    names = [case[0] for case in CASES]
    assert len(set(names)) == len(names) >= 15


@pytest.mark.parametrize(
    "setup, error, pattern",
    [case[1:] for case in CASES],
    ids=[re.sub(r"[^\w.=-]+", "_", case[0]) for case in CASES],
)
def test_bad_input_gives_its_message(tmp_path, setup, error, pattern):
    run = setup(tmp_path)
    pattern = pattern.replace("{tmp}", re.escape(str(tmp_path)))
    with warnings.catch_warnings():
        # Warnings (empty identity folders, no .idx) come before the error.
        warnings.simplefilter("ignore")
        with pytest.raises(error) as caught:
            run()
    text = (
        str(caught.value.code) if error is SystemExit
        else caught.value.message if error is InvalidArgument
        else str(caught.value)
    )
    assert re.search(pattern, text, flags=re.DOTALL), text
    if error is not InvalidArgument:
        # TensorFlow adds its own op context; every other message is one line.
        assert "\n" not in text, text


@pytest.mark.parametrize(
    "setup, pattern",
    [(case[1], case[3]) for case in CASES if case[2] is ConfigError],
    ids=[re.sub(r"[^\w.=-]+", "_", case[0]) for case in CASES
         if case[2] is ConfigError],
)
def test_config_error_names_the_flag(tmp_path, setup, pattern):
    # train.py prints `--<error.setting>=<value>: ...`: the setting is the
    # flag of that name.
    with pytest.raises(ConfigError) as caught:
        setup(tmp_path)()
    assert caught.value.setting == re.match(r"\^(\w+)=", pattern).group(1)
    assert caught.value.setting in config.FIELDS


def test_evaluate_resizes_images_of_mixed_sizes(tmp_path):
    """A model of any input size gets one batch of one size: the first
    image's; the others are resized to it instead of stopping."""
    lfw = make_lfw(tmp_path / "lfw", [2, 2])  # 6×5 images
    (lfw / "Person_0" / "Person_0_0002.png").write_bytes(
        encode(np.full((40, 30, 3), 2, np.uint8), "PNG"))
    (tmp_path / "pairs.txt").write_text(PAIRS_2_FOLDS)
    evaluate_main(lfw_dir="{tmp}lfw", pairs="{tmp}pairs.txt")(tmp_path)()
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    (model,) = results["models"]
    pairs = model["verification"]["pairs"]
    assert (pairs["num_genuine"], pairs["num_impostor"]) == (2, 2)
    assert pairs["num_images"] == 4


def test_evaluate_trust_saved_model_loads_a_refused_model(tmp_path):
    witness = tmp_path / "written_by_the_model"
    saved_models.save_crafted(tmp_path / "model", "write_file", witness)
    make_lfw(tmp_path / "lfw", [2, 2])
    (tmp_path / "pairs.txt").write_text(PAIRS_2_FOLDS)
    evaluate_main(model="{tmp}model", lfw_dir="{tmp}lfw",
                  pairs="{tmp}pairs.txt", trust_saved_model=True)(tmp_path)()
    assert witness.read_text() == "written by the model"
    assert (tmp_path / "out" / "results.json").is_file()
