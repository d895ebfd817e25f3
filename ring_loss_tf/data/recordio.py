"""MXNet RecordIO (`.rec` + `.idx`) read without MXNet.

insightface distributes MS1M, Glint360K and CASIA-WebFace as `train.rec`
with `train.idx`; this module reads them directly, so nobody has to convert.

The framing (dmlc-core `recordio.h`): each record part is

    uint32 magic = 0xced7230a
    uint32 lrecord: cflag = lrecord >> 29, length = lrecord & (2**29 - 1)
    length bytes of data, then zero padding to a multiple of 4 bytes

cflag 0 is a whole record; a record whose data contains the magic number at a
4-byte-aligned position is split there into parts with cflag 1 (first), 2
(middle) and 3 (last), and the reader joins the parts with the magic number
between them. All integers are little-endian.

An image record (MXNet `recordio.pack`) starts with the 24-byte IRHeader

    uint32 flag, float32 label, uint64 id, uint64 id2

and, if flag > 0, `flag` float32 labels follow (the header's label is then
unused); the rest is the encoded image. The `.idx` file is text, one
"key<TAB>byte offset" line per record.

insightface's convention: if record 0 has flag > 0 and no image, its labels
(a, b) say that image records are the ids 1 .. a-1 and identity records the
ids a .. b-1 (one per class, whose labels are the id range of its images);
each image record's own label is its class.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import struct
import threading
import warnings

import numpy as np

MAGIC = 0xCED7230A
_LENGTH_MASK = (1 << 29) - 1
_IR_FORMAT = "<IfQQ"
IR_HEADER_SIZE = struct.calcsize(_IR_FORMAT)  # 24
_MAGIC_BYTES = struct.pack("<I", MAGIC)


@dataclasses.dataclass(frozen=True)
class IRHeader:
    """The image record header; `label` is a float, or an array if flag > 0."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


_NOT_IMAGE_REC_FIX = (
    "The file is truncated or not an insightface image .rec: re-create it "
    "with MXNet's im2rec, or check that the .idx was written with this .rec."
)


def unpack(
    record: bytes, where: str = "image record"
) -> tuple[IRHeader, bytes]:
    """Splits an image record into its IRHeader and the encoded image.

    Args:
        record: the record's bytes, as `RecordIOReader.read` returns them.
        where: names the record in errors, e.g. "train.rec record 5"
            (`RecordIOReader.read_image` passes the file and the key).

    Raises:
        ValueError: the record is shorter than its IRHeader (and the extra
            labels the header announces); the message starts with `where`.
    """
    if len(record) < IR_HEADER_SIZE:
        raise ValueError(
            f"{where}: {len(record)} bytes, shorter than the "
            f"{IR_HEADER_SIZE}-byte IRHeader (flag, label, id, id2). "
            + _NOT_IMAGE_REC_FIX
        )
    flag, label, id1, id2 = struct.unpack_from(_IR_FORMAT, record)
    payload_start = IR_HEADER_SIZE
    if flag > 0:
        payload_start += 4 * flag
        if len(record) < payload_start:
            raise ValueError(
                f"{where}: its IRHeader says {flag} labels follow, but the "
                f"record has only {len(record)} bytes. " + _NOT_IMAGE_REC_FIX
            )
        label = np.frombuffer(
            record, dtype="<f4", count=flag, offset=IR_HEADER_SIZE
        ).astype(np.float32)
    return IRHeader(flag, label, id1, id2), record[payload_start:]


def first_label(header: IRHeader) -> float:
    """The class label of an image record: the label, or the first of them."""
    if header.flag > 0:
        return float(header.label[0])
    return float(header.label)


