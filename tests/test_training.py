"""Tests of ring_loss_tf.training (and the first export).

References: a one-device run on the same global batch (for two replicas and
two worker processes), a plain `tf.GradientTape` step written out by hand
(for the loss scaling and weight decay), closed forms (learning rate), an
uninterrupted run (for resuming). Every distributed test builds its own
strategy with its own model (design.md §3).
"""

import json
import math
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from ring_loss_tf import layers
from ring_loss_tf import training

REPO = pathlib.Path(__file__).resolve().parents[1]

IMAGE_SIZE = (16, 16)
NUM_CLASSES = 7
GLOBAL_BATCH = 8


def _model_fn(head="softmax", lambda_ring=0.01, seed=3):
    def model_fn():
        return training.build_models(
            num_classes=NUM_CLASSES,
            backbone="small_cnn",
            head=head,
            image_size=IMAGE_SIZE,
            channels=1,
            embedding_dim=12,
            lambda_ring=lambda_ring,
            lambda_base=10.0,
            seed=seed,
        )

    return model_fn


def _batches(num, seed=0):
    rng = np.random.default_rng(seed)
    return [
        (
            tf.constant(
                rng.normal(size=(GLOBAL_BATCH, *IMAGE_SIZE, 1)), tf.float32
            ),
            tf.constant(
                rng.integers(0, NUM_CLASSES, GLOBAL_BATCH), tf.int32
            ),
        )
        for _ in range(num)
    ]


def _run(devices, head, lambda_ring, num_steps=3, jit=True, lr=0.05):
    strategy = training.build_strategy(devices)
    trainer = training.Trainer(
        strategy,
        _model_fn(head, lambda_ring),
        global_batch_size=GLOBAL_BATCH,
        learning_rate=lr,
        momentum=0.9,
        weight_decay=5e-3,
        jit=jit,
    )
    trainer.initial_state = _state(trainer)
    for step, (images, labels) in enumerate(_batches(num_steps)):
        if step == 0:
            trainer.initialize_radius(images)
        trainer.train_step(images, labels)
    return trainer


def _state(trainer):
    """Every weight of the training model, by path, as float64 numpy."""
    return {
        v.path: np.asarray(keras.ops.convert_to_numpy(v), np.float64)
        for v in trainer.models.train_model.weights
    }


def _assert_same_state(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=atol, rtol=0,
                                   err_msg=key)


@pytest.mark.parametrize(
    "head, lambda_ring", [("softmax", 0.01), ("asoftmax", 0.01)]
)
def test_two_replicas_equal_one_device(head, lambda_ring):
    one = _run(["/cpu:0"], head, lambda_ring)
    two = _run(["/cpu:0", "/cpu:1"], head, lambda_ring)
    assert two.num_replicas == 2
    a, b = _state(one), _state(two)
    _assert_same_state(one.initial_state, two.initial_state, atol=0)
    _assert_same_state(a, b)
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
    trainer = training.Trainer(
        training.build_strategy(["/cpu:0"]),
        _model_fn("softmax", 0.05),
        global_batch_size=GLOBAL_BATCH,
        learning_rate=lr,
        momentum=0.0,
        weight_decay=wd,
        jit=False,
    )
    ((images, labels),) = _batches(1, seed=5)
    trainer.initialize_radius(images)
    before = _state(trainer)

    reference = _model_fn("softmax", 0.05)()
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
    after = _state(trainer)
    for key, value in expected.items():
        np.testing.assert_allclose(after[key], value, atol=1e-6, err_msg=key)
    assert stats["cross_entropy"] == pytest.approx(float(ce), rel=1e-5)


def test_weight_decay_only_on_kernels():
    model_fn = _model_fn("centerloss", 0.01)
    models = model_fn()
    decayed = {v.path for v in training.decayed_variables(models.train_model)}
    kernels = {
        v.path
        for v in models.train_model.trainable_variables
        if v.path.endswith("/kernel")
    }
    assert decayed == kernels and decayed
    for layer in models.train_model.layers + models.embedding_model.layers:
        if isinstance(
            layer, (layers.RingLoss, layers.CenterLoss, keras.layers.PReLU)
        ):
            assert not {v.path for v in layer.weights} & decayed
    assert not any(p.endswith(("bias", "radius", "centers", "alpha"))
                   for p in decayed)


