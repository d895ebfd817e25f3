"""The training loop: `train(config)`, progress, summaries, the NaN guard.

The data flow: images → backbone → `RingLoss` (if λ > 0) → head → logits;
the loss is sparse cross-entropy from the logits (the fused, stable op) plus
the layers' `add_loss` terms (ring, center) plus weight decay on kernels. The
embedding model (the backbone) is what is exported and evaluated.

Where the parts live: the settings in `config` (`TrainConfig`), model
assembly in `models`, the distributed step (strategy, `Trainer`,
checkpoints, learning rate, signals) in `trainer`, the final table's
scoring in `evaluation`. Nothing here reads flags: `train.py` parses them
into a `TrainConfig` and calls `train`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import pathlib
import re
import time
import traceback

import keras
import numpy as np
import tensorflow as tf

from ring_loss_tf import cluster
from ring_loss_tf import config as config_lib
from ring_loss_tf.data import pipeline
from ring_loss_tf.evaluation import protocols
from ring_loss_tf.evaluation import report
from ring_loss_tf import export as export_lib
from ring_loss_tf.data import kanji
from ring_loss_tf.models import assembly as models_lib
from ring_loss_tf import registry
from ring_loss_tf import rendezvous
from ring_loss_tf.data import sources
from ring_loss_tf.training import trainer as trainer_lib
from ring_loss_tf.training import distribution
from ring_loss_tf.training import schedules
from ring_loss_tf.training import signals
from ring_loss_tf.errors import NonFiniteLossError
from ring_loss_tf.errors import TrainingDataError
from ring_loss_tf.errors import TrainingInterrupted
from ring_loss_tf.errors import WorkerLostError
from ring_loss_tf.errors import first_line

EXPORT_DIR = "export"

# tf.debugging.Assert's message: "[<text> File:] [b'<path>']" (or "<path>"),
# from a corrupt image or one over the pixel budget.
_CORRUPT_ASSERTION = re.compile(
    r"\[((?:Corrupt or truncated image file\.|Image larger than the pixel "
    r"budget).*?File:)\] \[b?['\"]?(.*?)['\"]?\]",
    re.S,
)


def data_error(error, trainer=None):
    """A `TrainingDataError` from tf.data's InvalidArgumentError."""
    text = getattr(error, "message", None) or str(error)
    match = _CORRUPT_ASSERTION.search(text)
    record = re.search(re.escape(pipeline.RECORD_ERROR) + r"([^\n]*)", text)
    if match:
        message = f"{match.group(1)} {match.group(2)}"
    elif record:
        # The reader's message names the file and the record.
        message = record.group(1).strip()
        skip = (
            "rerun with skip_corrupt=True (--skip_corrupt): it reads every "
            "record once at the start and leaves out those that fail."
        )
        if "class label" in message:
            pass
        elif ".rec record " in message:
            message += " Copy the .rec and .idx again, or " + skip
        else:
            message += " Or " + skip
    else:
        message = (
            "A training image could not be decoded "
            f"({first_line(error)}), and TensorFlow does not say which "
            "file. Rerun with skip_corrupt=True (--skip_corrupt): it decodes "
            "every image once at the start and leaves out those that fail."
        )
    latest = None
    if trainer is not None and trainer.model_dir is not None:
        latest = tf.train.latest_checkpoint(str(trainer.model_dir))
    if latest:
        message += f" The last checkpoint {latest} is intact."
    return TrainingDataError(message)


# --------------------------------------------------------------------------
# The training loop with logs, summaries and the NaN guard
# --------------------------------------------------------------------------


