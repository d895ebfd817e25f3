"""The sharded head against the replicated one, a float64 reference, and
itself at other shard counts (ring_loss_tf/sharded_head.py)."""

import math
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from ring_loss_tf import config as config_lib
from ring_loss_tf.models import assembly
from ring_loss_tf.models import sharded_head
from ring_loss_tf.training import trainer as trainer_lib
from ring_loss_tf.training import distribution
from ring_loss_tf.errors import ConfigError

from tests import tiny_runs
from tests.worker_processes import start_workers


def devices(n):
    return [f"/cpu:{i}" for i in range(n)]


def make_trainer(n, head, lambda_ring, sharded, batch_size, rate=1.0,
                 model_dir=None, num_classes=tiny_runs.NUM_CLASSES):
    config = config_lib.replace(
        tiny_runs.model_config(head, lambda_ring),
        head_sharding=sharded, head_sample_rate=rate,
        num_classes=num_classes,
    )
    return trainer_lib.Trainer(
        distribution.build_strategy(devices(n)),
        lambda: assembly.build_models(config),
        global_batch_size=batch_size,
        learning_rate=0.05,
        momentum=0.9,
        weight_decay=5e-3,
        jit=False,
        model_dir=model_dir,
    )


def train(trainer, batches):
    stats = []
    for images, labels in batches:
        # As training.train does: R from the first batch, or restored.
        if not getattr(trainer, "radius_set", False):
            trainer.initialize_radius(images)
            trainer.radius_set = True
        stats.append(trainer.train_step(images, labels)[0])
    return stats


def kernel(trainer):
    head = trainer.models.head
    if isinstance(head, sharded_head.ShardedHead):
        return head.kernel()
    return head.kernel.numpy()


def assert_close(a, b, what):
    scale = 1.0 + np.abs(a).max()
    np.testing.assert_allclose(a, b, atol=1e-5 * scale, rtol=0, err_msg=what)


# --------------------------------------------------------------------------
# Shards, the initial centres and the sampled columns
# --------------------------------------------------------------------------


def test_shards_cover_the_classes_once():
    for classes, shards in ((7, 2), (10, 4), (5, 5), (100003, 8)):
        bounds = sharded_head.shard_bounds(classes, shards)
        assert bounds[0][0] == 0 and bounds[-1][1] == classes
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        widths = [stop - start for start, stop in bounds]
        assert max(widths) - min(widths) <= 1


def test_initial_centres_do_not_depend_on_the_sharding():
    dim, classes = 4, 3 * sharded_head.INIT_BLOCK + 5
    whole = sharded_head.initial_columns(dim, classes, 0, classes, seed=1)
    limit = math.sqrt(6 / (dim + classes))
    assert whole.shape == (dim, classes) and np.abs(whole).max() <= limit
    assert np.abs(whole).max() > 0.9 * limit  # uniform, not a narrower law
    for start, stop in sharded_head.shard_bounds(classes, 3):
        np.testing.assert_array_equal(
            sharded_head.initial_columns(dim, classes, start, stop, seed=1),
            whole[:, start:stop],
        )
    other = sharded_head.initial_columns(dim, classes, 0, classes, seed=2)
    assert not np.array_equal(whole, other)


def kept_classes(labels, classes, shards, rate, step, seed=5):
    kept = []
    for start, stop in sharded_head.shard_bounds(classes, shards):
        columns = sharded_head.kept_columns(
            tf.constant(labels), start, stop, classes, rate, seed, step
        )
        kept.append(columns.numpy() + start)
    return np.concatenate(kept)


def test_sampling_keeps_the_positives_and_ignores_the_shard_count():
    classes, rate = 4000, 0.1
    labels = np.array([0, 17, 17, 1999, 3999], np.int32)
    one = kept_classes(labels, classes, 1, rate, step=3)
    for shards in (2, 3, 8):
        np.testing.assert_array_equal(
            kept_classes(labels, classes, shards, rate, step=3), one
        )
    assert set(labels) <= set(one)
    negatives = len(one) - len(set(labels) & set(one))
    # Binomial(3995, 0.1): mean 399.5, sd 19; 5 sd either side.
    assert abs(negatives - rate * (classes - 5)) < 5 * 19
    assert not np.array_equal(one, kept_classes(labels, classes, 1, rate, 4))
    np.testing.assert_array_equal(
        kept_classes(labels, 50, 2, 1.0, step=3), np.arange(50)
    )


