"""Tests of ring_loss_tf.training.trainer: the distributed step.

References: a one-device run on the same global batch (for two replicas and
two worker processes), a plain `tf.GradientTape` step written out by hand
(for the loss scaling and weight decay), closed forms (learning rate). Every
distributed test builds its own strategy with its own model: TensorFlow 2.21
can fail a collective ("Shape mismatch in the collective instance") when two
strategies share a model.
"""

import json
import math
import os
import shutil
import pathlib
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from ring_loss_tf import config as config_lib
from ring_loss_tf.data import pipeline
from ring_loss_tf.training import trainer as trainer_lib
from ring_loss_tf.training import checkpoints
from ring_loss_tf.training import distribution
from ring_loss_tf.training import schedules
from tests.data_files import pack
from tests.data_files import write_record
from tests.tiny_runs import GLOBAL_BATCH
from tests.tiny_runs import assert_same_state
from tests.tiny_runs import batches
from tests.tiny_runs import checkpoint_state
from tests.tiny_runs import model_fn
from tests.tiny_runs import state
from tests.tiny_runs import tiny_train
from tests.tiny_runs import trainer_run
from tests.worker_processes import start_workers

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "head, lambda_ring", [("softmax", 0.01), ("asoftmax", 0.01)]
)
def test_two_replicas_equal_one_device(head, lambda_ring):
    one = trainer_run(["/cpu:0"], head, lambda_ring)
    two = trainer_run(["/cpu:0", "/cpu:1"], head, lambda_ring)
    assert two.num_replicas == 2
    a, b = state(one), state(two)
    assert_same_state(one.initial_state, two.initial_state, atol=0)
    assert_same_state(a, b)
    # The steps changed every trainable weight (the test is not vacuous).
    for v in one.models.train_model.trainable_variables:
        assert np.abs(a[v.path] - one.initial_state[v.path]).max() > 1e-6
    radius_key = next(k for k in a if k.endswith("radius"))
    assert abs(a[radius_key] - one.radius()) < 1e-6
    if head == "asoftmax":
        assert two.models.head.iterations.numpy() == 3
        assert one.head_lambda() == pytest.approx(
            max(5.0, 10.0 / (1 + 0.12 * 3))
        )


def test_step_matches_hand_written_gradient_step():
    """One step = SGD on mean CE + ring loss + wd/2·Σ‖kernel‖² (by hand)."""
    lr, wd = 0.1, 5e-3
    trainer = trainer_lib.Trainer(
        distribution.build_strategy(["/cpu:0"]),
        model_fn("softmax", 0.05),
        global_batch_size=GLOBAL_BATCH,
        learning_rate=lr,
        momentum=0.0,
        weight_decay=wd,
        jit=False,
    )
    ((images, labels),) = batches(1, seed=5)
    trainer.initialize_radius(images)
    before = state(trainer)

    reference = model_fn("softmax", 0.05)()
    reference.train_model.set_weights(
        trainer.models.train_model.get_weights()
    )
    reference.ring.initialize_radius(reference.embedding_model(images))
    variables = reference.train_model.trainable_variables
    with tf.GradientTape() as tape:
        logits, _ = reference.train_model([images, labels], training=True)
        ce = tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
        )
        loss = ce + tf.add_n(reference.train_model.losses)
    grads = tape.gradient(loss, variables)
    expected = {}
    for v, g in zip(variables, grads):
        g = g.numpy().astype(np.float64)
        name = v.path.rsplit("/", 1)[-1]
        layer = v.path.split("/")[-2]
        if name == "kernel":
            g = g + wd * before[v.path]
        else:
            assert name in ("bias", "alpha", "radius"), v.path
            assert "prelu" in layer or name != "alpha"
        expected[v.path] = before[v.path] - lr * g
    stats, _ = trainer.train_step(images, labels)
    after = state(trainer)
    for key, value in expected.items():
        np.testing.assert_allclose(after[key], value, atol=1e-6, err_msg=key)
    assert stats["cross_entropy"] == pytest.approx(float(ce), rel=1e-5)


