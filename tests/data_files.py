"""Writers of the files the data readers take, for tests (not public API).

Each writer follows the published format, not ring_loss_tf's readers, so a
reader bug cannot hide behind the same bug in the writer: image folders and
PNGs (Pillow), binary PGMs (by hand), LFW trees, RecordIO (dmlc-core
recordio.h and mxnet.recordio), insightface .bin pickles.
tests/data/test_images.py, tests/data/test_pipeline.py,
tests/data/test_eval_sets.py, tests/test_bad_inputs.py and
tests/data/test_fuzz.py build their inputs with them; a test module
imports helpers from here, never from another test module, so that each
Bazel test target (tests/BUILD) carries what it imports.
"""

import io
import os
import pathlib
import pickle
import struct
import zlib

import numpy as np
from PIL import Image


def encode(array, fmt, **kwargs):
    """`array` encoded as an image file of format `fmt` by Pillow."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def constant_png(value, size=(8, 8), mode="L"):
    shape = size if mode == "L" else size + (3,)
    return encode(np.full(shape, value, np.uint8), "PNG")


def png_chunk(kind, payload):
    """One PNG chunk: length, type, payload, CRC-32 of type and payload."""
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload)))


def png_of_size(width, height, idat=None):
    """A 1-bit grey PNG whose IHDR says width x height (PNG spec, by hand).

    `idat`: the compressed data; default black rows, compressed a row at a
    time, so a 12000 x 12000 file (17 KB) is made without holding its
    pixels: a decompression bomb (144 MB of samples once decoded).
    """
    if idat is None:
        compressor = zlib.compressobj(9)
        row = bytes((width + 7) // 8 + 1)  # filter byte 0, then the bits
        idat = b"".join(compressor.compress(row) for _ in range(height))
        idat += compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""))


def png_with_broken_chunk(array):
    """`array` as a PNG whose data is split over two IDAT chunks, the
    second with a type that is no chunk type (b"ID\\0T"): Pillow opens it and
    raises SyntaxError ("broken PNG file") when it loads the pixels."""
    contents = encode(array, "PNG")
    start = contents.index(b"IDAT") - 4
    length = struct.unpack(">I", contents[start:start + 4])[0]
    data = contents[start + 8:start + 8 + length]
    half = len(data) // 2
    broken = png_chunk(b"ID\0T", data[half:])
    return (contents[:start] + png_chunk(b"IDAT", data[:half]) + broken
            + contents[start + 12 + length:])


def pgm(array, maxval=255):
    """Binary PGM written by hand (independent of any decoder)."""
    h, w = array.shape
    header = f"P5\n{w} {h}\n{maxval}\n".encode()
    dtype = ">u2" if maxval > 255 else np.uint8
    return header + array.astype(dtype).tobytes()


def smooth_rgb(h=20, w=24):
    """uint8 (h, w, 3) colour ramps: smooth, so lossy codecs stay close."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack(
        [x * 250 // w, y * 250 // h, 250 - (x + y) * 200 // (w + h)], axis=-1
    ).astype(np.uint8)


def make_folder(root, counts, value=lambda label, k: 10 * label + k + 1):
    """root/<idNN>/<k>.png, each image constant at value(label, k)."""
    root = pathlib.Path(root)
    for label, count in enumerate(counts):
        directory = root / f"id{label:02d}"
        directory.mkdir(parents=True)
        for k in range(count):
            (directory / f"{k}.png").write_bytes(constant_png(value(label, k)))
    return root


# --------------------------------------------------------------------------
# RecordIO, written from the published format (dmlc-core recordio.h,
# mxnet.recordio.pack), independently of the reader.

MAGIC = 0xCED7230A


def write_record(file, payload):
    """dmlc RecordIOWriter::WriteRecord: split at aligned magic numbers."""
    magic = struct.pack("<I", MAGIC)
    start = 0
    for i in range(0, len(payload) - len(payload) % 4, 4):
        if payload[i : i + 4] == magic:
            flag = 1 if start == 0 else 2
            file.write(magic + struct.pack("<I", flag << 29 | (i - start)))
            file.write(payload[start:i])
            start = i + 4
    flag = 3 if start else 0
    rest = payload[start:]
    file.write(magic + struct.pack("<I", flag << 29 | len(rest)))
    file.write(rest + b"\0" * (-len(payload) % 4))


def pack(label, image, id1=0):
    """mxnet.recordio.pack: IRHeader (flag, label, id, id2) + labels + data."""
    if np.ndim(label):
        labels = np.asarray(label, "<f4")
        return struct.pack("<IfQQ", len(labels), 0.0, id1, 0) + (
            labels.tobytes() + image
        )
    return struct.pack("<IfQQ", 0, label, id1, 0) + image