# --------------------------------------------------------------------------
# r = 1: the replicated head's step, on 2 and 4 replicas
# --------------------------------------------------------------------------


CASES = [
    (replicas, head, ring)
    for replicas in (2, 4)
    for head in ("asoftmax", "cosface", "arcface")
    for ring in (0.0, 0.01)
]


@pytest.mark.parametrize("replicas,head,lambda_ring", CASES)
def test_sharded_step_is_the_replicated_step(replicas, head, lambda_ring):
    """Same loss, and the same weights after one step (so the same
    gradients: the first SGD step moves each weight by −lr·g) and after a
    second (momentum, the margin count)."""
    batch = 4 * replicas
    batches = tiny_runs.batches(2, batch_size=batch)
    replicated = make_trainer(replicas, head, lambda_ring, False, batch)
    sharded = make_trainer(replicas, head, lambda_ring, True, batch)
    sharded.models.head.assign_kernel(kernel(replicated))
    assert sharded.models.head.num_shards == replicas
    before = tiny_runs.state(replicated)
    for step, (images, labels) in enumerate(batches):
        a = train(replicated, [(images, labels)])[0]
        b = train(sharded, [(images, labels)])[0]
        for name in a:
            assert b[name] == pytest.approx(a[name], rel=1e-5, abs=1e-6), (
                step, name)
        state_a = tiny_runs.state(replicated)
        state_b = tiny_runs.state(sharded)
        # The replicated model also holds the head's kernel and count.
        assert set(state_a) - set(state_b) == {
            v.path for v in replicated.models.head.weights}
        for name in state_b:
            assert_close(state_a[name], state_b[name], f"{step} {name}")
        assert_close(kernel(replicated), kernel(sharded), f"{step} kernel")
    moved = [k for k in before if not np.array_equal(before[k], state_a[k])]
    assert len(moved) > len(before) // 2
    if replicated.models.head.counts_steps:  # A-Softmax's λ
        assert int(np.asarray(replicated.models.head.iterations)) == 2
        assert int(sharded.models.head.iterations.numpy()) == 2


def combined_margin(cos, norms, labels, scale=64.0, margin=0.3, m3=0.2):
    """insightface's combined margin: s·(cos(θ_y + m) − m3) on the target
    (docs, "Extending": a margin head is this function and one registry
    line)."""
    from keras import ops

    from ring_loss_tf.layers import heads

    mask = heads.target_mask(labels, ops.shape(cos)[-1])
    target = ops.cos(ops.arccos(ops.clip(cos, -1 + 1e-7, 1 - 1e-7)) + margin)
    return scale * (cos + mask * (target - m3 - cos))


def test_a_registered_margin_head_trains_replicated_and_sharded(monkeypatch):
    """A margin head added as the docs show trains with and without
    `head_sharding`, and both give the same step."""
    from ring_loss_tf import registry
    from ring_loss_tf.layers import heads

    monkeypatch.setitem(registry.HEADS, "combined", registry.Head(
        margin_function=combined_margin,
        margin_arguments={"scale": 32.0, "margin": 0.3},
    ))
    # Building the head registers its margin under the head's name; undone
    # after the test.
    monkeypatch.setitem(heads.MARGINS, "combined", None)
    config_lib.check(config_lib.make(head="combined", head_sharding=True))
    batch = 8
    images, labels = tiny_runs.batches(1, batch_size=batch)[0]
    replicated = make_trainer(2, "combined", 0.01, False, batch)
    sharded = make_trainer(2, "combined", 0.01, True, batch)
    sharded.models.head.assign_kernel(kernel(replicated))
    head = replicated.models.head
    assert head.margin_function == "combined"
    assert head.margin_arguments == {"scale": 32.0, "margin": 0.3}
    # The logits against the formula in float64.
    _, features = replicated.models.train_model(
        [images, labels], training=False)
    x = features.numpy().astype(np.float64)
    w = kernel(replicated).astype(np.float64)
    cos = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (
        w / np.linalg.norm(w, axis=0, keepdims=True))
    rows = np.arange(batch)
    expected = 32.0 * cos
    target = np.cos(np.arccos(cos[rows, labels.numpy()]) + 0.3) - 0.2
    expected[rows, labels.numpy()] = 32.0 * target
    logits = head([features, labels], training=True)
    np.testing.assert_allclose(logits.numpy(), expected, atol=1e-3)
    a = train(replicated, [(images, labels)])[0]
    b = train(sharded, [(images, labels)])[0]
    for name in a:
        assert b[name] == pytest.approx(a[name], rel=1e-5, abs=1e-6), name
    assert_close(kernel(replicated), kernel(sharded), "kernel")