@pytest.mark.parametrize("schedule", ["cosine", "step", "constant"])
def test_learning_rate_schedule_closed_form(schedule):
    total, warmup, base = 28, 4, 0.1
    lr = training.LearningRate(base, total, schedule, warmup_steps=warmup)
    for t in range(0, 35):
        if schedule == "cosine":
            decay = 0.5 * (1 + math.cos(math.pi * min(t / total, 1)))
        elif schedule == "step":
            decay = 0.1 ** ((t >= 16) + (t >= 24))
        else:
            decay = 1.0
        expected = base * decay * min(1.0, (t + 1) / warmup)
        assert float(lr(t)) == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_nonfinite_loss_stops_with_message_and_intact_checkpoint(tmp_path):
    trainer = training.Trainer(
        training.build_strategy(["/cpu:0"]),
        _model_fn(),
        global_batch_size=GLOBAL_BATCH,
        learning_rate=0.05,
        model_dir=tmp_path,
        jit=False,
    )
    trainer.attach_checkpoint()
    batches = _batches(4)
    # The third batch carries a NaN: the loss of step 3 is NaN.
    images = batches[2][0].numpy()
    images[0, 0, 0, 0] = np.nan
    batches[2] = (tf.constant(images), batches[2][1])
    lines, states = [], {}

    def log(line):
        lines.append(line)
        states[len(lines)] = _state(trainer)

    with pytest.raises(training.NonFiniteLossError,
                       match=r"step 3: the loss is not finite.*ckpt-2.*"
                       r"intact.*lower lr") as info:
        training.run_loop(trainer, iter(batches), 4, checkpoint_every=2,
                          log_every=1, print_fn=log)
    assert info.value.step == 3
    assert [line.split()[1] for line in lines] == ["1/4", "2/4"]
    assert not all(np.all(np.isfinite(v)) for v in _state(trainer).values())
    # The checkpoint holds the weights after step 2, all finite.
    restored = training.Trainer(
        training.build_strategy(["/cpu:0"]),
        _model_fn(seed=99),
        global_batch_size=GLOBAL_BATCH,
        learning_rate=0.05,
        model_dir=tmp_path,
    )
    assert restored.attach_checkpoint().endswith("ckpt-2")
    assert int(restored.step.numpy()) == 2
    state = _state(restored)
    assert all(np.all(np.isfinite(v)) for v in state.values())
    _assert_same_state(state, states[2], atol=0)


# --------------------------------------------------------------------------
# train(): resume, config, export, table (tiny embedded data set)


@pytest.fixture(scope="module")
def tiny_kanji(tmp_path_factory):
    return dict(
        cache_dir=str(tmp_path_factory.mktemp("kanji")),
        num_train_identities=12,
        num_test_identities=6,
        train_samples_per_identity=6,
        test_samples_per_identity=3,
        image_size=16,
        num_workers=1,
        progress=False,
    )


def _tiny_train(model_dir, kanji, **kwargs):
    arguments = dict(
        model_dir=model_dir,
        kanji_options=kanji,
        steps=6,
        batch_size=8,
        lr=0.05,
        warmup_steps=2,
        checkpoint_every=4,
        log_every=1,
        devices=["/cpu:0"],
        evaluate=False,
        export=False,
        jit=False,
    )
    arguments.update(kwargs)
    return training.train(**arguments)


def _checkpoint_state(model_dir):
    reader = tf.train.load_checkpoint(str(model_dir))
    names = [
        n for n in reader.get_variable_to_shape_map()
        if n.startswith("model/") and "OPTIMIZER" not in n
    ]
    return {n: reader.get_tensor(n) for n in names}


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, tiny_kanji):
    whole = _tiny_train(tmp_path / "whole", tiny_kanji, print_fn=lambda _: 0)
    assert whole["step"] == 6

    def crash_after_step_5(line):
        if line.startswith("step 5/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _tiny_train(tmp_path / "split", tiny_kanji, print_fn=crash_after_step_5)
    # Step 5 was lost with the process; the checkpoint of step 4 survived.
    assert tf.train.latest_checkpoint(str(tmp_path / "split")).endswith("-4")
    lines = []
    resumed = _tiny_train(tmp_path / "split", tiny_kanji, print_fn=lines.append)
    assert lines[0].startswith("Resuming from") and "steps 4→6" in lines[0]
    assert resumed["step"] == 6
    a = _checkpoint_state(tmp_path / "whole")
    b = _checkpoint_state(tmp_path / "split")
    assert a.keys() == b.keys() and any("radius" in k for k in a)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=1e-6, err_msg=key)
    # The iterator position was saved too: both runs end at the same place.
    assert whole["last"]["loss"] == pytest.approx(resumed["last"]["loss"],
                                                  rel=1e-5)