@pytest.mark.parametrize("schedule", ["cosine", "step", "constant"])
def test_learning_rate_schedule_closed_form(schedule):
    total, warmup, base = 28, 4, 0.1
    lr = schedules.LearningRate(base, total, schedule, warmup_steps=warmup)
    for t in range(0, 35):
        if schedule == "cosine":
            decay = 0.5 * (1 + math.cos(math.pi * min(t / total, 1)))
        elif schedule == "step":
            decay = 0.1 ** ((t >= 16) + (t >= 24))
        else:
            decay = 1.0
        expected = base * decay * min(1.0, (t + 1) / warmup)
        assert float(lr(t)) == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_batch_not_divisible_by_the_replicas_is_a_config_error():
    from ring_loss_tf.errors import ConfigError

    with pytest.raises(ConfigError, match=r"batch_size=7: not divisible by "
                       r"the 2 replicas; use a multiple of 2, e.g. 6"):
        trainer_lib.Trainer(
            distribution.build_strategy(["/cpu:0", "/cpu:1"]), model_fn(),
            global_batch_size=7,
        )


def test_xla_is_on_by_default_on_gpus_and_on_cpus_without_onednn():
    cpus = distribution.build_strategy(["/cpu:0", "/cpu:1"])
    onednn = distribution.onednn_kernels_enabled()
    assert onednn is not None  # TensorFlow 2.21 answers
    assert distribution.jit_by_default(cpus) is (not onednn)
    assert trainer_lib.Trainer(cpus, model_fn(),
                               global_batch_size=4).jit is (not onednn)
    # What a MirroredStrategy over two GPUs names its devices.
    gpus = type("Strategy", (), {"extended": type("Extended", (), {
        "worker_devices": ("/job:localhost/replica:0/task:0/device:GPU:0",
                           "/job:localhost/replica:0/task:0/device:GPU:1"),
    })})
    assert distribution.jit_by_default(gpus)
    assert distribution.jit_by_default(gpus, xla_on_cpu=False)
    assert not distribution.jit_by_default(cpus, xla_on_cpu=False)
    assert trainer_lib.Trainer(cpus, model_fn(), global_batch_size=4,
                               jit=True).jit


@pytest.mark.parametrize("onednn", ["0", "1"])
def test_cpu_jit_default_follows_tensorflows_onednn_switch(onednn):
    """AVX2-only CPUs get TensorFlow's Eigen kernels (oneDNN off), AVX-512
    VNNI / AMX ones oneDNN's: TF_ENABLE_ONEDNN_OPTS sets either on any x86
    CPU, so both kinds of CPU are checked on whichever runs the test."""
    code = textwrap.dedent("""
        from ring_loss_tf.training import distribution
        strategy = distribution.build_strategy(["/cpu:0"])
        print(distribution.onednn_kernels_enabled(),
              distribution.jit_by_default(strategy))
    """)
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": onednn,
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO,
                         capture_output=True, text=True, check=True)
    enabled, jit = out.stdout.split()[-2:]
    assert enabled == ("True" if onednn == "1" else "False")
    assert jit == ("False" if onednn == "1" else "True")


def test_mixed_bfloat16_step_is_close_to_float32():
    """mixed_bfloat16 (the CPU policy): bf16 compute, float32 weights and R."""
    ((images, labels),) = batches(1, seed=2)

    def first_step(policy):
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(policy)
        try:
            trainer = trainer_lib.Trainer(
                distribution.build_strategy(["/cpu:0"]),
                model_fn("softmax", 0.01),
                global_batch_size=GLOBAL_BATCH,
                learning_rate=0.05,
                jit=False,
                mixed_precision=None if policy == "float32" else policy,
            )
        finally:
            keras.config.set_dtype_policy(previous)
        trainer.initialize_radius(images)
        stats, _ = trainer.train_step(images, labels)
        return trainer, stats

    mixed, mixed_stats = first_step("mixed_bfloat16")
    full, full_stats = first_step("float32")
    conv = mixed.models.embedding_model.get_layer("conv1_1")
    assert conv.compute_dtype == "bfloat16" and conv.kernel.dtype == "float32"
    assert mixed.models.ring.radius.dtype == "float32"
    assert not mixed.loss_scaling  # bfloat16 needs no loss scaling
    for key in ("cross_entropy", "ring_loss", "feature_norm"):
        assert mixed_stats[key] == pytest.approx(full_stats[key], rel=3e-2)
    assert mixed.radius() == pytest.approx(full.radius(), rel=1e-2)