def _format_seconds(seconds):
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def run_loop(
    trainer,
    iterator,
    total_steps,
    *,
    checkpoint_every=500,
    log_every=50,
    stop_at_step=None,
    print_fn=print,
    summary_writer=None,
    stop_requested=None,
    steps_per_loop=1,
):
    """Trains until `total_steps` (or `stop_at_step`), checkpointing.

    The checkpoint saved at the end (and every `checkpoint_every` steps) holds
    the model, the optimizer and the step; the input stream is a function of
    the step, so running again continues exactly.

    The statistics stay on the device: the host reads them only to log,
    before a checkpoint and at the end, so it does not wait for every step.
    With `steps_per_loop` K > 1 and a `tf.data` or distributed iterator,
    up to K steps run in one compiled call (`Trainer.train_loop`); a loop is
    cut short so that it never runs past a step that logs, checkpoints or
    stops, so those happen at exactly the step they name, and the weights
    are those of K = 1 (tested). The first step of a run is always a call of
    its own (it initialises R from its batch).

    NaN guard: the compiled step records the first step whose loss is not
    finite. It is read at every log line, before every checkpoint and at
    the end, and then raises `NonFiniteLossError` naming that step and its
    statistics. So no checkpoint of a step at or after a non-finite one is
    ever written: the latest checkpoint is the last good one, and the next
    run resumes from it. The weights in memory are not rolled back; they
    may have trained past the bad step (up to the next read) and are not
    to be used.

    Args:
        stop_requested: None, or a callable checked before every call
            (every step, or every loop of up to K steps); when it returns a
            reason (e.g. `StopOnSignals`), the step reached is
            checkpointed and `TrainingInterrupted` raised. A request that
            arrives during a loop acts at its end.
        steps_per_loop: K, the most steps per compiled call. Iterators that
            are not `tf.data`'s (a Python list's) run one step per call.

    Returns:
        Stats of the last step (a `trainer.StepStats`), or None if no step
        ran.

    Raises:
        NonFiniteLossError, TrainingInterrupted, CheckpointWriteError,
        TrainingDataError (an image could not be decoded).
    """
    step = int(trainer.step.numpy())
    stop = total_steps
    if stop_at_step is not None:
        stop = min(stop_at_step, total_steps)
    loops = steps_per_loop > 1 and isinstance(
        iterator, (tf.data.Iterator, tf.distribute.DistributedIterator)
    )
    last = None
    saved_step = None
    interval_start, interval_steps = time.perf_counter(), 0
    steps_per_second = None
    chief = trainer.is_chief

    def check_finite():
        found = trainer.first_nonfinite()
        if found is not None:
            bad_step, bad_stats = found
            # The step counter names the last step with a finite loss.
            trainer.step.assign(bad_step - 1)
            raise NonFiniteLossError(
                _nan_message(trainer, bad_step, bad_stats), bad_step
            )

    while step < stop:
        reason = stop_requested() if stop_requested is not None else None
        if stop_requested is not None and trainer.any_worker(reason):
            check_finite()
            path = trainer.save() if saved_step != step else (
                tf.train.latest_checkpoint(str(trainer.model_dir))
                if trainer.model_dir is not None and chief
                else None
            )
            raise TrainingInterrupted(
                reason or "another worker", step, path, chief=chief
            )
        if step == 0 or last is None or not loops:
            try:
                images, labels = next(iterator)
            except tf.errors.InvalidArgumentError as error:
                raise data_error(error, trainer) from None
            if step == 0 or last is None:
                trainer.initialize_radius(images)
            stats, norms = trainer.train_step(images, labels)
            num_steps = 1
        else:
            num_steps = min(
                steps_per_loop,
                stop - step,
                log_every - step % log_every,
                checkpoint_every - step % checkpoint_every,
            )
            try:
                stats, norms = trainer.train_loop(iterator, num_steps)
            except tf.errors.InvalidArgumentError as error:
                raise data_error(error, trainer) from None
        step += num_steps
        interval_steps += num_steps
        last = stats
        if step % log_every == 0 or step == stop or step == 1:
            check_finite()
            dict(stats)  # waits for the step: the interval's time is real
            now = time.perf_counter()
            elapsed = now - interval_start
            images_per_second = (
                interval_steps * trainer.global_batch_size / elapsed
                if elapsed > 0
                else float("nan")
            )
            if step > 1:  # the first interval includes compilation
                steps_per_second = interval_steps / elapsed
            if chief:
                print_fn(
                    _progress_line(
                        trainer, step, total_steps, stats,
                        images_per_second, steps_per_second,
                    )
                )
                if summary_writer is not None:
                    _write_summaries(
                        summary_writer, trainer, step, stats, norms,
                        images_per_second,
                    )
            interval_start, interval_steps = time.perf_counter(), 0
        if step % checkpoint_every == 0 or step == stop:
            check_finite()
            trainer.save()
            saved_step = step
    return last


