"""Fuzzing the readers: bad files raise only their documented errors.

Each reader gets random input and mutations of a valid file (bytes flipped,
set, inserted, deleted, 4-byte words overwritten, the file cut short; lines
of text dropped, repeated or rewritten):

    pairs.txt      eval_sets.parse_pairs_file, eval_sets.read_lfw_pairs
    .bin           eval_sets.read_bin (its restricted unpickler), also
                   pickles of arbitrary plain data and pickles that call
                   functions
    RecordIO       recordio.unpack, RecordIOReader (.rec and .idx),
                   recordio.image_records, pipeline.open_training_source
    KanjiVG SVG    kanji.parse_path, kanji.load_strokes

The property: the call returns, or raises one of the exceptions its
docstring lists under "Raises:", with a one-line message that names the file
(TensorFlow's decode errors carry TensorFlow's op context on further lines).
Anything else (IndexError, struct.error, UnicodeDecodeError, KeyError,
numpy errors, a hang of more than `HANG_SECONDS`) fails the test. Bugs found
this way have plain regression tests in tests/test_bad_inputs.py and
tests/data/test_kanji.py.

Profiles, chosen by the environment variable RING_LOSS_TF_FUZZ:

    (unset) or "ci"  derandomized: the same examples every run, < 60 s in all
    "long"           6x the examples, fresh ones each run, failures kept in
                     Hypothesis' example database; about 5 minutes:

    RING_LOSS_TF_FUZZ=long python -m pytest -q -s tests/data/test_fuzz.py

(-s shows, per test, how many examples ended in each outcome.)

Each mutation test also checks that its examples reached deep code: some
mutated files still read successfully and the failures are of several kinds
(a mutation strategy that only ever fails at the first byte tests nothing).
"""

import collections
import contextlib
import os
import pathlib
import pickle
import re
import signal
import struct
import tempfile
import warnings

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from ring_loss_tf.data import pipeline
from ring_loss_tf.data import eval_sets
from ring_loss_tf.data import kanji
from ring_loss_tf.data import recordio
from tests.data_files import constant_png
from tests.data_files import make_lfw
from tests.data_files import write_rec

_COMMON = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "ring_loss_tf_ci", derandomize=True, database=None, max_examples=100,
    **_COMMON,
)
settings.register_profile(
    "ring_loss_tf_long", derandomize=False, max_examples=600, **_COMMON
)
PROFILE_NAME = os.environ.get("RING_LOSS_TF_FUZZ", "ci")
if PROFILE_NAME not in ("ci", "long"):
    raise ValueError(
        f"RING_LOSS_TF_FUZZ must be 'ci' or 'long'. Received: {PROFILE_NAME!r}"
    )
PROFILE = settings.get_profile(f"ring_loss_tf_{PROFILE_NAME}")
HANG_SECONDS = 20


def fuzz(fraction):
    """The profile with `fraction` of its examples (tests differ in cost)."""
    return settings(
        PROFILE, max_examples=max(5, int(PROFILE.max_examples * fraction))
    )


class Hang(BaseException):
    """A reader ran for more than HANG_SECONDS (BaseException: a reader's
    `except Exception` must not turn it into a documented error)."""


