"""Converts a training set between formats: folder, RecordIO, TFRecord.

    ring-loss-convert --input_dir=DIR --output_dir=DIR --to=tfrecord

reads any training set `ring_loss_tf.data.sources` opens (a folder per identity,
a `train.rec` + `train.idx`, `train-*.tfrecord` shards) and writes it as

    tfrecord    OUTPUT/train-00000-of-0000N.tfrecord (tf.train.Example with
                `image/encoded` and `image/class/label`, or the keys given),
                each shard's index beside it
    rec         OUTPUT/train.rec + train.idx in insightface's layout
                (header record 0, image records 1 .. n, one identity
                record per class when each class's images are contiguous)

keeping every example's bytes, its label and its global index, so a
training run on the output sees the very batches it saw on the input.
Every record is read and checked before anything is written under its final
name: a bad one stops the conversion with one line naming the file and the
record, and leaves no output set behind. An output directory that already
holds a training set is refused.

The library function is `convert`; the command and its flags are in
`ring_loss_tf.commands.convert`.
"""

from __future__ import annotations

import os
import pathlib
import struct
from typing import Callable

import numpy as np

from ring_loss_tf.data import recordio
from ring_loss_tf.data import sources

FORMATS = ("tfrecord", "rec")
RECORDS_PER_SHARD = 10000


def _output_set(output: pathlib.Path) -> list[pathlib.Path]:
    """The files of a training set (of any format) already in `output`."""
    if not output.exists():
        return []
    found = [output / "train.rec", output / "train.idx"]
    found = [p for p in found if p.exists()]
    found += sorted(output.glob("train-*.tfrecord"))
    if (output / "train").exists():
        found.append(output / "train")
    return found


def convert(
    input: str | os.PathLike,
    output: str | os.PathLike,
    to: str,
    *,
    image_key: str = sources.IMAGE_KEY,
    label_key: str = sources.LABEL_KEY,
    records_per_shard: int = RECORDS_PER_SHARD,
    progress: Callable[[str], None] | None = None,
) -> list[pathlib.Path]:
    """Writes the training set at `input` to `output` in format `to`.

    Args:
        input: a data root or a training set (`sources.find`, else
            `sources.open_source`).
        output: the directory to write (made if missing); it must not hold
            a training set already.
        to: "tfrecord" or "rec".
        image_key, label_key: the Example features, read from a TFRecord
            input and written to a TFRecord output.
        records_per_shard: TFRecord output: records per shard.
        progress: called with a progress line now and then, and at the end.

    Returns:
        The files written (shards, or the .rec and .idx).

    Raises:
        ValueError: an unknown `to`, an output set that exists, or a bad
            input record (the message names the file and the record).
    """
    if to not in FORMATS:
        raise ValueError(
            f"--to must be one of {', '.join(FORMATS)}. Received: {to!r}"
        )
    if not isinstance(records_per_shard, int) or records_per_shard < 1:
        raise ValueError(
            "records_per_shard must be a positive integer. "
            f"Received: {records_per_shard!r}"
        )
    input, output = pathlib.Path(input), pathlib.Path(output)
    if not input.exists():
        raise FileNotFoundError(f"--input_dir not found: {input}")
    existing = _output_set(output)
    if existing:
        raise ValueError(
            f"{output} already holds a training set ({existing[0].name}); "
            "choose another --output_dir or delete it first."
        )
    options = sources.Options(image_key=image_key, label_key=label_key)
    found = sources.find(input)
    source = (found[0].open(found[1], options) if found
              else sources.open_source(input, options))
    report = progress or (lambda line: None)
    output.mkdir(parents=True, exist_ok=True)
    writer = _write_tfrecord if to == "tfrecord" else _write_rec
    temporaries = []
    try:
        written = writer(source, output, temporaries, report,
                         image_key=image_key, label_key=label_key,
                         records_per_shard=records_per_shard)
    except BaseException:
        for path in temporaries:
            path.unlink(missing_ok=True)
        raise
    # Only a set read whole gets its final names.
    for temporary, final in zip(temporaries, written):
        os.replace(temporary, final)
    if to == "tfrecord":
        # Each shard's index now, so the first training run need not scan.
        for shard in written:
            sources.index_shard(shard, options)
    report(
        f"Wrote {source.num_examples} images of {source.num_classes} "
        f"classes from {input} to {output} ({to}: "
        + ", ".join(p.name for p in written) + ")"
    )
    return written