def _progress_line(trainer, step, total_steps, stats, images_per_second, sps):
    width = len(str(total_steps))
    parts = [
        f"step {step:>{width}}/{total_steps}",
        f"loss {stats['loss']:.4f}",
        f"ce {stats['cross_entropy']:.4f}",
    ]
    radius = trainer.radius()
    if radius is not None:
        parts += [f"ring {stats['ring_loss']:.4f}", f"R {radius:.3f}"]
    parts.append(f"|F| {stats['feature_norm']:.3f}")
    head_lambda = trainer.head_lambda()
    if trainer.in_margin_warmup():
        parts.append("margin off")
    elif head_lambda is not None:
        parts.append(f"lambda {head_lambda:.2f}")
    parts.append(f"lr {trainer.learning_rate():.4g}")
    # A tenth of an image per second still matters for a 112-pixel network
    # on a CPU (SphereFace-20: about 16 img/s).
    parts.append(f"{images_per_second:.{0 if images_per_second >= 100 else 1}f}"
                 " img/s")
    if sps:
        parts.append(f"ETA {_format_seconds((total_steps - step) / sps)}")
    return "  ".join(parts)


def _summary_metadata(plugin_name):
    # The protos TensorBoard's tf.summary.scalar/histogram write, so the
    # summaries need no `tensorboard` package at training time.
    from tensorflow.core.framework import summary_pb2

    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(
            plugin_name=plugin_name
        )
    )


def write_scalar(name, value, step):
    """A TensorBoard scalar (plugin "scalars") to the default writer."""
    tf.summary.write(
        name,
        tf.constant(value, tf.float32),
        step=step,
        metadata=_summary_metadata("scalars"),
    )


def write_histogram(name, values, step, buckets=30):
    """A TensorBoard histogram: a (buckets, 3) tensor of left, right, count."""
    values = np.asarray(values, np.float64).reshape(-1)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return
    low, high = float(values.min()), float(values.max())
    if high <= low:
        high = low + 1e-6
    counts, edges = np.histogram(values, bins=buckets, range=(low, high))
    tensor = np.stack([edges[:-1], edges[1:], counts], axis=1)
    tf.summary.write(
        name,
        tf.constant(tensor, tf.float64),
        step=step,
        metadata=_summary_metadata("histograms"),
    )


def _write_summaries(writer, trainer, step, stats, norms, images_per_second):
    with writer.as_default():
        for name, value in stats.items():
            write_scalar(f"loss/{name}", value, step)
        radius = trainer.radius()
        if radius is not None:
            write_scalar("ring/radius", radius, step)
        head_lambda = trainer.head_lambda()
        if head_lambda is not None:
            write_scalar("asoftmax/lambda", head_lambda, step)
        write_scalar("learning_rate", trainer.learning_rate(), step)
        write_scalar("images_per_second", images_per_second, step)
        write_histogram("feature_norm", norms.numpy(), step)
    writer.flush()


