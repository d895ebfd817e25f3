"""Training data sources: one class per format, one list that finds them.

A source is what the pipeline (`pipeline.training_dataset`) needs
of a data set, whatever its format:

    kind            a name for messages: "folder", "recordio", "tfrecord"
    path            the folder, the `.rec` file, or the first shard
    num_classes     labels are 0 .. num_classes - 1
    num_examples    global indices are 0 .. num_examples - 1
    class_names     a name per label
    num_skipped     examples left out as corrupt (skip_corrupt)
    expect          the image format most examples have ("png", "jpeg")
    read(i)         (encoded image bytes, label, name) of global index i
    loader()        `read` as tf.data ops: index -> ((bytes, name), label)
    preloadable     whether `preload` can decode the whole set into memory
                    (the pipeline does so when it fits IN_MEMORY_LIMIT_BYTES)
    preload(...)    that uint8 array (folders: Pillow and tf ops, the
                    streaming path's pixels); record sets stream instead
    external_state  whether `loader` keeps state outside the graph (an open
                    file), which tf.data must be told to ignore

Each worker calls `read` only for the indices of its own rows, so a source
must read one example by its global index without reading the others.

`FORMATS` is the one list of (detect, open) pairs: the trainer and
`open_source` use it, and the configuration check uses its detect half
(`ring_loss_tf.layouts`, which needs no TensorFlow and no data module).

    folder      root/train/<identity>/*.jpg
    recordio    root/train.rec + train.idx (insightface), or train/train.rec
    tfrecord    root/train-*.tfrecord or root/train/*.tfrecord shards of
                tf.train.Example (`image/encoded`, `image/class/label`)

TFRecord framing: uint64 length, uint32 masked CRC32C of the length, the
data, uint32 masked CRC32C of the data (little-endian). A shard is scanned
once into an index of record offsets and labels, written beside it as
`<shard>.idx` (or under the cache directory when the shard's directory is
read-only); reads then go straight to the offset.

This module imports TensorFlow only where it reads records.
"""

from __future__ import annotations

import dataclasses
import concurrent.futures
import hashlib
import io
import os
import pathlib
import struct
import tempfile
import threading
import warnings
from typing import Callable, Sequence

import numpy as np

from ring_loss_tf import layouts
from ring_loss_tf.data import recordio

# Starts the ValueError a record read raises inside tf.data, so that the
# training loop finds our one-line message in TensorFlow's error text.
RECORD_ERROR = "Unreadable training record: "

IMAGE_KEY = "image/encoded"
LABEL_KEY = "image/class/label"
INDEX_SUFFIX = ".idx"
_INDEX_HEADER = "# ring_loss_tf TFRecord index 1"


class DataWarning(UserWarning):
    """Something in the data was skipped; training goes on without it."""


@dataclasses.dataclass(frozen=True)
class Options:
    """How a source is opened (from `TrainConfig.data`).

    Attributes:
        skip_corrupt: decode every example once now and leave out those
            that fail (one warning), instead of stopping when read.
        image_key, label_key: the tf.train.Example features of a TFRecord
            set holding the encoded image (bytes) and the class (int64).
        index_dir: where a TFRecord index goes when the shard's directory
            is read-only (default: the user cache directory).
    """

    skip_corrupt: bool = False
    image_key: str = IMAGE_KEY
    label_key: str = LABEL_KEY
    index_dir: str | None = None


class Source:
    """The protocol (see the module docstring); subclasses set the fields."""

    kind = "source"
    external_state = True
    preloadable = False
    expect: str | None = "jpeg"

    def __init__(self, path, num_classes, num_examples, class_names,
                 num_skipped=0):
        self.path = pathlib.Path(path)
        self.num_classes = int(num_classes)
        self.num_examples = int(num_examples)
        self.class_names = list(class_names)
        self.num_skipped = int(num_skipped)

    def read(self, index: int) -> tuple[bytes, int, str]:
        raise NotImplementedError

    def preload(self, image_size, channels, max_pixels):
        """A uint8 (n, h, w, c) array of every image, or None: streams."""
        return None

    def loader(self):
        """index (int64 tensor) -> ((encoded bytes, name), int32 label),
        reading through `read` (in Python, one record by its offset)."""
        import tensorflow as tf

        def read(index):
            try:
                payload, label, _ = self.read(int(index))
                return np.int64(label), payload, self.name(int(index))
            except (ValueError, KeyError, OSError) as error:
                text = str(error).strip("'\"")
                raise ValueError(RECORD_ERROR + text) from None

        def load(index):
            label, payload, name = tf.py_function(
                read, [index], [tf.int64, tf.string, tf.string]
            )
            label = tf.ensure_shape(label, [])
            payload = tf.ensure_shape(payload, [])
            name = tf.ensure_shape(name, [])
            return (payload, name), tf.cast(label, tf.int32)

        return load

    def name(self, index: int) -> str:
        """How errors name example `index` (a file, or a file's record)."""
        raise NotImplementedError