def _examples(source, report):
    """(index, image bytes, label) of every example, each checked."""
    every = max(1, min(10000, source.num_examples // 10))
    for index in range(source.num_examples):
        image, label, name = source.read(index)
        if not sources.looks_like_image(image):
            raise ValueError(
                f"{name}: {len(image)} bytes that are not an image (they "
                f"start {image[:8]!r}; expected JPEG, PNG, GIF, BMP or PGM). "
                "Remove or replace it, then convert again."
            )
        if (index + 1) % every == 0:
            report(f"read {index + 1}/{source.num_examples} images")
        yield index, image, int(label)


def _write_tfrecord(source, output, temporaries, report, *, image_key,
                    label_key, records_per_shard):
    import tensorflow as tf

    count = source.num_examples
    num_shards = -(-count // records_per_shard)
    finals = [output / f"train-{s:05d}-of-{num_shards:05d}.tfrecord"
              for s in range(num_shards)]
    writer = None
    for index, image, label in _examples(source, report):
        shard = index // records_per_shard
        if index % records_per_shard == 0:
            if writer is not None:
                writer.close()
            temporaries.append(finals[shard].with_name(
                finals[shard].name + ".partial"))
            writer = tf.io.TFRecordWriter(str(temporaries[-1]))
        example = tf.train.Example(features=tf.train.Features(feature={
            image_key: tf.train.Feature(
                bytes_list=tf.train.BytesList(value=[image])),
            label_key: tf.train.Feature(
                int64_list=tf.train.Int64List(value=[label])),
        }))
        writer.write(example.SerializeToString())
    if writer is not None:
        writer.close()
    return finals


def _record_bytes(payload):
    """dmlc RecordIO framing of one record: split where the magic number
    sits at a 4-byte-aligned position (dmlc-core recordio.h)."""
    magic = struct.pack("<I", recordio.MAGIC)
    parts, start = [], 0
    for i in range(0, len(payload) - len(payload) % 4, 4):
        if payload[i:i + 4] == magic:
            parts.append(payload[start:i])
            start = i + 4
    parts.append(payload[start:])
    out = bytearray()
    for n, part in enumerate(parts):
        if len(parts) == 1:
            flag = 0
        else:
            flag = 1 if n == 0 else (3 if n == len(parts) - 1 else 2)
        out += magic + struct.pack("<I", flag << 29 | len(part))
        out += part + b"\0" * (-len(part) % 4)
    return bytes(out)


def _pack(label, image, key):
    if np.ndim(label):
        labels = np.asarray(label, "<f4")
        return struct.pack("<IfQQ", len(labels), 0.0, key, 0) + (
            labels.tobytes() + image
        )
    return struct.pack("<IfQQ", 0, float(label), key, 0) + image


def _write_rec(source, output, temporaries, report, **unused):
    rec, idx = output / "train.rec", output / "train.idx"
    temporaries += [rec.with_name("train.rec.partial"),
                    idx.with_name("train.idx.partial")]
    count = source.num_examples
    first_identity = count + 1
    end = first_identity + source.num_classes
    offsets = []
    ranges = {}  # label -> [first key, last key + 1], if contiguous
    contiguous = True
    with open(temporaries[0], "wb") as file:
        offsets.append(file.tell())
        file.write(_record_bytes(
            _pack([float(first_identity), float(end)], b"", 0)))
        previous = None
        for index, image, label in _examples(source, report):
            key = index + 1
            if label in ranges and label != previous:
                contiguous = False
            ranges.setdefault(label, [key, key])[1] = key + 1
            previous = label
            offsets.append(file.tell())
            file.write(_record_bytes(_pack(float(label), image, key)))
        if contiguous and len(ranges) == source.num_classes:
            for label in range(source.num_classes):
                offsets.append(file.tell())
                first, last = ranges[label]
                file.write(_record_bytes(_pack(
                    [float(first), float(last)], b"", first_identity + label
                )))
    with open(temporaries[1], "w") as file:
        file.writelines(f"{key}\t{offset}\n"
                        for key, offset in enumerate(offsets))
    return [rec, idx]


if __name__ == "__main__":
    from ring_loss_tf.commands import convert as convert_command

    convert_command.run()