def class_label(
    header: IRHeader, num_classes: int | None, where: str
) -> int:
    """The class of an image record, checked: an integer in
    0 .. num_classes - 1 (0 .. 2**31 - 1 when the count is unknown).

    Args:
        header: the record's IRHeader.
        num_classes: the class count insightface's header record 0 says,
            or None.
        where: names the record in errors, e.g. "train.rec record 5".

    Raises:
        ValueError: a NaN, infinite, negative, fractional or too large
            label; the message starts with `where`.
    """
    label = first_label(header)
    limit = 2**31 if num_classes is None else num_classes
    if math.isfinite(label) and label.is_integer() and 0 <= label < limit:
        return int(label)
    if num_classes is None:
        expected = "0 .. 2**31 - 1"
    else:
        expected = (
            f"0 .. {num_classes - 1}: the set has {num_classes} classes "
            "(its header record 0 says how many)"
        )
    raise ValueError(
        f"{where}: class label {label} is not an integer in {expected}. "
        "The file is not an insightface image .rec, or it is corrupt: "
        "re-create it with MXNet's im2rec."
    )


class RecordIOReader:
    """Random access to the records of a `.rec` file, thread-safe.

    Args:
        rec_path: the `.rec` file.
        idx_path: its `.idx` file; default: the `.rec` path with `.idx`. If
            it does not exist, the `.rec` file is scanned once (a warning
            says so; for large files write the `.idx` with MXNet's tools).

    Reads use `os.pread` on one descriptor, so threads (tf.data's parallel
    map) can read concurrently.

    Raises:
        FileNotFoundError: `rec_path` is not a file.
        ValueError: a malformed `.idx` line, or (scanning without an index)
            a framing error; the message names the file and the line or the
            byte offset. Reads raise ValueError for framing errors and
            KeyError for a key the index does not have.
    """

    def __init__(self, rec_path, idx_path=None):
        self.path = pathlib.Path(rec_path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"RecordIO file not found: {self.path}. Pass the path of a "
                "train.rec (with train.idx beside it) or of its directory."
            )
        idx_path = (
            pathlib.Path(idx_path)
            if idx_path is not None
            else self.path.with_suffix(".idx")
        )
        self.size = self.path.stat().st_size
        self._fd = os.open(self.path, os.O_RDONLY)
        self._lock = threading.Lock()
        if idx_path.is_file():
            self.offsets = _read_idx(idx_path)
        else:
            warnings.warn(
                f"No index file {idx_path}: scanning {self.path} for record "
                "offsets (slow for large files).",
                stacklevel=2,
            )
            offsets = np.asarray(self.scan(), dtype=np.int64)
            self.offsets = RecordIndex(
                np.arange(len(offsets), dtype=np.int64), offsets
            )
        self.keys = self.offsets.keys

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __getstate__(self):
        raise TypeError("RecordIOReader holds an open file; pass its path.")

    def _pread(self, size, offset):
        if offset < 0 or offset + size > self.size:
            data = b""  # beyond the end (or a negative offset from the .idx)
        else:
            data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise ValueError(
                f"{self.path}: truncated RecordIO file: wanted {size} bytes at "
                f"offset {offset}, the file has {self.size} bytes."
            )
        return data

    def read_at(self, offset: int) -> bytes:
        """The record (its parts joined) that starts at byte `offset`."""
        parts = []
        position = offset
        while True:
            magic, lrecord = struct.unpack("<II", self._pread(8, position))
            if magic != MAGIC:
                raise ValueError(
                    f"{self.path}: not a RecordIO record at offset {position}: "
                    f"expected magic 0x{MAGIC:08x}, found 0x{magic:08x}. Is "
                    "the .idx file the one written with this .rec?"
                )
            cflag, length = lrecord >> 29, lrecord & _LENGTH_MASK
            parts.append(self._pread(length, position + 8) if length else b"")
            position += 8 + ((length + 3) & ~3)
            if cflag in (0, 3):
                break
        return _MAGIC_BYTES.join(parts)

    def read(self, key: int) -> bytes:
        """The record with index key `key` (from the `.idx` file)."""
        try:
            offset = self.offsets[key]
        except KeyError:
            raise KeyError(
                f"{self.path}: no record with key {key} in its index "
                f"({len(self.keys)} records)."
            ) from None
        return self.read_at(offset)

    def read_image(self, key: int) -> tuple[IRHeader, bytes]:
        """`unpack` of record `key`; errors name this file and the key."""
        return unpack(self.read(key), self._where(key))

    def _where(self, key):
        return f"{self.path} record {key}"

    def read_header(self, key: int) -> IRHeader:
        """Only the IRHeader (and extra labels) of record `key`."""
        if key not in self.offsets:
            self.read(key)  # raises the KeyError naming the file
        offset = self.offsets[key]
        magic, lrecord = struct.unpack("<II", self._pread(8, offset))
        if magic != MAGIC or lrecord >> 29 not in (0, 1):
            return self.read_image(key)[0]
        length = lrecord & _LENGTH_MASK
        if length < IR_HEADER_SIZE:
            return self.read_image(key)[0]
        head = self._pread(IR_HEADER_SIZE, offset + 8)
        if struct.unpack_from("<I", head)[0] > 0:
            return self.read_image(key)[0]
        return unpack(head, self._where(key))[0]

    def scan(self) -> list[int]:
        """Byte offsets of every record, by reading the framing in order."""
        offsets = []
        position = 0
        in_record = False
        while position < self.size:
            magic, lrecord = struct.unpack("<II", self._pread(8, position))
            if magic != MAGIC:
                raise ValueError(
                    f"{self.path}: not a RecordIO file: expected magic "
                    f"0x{MAGIC:08x} at offset {position}, found 0x{magic:08x}."
                )
            cflag, length = lrecord >> 29, lrecord & _LENGTH_MASK
            if not in_record:
                offsets.append(position)
            in_record = cflag in (1, 2)
            position += 8 + ((length + 3) & ~3)
        return offsets