def _nan_message(trainer, step, stats):
    values = ", ".join(f"{k} {v:.4g}" for k, v in stats.items())
    latest = None
    if trainer.manager is not None:
        latest = tf.train.latest_checkpoint(str(trainer.model_dir))
    if latest:
        kept = (
            f"the last good checkpoint {latest} is intact and the next run "
            "resumes from it"
        )
    else:
        kept = "no checkpoint was written yet"
    return (
        f"Training stopped at step {step}: the loss is not finite ({values}); "
        f"{kept}. Try a lower lr (now {trainer.peak_learning_rate():.4g}), "
        "warmup_steps, a smaller lambda_ring, or training without "
        "mixed_precision."
    )


# --------------------------------------------------------------------------
# train(): everything train.py does
# --------------------------------------------------------------------------


def check_resume_config(config, model_dir=None, save=True):
    """Saves `config` in its model_dir, or checks it against a saved one.

    A model_dir with a checkpoint must hold a run of the same settings
    (those `config.FIELDS` marks "match"): resuming with another model or
    optimisation would silently train something else.

    Args:
        save: write config.json now if it is to be written; `train` passes
            False and writes it once the checkpoint is restored, so a run
            that fails to start leaves its model_dir as it found it.

    Returns:
        Whether config.json is (or, without `save`, is to be) written.

    Raises:
        ValueError: `model_dir` holds a checkpoint of another run.
    """
    model_dir = pathlib.Path(model_dir or config.run.model_dir)
    path = model_dir / config_lib.CONFIG_FILE
    if path.is_file() and tf.train.latest_checkpoint(str(model_dir)):
        try:
            saved = json.loads(path.read_text())
            different = config_lib.differences(saved, config)
        except ValueError as error:
            raise ValueError(
                f"{path} cannot be read ({error}); use a new model_dir"
            ) from None
        if different:
            raise ValueError(
                f"{model_dir} holds a checkpoint of another model: "
                f"{', '.join(different)}. Use a new model_dir, or the "
                "settings of that run to resume it."
            )
        return False
    if save:
        config_lib.save(config, model_dir)
    return True


def _mixed_precision_policy(enabled):
    if not enabled:
        return None
    if tf.config.list_logical_devices("GPU"):
        return "mixed_float16"
    return "mixed_bfloat16"


def _training_data(config, chief):
    """The root of the data set (generating the embedded one) and its
    training source."""
    if config.data.data_dir is None:
        options = config_lib.kanji_options(config)
        root = pathlib.Path(kanji.prepare(progress=chief, **options))
    else:
        root = pathlib.Path(config.data.data_dir)
    options = sources.Options(
        skip_corrupt=config.data.skip_corrupt,
        image_key=config.data.tfrecord_image_key,
        label_key=config.data.tfrecord_label_key,
        index_dir=config.data.cache_dir,
    )
    return root, sources.open_root(root, options)


def _build_trainer(config, strategy, total_steps):
    optim, run = config.optim, config.run
    policy = _mixed_precision_policy(optim.mixed_precision)
    previous_policy = keras.config.dtype_policy()
    if policy:
        keras.config.set_dtype_policy(policy)
    keras.utils.set_random_seed(run.seed)
    try:
        return trainer_lib.Trainer(
            strategy,
            lambda: models_lib.build_models(config),
            global_batch_size=optim.batch_size,
            learning_rate=schedules.LearningRate(
                optim.lr, total_steps, optim.lr_schedule,
                warmup_steps=optim.warmup_steps,
            ),
            optimizer=optim.optimizer,
            momentum=optim.momentum,
            weight_decay=optim.weight_decay,
            jit=run.jit,
            model_dir=run.model_dir,
            max_to_keep=run.max_to_keep,
            mixed_precision=policy,
            all_reduce_dtype=run.all_reduce_dtype,
        )
    finally:
        keras.config.set_dtype_policy(previous_policy)


def _peer_error(error):
    """TensorFlow's reason without its op prefix, naming the lost tasks."""
    text = getattr(error, "message", None) or str(error)
    text = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", text.strip())
    reason = text.splitlines()[0] if text else type(error).__name__
    tasks = re.findall(r"^(/job:\S+/task:\d+)\s*$", text, re.M)
    return " ".join([reason.rstrip(":") + (":" if tasks else ""), *tasks])


