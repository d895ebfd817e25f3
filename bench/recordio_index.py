"""RecordIO index: memory and time to open, per million records.

    python bench/recordio_index.py [--records 1000000] [--repeats 5]

Writes a synthetic `train.idx` of `--records` lines (im2rec's layout: keys
0 .. n-1, increasing byte offsets) beside a sparse `train.rec` of the size
those offsets imply, in a temporary directory, then measures in one
process, alternating the two each round (median of `--repeats`):

- open: `recordio.RecordIOReader(train.rec)`, which parses the `.idx` into
  two int64 arrays (`recordio.RecordIndex`), and the index's bytes;
- dict: the same file parsed line by line into a dict of Python ints (what
  the reader held before), and its memory measured with tracemalloc.

Both are scaled to one million records. Nothing here reads the records
themselves.
"""

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time
import tracemalloc

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from ring_loss_tf.data import recordio  # noqa: E402


def write_index(directory: pathlib.Path, records: int) -> pathlib.Path:
    """A train.idx of `records` lines and a sparse train.rec to match."""
    sizes = np.random.default_rng(0).integers(2_000, 9_000, records)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    lines = np.char.add(
        np.char.add(np.arange(records).astype(str), "\t"),
        offsets.astype(str),
    )
    (directory / "train.idx").write_text("\n".join(lines.tolist()) + "\n")
    rec = directory / "train.rec"
    with open(rec, "wb") as file:
        file.truncate(int(offsets[-1] + sizes[-1]))
    return rec


def dict_index(path: pathlib.Path) -> dict:
    index = {}
    with open(path, encoding="ascii") as file:
        for line in file:
            fields = line.split()
            if fields:
                index[int(fields[0])] = int(fields[1])
    return index


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    per_million = 1e6 / args.records
    with tempfile.TemporaryDirectory(prefix="recordio-index-") as tmp:
        rec = write_index(pathlib.Path(tmp), args.records)
        idx_mb = os.path.getsize(rec.with_suffix(".idx")) / 2**20
        open_s, dict_s, index_bytes, dict_bytes = [], [], 0, 0
        for _ in range(args.repeats):
            started = time.perf_counter()
            reader = recordio.RecordIOReader(rec)
            open_s.append(time.perf_counter() - started)
            index_bytes = reader.offsets.nbytes
            assert len(reader.offsets) == args.records
            reader.close()
            tracemalloc.start()
            started = time.perf_counter()
            index = dict_index(rec.with_suffix(".idx"))
            dict_s.append(time.perf_counter() - started)
            dict_bytes = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
            assert len(index) == args.records
            del index
    print(f"{args.records:,} records, .idx {idx_mb:.1f} MiB; per million "
          f"records, median of {args.repeats}:")
    print("| index | memory | time to open |")
    print("|---|---|---|")
    print(f"| int64 arrays (`recordio.RecordIndex`) | "
          f"{index_bytes * per_million / 2**20:.1f} MiB | "
          f"{statistics.median(open_s) * per_million:.2f} s |")
    print(f"| dict of Python ints (before) | "
          f"{dict_bytes * per_million / 2**20:.1f} MiB | "
          f"{statistics.median(dict_s) * per_million:.2f} s |")


if __name__ == "__main__":
    main()