# --------------------------------------------------------------------------
# r < 1: the loss on the kept classes, in float64
# --------------------------------------------------------------------------


def cosface_loss(features, labels, weights, scale=64.0, margin=0.35):
    x = features / np.linalg.norm(features, axis=1, keepdims=True)
    w = weights / np.linalg.norm(weights, axis=0, keepdims=True)
    logits = scale * (x @ w)
    rows = np.arange(len(labels))
    logits[rows, labels] -= scale * margin
    top = logits.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return np.mean(lse - logits[rows, labels])


def test_sampled_loss_is_softmax_over_the_kept_classes():
    # Labels are classes 0..6 of 40: the others are negatives to sample.
    classes, rate, batch = 40, 0.4, 8
    trainer = make_trainer(2, "cosface", 0.0, True, batch, rate=rate,
                           num_classes=classes)
    images, labels = tiny_runs.batches(1, seed=4, batch_size=batch)[0]
    head = trainer.models.head
    whole = head.kernel()
    # Each replica's BatchNorm normalises its own 4 rows.
    features = np.concatenate([
        trainer.models.train_model(
            [images[rows], labels[rows]], training=True
        )[0].numpy()
        for rows in (slice(0, 4), slice(4, 8))
    ]).astype(np.float64)
    # The trainer's step draws its columns at step 0.
    kept = kept_classes(labels.numpy(), classes, 1, rate, step=0,
                        seed=head.seed)
    assert 0 < len(set(kept) - set(labels.numpy())) < classes - len(
        set(labels.numpy()))
    position = {c: i for i, c in enumerate(kept)}
    expected = cosface_loss(
        features, np.array([position[c] for c in labels.numpy()]),
        whole[:, kept].astype(np.float64),
    )
    stats = train(trainer, [(images, labels)])[0]
    assert stats["cross_entropy"] == pytest.approx(expected, rel=1e-5)
    # A class of no row and not drawn does not move (no gradient, and its
    # decay waits for a step that keeps it); the kept ones do.
    left_out = sorted(set(range(classes)) - set(kept))
    after = head.kernel()
    np.testing.assert_array_equal(after[:, left_out], whole[:, left_out])
    momenta = np.concatenate([m.numpy() for m in head.momenta], axis=1)
    assert not momenta[:, left_out].any() and momenta[:, kept].all()
    assert not np.any(np.all(after[:, kept] == whole[:, kept], axis=0))


# --------------------------------------------------------------------------
# Checkpoints: resuming on another number of replicas re-shards
# --------------------------------------------------------------------------


def test_resume_on_other_replica_count_reshards(tmp_path):
    """A-Softmax on the `fc` embedding has no BatchNorm, so N replicas give
    the one-device step: 2 steps on 2 replicas + 1 on 4 = 3 on 2."""
    batches = tiny_runs.batches(3, batch_size=8)
    straight = make_trainer(2, "asoftmax", 0.01, True, 8)
    train(straight, batches)

    first = make_trainer(2, "asoftmax", 0.01, True, 8, model_dir=tmp_path)
    first.attach_checkpoint()
    train(first, batches[:2])
    first.save()
    saved = first.models.head.kernel()
    assert sharded_head.saved_layout(
        tf.train.latest_checkpoint(str(tmp_path))) == (0, 2, 2)

    second = make_trainer(4, "asoftmax", 0.01, True, 8, model_dir=tmp_path)
    second.attach_checkpoint()
    assert second.models.head.num_shards == 4
    np.testing.assert_array_equal(second.models.head.kernel(), saved)
    assert int(second.models.head.iterations.numpy()) == 2
    assert int(second.step.numpy()) == 2
    train(second, batches[2:])
    assert_close(kernel(straight), kernel(second), "kernel")
    a, b = tiny_runs.state(straight), tiny_runs.state(second)
    for name in a:
        assert_close(a[name], b[name], name)


# --------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------


@pytest.mark.parametrize("settings,setting", [
    ({"head": "softmax", "head_sharding": True}, "head_sharding"),
    ({"head": "arcface", "head_sample_rate": 0.5}, "head_sample_rate"),
    ({"head": "arcface", "head_sharding": True, "head_sample_rate": 0},
     "head_sample_rate"),
    ({"head": "arcface", "head_sharding": True, "optimizer": "adam"},
     "optimizer"),
])
def test_bad_sharding_settings_name_the_flag(settings, setting):
    config = config_lib.make(**settings)
    with pytest.raises(ConfigError) as error:
        config_lib.check(config)
    assert error.value.setting == setting
    assert "\n" not in str(error.value)


