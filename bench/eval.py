"""Benchmarks of evaluation: verification, identification, embedding.

    python bench/eval.py                      # all three, full sizes
    python bench/eval.py --only=identification --num_distractors=100000

1. Verification: `metrics.pair_scores` + `metrics.verify` (10 folds, six
   FARs) of 6,000 pairs of 512-d embeddings, after embedding.
2. Identification: `metrics.identify` of 10,000 probes against a 10,000
   gallery plus N × 512 synthetic distractors (default 1,000,000: 2 GB of
   float32); wall time, peak memory of the call (tracemalloc: the working
   memory beyond its inputs) and effective GFLOP/s (2 · probes · (gallery +
   N) · 512, ×2 for the gallery's two passes) as a ratio to a plain NumPy
   matmul of the same shape ((10,000 × 512) @ (512 × N), blocked only so its
   output fits in memory), measured interleaved in the same run.
3. Embedding: images/s of an exported SavedModel (the untrained small_cnn
   backbone by default, or --model) on the embedded KanjiVG test split
   (generated on first use), through `protocols.Embedder`.

Each figure is the median of --repeats runs (≥ 5); ratios are of figures of
the same run. The machine is shared and noisy: compare ratios, not times.

Measured on 2 shared cores (load average 10-16 from other jobs, so absolute
times are inflated; the ratio is what to compare):

    verification, 6,000 pairs:      63 ms (verify alone 20 ms)
    --num_distractors=50000:        10,000 probes, 73.3 s, 9.8 GFLOP/s,
                                    plain matmul 12.1 GFLOP/s, ratio 0.81
                                    (per-run 0.79-0.81); working memory
                                    199 MiB
    --num_probes=500 --num_distractors=1000000 (2.05 GB of inputs):
                                    68.2 s, 7.5 GFLOP/s, plain matmul
                                    8.7 GFLOP/s, ratio 0.86 (per-run median
                                    0.89); working memory 55 MiB
    embedding (small_cnn, 32×32×1): 1,516 images/s

The full 10,000 × 1,000,000 run is 1.0e13 FLOPs: about 15-20 minutes per
repetition at these rates, too long for the shared machine, hence the
smaller sets above.
"""

import argparse
import os
import pathlib
import resource
import sys
import tempfile
import time
import tracemalloc

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ring_loss_tf.evaluation import metrics  # noqa: E402


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), times


def bench_verification(args):
    rng = np.random.default_rng(0)
    n, dim = 6000, 512
    issame = np.arange(n) % 2 == 0
    a = rng.standard_normal((n, dim), dtype=np.float32)
    noise = rng.standard_normal((n, dim), dtype=np.float32)
    b = np.where(issame[:, None], a + 1.5 * noise, noise)

    def run():
        metrics.verify(metrics.pair_scores(a, b), issame)

    med, times = median_time(run, args.repeats)
    scores = metrics.pair_scores(a, b)
    verify_only, _ = median_time(
        lambda: metrics.verify(scores, issame), args.repeats
    )
    print(
        f"verification: 6,000 pairs x {dim}-d: pair_scores + verify "
        f"{1000 * med:.1f} ms (median of {args.repeats}; verify alone "
        f"{1000 * verify_only:.1f} ms)"
    )


def _synthetic(num, dim, seed, chunk=65536):
    out = np.empty((num, dim), np.float32)
    rng = np.random.default_rng(seed)
    for start in range(0, num, chunk):
        stop = min(start + chunk, num)
        out[start:stop] = rng.standard_normal(
            (stop - start, dim), dtype=np.float32
        )
    return out