# --------------------------------------------------------------------------
# Two MultiWorkerMirroredStrategy worker processes vs one process

_WORKER = textwrap.dedent(
    """
    import sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    sys.path.insert(0, sys.argv[2])
    import tiny_runs
    trainer = tiny_runs.trainer_run(None, sys.argv[3], 0.01)
    assert trainer.num_replicas == 2, trainer.num_replicas
    if trainer.is_chief:
        np.savez(sys.argv[4], **{k.replace("/", "|"): v
                                 for k, v in tiny_runs.state(trainer).items()})
    """
)


_RESTORING_WORKER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    sys.path.insert(0, sys.argv[2])
    import tiny_runs
    from ring_loss_tf.training import distribution
    from ring_loss_tf.training import trainer as trainer_lib
    from ring_loss_tf.errors import WorkersDisagreeError
    trainer = trainer_lib.Trainer(
        distribution.build_strategy(None), tiny_runs.model_fn(),
        global_batch_size=tiny_runs.GLOBAL_BATCH, learning_rate=0.05,
        model_dir=sys.argv[3], jit=False,
    )
    try:
        trainer.attach_checkpoint(scratch_dir=sys.argv[4])
    except WorkersDisagreeError as error:
        print("REFUSED", error)
        sys.exit(3)
    print("AGREED", int(trainer.step.numpy()))
    """
)


def test_workers_that_restore_different_steps_stop(tmp_path):
    """The chief restores step 2, the other worker (another model_dir)
    nothing: both stop with the message, neither trains."""
    saved = trainer_lib.Trainer(
        distribution.build_strategy(["/cpu:0"]), model_fn(),
        global_batch_size=GLOBAL_BATCH, learning_rate=0.05,
        model_dir=tmp_path / "chief", jit=False,
    )
    saved.attach_checkpoint()
    for step, (images, labels) in enumerate(batches(2)):
        if step == 0:
            saved.initialize_radius(images)
        saved.train_step(images, labels)
    saved.save()
    (tmp_path / "other").mkdir()
    (tmp_path / "scratch").mkdir()
    results = start_workers(tmp_path, _RESTORING_WORKER, [
        [str(tmp_path / "chief"), str(tmp_path / "scratch")],
        [str(tmp_path / "other"), str(tmp_path / "scratch")],
    ])
    for code, output in results:
        assert code == 3, output[-3000:]
        assert "The workers restored different steps" in output
        assert "mean over the replicas: 1" in output
    assert "this one: step 2 from" in results[0][1]
    assert "this one: step 0 from no checkpoint" in results[1][1]
    # The non-chief's scratch directory was made where it was told.
    assert [p.name.startswith("ring_loss_tf-worker-")
            for p in (tmp_path / "scratch").iterdir()] == [True]


def test_two_worker_processes_equal_one_process(tmp_path):
    head = "asoftmax"
    out = tmp_path / "chief.npz"
    results = start_workers(tmp_path, _WORKER, [[head, str(out)]] * 2)
    for code, output in results:
        assert code == 0, output[-3000:]
    multi = {k.replace("|", "/"): v for k, v in np.load(out).items()}
    single = state(trainer_run(["/cpu:0"], head, 0.01))
    assert_same_state(single, multi)


def test_unfinished_checkpoints_of_a_killed_run_are_removed(tmp_path):
    """What a kill during a save leaves (ckpt-N_temp/, a partial
    ckpt-N.index newer than the index names) goes; complete ones stay."""
    step = tf.Variable(0)
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(step=step), str(tmp_path), max_to_keep=3
    )
    for _ in range(2):
        step.assign_add(1)
        manager.save(checkpoint_number=int(step.numpy()))
    shutil.copy(tmp_path / "ckpt-2.data-00000-of-00001",
                tmp_path / "ckpt-3.data-00000-of-00001")
    (tmp_path / "ckpt-3.index").write_bytes(b"\x00" * 7)  # a cut merge
    (tmp_path / "ckpt-4_temp").mkdir()
    (tmp_path / "ckpt-4_temp" / "part-00000-of-00001.index").write_bytes(b"")
    removed = checkpoints.remove_unfinished_checkpoints(tmp_path)
    assert sorted(removed) == ["ckpt-3.data-00000-of-00001", "ckpt-3.index",
                               "ckpt-4_temp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint", "ckpt-1.data-00000-of-00001", "ckpt-1.index",
        "ckpt-2.data-00000-of-00001", "ckpt-2.index",
    ]
    reader = tf.train.load_checkpoint(str(tmp_path / "ckpt-2"))
    assert reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE") == 2
    # Without a `checkpoint` index nothing but temporary directories goes.
    (tmp_path / "checkpoint").unlink()
    (tmp_path / "ckpt-5_temp").mkdir()
    assert checkpoints.remove_unfinished_checkpoints(tmp_path) == [
        "ckpt-5_temp"
    ]
    assert (tmp_path / "ckpt-2.index").is_file()


# --------------------------------------------------------------------------
# Two workers training from RecordIO: each decodes only its half

_TRAINING_WORKER = textwrap.dedent(
    """
    import json, os, signal, sys
    sys.path.insert(0, sys.argv[1])
    from ring_loss_tf import config as config_lib
    from ring_loss_tf.data import recordio
    from ring_loss_tf.training import trainer as trainer_lib
    from ring_loss_tf.training import loop
    from ring_loss_tf.errors import TrainingInterrupted
    config_path, model_dir, report, sigterm_after = sys.argv[3:7]
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    reads = []
    read_image = recordio.RecordIOReader.read_image

    def logged(self, key):
        reads.append(int(key))
        return read_image(self, key)

    recordio.RecordIOReader.read_image = logged
    image_records = recordio.image_records

    def opened(reader):  # its look at record 0 is not decoding
        result = image_records(reader)
        reads.clear()
        return result

    recordio.image_records = opened
    train_step = trainer_lib.Trainer.train_step

    def step_then_maybe_stop(self, images, labels):
        result = train_step(self, images, labels)
        if index == 1 and int(self.step.numpy()) == int(sigterm_after):
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    trainer_lib.Trainer.train_step = step_then_maybe_stop
    config = config_lib.replace(
        config_lib.from_dict(json.loads(open(config_path).read())),
        model_dir=model_dir,
    )
    outcome = "finished"
    try:
        result = loop.train(config, stop_on_signals=True)
        step = result.step
    except TrainingInterrupted as stop:
        outcome, step = "interrupted", stop.step
    with open(report, "w") as file:
        json.dump({"reads": reads, "step": step, "outcome": outcome}, file)
    """
)


def _random_rec(directory, num_records, num_classes, size=16):
    """insightface-style train.rec + train.idx of random grey PNGs (no
    header record: the labels give the class count)."""
    from PIL import Image
    import io

    rng = np.random.default_rng(4)
    directory.mkdir(parents=True)
    offsets = []
    with open(directory / "train.rec", "wb") as file:
        for key in range(num_records):
            buffer = io.BytesIO()
            Image.fromarray(
                rng.integers(0, 256, (size, size), dtype=np.uint8)
            ).save(buffer, "PNG")
            offsets.append(file.tell())
            write_record(file, pack(float(key % num_classes),
                                    buffer.getvalue()))
    with open(directory / "train.idx", "w") as file:
        for key, offset in enumerate(offsets):
            file.write(f"{key}\t{offset}\n")
    return directory


@pytest.fixture(scope="module")
def rec_run(tmp_path_factory):
    """A 6-step A-Softmax + Ring loss run on 400 RecordIO images, and its
    one-process result (the reference of the two-worker runs)."""
    root = tmp_path_factory.mktemp("rec_run")
    data_dir = _random_rec(root / "data", 400, 10)
    config = config_lib.make(
        data_dir=str(data_dir), image_size=(16, 16), channels=1,
        augment="face", backbone="small_cnn", embedding_dim=12,
        head="asoftmax", lambda_ring=0.01, lambda_base=10.0,
        margin_warmup_steps=0, steps=6, batch_size=8, lr=0.05,
        warmup_steps=2, checkpoint_every=3, log_every=1, evaluate=False,
        export=False, jit=False, seed=1,
    )
    config_path = root / "config.json"
    config_path.write_text(json.dumps(config_lib.to_dict(config)))
    tiny_train(root / "one", config, print_fn=lambda *_: None)
    return config, config_path, checkpoint_state(root / "one")


def _train_two_workers(tmp_path, config_path, model_dir, sigterm_after=0):
    reports = [tmp_path / f"report{i}.json" for i in range(2)]
    results = start_workers(tmp_path, _TRAINING_WORKER, [
        [str(config_path), str(model_dir), str(r), str(sigterm_after)]
        for r in reports
    ])
    for code, output in results:
        assert code == 0, output[-3000:]
    return [json.loads(r.read_text()) for r in reports]


def _keys_of_rows(config, rows_of_step, steps):
    """The record keys at the given rows of global batches 0 .. steps-1."""
    source = pipeline.open_training_source(config.data.data_dir)
    batch = config.optim.batch_size
    positions = [s * batch + r for s in range(steps) for r in rows_of_step]
    index = pipeline.shuffled_index(
        tf.constant(positions, tf.int64), config.run.seed,
        source.num_examples,
    ).numpy()
    return {int(source.keys[i]) for i in index}


def test_two_workers_decode_only_their_half_and_equal_one_process(
    tmp_path, rec_run
):
    config, config_path, reference = rec_run
    reports = _train_two_workers(tmp_path, config_path, tmp_path / "model")
    assert [r["outcome"] for r in reports] == ["finished"] * 2
    half = config.optim.batch_size // 2
    epoch_steps = 400 // config.optim.batch_size
    for worker, report in enumerate(reports):
        own_rows = range(worker * half, (worker + 1) * half)
        other_rows = range((1 - worker) * half, (2 - worker) * half)
        reads = report["reads"]
        # Every image it trained on, each once, and none of the other
        # worker's rows (over the whole first epoch, past any prefetch).
        assert _keys_of_rows(config, own_rows, 6) <= set(reads)
        assert len(reads) == len(set(reads))
        assert not set(reads) & _keys_of_rows(config, other_rows,
                                               epoch_steps)
    assert_same_state(reference, checkpoint_state(tmp_path / "model"))


def test_a_preempted_worker_stops_both_at_one_step_and_resume_is_exact(
    tmp_path, rec_run
):
    """SIGTERM to the non-chief after its step 2: both workers checkpoint
    step 2 and stop before step 3; started again, they finish equal to one
    process."""
    config, config_path, reference = rec_run
    model_dir = tmp_path / "model"
    first = _train_two_workers(tmp_path, config_path, model_dir,
                               sigterm_after=2)
    assert [(r["outcome"], r["step"]) for r in first] == [
        ("interrupted", 2)] * 2
    assert tf.train.latest_checkpoint(str(model_dir)).endswith("ckpt-2")
    second = _train_two_workers(tmp_path, config_path, model_dir)
    assert [(r["outcome"], r["step"]) for r in second] == [("finished", 6)] * 2
    assert_same_state(reference, checkpoint_state(model_dir))


def test_gradients_all_reduced_in_bfloat16_are_rounded_not_lost():
    """Two replicas summing gradients in bfloat16: close to the float32
    update (within bfloat16's rounding) but not equal to it."""
    full = trainer_run(["/cpu:0", "/cpu:1"], "softmax", 0.01, num_steps=1)
    half = trainer_lib.Trainer(
        distribution.build_strategy(["/cpu:0", "/cpu:1"]),
        model_fn("softmax", 0.01), global_batch_size=GLOBAL_BATCH,
        learning_rate=0.05, momentum=0.9, weight_decay=5e-3,
        all_reduce_dtype="bfloat16",
    )
    images, labels = batches(1)[0]
    half.initialize_radius(images)
    half.train_step(images, labels)
    start = full.initial_state
    a, b = state(full), state(half)
    differs = False
    for v in full.models.train_model.trainable_variables:
        key = v.path
        change_full, change_half = a[key] - start[key], b[key] - start[key]
        scale = np.abs(change_full).max()
        # Each of the two addends and the sum rounded to 8 bits: a few
        # parts in 2^8 of the largest change.
        np.testing.assert_allclose(change_half, change_full, rtol=0,
                                   atol=4 * 2.0**-8 * scale, err_msg=key)
        differs |= not np.array_equal(change_half, change_full)
    assert differs