def write_rec(directory, images_per_class, header=True, vector_label=False):
    """insightface layout: record 0 header, images 1..a-1, identities a..b-1.

    Image i of class c is a constant PNG of grey level 20*c + i + 1.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    records, ranges = [], []
    for c, count in enumerate(images_per_class):
        first = len(records) + (1 if header else 0)
        for i in range(count):
            label = [c, 0.5] if vector_label else float(c)
            records.append(pack(label, constant_png(20 * c + i + 1)))
        ranges.append((first, first + count))
    if header:
        a = len(records) + 1
        b = a + len(images_per_class)
        identity = [pack([float(s), float(e)], b"") for s, e in ranges]
        records = [pack([float(a), float(b)], b"")] + records + identity
    write_records(directory, records)
    return directory, records


def write_records(directory, records):
    """directory/train.rec holding `records` (packed payloads) as keys
    0, 1, ..., and its train.idx."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    offsets = []
    with open(directory / "train.rec", "wb") as file:
        for payload in records:
            offsets.append(file.tell())
            write_record(file, payload)
    with open(directory / "train.idx", "w") as file:
        for key, offset in enumerate(offsets):
            file.write(f"{key}\t{offset}\n")
    return directory


def damage_rec(directory, key, how):
    """Damages record `key` of directory/train.rec (offsets from its
    train.idx) as a bad copy or a bad writer would: "truncated": the file
    ends 10 bytes into its data; "length": its length field says 2**29 - 1
    bytes, past the end of the file; "unending": it is the first part
    (cflag 1) of a multi-part record whose later parts (every record after
    it, cflag 2) never end."""
    rec = pathlib.Path(directory) / "train.rec"
    lines = (pathlib.Path(directory) / "train.idx").read_text().split("\n")
    offsets = dict(tuple(int(v) for v in line.split()) for line in lines
                   if line.strip())
    start = offsets[key]
    contents = bytearray(rec.read_bytes())
    if how == "truncated":
        del contents[start + 8 + 10:]
    elif how == "length":
        struct.pack_into("<I", contents, start + 4, (1 << 29) - 1)
    elif how == "unending":
        for offset in sorted(o for o in offsets.values() if o >= start):
            lrecord = struct.unpack_from("<I", contents, offset + 4)[0]
            flag = 1 if offset == start else 2
            struct.pack_into("<I", contents, offset + 4,
                             flag << 29 | lrecord & ((1 << 29) - 1))
    else:
        raise ValueError(f"unknown damage {how!r}")
    rec.write_bytes(bytes(contents))
    return rec


# --------------------------------------------------------------------------
# LFW trees


def make_lfw(root, counts, ext="png"):
    root = pathlib.Path(root)
    for label, count in enumerate(counts):
        name = f"Person_{label}"
        (root / name).mkdir(parents=True)
        for n in range(1, count + 1):
            (root / name / f"{name}_{n:04d}.{ext}").write_bytes(
                encode(np.full((6, 5, 3), (30 * label + n) % 256, np.uint8),
                       "PNG")
            )
    return root


# --------------------------------------------------------------------------
# insightface .bin


def write_bin(path, bins, issame, protocol):
    with open(path, "wb") as file:
        pickle.dump((bins, issame), file, protocol=protocol)


class CallsAFunction:
    """Pickles to a call of os.mkdir(path): a witness that unpickling ran
    code (the directory exists afterwards)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


# --------------------------------------------------------------------------
# TFRecord, written with TensorFlow's own writer (not ring_loss_tf's).


def example_bytes(image, label, image_key="image/encoded",
                  label_key="image/class/label"):
    """A serialized tf.train.Example of one image and its int64 label."""
    import tensorflow as tf

    return tf.train.Example(features=tf.train.Features(feature={
        image_key: tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[image])),
        label_key: tf.train.Feature(
            int64_list=tf.train.Int64List(value=[label])),
    })).SerializeToString()


def write_tfrecords(directory, shards, name="train-{:05d}.tfrecord"):
    """directory/train-NNNNN.tfrecord, one per list of serialized records
    in `shards`, written with tf.io.TFRecordWriter; their paths."""
    import tensorflow as tf

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, records in enumerate(shards):
        path = directory / name.format(number)
        with tf.io.TFRecordWriter(str(path)) as writer:
            for record in records:
                writer.write(record)
        paths.append(path)
    return paths


def folder_examples(root):
    """(file bytes, label) of root/<identity>/<image> in the order of a
    folder source: identities sorted, their files sorted."""
    out = []
    identities = sorted(p for p in pathlib.Path(root).iterdir() if p.is_dir())
    for label, identity in enumerate(identities):
        for path in sorted(identity.iterdir()):
            out.append((path.read_bytes(), label))
    return out


def random_images(root, counts, size=(8, 8), jpeg_every=3):
    """root/<idNN>/<k>.png (every `jpeg_every`-th a .jpg) of random grey
    pixels, so that shifts, flips and decoders show."""
    rng = np.random.default_rng(7)
    root = pathlib.Path(root)
    for label, count in enumerate(counts):
        directory = root / f"id{label:02d}"
        directory.mkdir(parents=True)
        for k in range(count):
            pixels = rng.integers(0, 256, size, dtype=np.uint8)
            if k % jpeg_every == jpeg_every - 1:
                (directory / f"{k}.jpg").write_bytes(encode(pixels, "JPEG"))
            else:
                (directory / f"{k}.png").write_bytes(encode(pixels, "PNG"))
    return root