def bench_identification(args):
    num_probes, dim = args.num_probes, 512
    num_gallery = num_probes
    rng = np.random.default_rng(1)
    gallery = _synthetic(num_gallery, dim, 2)
    labels = np.arange(num_gallery)
    # Noise so that genuine cosines (≈ 0.24) meet the distractor tail.
    probes = gallery + 4.0 * rng.standard_normal(
        (num_probes, dim), dtype=np.float32
    )
    distractors = _synthetic(args.num_distractors, dim, 3)
    # The same FLOPs as identify: gallery twice (best genuine, then the
    # count), distractors once.
    candidates = 2 * num_gallery + args.num_distractors
    flops = 2.0 * num_probes * candidates * dim

    out = np.empty((num_probes, args.chunk_size), np.float32)

    def plain_matmul():
        for source in (gallery, gallery, distractors):
            for start in range(0, source.shape[0], args.chunk_size):
                block = source[start : start + args.chunk_size]
                np.matmul(probes, block.T, out=out[:, : block.shape[0]])

    def run_identify():
        return metrics.identify(
            probes,
            labels,
            gallery,
            labels,
            distractors,
            chunk_size=args.chunk_size,
            probe_chunk_size=args.probe_chunk_size,
        )

    ident_times, mm_times = [], []
    result = None
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = run_identify()
        ident_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        plain_matmul()
        mm_times.append(time.perf_counter() - start)
    tracemalloc.start()
    run_identify()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    t_id, t_mm = np.median(ident_times), np.median(mm_times)
    per_run = np.array(mm_times) / np.array(ident_times)
    input_gb = (probes.nbytes + gallery.nbytes + distractors.nbytes) / 1e9
    print(
        f"identification: {num_probes:,} probes vs {num_gallery:,} gallery "
        f"+ {args.num_distractors:,} x {dim} distractors (inputs "
        f"{input_gb:.2f} GB): {t_id:.1f} s, {flops / t_id / 1e9:.1f} "
        f"GFLOP/s; plain matmul {t_mm:.1f} s, {flops / t_mm / 1e9:.1f} "
        f"GFLOP/s; ratio {t_mm / t_id:.2f} (per-run ratios median "
        f"{np.median(per_run):.2f}, min {per_run.min():.2f}); "
        f"rank-1 {100 * result.rank1:.2f}%"
    )
    print(
        f"  working memory of identify (tracemalloc peak): "
        f"{peak / 2**20:.0f} MiB; process max RSS "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} "
        f"GiB; chunk {args.chunk_size} x probe chunk "
        f"{args.probe_chunk_size}; medians of {args.repeats}"
    )


def bench_embedding(args):
    import tensorflow as tf  # noqa: F401

    from ring_loss_tf.models import backbones
    from ring_loss_tf.data import pipeline
    from ring_loss_tf.data import eval_sets
    from ring_loss_tf.evaluation import protocols
    from ring_loss_tf.data import kanji

    root = kanji.prepare(cache_dir=args.cache_dir)
    paths, _, _ = eval_sets.read_image_folder(root / "test", load=False)
    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model
        if model_path is None:
            model = backbones.small_cnn(seed=0)
            model_path = os.path.join(tmp, "export")
            model.export(model_path, verbose=False)
        embedder = protocols.load_embedder(
            model_path, batch_size=args.batch_size
        )
        images = pipeline.load_images(
            paths,
            image_size=embedder.image_size,
            channels=embedder.channels,
        )
        embedder(images[: args.batch_size])  # warm-up (tracing)
        med, _ = median_time(lambda: embedder(images), args.repeats)
    print(
        f"embedding: {len(images):,} images {images.shape[1:]} of the "
        f"embedded test split through the SavedModel signature "
        f"({embedder.describe()['input_dtype']} input, batch "
        f"{args.batch_size}): {len(images) / med:,.0f} images/s "
        f"(median of {args.repeats})"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", choices=["verification", "identification", "embedding"]
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num_probes", type=int, default=10_000)
    parser.add_argument("--num_distractors", type=int, default=1_000_000)
    parser.add_argument("--chunk_size", type=int, default=8192)
    parser.add_argument("--probe_chunk_size", type=int, default=2048)
    parser.add_argument(
        "--model", default=None, help="SavedModel for the embedding benchmark."
    )
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--cache_dir", default=None)
    args = parser.parse_args()
    if args.repeats < 5:
        parser.error("--repeats must be >= 5 (figures are medians).")
    for name in ("verification", "identification", "embedding"):
        if args.only in (None, name):
            globals()[f"bench_{name}"](args)


if __name__ == "__main__":
    main()