@contextlib.contextmanager
def _lost_workers(trainer, starting=False, model_dir=None):
    """A collective that fails because a peer died or cannot be reached
    (TensorFlow's heartbeats notice within seconds) as one message.

    `trainer`: the `Trainer`, or a callable returning it (None while it is
    being built); `starting`: the workers are still building the model,
    restoring and starting their input, before the first step.
    """
    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.AbortedError,
            tf.errors.DeadlineExceededError) as error:
        current = trainer() if callable(trainer) else trainer
        if current is not None:
            num_workers, chief = current.num_workers, current.is_chief
            directory = current.model_dir
        else:
            num_workers = len(cluster.tf_config_workers())
            chief = cluster.is_chief_task()
            directory = model_dir
        if num_workers <= 1:
            raise
        latest = tf.train.latest_checkpoint(str(directory)) if (
            directory is not None) else None
        kept = (
            f"the checkpoints in {directory} are intact (latest: {latest}; "
            "the steps after it are lost)" if latest and chief
            else "the chief's checkpoints are intact"
        )
        if starting:
            when = "while starting"
            if current is not None:
                when += f", before step {int(current.step.numpy()) + 1}"
        else:
            when = f"at step {int(current.step.numpy()) + 1}"
        raise WorkerLostError(
            f"Lost contact with another worker {when} "
            f"({_peer_error(error)}); {kept}. Start every worker again with "
            "the same command and TF_CONFIG to resume from the latest "
            "checkpoint."
        ) from None


def _forget_frames(error):
    """Clears the locals of the finished frames an exception's traceback
    (and those of its context and cause) keeps alive.

    A traceback holds the frames of `run_loop` and of the iterator's
    `__next__`, and so the input iterator. Left to the interpreter's
    shutdown (train.py exits with the error in hand), the iterator is
    destroyed only then: its destructor waits for the pipeline's threads,
    and a thread inside a `tf.py_function` (the RecordIO reader) can no
    longer take the GIL of a finalising interpreter, so the process never
    exits. Dropped here, it is destroyed while those threads can finish.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__


def _start_line(config, trainer, restored, source, total_steps,
                workers=None):
    model = config.model
    ring_text = ""
    if model.lambda_ring:
        ring_text = f"RingLoss(λ={model.lambda_ring}) → "
    if model.center_loss_weight:
        ring_text += f"CenterLoss(λ={model.center_loss_weight}) → "
    head_text = model.head
    if model.head_sharding:
        head_text += f" sharded over {trainer.num_replicas} replica(s)"
        if model.head_sample_rate < 1:
            head_text += f", {model.head_sample_rate:g} of the negatives"
    if model.margin_warmup_steps and registry.head(model.head).has_margin:
        head_text += f" (margin from step {model.margin_warmup_steps + 1})"
    if model.embedding_block != "fc":
        head_text += f", embedding block {model.embedding_block}"
    start = int(trainer.step.numpy())
    return (
        f"{'Resuming from ' + restored if restored else 'Training'}: "
        f"{model.backbone} → {ring_text}{head_text}, "
        f"{model.num_classes} classes, {source.num_examples} images, "
        f"batch {config.optim.batch_size} on {trainer.num_replicas} "
        f"replica(s), steps {start}→{total_steps}, jit={config.run.jit}, "
        f"mixed_precision={trainer.mixed_precision or 'off'}"
        + (f", cluster {workers.describe()}"
           if workers is not None and workers.num_workers > 1 else "")
    )


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a training run ends with.

    Attributes:
        step: the step training stopped after.
        last: the statistics of the last step (loss, cross-entropy, ring
            term, R, mean norm, ...), or None if no step ran.
        trainer: the `Trainer`, with the trained models.
        config: the resolved `TrainConfig` saved as config.json.
        export_dir: where the SavedModel was written (the chief, at the
            end of a run with `export`), else None.
        verification: the final verification on unseen identities (a
            `metrics.VerificationResult`), else None.
        table: that verification as the printed markdown table, else None.
    """

    step: int
    last: dict | None
    trainer: object
    config: object
    export_dir: str | None = None
    verification: object = None
    table: str | None = None