# --------------------------------------------------------------------------
# Folders


class FolderSource(Source):
    """A folder per identity: `root/<identity>/*.jpg`.

    Attributes (beyond the protocol): `paths` and `labels`, the files and
    their labels in index order.
    """

    kind = "folder"
    external_state = False
    preloadable = True

    def __init__(self, path, paths, labels, class_names, num_skipped=0):
        super().__init__(path, len(class_names), len(paths), class_names,
                         num_skipped)
        self.paths = np.asarray(paths, dtype=object)
        self.labels = np.asarray(labels, np.int32)
        import collections

        suffixes = collections.Counter(
            os.path.splitext(str(p))[1].lower() for p in self.paths[:1000]
        )
        suffix = suffixes.most_common(1)[0][0]
        self.expect = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}.get(
            suffix
        )

    def read(self, index):
        path = str(self.paths[index])
        with open(path, "rb") as file:
            return file.read(), int(self.labels[index]), path

    def name(self, index):
        return str(self.paths[index])

    def preload(self, image_size, channels, max_pixels):
        from ring_loss_tf.data import images

        return images.load_images(self.paths, image_size=image_size,
                                  channels=channels, max_pixels=max_pixels)

    def loader(self):
        import tensorflow as tf

        paths = tf.constant([str(p) for p in self.paths])
        labels = tf.constant(self.labels, tf.int32)

        def load(index):
            path = tf.gather(paths, index)
            return (tf.io.read_file(path), path), tf.gather(labels, index)

        return load


def open_folder(path: pathlib.Path, options: Options) -> FolderSource:
    paths, labels, class_names = list_image_folder(path)
    skipped = 0
    if options.skip_corrupt:
        bad = find_corrupt_images(paths)
        if bad:
            skipped = len(bad)
            bad_set = {p for p, _ in bad}
            keep = np.array([p not in bad_set for p in paths])
            paths = [p for p, k in zip(paths, keep) if k]
            labels = labels[keep]
            warnings.warn(
                f"Skipped {skipped} corrupt or truncated image(s) in {path} "
                f"(first: {bad[0][0]}: {bad[0][1]}).",
                DataWarning,
                stacklevel=3,
            )
            if not paths:
                raise ValueError(
                    f"Every image in {path} is corrupt: all {skipped} files "
                    f"failed to decode (first: {bad[0][0]}: {bad[0][1]}). "
                    "Check that the files are images (jpg/png/...) and copy "
                    "the data set again, or point to another directory."
                )
    return FolderSource(path, paths, labels, class_names, skipped)


# --------------------------------------------------------------------------
# MXNet RecordIO


class RecordIOSource(Source):
    """insightface's `train.rec` + `train.idx` (`ring_loss_tf.data.recordio`).

    Attributes (beyond the protocol): `reader`, and `keys`, the record key
    of each index.
    """

    kind = "recordio"
    expect = "jpeg"

    def __init__(self, path, reader, keys, num_classes, num_skipped=0):
        super().__init__(path, num_classes, len(keys),
                         [str(k) for k in range(num_classes)], num_skipped)
        self.reader = reader
        self.keys = keys

    def read(self, index):
        key = int(self.keys[index])
        where = f"{self.path} record {key}"
        try:
            header, payload = self.reader.read_image(key)
            label = recordio.class_label(header, self.num_classes, where)
        except (ValueError, KeyError) as error:
            text = str(error).strip("'\"")
            if not text.startswith(f"{self.path} record "):
                text = f"{where}: " + text.removeprefix(f"{self.path}: ")
            raise ValueError(text) from None
        return payload, label, where

    def name(self, index):
        return f"record {int(self.keys[index])} of {self.path}"