def test_more_replicas_than_classes_is_one_line():
    config = config_lib.replace(
        tiny_runs.model_config("arcface"), head_sharding=True, num_classes=3
    )
    with pytest.raises(ValueError, match="Cannot shard 3 classes over 4"):
        trainer_lib.Trainer(
            distribution.build_strategy(devices(4)),
            lambda: assembly.build_models(config),
            global_batch_size=8,
            jit=False,
        )


# --------------------------------------------------------------------------
# Two worker processes: each holds and saves its own shard
# --------------------------------------------------------------------------


_WORKER = textwrap.dedent(
    """
    import sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    sys.path.insert(0, sys.argv[2])
    from tests import tiny_runs
    from ring_loss_tf import config as config_lib
    from ring_loss_tf.models import assembly
    from ring_loss_tf.training import distribution
    from ring_loss_tf.training import trainer as trainer_lib
    config = config_lib.replace(
        tiny_runs.model_config("asoftmax", 0.01), head_sharding=True)
    trainer = trainer_lib.Trainer(
        distribution.build_strategy(None),
        lambda: assembly.build_models(config),
        global_batch_size=8, learning_rate=0.05, momentum=0.9,
        weight_decay=5e-3, jit=False, model_dir=sys.argv[3])
    trainer.attach_checkpoint()
    trainer.initialize_radius(tiny_runs.batches(1)[0][0])
    steps = int(sys.argv[4])
    for images, labels in tiny_runs.batches(steps)[
            int(trainer.step.numpy()):]:
        trainer.train_step(images, labels)
    trainer.save()
    np.savez(sys.argv[5], kernel=trainer.models.head.kernel(),
             **{k.replace("/", "|"): v
                for k, v in tiny_runs.state(trainer).items()})
    """
)


def test_two_workers_hold_and_resume_their_own_shards(tmp_path):
    """Two processes (one replica each) = one process with two replicas;
    each saves its shard (the other worker's in model_dir/worker-1),
    and both resume from their own."""
    model_dir = tmp_path / "run"

    def run_workers(steps):
        outputs = [tmp_path / f"w{i}.npz" for i in range(2)]
        results = start_workers(tmp_path, _WORKER, [
            [str(model_dir), str(steps), str(out)] for out in outputs])
        for code, output in results:
            assert code == 0, output[-3000:]
        return [np.load(out) for out in outputs]

    run_workers(2)
    chief = tf.train.latest_checkpoint(str(model_dir))
    other = tf.train.latest_checkpoint(str(model_dir / "worker-1"))
    assert sharded_head.saved_layout(chief) == (0, 2, 1)
    assert sharded_head.saved_layout(other) == (1, 2, 1)
    first, second = run_workers(3)  # resumes at step 2

    one = make_trainer(2, "asoftmax", 0.01, True, 8)
    train(one, tiny_runs.batches(3))
    np.testing.assert_allclose(
        np.concatenate([first["kernel"], second["kernel"]], axis=1),
        kernel(one), atol=1e-5)
    expected = tiny_runs.state(one)
    for name, value in expected.items():
        assert_close(value, first[name.replace("/", "|")], name)


def test_train_with_sampling_and_steps_per_loop(tmp_path):
    """`training.train` with a sampled sharded head, margin warm-up
    crossing loops: 3 steps per call end where 1 step per call does."""
    base = tiny_runs.tiny_kanji_config(
        tmp_path / "cache", head="arcface", head_sharding=True,
        head_sample_rate=0.5, margin_warmup_steps=2,
    )
    for k in (1, 3):
        tiny_runs.tiny_train(tmp_path / f"k{k}", base, devices=devices(2),
                             steps_per_loop=k, print_fn=lambda *_: None)
    tiny_runs.assert_same_checkpoints(tmp_path / "k1", tmp_path / "k3",
                                      atol=1e-6)
    one = tf.train.load_checkpoint(str(tmp_path / "k1"))
    three = tf.train.load_checkpoint(str(tmp_path / "k3"))
    keys = [k for k in one.get_variable_to_shape_map()
            if k.startswith("head/")]
    assert any("kernels" in k for k in keys)
    for key in keys:
        np.testing.assert_allclose(one.get_tensor(key), three.get_tensor(key),
                                   atol=1e-6, err_msg=key)