def train(
    config: config_lib.TrainConfig,
    *,
    devices=None,
    stop_on_signals=False,
    print_fn=print,
):
    """Trains, checkpoints, exports and evaluates, as `config` says.

    Rerunning with the same `model_dir` resumes from its latest checkpoint
    (the same weights as an uninterrupted run); different settings of the
    model or the optimisation are an error. Under `run.cluster` (default
    auto) each task of an srun step becomes one worker: this process's
    TF_CONFIG is set from SLURM's variables (`cluster.use`).

    Args:
        config: the run's `TrainConfig` (train.py's flags, one field each).
            With `data_dir` None it trains on the embedded character set
            (`kanji.prepare`, generated on first use); else `data_dir` holds
            train/ (one folder per identity), train.rec or TFRecord
            shards (`ring_loss_tf.data.sources.FORMATS`) and optionally
            test/ + pairs.txt (LFW layout) for the final table.
        devices: device list of `trainer.build_strategy`; default one
            logical CPU device per `cpu_replicas`, else every GPU, else the
            CPU.
        stop_on_signals: while training, SIGINT / SIGTERM stop after the
            current step with a checkpoint (`trainer.StopOnSignals`) and
            raise `TrainingInterrupted`; while a worker waits for the
            others to start, they raise `StartupInterrupted`. Needs the
            main thread.
        print_fn: where progress lines go.

    Returns:
        A `TrainResult`.

    Raises:
        ConfigError: a bad setting (names it and the fix).
        NonFiniteLossError: the loss became NaN/Inf (the last checkpoint is
            kept).
        TrainingInterrupted: a signal stopped training (`stop_on_signals`);
            the current step was checkpointed.
        StartupInterrupted: a signal came while this worker waited for the
            others to start (`stop_on_signals`); nothing was written.
        CheckpointWriteError: a checkpoint could not be written; the
            earlier ones are intact.
        TrainingDataError: a training image could not be decoded, or a
            RecordIO record read or its label is bad (names the record).
        WorkerLostError: a worker was lost, during start-up or training;
            `WorkerMissingError` if one did not start within
            `startup_timeout`.
        ValueError: `model_dir` holds a checkpoint of another run.
    """
    config_lib.check(config)
    run = config.run
    # The strategy, the chief test and the workers' input all read
    # TF_CONFIG: a SLURM step is turned into it here, once.
    workers = cluster.detect(run.cluster)
    cluster.use(workers)
    if devices is None and run.cpu_replicas is not None and not (
        tf.config.list_physical_devices("GPU")
    ):
        devices = [f"/cpu:{i}" for i in range(run.cpu_replicas)]
    # The data first: generating the embedded set forks worker processes,
    # and a fork after MultiWorkerMirroredStrategy has started its gRPC
    # threads hangs the children.
    root, source = _training_data(config, cluster.is_chief_task())
    if devices is None:
        # The strategy's start-up cannot be interrupted: the workers meet
        # before it (rendezvous module docstring).
        rendezvous.wait_for_peers(
            run.startup_timeout, model_dir=run.model_dir,
            stop_on_signals=stop_on_signals, print_fn=print_fn,
        )
    with rendezvous.strategy_deadline(run.startup_timeout,
                                      model_dir=run.model_dir):
        strategy = distribution.build_strategy(devices, run.collectives)
    config_lib.check_replicas(
        config.optim.batch_size, strategy.num_replicas_in_sync
    )
    chief = distribution.is_chief(strategy)
    config = config_lib.resolve(config, num_classes=source.num_classes)
    if run.jit is None:
        backbone = registry.backbone(config.model.backbone)
        config = config_lib.replace(
            config,
            jit=distribution.jit_by_default(strategy, backbone.xla_on_cpu),
        )
    if config.optim.batch_size > source.num_examples:
        n = source.num_examples
        raise config_lib.ConfigError(
            "batch_size", config.optim.batch_size,
            f"larger than the training set ({n} images)",
            f"use a batch of at most {n}",
        )
    total_steps = config_lib.steps_of(config, source.num_examples)
    write_config = chief and check_resume_config(config, save=False)
    trainer = None
    data_config = config.data

    def worker_pipeline(input_context):
        return pipeline.training_dataset(
            source,
            batch_size=config.optim.batch_size,
            image_size=data_config.image_size,
            channels=data_config.channels,
            augment=data_config.augment,
            seed=run.seed,
            input_context=input_context,
            start_step=start_step,
            max_pixels=data_config.max_image_pixels,
        )

    # Building the model and restoring hold collectives too (variables are
    # broadcast from the chief, the workers compare their steps).
    with _lost_workers(lambda: trainer, starting=True,
                       model_dir=run.model_dir):
        trainer = _build_trainer(config, strategy, total_steps)
        restored = trainer.attach_checkpoint(
            max_to_keep=run.max_to_keep, scratch_dir=run.worker_scratch_dir,
        )
        start_step = int(trainer.step.numpy())
        try:
            iterator = iter(trainer.distribute_dataset(worker_pipeline))
        except tf.errors.InvalidArgumentError as error:  # in-memory decoding
            raise data_error(error, trainer) from None
    if write_config:  # the run starts: its settings go beside it
        config_lib.save(config, run.model_dir)
    if chief:
        print_fn(_start_line(config, trainer, restored, source, total_steps,
                             workers))
    elif workers.num_workers > 1:
        print_fn(f"Worker {workers.index} of {workers.num_workers} "
                 f"({workers.source}) started at step {start_step}; worker 0 "
                 "reports progress and writes the checkpoints.")
    writer = None
    if chief:
        writer = tf.summary.create_file_writer(
            str(pathlib.Path(run.model_dir) / "train")
        )
    stopper = (
        signals.StopOnSignals(print_fn=print_fn) if stop_on_signals
        else None
    )
    try:
        with stopper or contextlib.nullcontext(), _lost_workers(trainer):
            last = run_loop(
                trainer,
                iterator,
                total_steps,
                checkpoint_every=run.checkpoint_every,
                log_every=run.log_every,
                stop_at_step=run.stop_at_step,
                print_fn=print_fn,
                summary_writer=writer,
                stop_requested=stopper,
                steps_per_loop=run.steps_per_loop,
            )
    except BaseException as error:
        _forget_frames(error)
        raise
    finally:
        # The input pipeline goes first, while its threads can still run
        # (`_forget_frames`); the collection also breaks its cycles.
        iterator = None
        gc.collect()
        trainer.close()
        if writer is not None:
            writer.close()
    step = int(trainer.step.numpy())
    result = TrainResult(step=step, last=last, trainer=trainer, config=config)
    if step < total_steps or not chief:
        return result
    embedding_model = trainer.models.embedding_model
    if run.export:
        export_dir = export_lib.export_saved_model(
            embedding_model,
            pathlib.Path(run.model_dir) / EXPORT_DIR,
            overwrite=True,
        )
        result = dataclasses.replace(result, export_dir=export_dir)
        print_fn(f"Exported the embedding model to {export_dir}")
    pairs_path = root / "pairs.txt"
    if run.evaluate and pairs_path.is_file() and (root / "test").is_dir():
        verification = protocols.verify_pairs(
            embedding_model, pairs_path, root / "test"
        )
        table = report.format_verification(
            verification, f"Verification on unseen identities ({pairs_path})"
        )
        result = dataclasses.replace(
            result, verification=verification, table=table
        )
        print_fn(table)
    return result
