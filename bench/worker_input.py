"""Per-worker input: images each worker decodes per step; does it keep up.

    python bench/worker_input.py [--repeats 5] [--batch_size 32]
                                 [--backbone small_cnn] [--output FILE]
    python bench/worker_input.py --quick     # smoke test, about 1 min

The default run takes about 2 min on 2 cores (sphereface20 steps are
slower). Result there: each of W workers decodes B / W images per step
(B before), at about 0.5 ms of one core per image.

Makes synthetic face-sized JPEGs (112x96 RGB, smooth random colour,
quality 90; 64 identities x 20 by default) in a temporary directory (there
is no face data here), then:

- per-image decode cost: `pipeline.training_dataset` (streaming,
  augment="face")
  iterated in this process with tf.data's private thread pool and intra-op
  parallelism at 1: process CPU ms per image (decode + resize + augment +
  batching), median of `--repeats`. Wall ms is printed beside it.
- for W = 1, 2, 4 worker processes on 127.0.0.1 (W = 1: one plain process
  without TF_CONFIG, so `MirroredStrategy` on the CPU; W >= 2: a TF_CONFIG
  cluster, `MultiWorkerMirroredStrategy`, one CPU replica per worker), each
  worker builds the `Trainer` and its pipeline as `training.train` does
  (`trainer.distribute_dataset(lambda ctx: pipeline_lib.training_dataset(...,
  input_context=ctx, in_memory=False))`) and, in `--repeats` rounds
  (all workers in step, a collective between phases):
  - counts the images it receives per step (the sum of its local
    per-replica batches: what it decoded) and times its pipeline alone,
    a fresh iterator, `--steps` steps after `--warmup`;
  - times `--train_steps` distributed training steps (forward, backward,
    all-reduce across the workers, SGD) of `--backbone` + RingLoss +
    softmax on a synthetic local batch of the same size: the images/s per
    worker the step consumes.
  Rates are the mean over the workers of a round, median over rounds.
  Before per-worker input (commit a239990) every worker decoded the whole
  global batch B; that figure is shown as the previous design.

All workers share this machine's cores: from W = 2 each gets a share of
the CPU for both the pipeline and the step, and W = 4 on 2 cores
oversubscribes it, so rates there are not scaling measurements; the counts
are exact at every W. A second table carries the measured decode cost to
machines of `--gpus_per_machine` GPUs at `--images_per_gpu` images/s each
(600: insightface's iResNet-50 figure), on paper.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench.input import make_jpeg_folder  # noqa: E402
from ring_loss_tf import cluster  # noqa: E402
from ring_loss_tf import config as config_lib  # noqa: E402
from ring_loss_tf.data import pipeline as pipeline_lib  # noqa: E402
from ring_loss_tf.models import assembly  # noqa: E402
from ring_loss_tf.training import trainer as trainer_lib  # noqa: E402
from ring_loss_tf.training import distribution  # noqa: E402

IMAGE_SIZE = (112, 96)
CHANNELS = 3
QUICK = dict(identities=8, per_identity=8, batch_size=8, repeats=1,
             steps=3, warmup=1, train_steps=2, decode_batches=3)


def paper_table(cost_ms, images_per_gpu, gpus_per_machine, machines):
    """Decoding load per machine at a given GPU rate, now and before.

    Now each machine decodes its own GPUs' images (independent of the
    machine count W); before, every machine decoded the whole global
    batch, W times that. Cores = images/s x `cost_ms` / 1000.
    """
    per_machine = gpus_per_machine * images_per_gpu
    rows = []
    for w in machines:
        before = w * per_machine
        rows.append({
            "machines": w,
            "gpus": w * gpus_per_machine,
            "images_per_s_now": per_machine,
            "images_per_s_before": before,
            "cores_now": per_machine * cost_ms / 1e3,
            "cores_before": before * cost_ms / 1e3,
        })
    return rows


def paper_markdown(rows, cost_ms, images_per_gpu, gpus_per_machine):
    lines = [
        f"On paper: machines of {gpus_per_machine} GPUs at "
        f"{images_per_gpu:,g} images/s per GPU, decoding at the measured "
        f"{cost_ms:.2f} ms per image per core:",
        "| machines (GPUs) | images each machine decodes per s, now "
        "| before | cores for decoding per machine, now | before |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['machines']} ({r['gpus']}) | {r['images_per_s_now']:,.0f} "
            f"| {r['images_per_s_before']:,.0f} | {r['cores_now']:.1f} "
            f"| {r['cores_before']:.1f} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------
# One worker process
# --------------------------------------------------------------------------


def _local_rows(strategy, values):
    return sum(int(t.shape[0])
               for t in strategy.experimental_local_results(values))


def _pipeline_round(dataset, strategy, warmup, steps):
    """Images per step and images/s of a fresh iterator, alone.

    A fresh iterator per round, deleted afterwards, so no prefetch buffer
    filled during the training steps inflates the figure.
    """
    iterator = iter(dataset)
    for _ in range(warmup):
        next(iterator)
    counts = []
    start = time.perf_counter()
    for _ in range(steps):
        images, _ = next(iterator)
        counts.append(_local_rows(strategy, images))
    elapsed = time.perf_counter() - start
    del iterator
    return counts, sum(counts) / elapsed


def worker(settings):
    """Runs in each worker process; prints one `RESULT {json}` line."""
    batch_size = settings["batch_size"]
    strategy = distribution.build_strategy()
    source = pipeline_lib.open_training_source(settings["folder"])
    config = config_lib.make(
        backbone=settings["backbone"], image_size=IMAGE_SIZE,
        channels=CHANNELS, augment="face", lambda_ring=0.01, seed=0,
        num_classes=source.num_classes,
    )
    trainer = trainer_lib.Trainer(
        strategy, lambda: assembly.build_models(config),
        global_batch_size=batch_size, learning_rate=0.01,
    )

    def worker_pipeline(input_context):
        return pipeline_lib.training_dataset(
            source, batch_size=batch_size, image_size=IMAGE_SIZE,
            channels=CHANNELS, augment="face", seed=0,
            input_context=input_context, in_memory=False,
        )

    dataset = trainer.distribute_dataset(worker_pipeline)
    per_replica = trainer.per_replica_batch_size
    rng = np.random.default_rng(0)

    def on_each_replica(value, dtype):
        return strategy.experimental_distribute_values_from_function(
            lambda _: tf.constant(value, dtype)
        )

    # A synthetic batch of the pipeline's size on each local replica.
    images = on_each_replica(
        rng.uniform(-1, 1, (per_replica, *IMAGE_SIZE, CHANNELS)), tf.float32
    )
    labels = on_each_replica(
        rng.integers(0, source.num_classes, per_replica), tf.int32
    )
    trainer.initialize_radius(images)
    for _ in range(2):  # compile and warm up
        trainer.train_step(images, labels)
    local_rows = _local_rows(strategy, images)
    counts, pipeline, step = set(), [], []
    for _ in range(settings["repeats"]):
        trainer.any_worker(False)  # a collective: all workers start together
        round_counts, rate = _pipeline_round(
            dataset, strategy, settings["warmup"], settings["steps"]
        )
        counts.update(round_counts)
        pipeline.append(rate)
        trainer.any_worker(False)
        start = time.perf_counter()
        for _ in range(settings["train_steps"]):
            trainer.train_step(images, labels)
        step.append(settings["train_steps"] * local_rows
                    / (time.perf_counter() - start))
    print("RESULT " + json.dumps({
        "replicas": trainer.num_replicas,
        "local_replicas": len(
            strategy.experimental_local_results(images)
        ),
        "images_per_step": sorted(counts),
        "pipeline": pipeline,
        "step": step,
    }), flush=True)


# --------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------


def run_workers(num_workers, settings, timeout):
    """Starts `num_workers` processes (a loopback TF_CONFIG cluster when
    more than one); returns each one's RESULT dict."""
    configs = cluster.loopback_tf_configs(num_workers)
    processes = []
    for tf_config in configs:
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        env.pop("TF_CONFIG", None)
        if num_workers > 1:
            env["TF_CONFIG"] = tf_config
        processes.append(subprocess.Popen(
            [sys.executable, __file__, "--worker_settings",
             json.dumps(settings)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        ))
    outputs = []
    deadline = time.monotonic() + timeout
    try:
        for process in processes:
            remaining = max(1.0, deadline - time.monotonic())
            outputs.append(process.communicate(timeout=remaining)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    results = []
    for index, (process, output) in enumerate(zip(processes, outputs)):
        lines = [x for x in output.splitlines() if x.startswith("RESULT ")]
        if process.returncode or not lines:
            raise SystemExit(
                f"worker {index} of {num_workers} failed (exit "
                f"{process.returncode}):\n" + output[-3000:]
            )
        results.append(json.loads(lines[-1][len("RESULT "):]))
    return results


def decode_cost(source, batch_size, batches, warmup=3):
    """(CPU ms, wall ms) per image of the streaming pipeline on one thread."""
    dataset = pipeline_lib.training_dataset(
        source, batch_size=batch_size, image_size=IMAGE_SIZE,
        channels=CHANNELS, augment="face", seed=0, in_memory=False,
    )
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    iterator = iter(dataset.with_options(options))
    for _ in range(warmup):
        next(iterator)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(batches):
        images, _ = next(iterator)
    images.numpy()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    del iterator
    count = batches * batch_size
    return cpu / count * 1e3, wall / count * 1e3


def summarize(num_workers, batch_size, results):
    """One table row: rates are the workers' mean per round, median over
    the rounds."""
    counts = sorted({c for r in results for c in r["images_per_step"]})
    pipeline = statistics.median(
        np.mean([r["pipeline"] for r in results], axis=0)
    )
    step = statistics.median(np.mean([r["step"] for r in results], axis=0))
    return {
        "workers": num_workers,
        "replicas": results[0]["replicas"],
        "images_per_worker_per_step": counts,
        "images_per_worker_per_step_before": batch_size,
        "pipeline_images_per_s_per_worker": pipeline,
        "step_images_per_s_per_worker": step,
        "ratio": pipeline / step,
        "per_worker": results,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4",
                        help="comma-separated worker counts")
    parser.add_argument("--batch_size", type=int, default=32,
                        help="the global batch B")
    parser.add_argument("--backbone", default="small_cnn",
                        help="small_cnn (quick) or sphereface20")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100,
                        help="pipeline steps timed per round (long enough "
                        "that prefetch buffers do not inflate the rate)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--train_steps", type=int, default=20)
    parser.add_argument("--decode_batches", type=int, default=20)
    parser.add_argument("--identities", type=int, default=64)
    parser.add_argument("--per_identity", type=int, default=20)
    parser.add_argument("--images_per_gpu", type=float, default=600)
    parser.add_argument("--gpus_per_machine", type=int, default=8)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: " + ", ".join(
                            f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--timeout", type=float, default=900,
                        help="seconds per cluster")
    parser.add_argument("--output", default=None,
                        help="also write the results as JSON here")
    parser.add_argument("--worker_settings", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_settings:
        return worker(json.loads(args.worker_settings))
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    counts = [int(w) for w in args.workers.split(",")]
    bad = [w for w in counts if w < 1 or args.batch_size % w]
    if bad:
        parser.error(f"--workers {bad}: each must divide --batch_size "
                     f"{args.batch_size}")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="worker-input-") as folder:
        make_jpeg_folder(folder, args.identities, args.per_identity,
                         IMAGE_SIZE)
        source = pipeline_lib.open_training_source(folder)
        costs = [decode_cost(source, args.batch_size, args.decode_batches)
                 for _ in range(args.repeats)]
        cost_ms = statistics.median(c[0] for c in costs)
        wall_ms = statistics.median(c[1] for c in costs)
        settings = {k: getattr(args, k) for k in (
            "batch_size", "backbone", "repeats", "steps", "warmup",
            "train_steps")}
        settings["folder"] = folder
        rows = [summarize(w, args.batch_size,
                          run_workers(w, settings, args.timeout))
                for w in counts]
    machines = (1, 2, 4, 8)
    paper = paper_table(cost_ms, args.images_per_gpu, args.gpus_per_machine,
                        machines)
    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPUs, global batch "
          f"{args.batch_size}, {args.backbone} step; synthetic face-sized "
          f"JPEGs ({args.identities} identities x {args.per_identity}, "
          f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}, quality 90); median of "
          f"{args.repeats} rounds. W = 1: one process without TF_CONFIG; "
          "the workers share this machine's cores (W = 4 oversubscribes "
          "them: rates there are not scaling measurements).")
    print("| workers W | images decoded per worker per step, now | before "
          "(previous design: whole global batch) | pipeline img/s per worker "
          "| step consumption img/s per worker | ratio pipeline / step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        now = "/".join(str(c) for c in r["images_per_worker_per_step"])
        print(f"| {r['workers']} | {now} "
              f"| {r['images_per_worker_per_step_before']} "
              f"| {r['pipeline_images_per_s_per_worker']:.0f} "
              f"| {r['step_images_per_s_per_worker']:.0f} "
              f"| {r['ratio']:.2f} |")
    print(f"\nDecode cost (decode + resize + augment, one thread): "
          f"{cost_ms:.2f} ms of CPU per image (wall {wall_ms:.2f} ms), "
          f"median of {args.repeats}.\n")
    print(paper_markdown(paper, cost_ms, args.images_per_gpu,
                         args.gpus_per_machine))
    print(f"\n({(time.monotonic() - started) / 60:.1f} min)")
    if args.output:
        path = pathlib.Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "settings": {k: v for k, v in vars(args).items()
                         if k != "worker_settings"},
            "tensorflow": tf.__version__,
            "cpus": os.cpu_count(),
            "decode_ms_per_image_cpu": cost_ms,
            "decode_ms_per_image_wall": wall_ms,
            "workers": rows,
            "paper": paper,
        }, indent=1) + "\n")
        print(f"Wrote {path}")


if __name__ == "__main__":
    main()