def test_resume_with_another_architecture_is_an_error(tmp_path, tiny_kanji):
    _tiny_train(tmp_path, tiny_kanji, steps=1, print_fn=lambda _: 0)
    config = json.loads((tmp_path / training.CONFIG_FILE).read_text())
    assert config["head"] == "softmax" and config["num_classes"] == 12
    with pytest.raises(ValueError,
                       match=r"another model: head='softmax' \(now "
                       r"'arcface'\).*new model_dir"):
        _tiny_train(tmp_path, tiny_kanji, head="arcface", print_fn=print)
    with pytest.raises(ValueError, match=r"ring=True \(now False\)"):
        _tiny_train(tmp_path, tiny_kanji, lambda_ring=0.0, print_fn=print)


@pytest.mark.parametrize(
    "argument, value, pattern",
    [
        ("head", "svm", r"head='svm': unknown head; use one of softmax"),
        ("lambda_ring", -0.1, r"lambda_ring=-0.1: must be a finite number"),
        ("batch_size", 7, r"batch_size=7: not divisible by the 2 replicas"),
        ("data_dir", "/no/such/dir", r"data_dir='/no/such/dir': no such dir"),
        ("ring_radius", -3.0, r"ring_radius=-3.0: must be 'auto' or a pos"),
    ],
)
def test_train_argument_errors(tmp_path, tiny_kanji, argument, value, pattern):
    with pytest.raises(training.ArgumentError, match=pattern) as info:
        _tiny_train(tmp_path, tiny_kanji, devices=["/cpu:0", "/cpu:1"],
                    **{argument: value})
    assert info.value.argument == argument
    assert "\n" not in str(info.value)


def test_export_refuses_existing_dir_and_round_trips(tmp_path):
    from ring_loss_tf import export

    models = _model_fn()()
    target = tmp_path / "exported"
    target.mkdir()
    with pytest.raises(FileExistsError, match="already exists; pass "
                       "overwrite=True"):
        export.export_saved_model(models.embedding_model, target)
    assert export.export_saved_model(
        models.embedding_model, target, overwrite=True
    ) == target
    assert [p.name for p in tmp_path.iterdir()] == ["exported"]
    loaded = tf.saved_model.load(str(target))
    images = _batches(1)[0][0]
    np.testing.assert_allclose(
        loaded.serve(images).numpy(),
        models.embedding_model(images).numpy(),
        atol=1e-5,
    )


# --------------------------------------------------------------------------
# Two MultiWorkerMirroredStrategy worker processes vs one process