class RecordIndex:
    """Record keys → byte offsets, as two sorted int64 arrays.

    16 bytes a record (a dict of Python ints takes about 126): the index of
    WebFace42M's 42M records is 0.7 GB, not 5 GB, and the arrays can be
    sliced or shared between the processes of tf.data without copies.
    Looking a key up is a binary search (or an index when the keys are
    0 .. n-1, as im2rec writes them).
    """

    def __init__(self, keys: np.ndarray, offsets: np.ndarray):
        keys = np.asarray(keys, dtype=np.int64)
        offsets = np.asarray(offsets, dtype=np.int64)
        if len(keys) > 1 and np.any(keys[1:] < keys[:-1]):
            # im2rec writes keys in order: sort only the files that are not.
            order = np.argsort(keys, kind="stable")
            keys, offsets = keys[order], offsets[order]
        self.keys = np.ascontiguousarray(keys)
        self.offsets = np.ascontiguousarray(offsets)
        if len(self.keys) > 1 and np.any(np.diff(self.keys) == 0):
            # A repeated key: the last line wins, as a dict would keep it.
            last = np.r_[self.keys[1:] != self.keys[:-1], True]
            self.keys, self.offsets = self.keys[last], self.offsets[last]
        self._dense = bool(
            len(self.keys) == 0
            or (self.keys[0] == 0 and self.keys[-1] == len(self.keys) - 1)
        )

    def __len__(self):
        return len(self.keys)

    def __contains__(self, key):
        return self._position(key) is not None

    def __getitem__(self, key):
        position = self._position(key)
        if position is None:
            raise KeyError(key)
        return int(self.offsets[position])

    def __iter__(self):
        return iter(self.keys.tolist())

    def _position(self, key):
        try:
            key = int(key)
        except (TypeError, ValueError, OverflowError):
            return None
        if self._dense:
            return key if 0 <= key < len(self.keys) else None
        position = int(np.searchsorted(self.keys, key))
        if position < len(self.keys) and self.keys[position] == key:
            return position
        return None

    def count_between(self, low: int, high: int) -> int:
        """How many keys k have low <= k < high."""
        if high <= low:
            return 0
        return int(np.searchsorted(self.keys, high)
                   - np.searchsorted(self.keys, low))

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.offsets.nbytes


