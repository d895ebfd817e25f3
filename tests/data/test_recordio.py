"""Tests of the RecordIO reader (ring_loss_tf/recordio.py), on files from
the writers of tests/data_files.py (framing as MXNet's dmlc-core writes
it)."""

import struct

import numpy as np
import pytest

from ring_loss_tf.data import recordio
from tests.data_files import MAGIC
from tests.data_files import pack
from tests.data_files import write_record


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


def _dict_index(text):
    """What the index holds, the plain way: {key: offset}, last line wins."""
    index = {}
    for line in text.splitlines():
        if line.split():
            key, offset = (int(v) for v in line.split())
            index[key] = offset
    return index


@pytest.mark.parametrize("dense", [True, False])
def test_record_index_matches_a_dict(tmp_path, dense):
    rng = np.random.default_rng(3)
    n = 500
    keys = np.arange(n) if dense else rng.choice(10**12, n, replace=False)
    offsets = rng.integers(0, 2**62, n)
    lines = [f"{k}\t{o}" for k, o in zip(keys, offsets)]
    if not dense:
        lines.insert(7, f"{keys[3]}\t12345")  # a repeated key
        lines.insert(20, "")  # a blank line
    text = "\r\n".join(lines)  # CRLF, no newline at the end
    (tmp_path / "x.idx").write_text(text)
    index = recordio._read_idx(tmp_path / "x.idx")
    expected = _dict_index(text)
    assert len(index) == len(expected)
    assert index.keys.tolist() == sorted(expected)
    assert all(index[k] == v for k, v in expected.items())
    assert index.nbytes == 16 * len(expected)
    for missing in (-1, n, 10**13, "a", None, 2**70):
        assert missing not in index
    with pytest.raises(KeyError):
        index[-1]
    for low, high in ((0, 10), (5, 5), (-3, 10**13), (100, 50)):
        assert index.count_between(low, high) == sum(
            1 for k in expected if low <= k < high
        )


@pytest.mark.parametrize(
    "text, bad_line",
    [
        ("0\t4\n1\t9223372036854775808\n", 2),  # offset beyond int64
        ("0\t4\n1.5\t8\n", 2),
        ("0\t4\n1\t8\t9\n", 2),
        ("0\t4\n1\n2\t8\n", 2),
        ("0\t-4\n", 1),
    ],
)
def test_idx_errors_name_the_line(tmp_path, text, bad_line):
    (tmp_path / "x.idx").write_text(text)
    with pytest.raises(ValueError, match=rf"x\.idx line {bad_line}: "
                       r"expected 'key<TAB>offset'"):
        recordio._read_idx(tmp_path / "x.idx")


def test_idx_edge_values_parse(tmp_path):
    top = 2**63 - 1
    (tmp_path / "x.idx").write_text(f"+5\t{top}\n0 0\n")
    index = recordio._read_idx(tmp_path / "x.idx")
    assert index[5] == top and index[0] == 0 and len(index) == 2