_WORKER = textwrap.dedent(
    """
    import sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    sys.path.insert(0, sys.argv[2])
    import test_training as t
    from ring_loss_tf import training
    trainer = t._run(None, sys.argv[3], 0.01)
    assert trainer.num_replicas == 2, trainer.num_replicas
    if trainer.is_chief:
        np.savez(sys.argv[4], **{k.replace("/", "|"): v
                                 for k, v in t._state(trainer).items()})
    """
)


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_two_worker_processes_equal_one_process(tmp_path):
    head = "asoftmax"
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    out = tmp_path / "chief.npz"
    processes = []
    for index in range(2):
        env = dict(os.environ)
        env["TF_CONFIG"] = json.dumps(
            {"cluster": {"worker": workers},
             "task": {"type": "worker", "index": index}}
        )
        env["TF_CPP_MIN_LOG_LEVEL"] = "2"
        env.pop("PYTHONPATH", None)
        processes.append(
            subprocess.Popen(
                [sys.executable, str(script), str(REPO),
                 str(REPO / "tests"), head, str(out)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = []
    for process in processes:
        try:
            logs.append(process.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            raise
    for process, log in zip(processes, logs):
        assert process.returncode == 0, log[-3000:]
    multi = {k.replace("|", "/"): v for k, v in np.load(out).items()}
    single = _state(_run(["/cpu:0"], head, 0.01))
    _assert_same_state(single, multi)


def test_mixed_bfloat16_step_is_close_to_float32():
    """mixed_bfloat16 (the CPU policy): bf16 compute, float32 weights and R."""
    ((images, labels),) = _batches(1, seed=2)

    def first_step(policy):
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(policy)
        try:
            trainer = training.Trainer(
                training.build_strategy(["/cpu:0"]),
                _model_fn("softmax", 0.01),
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


def test_data_errors_become_one_line():
    """tf.data's decode errors: the file when TensorFlow's assertion names
    it, otherwise what failed and the fix."""
    named = tf.errors.InvalidArgumentError(
        None, None,
        "assertion failed: [Corrupt or truncated image file. Remove it. "
        "File:] [b'/data/x/1.png']\n\t [[{{node Assert}}]] "
        "[Op:IteratorGetNext]",
    )
    assert str(training._data_error(named)) == (
        "Corrupt or truncated image file. Remove it. File: /data/x/1.png"
    )
    unnamed = tf.errors.InvalidArgumentError(
        None, None, "Invalid PNG data, size 73\n\t [[{{node DecodePng}}]]"
    )
    error = training._data_error(unnamed)
    assert isinstance(error, ValueError)
    assert str(error) == (
        "A training image could not be decoded (Invalid PNG data, size 73), "
        "and TensorFlow does not say which file. Rerun with "
        "skip_corrupt=True (--skip_corrupt): it decodes every image once at "
        "the start and leaves out those that fail."
    )


@pytest.mark.parametrize("stop", [2, 4])  # in the warm-up; with the margin
def test_margin_warmup_resumes_exactly_in_each_phase(tmp_path, tiny_kanji,
                                                     stop):
    settings = dict(head="asoftmax", margin_warmup_steps=3, lambda_base=50.0,
                    print_fn=lambda _: 0)
    whole = _tiny_train(tmp_path / "whole", tiny_kanji, **settings)
    head = whole["trainer"].models.head
    assert int(head.iterations.numpy()) == 6 and head.margin_step() == 3
    first = _tiny_train(tmp_path / "split", tiny_kanji, stop_at_step=stop,
                        **settings)
    assert first["step"] == stop
    assert first["trainer"].in_margin_warmup() == (stop <= 3)
    lines = []
    settings["print_fn"] = lines.append
    _tiny_train(tmp_path / "split", tiny_kanji, **settings)
    assert "(margin from step 4)" in lines[0]
    assert [("margin off" in line) for line in lines if
            line.startswith("step ")] == [s <= 3 for s in range(stop + 1, 7)]
    a = _checkpoint_state(tmp_path / "whole")
    b = _checkpoint_state(tmp_path / "split")
    assert a.keys() == b.keys()
    assert any(k.endswith("iterations/.ATTRIBUTES/VARIABLE_VALUE") for k in a)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=1e-6, err_msg=key)


# Each setting that shapes a model, its non-default value in the run of
# `shaped_runs`, and where the exported training model holds it.
SHAPING_SETTINGS = {
    "l2_alpha": ("l2", 10.0, lambda m: m.get_layer("l2").alpha),
    "center_loss_weight": (
        "l2", 0.02, lambda m: m.get_layer("center_loss").loss_weight
    ),
    "center_alpha": ("l2", 0.3, lambda m: m.get_layer("center_loss").alpha),
    "lambda_base": ("sf", 500.0, lambda m: m.get_layer("asoftmax").lambda_base),
    "lambda_gamma": ("sf", 0.2, lambda m: m.get_layer("asoftmax").lambda_gamma),
    "lambda_power": ("sf", 2.0, lambda m: m.get_layer("asoftmax").lambda_power),
    "lambda_min": ("sf", 3.0, lambda m: m.get_layer("asoftmax").lambda_min),
    "margin_warmup_steps": (
        "sf", 2, lambda m: m.get_layer("asoftmax").margin_warmup_steps
    ),
    "embedding_block": (
        "sf", "bn",
        lambda m: "bn" if any(
            isinstance(layer, layers.BatchNorm)
            for layer in m.get_layer("small_cnn").layers
        ) else "fc",
    ),
}
OTHER_VALUES = {
    "l2_alpha": 20.0, "center_loss_weight": 0.01, "center_alpha": 0.5,
    "lambda_base": 1000.0, "lambda_gamma": 0.12, "lambda_power": 1.0,
    "lambda_min": 5.0, "margin_warmup_steps": 5, "embedding_block": "fc",
}


@pytest.fixture(scope="module")
def shaped_runs(tmp_path_factory, tiny_kanji):
    """Two 3-step runs with every shaping setting off its default."""
    runs = {}
    for run, head in (("l2", "l2softmax"), ("sf", "asoftmax")):
        settings = {
            name: value
            for name, (where, value, _) in SHAPING_SETTINGS.items()
            if where == run
        }
        model_dir = tmp_path_factory.mktemp(run)
        _tiny_train(model_dir, tiny_kanji, head=head, steps=3,
                    print_fn=lambda _: 0, **settings)
        runs[run] = (model_dir, dict(head=head, steps=3, **settings))
    return runs


@pytest.mark.parametrize("name", list(SHAPING_SETTINGS))
def test_shaping_settings_are_saved_exported_and_checked_on_resume(
    name, shaped_runs, tiny_kanji, tmp_path
):
    from ring_loss_tf import export

    where, value, read = SHAPING_SETTINGS[name]
    model_dir, settings = shaped_runs[where]
    saved = json.loads((model_dir / training.CONFIG_FILE).read_text())
    assert saved[name] == value
    output = tmp_path / "export"
    assert export.main(["--model_dir", str(model_dir), "--output",
                        str(output), "--keras"]) == 0
    loaded = keras.saving.load_model(str(output / export.KERAS_FILE))
    assert read(loaded) == value
    with pytest.raises(
        ValueError,
        match=rf"another model: .*{name}={value!r} "
        rf"\(now {OTHER_VALUES[name]!r}\)",
    ):
        _tiny_train(model_dir, tiny_kanji, print_fn=print,
                    **dict(settings, **{name: OTHER_VALUES[name]}))


def test_resume_with_other_optimisation_settings_is_an_error(tmp_path,
                                                            tiny_kanji):
    _tiny_train(tmp_path, tiny_kanji, steps=1, print_fn=lambda _: 0)
    with pytest.raises(ValueError, match=r"lr=0.05 \(now 0.1\)"):
        _tiny_train(tmp_path, tiny_kanji, lr=0.1, print_fn=print)
    # More steps extend the run.
    assert _tiny_train(tmp_path, tiny_kanji, steps=2,
                       print_fn=lambda _: 0)["step"] == 2


@pytest.mark.parametrize(
    "argument, value, pattern",
    [
        ("margin_warmup_steps", -1, r"margin_warmup_steps=-1: must be an "
         r"integer >= 0"),
        ("margin_warmup_steps", 10, r"margin_warmup_steps=10: the softmax "
         r"head has no margin to warm up"),
        ("embedding_block", "ln", r"embedding_block='ln': unknown embedding "
         r"block; use one of fc, bn"),
        ("center_loss_weight", -0.5, r"center_loss_weight=-0.5: must be a "
         r"finite number >= 0"),
        ("l2_alpha", 0.0, r"l2_alpha=0.0: must be a positive number"),
    ],
)
def test_new_settings_are_checked_before_training(argument, value, pattern,
                                                  tmp_path, tiny_kanji):
    with pytest.raises(training.ArgumentError, match=pattern):
        _tiny_train(tmp_path, tiny_kanji, print_fn=print, **{argument: value})
    assert not (tmp_path / training.CONFIG_FILE).exists()


def test_center_loss_combines_with_a_margin_head(tmp_path, tiny_kanji):
    result = _tiny_train(tmp_path, tiny_kanji, head="asoftmax",
                         center_loss_weight=0.01, steps=2,
                         print_fn=lambda _: 0)
    model = result["trainer"].models.train_model
    centers = model.get_layer("center_loss").centers.numpy()
    assert np.any(centers != 0)  # updated by the steps
    assert isinstance(result["trainer"].models.head, layers.ASoftmax)