def _idx_error(path, number, line):
    return ValueError(
        f"{path} line {number}: expected 'key<TAB>offset' "
        f"(two integers 0 .. 2**63 - 1), found "
        f"{line.strip()[:60]!r}. Rewrite the index, or delete it "
        "to have the .rec scanned."
    )


def _read_idx(path) -> RecordIndex:
    """The `.idx` file as a `RecordIndex`.

    The file is parsed in one NumPy call; only if that finds something other
    than two non-negative integers a line is it read again line by line
    (which names the first bad line).
    """
    raw = pathlib.Path(path).read_bytes()
    lines = raw.count(b"\n") + (0 if raw.endswith(b"\n") or not raw else 1)
    text = raw.decode("ascii", errors="replace")
    with warnings.catch_warnings():
        # NumPy warns (and stops) at text that is not a number.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            numbers = np.fromstring(text, dtype=np.int64, sep=" ")
        except ValueError:
            numbers = np.zeros(1, np.int64)
    blank = sum(1 for line in text.splitlines() if not line.strip())
    fits = (
        len(numbers) == 2 * (lines - blank)
        and not np.any(numbers < 0)
        # NumPy saturates a number beyond int64 at its maximum.
        and not np.any(numbers == np.iinfo(np.int64).max)
        and _all_integers(text)
    )
    if not fits:
        numbers = _parse_idx_lines(path, text)
    pairs = numbers.reshape(-1, 2)
    return RecordIndex(pairs[:, 0].copy(), pairs[:, 1].copy())


def _all_integers(text):
    # np.fromstring reads "1.5" and "1e3" as numbers; an index holds digits,
    # whitespace and nothing else.
    return text.translate(_INDEX_CHARACTERS) == ""


_INDEX_CHARACTERS = str.maketrans("", "", "0123456789 \t\r\n")


def _parse_idx_lines(path, text):
    """`text` line by line: the numbers, or the ValueError naming the first
    malformed line."""
    numbers = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            key, offset = int(fields[0]), int(fields[1])
            # Both must fit an int64 (keys and offsets are int64 arrays).
            if len(fields) != 2 or not (
                0 <= key < 2**63 and 0 <= offset < 2**63
            ):
                raise ValueError
        except (ValueError, IndexError):
            raise _idx_error(path, number, line) from None
        numbers += (key, offset)
    return np.asarray(numbers, dtype=np.int64)


def image_records(reader: RecordIOReader) -> tuple[np.ndarray, int | None]:
    """(image record keys, num_classes if the header record says it).

    With insightface's header record 0 (flag > 0, labels (a, b)), images are
    the keys 1 .. a-1 and there are b - a classes; otherwise every record is
    an image and the class count is unknown (None).

    Raises:
        ValueError: record 0 is not an image record or a header record, or
            the image records it announces are not all in the index; the
            message names the file and the record.
    """
    if 0 in reader.offsets:
        header, payload = reader.read_image(0)
        # A header record carries two labels and no image.
        if header.flag >= 2 and not payload and header.label[0] >= 1:
            start, end = (float(v) for v in header.label[:2])
            if not (math.isfinite(start) and math.isfinite(end)):
                raise ValueError(
                    f"{reader.path} record 0: the header record's labels "
                    f"(first image id, end) = ({start}, {end}) are not "
                    f"finite. {_NOT_IMAGE_REC_FIX}"
                )
            start, end = int(start), int(end)
            # Keys 1 .. start-1 must all be in the index (counted, so a
            # corrupt header cannot make us allocate a huge range).
            present = reader.offsets.count_between(1, start)
            if present != start - 1:
                missing = next(
                    k for k in range(1, start) if k not in reader.offsets
                )
                raise ValueError(
                    f"{reader.path}: header record 0 says images are records "
                    f"1..{start - 1}, but record {missing} is not in the "
                    f"index ({len(reader.keys)} records). "
                    + _NOT_IMAGE_REC_FIX
                )
            keys = np.arange(1, start, dtype=np.int64)
            return keys, (end - start if end > start else None)
    return reader.keys.copy(), None