def open_recordio(rec: pathlib.Path, options: Options) -> RecordIOSource:
    reader = recordio.RecordIOReader(rec)
    keys, num_classes = recordio.image_records(reader)
    if len(keys) == 0:
        raise ValueError(
            f"No image records in {rec}: its index lists no records. "
            "Re-create the .rec and .idx with MXNet's im2rec."
        )
    skipped = 0
    if options.skip_corrupt:
        bad = find_corrupt_records(reader, keys)
        if bad:
            skipped = len(bad)
            keep = ~np.isin(keys, [k for k, _ in bad])
            keys = keys[keep]
            first = f"record {bad[0][0]}: {bad[0][1]}"
            if len(keys) == 0:
                raise ValueError(
                    f"Every image record in {rec} is unreadable or corrupt: "
                    f"all {skipped} failed (first: {first}). Copy the .rec "
                    "and .idx again, or re-create them with MXNet's im2rec."
                )
            warnings.warn(
                f"Skipped {skipped} unreadable or corrupt record(s) in {rec} "
                f"(first: {first}).",
                DataWarning,
                stacklevel=4,
            )
    if num_classes is None:
        # No header record: every label is read now, checked, and counted.
        labels = np.asarray([
            recordio.class_label(
                reader.read_header(int(k)), None, f"{rec} record {int(k)}"
            )
            for k in keys
        ], np.int64)
        num_classes = int(labels.max()) + 1
        empty = num_classes - len(np.unique(labels))
        if empty:
            warnings.warn(
                f"{rec}: labels run up to {num_classes - 1}, but {empty} of "
                f"those {num_classes} classes have no image (the head still "
                f"has {num_classes} outputs). Check the labels, or "
                "re-create the .rec with MXNet's im2rec.",
                DataWarning,
                stacklevel=4,
            )
    return RecordIOSource(rec, reader, keys, num_classes, skipped)


# --------------------------------------------------------------------------
# TFRecord


def _crc32c_table():
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC32C (Castagnoli) of `data`, in pure Python:
    used for the 8-byte length fields (TensorFlow's reader checks the data
    CRC when the index is built)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


_TFRECORD_FIX = (
    "Write the shard again (tf.io.TFRecordWriter, or python -m "
    "ring_loss_tf.data.convert), or remove it from the set."
)

# The first bytes of the image formats `ring_loss_tf.data.images` decodes.
_IMAGE_SIGNATURES = (
    b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM",
    b"P2", b"P5",
)


def looks_like_image(payload: bytes) -> bool:
    """Whether `payload` starts like a JPEG, PNG, GIF, BMP or PGM file."""
    return payload.startswith(_IMAGE_SIGNATURES)


def _shard_error(shard, record, problem, fix=_TFRECORD_FIX):
    return ValueError(f"{shard} record {record}: {problem}. {fix}")


def scan_tfrecord(shard: pathlib.Path) -> np.ndarray:
    """Byte offsets of the records of `shard`, its framing checked (the
    lengths, their CRCs, and that the last record ends at the file's end).

    Raises:
        ValueError: naming the shard and the record number.
    """
    size = shard.stat().st_size
    offsets = []
    with open(shard, "rb") as file:
        position = 0
        while position < size:
            record = len(offsets)
            head = file.read(12)
            if len(head) < 12:
                raise _shard_error(
                    shard, record,
                    f"truncated: the shard ends {size - position} bytes into "
                    "the 12-byte record header",
                )
            length, length_crc = struct.unpack("<QI", head)
            if masked_crc32c(head[:8]) != length_crc:
                raise _shard_error(
                    shard, record,
                    "the length's checksum does not match (not a TFRecord "
                    "file, or damaged)",
                )
            end = position + 12 + length + 4
            if end > size:
                raise _shard_error(
                    shard, record,
                    f"truncated: the record needs {end} bytes, the shard has "
                    f"{size}",
                )
            offsets.append(position)
            position = end
            file.seek(position)
    return np.asarray(offsets, np.int64)


