"""Tests of the RecordIO reader (ring_loss_tf/recordio.py), on files from
the writers of tests/data_files.py (framing as MXNet's dmlc-core writes
it)."""

import struct

import numpy as np
import pytest

from ring_loss_tf import recordio
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