@contextlib.contextmanager
def no_hang(seconds=HANG_SECONDS):
    def interrupt(signum, frame):
        raise Hang(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def outcome(call, errors, names):
    """Runs call(): "ok", or a short kind of the documented error it raised.

    Any other exception propagates (the fuzz test fails with it). A
    documented error must name one of `names` (the file) on its first line,
    and be one line unless TensorFlow raised it.
    """
    try:
        with no_hang(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "No index file": fine
            call()
    except errors as error:
        if isinstance(error, tf.errors.OpError):
            text = error.message
        elif isinstance(error, KeyError):
            text = str(error.args[0])
        else:
            text = str(error)
            assert "\n" not in text, f"a multi-line message: {text!r}"
        assert any(str(n) in text for n in names), (
            f"{type(error).__name__} does not name the file: {text!r}"
        )
        for n in names:
            text = text.replace(str(n), "FILE")
        kind = re.sub(r"\d+|'[^']*'|\([^)]*\)", "N", text)[:45]
        return f"{type(error).__name__}: {kind}"
    return "ok"


@st.composite
def mutated(draw, original, max_operations=4, words=()):
    """`original` bytes with 1..max_operations random edits."""
    edited = bytearray(original)
    for _ in range(draw(st.integers(1, max_operations))):
        operation = draw(st.sampled_from(
            ["flip", "set", "cut", "insert", "delete", "word"]
        ))
        position = draw(st.integers(0, max(len(edited) - 1, 0)))
        if operation == "flip" and edited:
            edited[position] ^= 1 << draw(st.integers(0, 7))
        elif operation == "set" and edited:
            edited[position] = draw(st.integers(0, 255))
        elif operation == "cut":
            del edited[position:]
        elif operation == "insert":
            edited[position:position] = draw(st.binary(min_size=1,
                                                        max_size=8))
        elif operation == "delete":
            del edited[position:position + draw(st.integers(1, 8))]
        elif operation == "word":
            position -= position % 4
            value = draw(st.sampled_from(words or (0,))
                         | st.integers(0, 2**32 - 1))
            edited[position:position + 4] = struct.pack("<I", value)
    return bytes(edited)


def assert_deep(outcomes, min_kinds, deep=("ok",)):
    """Some examples got as far as `deep` (by default: they read fine), and
    the others failed in at least `min_kinds` ways."""
    shown = "\n".join(f"{n:5d}  {k}" for k, n in outcomes.most_common())
    if PROFILE_NAME != "ci":
        print(f"outcomes:\n{shown}")
    assert any(outcomes[k] for k in outcomes if k.startswith(deep)), shown
    failures = [k for k in outcomes if k != "ok"]
    assert len(failures) >= min_kinds, shown


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="fuzz-") as directory:
        yield pathlib.Path(directory)


# --------------------------------------------------------------------------
# pairs.txt

VALID_PAIRS = (
    "2\t2\n"
    "Person_0\t1\t2\nPerson_1\t1\t3\n"
    "Person_0\t1\tPerson_1\t2\nPerson_0\t3\tPerson_1\t1\n"
    "Person_1\t2\t3\nPerson_0\t2\t3\n"
    "Person_1\t3\tPerson_0\t2\nPerson_1\t1\tPerson_0\t1\n"
)
FIELDS = st.one_of(
    st.sampled_from(["Person_0", "Person_1", "Nobody", "..", ".", "a/b",
                     "/etc", "x" * 300, "Person_0\x00", "\ufeff", "1_0"]),
    st.integers(-5, 5).map(str),
    st.integers().map(str),
    st.text(max_size=6),
)


@st.composite
def pairs_texts(draw):
    """A pairs.txt: random text, or the valid one with lines edited."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.text(max_size=200))
    lines = VALID_PAIRS.splitlines()
    for _ in range(draw(st.integers(1, 3))):
        index = draw(st.integers(0, len(lines) - 1))
        edit = draw(st.sampled_from(["drop", "repeat", "field", "fields",
                                     "join", "blank"]))
        if edit == "drop":
            del lines[index]
        elif edit == "repeat":
            lines.insert(index, lines[index])
        elif edit == "field":
            fields = lines[index].split("\t")
            fields[draw(st.integers(0, len(fields) - 1))] = draw(FIELDS)
            lines[index] = "\t".join(fields)
        elif edit == "fields":
            lines[index] = draw(st.sampled_from(["\t", " ", "  "])).join(
                draw(st.lists(FIELDS, max_size=6))
            )
        elif edit == "join":
            lines[index] += draw(st.sampled_from(["\r", "\x0b", "\x85", " "]))
        else:
            lines.insert(index, draw(st.sampled_from(["", " ", "\t"])))
        if not lines:
            break
    return "\n".join(lines) + draw(st.sampled_from(["", "\n", "\r\n"]))


def test_parse_pairs_file_fuzz(workdir):
    outcomes = collections.Counter()
    path = workdir / "pairs.txt"

    @fuzz(1.0)
    @given(st.one_of(pairs_texts().map(str.encode),
                     st.binary(max_size=100)))
    def check(contents):
        path.write_bytes(contents)
        result = []
        outcomes[outcome(
            lambda: result.append(eval_sets.parse_pairs_file(path)),
            ValueError, [path])] += 1
        if result:
            # Independent check of a successful parse against the header.
            lines = [l.split() for l in contents.decode(
                "utf-8", "replace").splitlines() if l.strip()]
            numbers = [int(v) for v in lines[0]]
            folds, per_fold = numbers if len(numbers) == 2 else (1, numbers[0])
            pairs = result[0]
            assert len(pairs) == folds * 2 * per_fold == len(lines) - 1
            assert [p[4] for p in pairs] == [
                i // (2 * per_fold) for i in range(len(pairs))
            ]

    check()
    assert_deep(outcomes, 4)


def test_read_lfw_pairs_fuzz(workdir):
    lfw = make_lfw(workdir / "lfw", [3, 3])
    path = workdir / "lfw_pairs.txt"
    outcomes = collections.Counter()

    @fuzz(0.5)
    @given(pairs_texts())
    def check(text):
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        outcomes[outcome(
            lambda: eval_sets.read_lfw_pairs(path, lfw, image_size=(6, 5),
                                             channels=3),
            (ValueError, FileNotFoundError, tf.errors.InvalidArgumentError),
            [path, lfw],
        )] += 1

    check()
    assert_deep(outcomes, 3)


# --------------------------------------------------------------------------
# insightface .bin


def _valid_bin(protocol):
    bins = [constant_png(v, (4, 4)) for v in (10, 20, 30, 40)]
    if protocol >= 4:
        bins[1] = np.frombuffer(bins[1], np.uint8)
    return pickle.dumps((bins, [True, False]), protocol=protocol)


class _Calls:
    """Pickles as a call of `function(*args)`: what a malicious file does."""

    def __init__(self, function, args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def _witness_calls(witness):
    """Functions a malicious .bin might call, each creating `witness`."""
    return st.sampled_from([
        _Calls(os.mkdir, (witness,)),
        _Calls(eval, (f"__import__('os').mkdir({witness!r})",)),
        _Calls(exec, (f"import os; os.mkdir({witness!r})",)),
        _Calls(os.system, (f"mkdir {witness}",)),
        _Calls(np.save, (witness, np.zeros(1))),
        _Calls(pathlib.Path, (witness,)),
        _Calls(np.ndarray, ((2,), object)),
        _Calls(np.dtype, ("O",)),
        _Calls(open, (witness, "w")),
        _Calls(bytes.fromhex, ("00",)),
    ])


PLAIN = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats()
    | st.binary(max_size=20) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=10,
)


def test_read_bin_fuzz(workdir):
    path = workdir / "fuzz.bin"
    witness = str(workdir / "created_by_the_pickle")
    outcomes = collections.Counter()
    valid = {p: _valid_bin(p) for p in (2, 4)}
    errors = (ValueError, eval_sets.UnsafePickleError,
              tf.errors.InvalidArgumentError)

    malicious = st.builds(
        lambda call, protocol, where: pickle.dumps(
            [(call, [True]), ([b"x", call], [call]), call][where],
            protocol=protocol,
        ),
        _witness_calls(witness), st.sampled_from([2, 4]), st.integers(0, 2),
    )
    structures = st.builds(
        lambda images, issame, protocol: pickle.dumps(
            (images, issame), protocol=protocol),
        PLAIN, PLAIN, st.sampled_from([0, 2, 4]),
    )

    @fuzz(1.0)
    @given(st.one_of(
        st.binary(max_size=200),
        mutated(valid[2], words=(0, 2**31, 2**32 - 1)),
        mutated(valid[4], words=(0, 2**31, 2**32 - 1)),
        malicious,
        structures,
    ))
    def check(contents):
        path.write_bytes(contents)
        outcomes[outcome(lambda: eval_sets.read_bin(path, image_size=(4, 4),
                                                    channels=1),
                         errors, [path])] += 1
        assert not os.path.exists(witness), "the pickle ran code"

    check()
    # Past the unpickler, into the checks of (images, issame).
    assert_deep(outcomes, 5, deep=("ok", "InvalidArgumentError",
                                   "ValueError: FILE: image",
                                   "ValueError: FILE: expected"))


def test_read_bin_corrupt_image_fuzz(workdir):
    # A well-formed .bin whose image i is a mutated PNG: reaches decoding
    # (a tf.data pipeline per example: few examples).
    path = workdir / "images.bin"
    png = constant_png(10, (4, 4))
    outcomes = collections.Counter()

    @fuzz(0.1)
    @given(st.integers(0, 3), mutated(png, max_operations=2),
           st.sampled_from([2, 4]))
    def check(i, image, protocol):
        bins = [png] * i + [image] + [png] * (3 - i)
        path.write_bytes(pickle.dumps((bins, [True, False]), protocol))
        kind = outcome(
            lambda: eval_sets.read_bin(path, image_size=(4, 4), channels=1),
            (ValueError, tf.errors.InvalidArgumentError),
            [f"{path} image {i}"],
        )
        outcomes[kind] += 1

    check()
    assert_deep(outcomes, 1, deep=("InvalidArgumentError",))


# --------------------------------------------------------------------------
# RecordIO

FRAMING_WORDS = (
    recordio.MAGIC, 0, 1, 3, 24, 2**29 - 1,
    1 << 29, 2 << 29, 3 << 29, (1 << 29) | 4, (2 << 29) | 4, (3 << 29) | 28,
    (7 << 29) | 8, 2**32 - 1,
)


def _read_everything(rec, idx=None):
    """Every public read of a .rec, as training does them."""
    reader = recordio.RecordIOReader(rec, idx)
    try:
        keys, _ = recordio.image_records(reader)
        for key in reader.keys:
            reader.read(key)
        for key in keys.tolist():
            reader.read_header(key)
            header, _ = reader.read_image(key)
            recordio.first_label(header)
        reader.scan()
    finally:
        reader.close()
    pipeline.open_training_source(rec)


def test_unpack_fuzz():
    @fuzz(1.0)
    @given(st.binary(max_size=64) | st.builds(
        lambda flag, rest: struct.pack("<I", flag) + rest,
        st.integers(0, 2**32 - 1), st.binary(max_size=40)))
    def check(record):
        where = "x.rec record 7"
        result = outcome(lambda: recordio.unpack(record, where), ValueError,
                         [where])
        if result == "ok":
            header, payload = recordio.unpack(record, where)
            extra = 4 * header.flag if header.flag > 0 else 0
            assert payload == record[recordio.IR_HEADER_SIZE + extra:]

    check()


@pytest.mark.parametrize("layout", ["insightface", "plain", "vector"])
def test_recordio_rec_fuzz(workdir, layout):
    directory, _ = write_rec(
        workdir / f"rec-{layout}", [2, 1, 2], header=layout == "insightface",
        vector_label=layout == "vector",
    )
    valid = (directory / "train.rec").read_bytes()
    index = (directory / "train.idx").read_text()
    rec, idx = workdir / f"fuzz-{layout}.rec", workdir / f"fuzz-{layout}.idx"
    outcomes = collections.Counter()
    errors = (ValueError, KeyError)

    @fuzz(0.7)
    @given(mutated(valid, words=FRAMING_WORDS), st.booleans())
    def check(contents, with_index):
        rec.write_bytes(contents)
        if with_index:
            idx.write_text(index)
        elif idx.exists():
            idx.unlink()
        outcomes[outcome(lambda: _read_everything(rec), errors,
                         [rec])] += 1

    check()
    assert_deep(outcomes, 4)


@st.composite
def idx_texts(draw, valid):
    """A .idx: random text, or the valid one with lines edited."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.text(max_size=80))
    lines = valid.splitlines()
    for _ in range(draw(st.integers(1, 3))):
        index = draw(st.integers(0, len(lines) - 1))
        edit = draw(st.sampled_from(["drop", "repeat", "key", "offset",
                                     "text"]))
        key, _, offset = lines[index].partition("\t")
        number = st.integers(-2**70, 2**70) | st.integers(-8, 300)
        if edit == "drop":
            del lines[index]
        elif edit == "repeat":
            lines.insert(index, lines[index])
        elif edit == "key":
            lines[index] = f"{draw(number)}\t{offset}"
        elif edit == "offset":
            lines[index] = f"{key}\t{draw(number)}"
        else:
            lines[index] = draw(st.text(max_size=12))
        if not lines:
            break
    return "\n".join(lines) + "\n"


def test_recordio_idx_fuzz(workdir):
    directory, _ = write_rec(workdir / "rec-idx", [2, 2])
    rec = directory / "train.rec"
    idx = directory / "train.idx"
    valid = idx.read_text()
    outcomes = collections.Counter()

    @fuzz(0.7)
    @given(idx_texts(valid))
    def check(text):
        idx.write_text(text, encoding="utf-8", errors="surrogatepass")
        outcomes[outcome(lambda: _read_everything(rec), (ValueError,),
                         [rec, idx])] += 1

    check()
    assert_deep(outcomes, 3)


# --------------------------------------------------------------------------
# KanjiVG SVG paths

PATH_ALPHABET = "MmCcSsLlHhVvZzAQ0123456789.,-+eE \t\n"


def test_parse_path_fuzz():
    svg = kanji.character_files()[0x6C38].read_text(encoding="utf-8")
    valid = re.findall(r'\sd="([^"]*)"', svg)
    outcomes = collections.Counter()

    @fuzz(1.5)
    @given(st.one_of(
        st.text(PATH_ALPHABET, max_size=60),
        st.text(max_size=30),
        st.sampled_from(valid).flatmap(
            lambda d: mutated(d.encode(), words=())
        ).map(lambda b: b.decode("utf-8", "replace")),
    ))
    def check(d):
        result = []
        outcomes[outcome(lambda: result.append(kanji.parse_path(d)),
                         ValueError, [f"Received: d={d!r}"])] += 1
        for polyline in result[0] if result else []:
            assert polyline.ndim == 2 and polyline.shape[1] == 2

    check()
    assert_deep(outcomes, 3)


def test_load_strokes_fuzz(workdir):
    valid = kanji.character_files()[0x6C38].read_bytes()
    path = workdir / "06c38.svg"
    outcomes = collections.Counter()

    @fuzz(0.5)
    @given(st.binary(max_size=100) | mutated(valid, max_operations=2))
    def check(contents):
        path.write_bytes(contents)
        outcomes[outcome(lambda: kanji.load_strokes(path), ValueError,
                         [path])] += 1

    check()
    assert_deep(outcomes, 2)


def test_hang_guard_catches_a_loop():
    # The guard the fuzz tests rely on to report a hang as a failure.
    with pytest.raises(Hang):
        with no_hang(0.2):
            while True:
                pass