class TFRecordSource(Source):
    """Shards of tf.train.Example, read by global index through an index.

    Attributes (beyond the protocol): `shards` (paths), `offsets` (per
    shard, int64 byte offsets of its records), `rows` (the (shard, record)
    pair of each global index) and `labels`.
    """

    kind = "tfrecord"

    def __init__(self, shards, offsets, labels, num_classes, options,
                 keep=None, num_skipped=0):
        self.shards = [pathlib.Path(s) for s in shards]
        self.offsets = offsets
        shard_of = np.concatenate([
            np.full(len(o), i, np.int64) for i, o in enumerate(offsets)
        ])
        record_of = np.concatenate([
            np.arange(len(o), dtype=np.int64) for o in offsets
        ])
        labels = np.asarray(labels, np.int64)
        if keep is not None:
            shard_of, record_of, labels = (
                shard_of[keep], record_of[keep], labels[keep]
            )
        self.rows = np.stack([shard_of, record_of], axis=1)
        self.labels = labels
        self.image_key = options.image_key
        self.label_key = options.label_key
        super().__init__(self.shards[0], num_classes, len(labels),
                         [str(k) for k in range(num_classes)], num_skipped)
        self._files = {}
        self._lock = threading.Lock()
        self.expect = None

    def __getstate__(self):
        raise TypeError("TFRecordSource holds open files; pass its path.")

    def _fd(self, shard):
        with self._lock:
            fd = self._files.get(shard)
            if fd is None:
                fd = self._files[shard] = os.open(self.shards[shard],
                                                  os.O_RDONLY)
            return fd

    def close(self):
        with self._lock:
            for fd in self._files.values():
                os.close(fd)
            self._files.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def name(self, index):
        shard, record = self.rows[index]
        return f"record {int(record)} of {self.shards[shard]}"

    def record(self, index: int) -> bytes:
        """The serialized tf.train.Example of global index `index`."""
        shard, record = (int(v) for v in self.rows[index])
        path = self.shards[shard]
        offsets = self.offsets[shard]
        offset = int(offsets[record])
        fd = self._fd(shard)
        head = os.pread(fd, 12, offset)
        if len(head) < 12:
            raise _shard_error(path, record, "truncated since it was indexed")
        length, length_crc = struct.unpack("<QI", head)
        expected = (
            int(offsets[record + 1]) if record + 1 < len(offsets)
            else os.fstat(fd).st_size
        ) - offset - 16
        if masked_crc32c(head[:8]) != length_crc or length != expected:
            raise _shard_error(
                path, record,
                "its length does not match the index (the shard changed "
                f"since it was indexed; delete {_index_path(path)})",
            )
        payload = os.pread(fd, length, offset + 12)
        if len(payload) != length:
            raise _shard_error(path, record, "truncated since it was indexed")
        return payload

    def read(self, index):
        shard, record = (int(v) for v in self.rows[index])
        payload = self.record(index)
        image, label = parse_example(
            payload, self.image_key, self.label_key, self.shards[shard],
            record,
        )
        if not 0 <= label < self.num_classes:
            raise _shard_error(
                self.shards[shard], record,
                f"class label {label} is not in 0 .. {self.num_classes - 1}",
            )
        return image, label, f"{self.shards[shard]} record {record}"


def parse_example(payload, image_key, label_key, shard, record):
    """(image bytes, int label) of a serialized tf.train.Example, or a
    ValueError naming the shard, the record and the missing key."""
    from tensorflow.core.example import example_pb2

    try:
        example = example_pb2.Example.FromString(payload)
    except Exception:  # protobuf's DecodeError
        raise _shard_error(shard, record, "not a tf.train.Example") from None
    features = example.features.feature
    keys = ", ".join(sorted(features)) or "none"
    if image_key not in features or not features[image_key].bytes_list.value:
        raise _shard_error(
            shard, record,
            f"no bytes feature {image_key!r} (its features: {keys})",
            "Name the image feature with --tfrecord_image_key.",
        )
    if label_key not in features or len(
        features[label_key].int64_list.value
    ) != 1:
        raise _shard_error(
            shard, record,
            f"no int64 feature {label_key!r} holding one label (its "
            f"features: {keys})",
            "Name the label feature with --tfrecord_label_key.",
        )
    image = features[image_key].bytes_list.value[0]
    label = int(features[label_key].int64_list.value[0])
    return image, label


def _index_path(shard: pathlib.Path) -> pathlib.Path:
    return shard.with_name(shard.name + INDEX_SUFFIX)


def _cached_index_path(shard, index_dir) -> pathlib.Path:
    if index_dir is None:
        index_dir = layouts.default_cache_dir()
    digest = hashlib.sha1(str(shard.resolve()).encode()).hexdigest()[:16]
    return (pathlib.Path(index_dir).expanduser() / "tfrecord-index"
            / f"{digest}-{shard.name}{INDEX_SUFFIX}")


def _index_header(shard, options):
    return (f"{_INDEX_HEADER} size={shard.stat().st_size} "
            f"image_key={options.image_key} label_key={options.label_key}")


def _load_index(path, header):
    """(offsets, labels) of an index file written for `header`, or None."""
    try:
        with open(path) as file:
            if file.readline().rstrip("\n") != header:
                return None
            numbers = np.loadtxt(file, dtype=np.int64, ndmin=2)
    except (OSError, ValueError):
        return None
    if numbers.size == 0:
        numbers = numbers.reshape(0, 2)
    if numbers.shape[1] != 2:
        return None
    return numbers[:, 0].copy(), numbers[:, 1].copy()


def _write_atomically(path, text):
    """Writes `path` through a temporary file and a rename, so a reader
    never sees half an index and an existing one is replaced whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=path.name + ".", suffix=".tmp"
    )
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def index_shard(shard: pathlib.Path, options: Options):
    """(offsets, labels) of `shard`: from its index if one matches the
    shard's size and keys, else by scanning it once and writing the index
    beside it (or under `options.index_dir` if that directory is
    read-only).

    The scan checks the framing (`scan_tfrecord`), every record's data CRC
    (TensorFlow's reader), that each record is a tf.train.Example with the
    two keys, a non-negative label and bytes that start like an image.
    """
    header = _index_header(shard, options)
    beside, cached = _index_path(shard), _cached_index_path(
        shard, options.index_dir
    )
    for path in (beside, cached):
        loaded = _load_index(path, header)
        if loaded is not None:
            return loaded
    offsets = scan_tfrecord(shard)
    labels = _read_labels(shard, offsets, options)
    text = header + "\n" + "".join(
        f"{o}\t{label}\n" for o, label in zip(offsets.tolist(),
                                              labels.tolist())
    )
    try:
        _write_atomically(beside, text)
    except OSError:
        _write_atomically(cached, text)
    return offsets, labels


def _read_labels(shard, offsets, options):
    import tensorflow as tf

    labels = np.empty(len(offsets), np.int64)
    record = 0
    try:
        for payload in tf.data.TFRecordDataset(str(shard)).as_numpy_iterator():
            image, label = parse_example(
                payload, options.image_key, options.label_key, shard, record
            )
            if not looks_like_image(image):
                raise _shard_error(
                    shard, record,
                    f"{options.image_key!r} holds {len(image)} bytes that "
                    f"are not an image (they start {image[:8]!r}; expected "
                    "JPEG, PNG, GIF, BMP or PGM)",
                )
            if not 0 <= label < 2**31:
                raise _shard_error(
                    shard, record,
                    f"class label {label} is not in 0 .. 2**31 - 1",
                )
            labels[record] = label
            record += 1
    except tf.errors.DataLossError:
        raise _shard_error(
            shard, record, "its data checksum does not match (damaged)"
        ) from None
    return labels


def open_tfrecord(path: pathlib.Path, options: Options) -> TFRecordSource:
    shards = layouts.tfrecord_shards(path)
    offsets, labels = [], []
    for shard in shards:
        o, label = index_shard(shard, options)
        offsets.append(o)
        labels.append(label)
    labels = np.concatenate(labels)
    if len(labels) == 0:
        raise ValueError(
            f"No records in the TFRecord shards of {path} "
            f"({len(shards)} empty shard(s)). " + _TFRECORD_FIX
        )
    num_classes = int(labels.max()) + 1
    empty = num_classes - len(np.unique(labels))
    if empty:
        warnings.warn(
            f"{path}: labels run up to {num_classes - 1}, but {empty} of "
            f"those {num_classes} classes have no image (the head still has "
            f"{num_classes} outputs). Check the labels of the shards.",
            DataWarning,
            stacklevel=4,
        )
    source = TFRecordSource(shards, offsets, labels, num_classes, options)
    first = source.read(0)[0]
    source.expect = "png" if first.startswith(b"\x89PNG") else "jpeg"
    if options.skip_corrupt:
        bad = find_corrupt_examples(source)
        if bad:
            if len(bad) == source.num_examples:
                raise ValueError(
                    f"Every record of the shards in {path} is unreadable or "
                    f"corrupt: all {len(bad)} failed (first: "
                    f"{bad[0][1]}). " + _TFRECORD_FIX
                )
            keep = np.ones(source.num_examples, bool)
            keep[[i for i, _ in bad]] = False
            warnings.warn(
                f"Skipped {len(bad)} unreadable or corrupt record(s) in "
                f"{path} (first: {bad[0][1]}).",
                DataWarning,
                stacklevel=4,
            )
            source = TFRecordSource(shards, offsets, labels, num_classes,
                                    options, keep=keep, num_skipped=len(bad))
            source.expect = "png" if first.startswith(b"\x89PNG") else "jpeg"
    return source


# --------------------------------------------------------------------------
# The one list


@dataclasses.dataclass(frozen=True)
class Format:
    """A data format: its layout (how to recognise it, without TensorFlow:
    `ring_loss_tf.layouts`) and how to open it.

    Attributes:
        layout: the `layouts.Layout` (name, detect, at_root, description).
        open: (the detected path, Options) -> a Source.
    """

    layout: layouts.Layout
    open: Callable[[pathlib.Path, Options], Source]

    @property
    def name(self):
        return self.layout.name

    @property
    def detect(self):
        return self.layout.detect


OPENERS = {
    "recordio": open_recordio,
    "tfrecord": open_tfrecord,
    "folder": open_folder,
}

# In the order of `layouts.LAYOUTS`: the first that detects a path wins.
FORMATS = tuple(Format(layout, OPENERS[layout.name])
                for layout in layouts.LAYOUTS)


def find(root: str | os.PathLike):
    """(Format, path to open) of the training set under a data root
    (`layouts.find`), or None."""
    found = layouts.find(root)
    if found is None:
        return None
    layout, path = found
    return FORMATS[layouts.LAYOUTS.index(layout)], path


def open_source(path: str | os.PathLike,
                options: Options = Options()) -> Source:
    """Opens the training set at `path` (a folder per identity, a `.rec`
    or a directory holding train.rec, or a directory of TFRecord shards)
    with the first format of `FORMATS` that detects it."""
    path = pathlib.Path(path)
    for entry in FORMATS:
        found = entry.detect(path)
        if found is not None:
            return entry.open(found, options)
    raise ValueError(
        f"Training data must be a directory or a .rec file. Received: {path}"
    )


def open_root(root: str | os.PathLike, options: Options = Options()):
    """The training source of a data root (`find`)."""
    found = find(root)
    if found is None:
        raise FileNotFoundError(
            f"{root} has no training set: expected {layouts.DESCRIPTION}."
        )
    entry, path = found
    return entry.open(path, options)


# --------------------------------------------------------------------------
# Folders of images, and finding corrupt examples


def missing_dir_error(path, what="Data directory"):
    return FileNotFoundError(
        f"{what} not found: {path}. Check the path (a folder per identity, "
        "a train.rec with train.idx, or a directory holding train.rec)."
    )


def _is(entry: os.DirEntry, kind: str) -> bool:
    """`entry.is_dir()` / `is_file()`, a link that cannot be followed (a
    loop) named in one line."""
    try:
        return entry.is_dir() if kind == "dir" else entry.is_file()
    except OSError as error:
        raise ValueError(
            f"{entry.path}: cannot be read ({error.strerror or error}); "
            "remove it or make the link point to an image or folder."
        ) from None


def list_image_folder(
    root: str | os.PathLike,
) -> tuple[list[str], np.ndarray, list[str]]:
    """Lists a folder-per-identity set: (paths, labels int32, class_names).

    Identities are the sub-directories of `root` in sorted order (label k is
    `class_names[k]`); images are their files with an image extension
    (jpg, jpeg, png, bmp, pgm, gif; any case), sorted. Identity folders
    without images are skipped with one warning naming them; no images at
    all is an error.
    """
    from ring_loss_tf.data.images import IMAGE_EXTENSIONS
    from ring_loss_tf.data.images import is_image_file

    root = pathlib.Path(root)
    if not root.is_dir():
        raise missing_dir_error(root)
    paths, labels, class_names, empty = [], [], [], []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith(".") or not _is(entry, "dir"):
            continue
        files = sorted(
            f.name for f in os.scandir(entry.path)
            if is_image_file(f.name) and _is(f, "file")
        )
        if not files:
            empty.append(entry.name)
            continue
        label = len(class_names)
        class_names.append(entry.name)
        paths.extend(os.path.join(entry.path, name) for name in files)
        labels.extend([label] * len(files))
    if empty:
        shown = ", ".join(empty[:10]) + (" ..." if len(empty) > 10 else "")
        warnings.warn(
            f"Skipped {len(empty)} identity folder(s) with no images in "
            f"{root}: {shown}",
            DataWarning,
            stacklevel=2,
        )
    if not paths:
        raise ValueError(
            f"No images found in {root}: expected one sub-directory per "
            f"identity holding {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} "
            "files (root/<identity>/<image>)."
        )
    return paths, np.asarray(labels, np.int32), class_names


def find_corrupt_images(paths: Sequence[str]) -> list[tuple[str, str]]:
    """(path, reason) of each image Pillow cannot fully decode.

    Decodes every file (threads, one per core), so it costs about as much as
    one epoch of reading. Used by `skip_corrupt=True`.
    """
    from PIL import Image

    from ring_loss_tf.data.images import image_bytes_ok

    def check(path):
        try:
            with Image.open(path) as image:
                image.load()
            with open(path, "rb") as file:
                ok = bool(image_bytes_ok(file.read()).numpy())
            return None if ok else (path, "truncated")
        except Exception as error:  # Pillow raises many types
            return (path, f"{type(error).__name__}: {error}")

    workers = min(32, (os.cpu_count() or 1) * 2)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return [r for r in pool.map(check, paths, chunksize=64) if r]


def find_corrupt_records(
    reader: recordio.RecordIOReader, keys: np.ndarray
) -> list[tuple[int, str]]:
    """(key, reason) of each image record that cannot be read or decoded.

    Reads every record (threads, one per core) and decodes its image with
    Pillow, as `find_corrupt_images` does for files; used by
    `skip_corrupt=True` on RecordIO sets. A bad class label is not skipped
    here: the pipeline stops on it, naming the record.
    """
    from PIL import Image

    from ring_loss_tf.data.images import image_bytes_ok

    def check(key):
        key = int(key)
        try:
            _, payload = reader.read_image(key)
            with Image.open(io.BytesIO(payload)) as image:
                image.load()
            ok = bool(image_bytes_ok(payload).numpy())
            return None if ok else (key, "truncated image")
        except Exception as error:  # framing errors, Pillow's many types
            return (key, f"{type(error).__name__}: {error}")

    workers = min(32, (os.cpu_count() or 1) * 2)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return [r for r in pool.map(check, keys, chunksize=64) if r]


def find_corrupt_examples(source: Source) -> list[tuple[int, str]]:
    """(index, "<name>: reason") of each example of `source` that cannot be
    read or decoded (threads, one per core); `find_corrupt_records` for any
    source."""
    from PIL import Image

    from ring_loss_tf.data.images import image_bytes_ok

    def check(index):
        try:
            payload, _, name = source.read(index)
        except Exception as error:  # framing, keys, labels
            return (index, str(error))
        try:
            with Image.open(io.BytesIO(payload)) as image:
                image.load()
            if bool(image_bytes_ok(payload).numpy()):
                return None
            return (index, f"{name}: truncated image")
        except Exception as error:  # Pillow's many types
            return (index, f"{name}: {type(error).__name__}: {error}")

    workers = min(32, (os.cpu_count() or 1) * 2)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        found = pool.map(check, range(source.num_examples), chunksize=64)
        return [r for r in found if r]
