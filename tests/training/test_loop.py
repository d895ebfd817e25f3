"""Tests of ring_loss_tf.training.loop: `train(config)` on a tiny embedded set.

References: an uninterrupted run (for resuming, in each phase of the margin
warm-up), the saved config.json and the exported model (for the settings
that shape a model), the message TensorFlow gives (for data errors), the
weights after the last finite step (for the NaN guard).
"""

import json
import pathlib
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from ring_loss_tf import config as config_lib
from ring_loss_tf.data import pipeline as data_lib
from ring_loss_tf import layers
from ring_loss_tf.training import trainer as trainer_lib
from ring_loss_tf.training import distribution
from ring_loss_tf.training import loop as loop_lib
from ring_loss_tf.errors import ConfigError
from ring_loss_tf.errors import NonFiniteLossError
from ring_loss_tf.errors import TrainingInterrupted
from tests.data_files import constant_png
from tests.data_files import make_folder
from tests.tiny_runs import GLOBAL_BATCH
from tests.tiny_runs import assert_same_checkpoints
from tests.tiny_runs import assert_same_state
from tests.tiny_runs import batches
from tests.tiny_runs import checkpoint_state
from tests.tiny_runs import model_fn
from tests.tiny_runs import state
from tests.tiny_runs import tiny_kanji_config
from tests.tiny_runs import tiny_train


@pytest.fixture(scope="module")
def tiny_kanji(tmp_path_factory):
    return tiny_kanji_config(tmp_path_factory.mktemp("kanji"))


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, tiny_kanji):
    whole = tiny_train(tmp_path / "whole", tiny_kanji, print_fn=lambda _: 0)
    assert whole.step == 6

    def crash_after_step_5(line):
        if line.startswith("step 5/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tiny_train(tmp_path / "split", tiny_kanji, print_fn=crash_after_step_5)
    # Step 5 was lost with the process; the checkpoint of step 4 survived.
    assert tf.train.latest_checkpoint(str(tmp_path / "split")).endswith("-4")
    lines = []
    resumed = tiny_train(tmp_path / "split", tiny_kanji, print_fn=lines.append)
    assert lines[0].startswith("Resuming from") and "steps 4→6" in lines[0]
    assert resumed.step == 6
    assert_same_checkpoints(tmp_path / "whole", tmp_path / "split", 1e-6)
    # The resumed input continued the stream: both runs end at one place.
    assert whole.last["loss"] == pytest.approx(resumed.last["loss"],
                                                  rel=1e-5)


def test_two_replicas_fed_by_one_pipeline_equal_one_device(tmp_path,
                                                          tiny_kanji):
    """`train` on 2 logical CPU devices: one pipeline yields each replica's
    rows (streamed and augmented), R starts from the norms summed across
    them, and the run ends where the one-device run ends."""
    settings = dict(head="asoftmax", lambda_ring=0.01, margin_warmup_steps=0,
                    augment="characters", print_fn=lambda _: 0)
    one = tiny_train(tmp_path / "one", tiny_kanji, **settings)
    two = tiny_train(tmp_path / "two", tiny_kanji,
                     devices=("/cpu:0", "/cpu:1"), **settings)
    assert two.trainer.num_replicas == 2
    assert_same_checkpoints(tmp_path / "one", tmp_path / "two", 1e-5)
    assert one.last["loss"] == pytest.approx(two.last["loss"],
                                                rel=1e-5)


def test_unset_jit_takes_the_cpu_default_and_saves_it(tmp_path, tiny_kanji):
    lines = []
    result = tiny_train(tmp_path / "run", tiny_kanji, print_fn=lines.append,
                        jit=None, steps=1)
    expected = not distribution.onednn_kernels_enabled()
    assert f"jit={expected}" in lines[0]
    assert result.trainer.jit is expected
    saved = json.loads((tmp_path / "run" / config_lib.CONFIG_FILE).read_text())
    assert config_lib.saved_settings(saved)["jit"] is expected


def test_resume_with_another_architecture_is_an_error(tmp_path, tiny_kanji):
    tiny_train(tmp_path, tiny_kanji, steps=1, print_fn=lambda _: 0)
    config = json.loads((tmp_path / config_lib.CONFIG_FILE).read_text())
    assert config["version"] == config_lib.VERSION
    assert config["model"]["head"] == "softmax"
    assert config["model"]["num_classes"] == 12
    with pytest.raises(ValueError,
                       match=r"another model: head='softmax' \(now "
                       r"'arcface'\).*new model_dir"):
        tiny_train(tmp_path, tiny_kanji, head="arcface", print_fn=print)
    with pytest.raises(ValueError, match=r"lambda_ring=0.01 \(now 0.0\)"):
        tiny_train(tmp_path, tiny_kanji, lambda_ring=0.0, print_fn=print)


def test_data_errors_become_one_line():
    """tf.data's decode errors: the file when TensorFlow's assertion names
    it, otherwise what failed and the fix."""
    named = tf.errors.InvalidArgumentError(
        None, None,
        "assertion failed: [Corrupt or truncated image file. Remove it. "
        "File:] [b'/data/x/1.png']\n\t [[{{node Assert}}]] "
        "[Op:IteratorGetNext]",
    )
    assert str(loop_lib.data_error(named)) == (
        "Corrupt or truncated image file. Remove it. File: /data/x/1.png"
    )
    unnamed = tf.errors.InvalidArgumentError(
        None, None, "Invalid PNG data, size 73\n\t [[{{node DecodePng}}]]"
    )
    error = loop_lib.data_error(unnamed)
    assert isinstance(error, ValueError)
    assert str(error) == (
        "A training image could not be decoded (Invalid PNG data, size 73), "
        "and TensorFlow does not say which file. Rerun with "
        "skip_corrupt=True (--skip_corrupt): it decodes every image once at "
        "the start and leaves out those that fail."
    )


def test_an_image_over_the_pixel_budget_becomes_one_line(tmp_path):
    """The pipeline's own assertion, through `data_error`: the file, its
    size and the fix."""
    root = make_folder(tmp_path / "set", [2, 2])
    big = root / "id01" / "1.png"
    big.write_bytes(constant_png(7, size=(10, 12)))
    dataset = data_lib.training_dataset(
        data_lib.open_training_source(root), batch_size=4, image_size=(8, 8),
        channels=1, augment="none", seed=0, repeat=False, in_memory=False,
        max_pixels=64,
    )
    with pytest.raises(tf.errors.InvalidArgumentError) as caught:
        list(dataset)
    assert str(loop_lib.data_error(caught.value)) == (
        "Image larger than the pixel budget of 64 (max_image_pixels): "
        "decoding it would take too much memory. Downscale the file, or "
        "raise the budget (--max_image_pixels of train.py or of the "
        f"aligner). File: {big} (12x10 pixels)"
    )


@pytest.mark.parametrize("stop", [2, 4])  # in the warm-up; with the margin
def test_margin_warmup_resumes_exactly_in_each_phase(tmp_path, tiny_kanji,
                                                     stop):
    settings = dict(head="asoftmax", margin_warmup_steps=3, lambda_base=50.0,
                    print_fn=lambda _: 0)
    whole = tiny_train(tmp_path / "whole", tiny_kanji, **settings)
    head = whole.trainer.models.head
    assert int(head.iterations.numpy()) == 6 and head.margin_step() == 3
    first = tiny_train(tmp_path / "split", tiny_kanji, stop_at_step=stop,
                        **settings)
    assert first.step == stop
    assert first.trainer.in_margin_warmup() == (stop <= 3)
    lines = []
    settings["print_fn"] = lines.append
    tiny_train(tmp_path / "split", tiny_kanji, **settings)
    assert "(margin from step 4)" in lines[0]
    assert [("margin off" in line) for line in lines if
            line.startswith("step ")] == [s <= 3 for s in range(stop + 1, 7)]
    a = checkpoint_state(tmp_path / "whole")
    b = checkpoint_state(tmp_path / "split")
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
        tiny_train(model_dir, tiny_kanji, head=head, steps=3,
                    print_fn=lambda _: 0, **settings)
        runs[run] = (model_dir, dict(head=head, steps=3, **settings))
    return runs


@pytest.mark.parametrize("name", list(SHAPING_SETTINGS))
def test_shaping_settings_are_saved_exported_and_checked_on_resume(
    name, shaped_runs, tiny_kanji, tmp_path
):
    from ring_loss_tf import export
    from ring_loss_tf.commands import export as export_command

    where, value, read = SHAPING_SETTINGS[name]
    model_dir, settings = shaped_runs[where]
    saved = json.loads((model_dir / config_lib.CONFIG_FILE).read_text())
    assert config_lib.saved_settings(saved)[name] == value
    output = tmp_path / "export"
    assert export_command.call(["--model_dir", str(model_dir), "--output",
                                str(output), "--keras"]) == 0
    loaded = keras.saving.load_model(str(output / export.KERAS_FILE))
    assert read(loaded) == value
    with pytest.raises(
        ValueError,
        match=rf"another model: .*{name}={value!r} "
        rf"\(now {OTHER_VALUES[name]!r}\)",
    ):
        tiny_train(model_dir, tiny_kanji, print_fn=print,
                    **dict(settings, **{name: OTHER_VALUES[name]}))


def test_resume_with_other_optimisation_settings_is_an_error(tmp_path,
                                                            tiny_kanji):
    tiny_train(tmp_path, tiny_kanji, steps=1, print_fn=lambda _: 0)
    with pytest.raises(ValueError, match=r"lr=0.05 \(now 0.1\)"):
        tiny_train(tmp_path, tiny_kanji, lr=0.1, print_fn=print)
    # More steps extend the run.
    assert tiny_train(tmp_path, tiny_kanji, steps=2,
                       print_fn=lambda _: 0).step == 2


def test_center_loss_combines_with_a_margin_head(tmp_path, tiny_kanji):
    result = tiny_train(tmp_path, tiny_kanji, head="asoftmax",
                         center_loss_weight=0.01, steps=2,
                         print_fn=lambda _: 0)
    model = result.trainer.models.train_model
    centers = model.get_layer("center_loss").centers.numpy()
    assert np.any(centers != 0)  # updated by the steps
    assert isinstance(result.trainer.models.head, layers.ASoftmax)


def test_a_bad_setting_stops_before_anything_is_written(tmp_path, tiny_kanji):
    with pytest.raises(ConfigError, match=r"margin_warmup_steps=10: the "
                       r"softmax head has no margin to warm up"):
        tiny_train(tmp_path, tiny_kanji, margin_warmup_steps=10)
    assert not any(tmp_path.iterdir())


FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures"
RELEASE_RUN = FIXTURES / "release_0_1_run"


def test_a_run_of_release_0_1_resumes(tmp_path, tiny_kanji):
    """A model_dir written by ring_loss_tf 0.1.0 (config.json version 1:
    ArcFace + R, 8-d embedding, 16×16, 2 of 3 steps) continues."""
    model_dir = tmp_path / "run"
    shutil.copytree(RELEASE_RUN, model_dir)
    settings = dict(head="arcface", embedding_dim=8, image_size=(16, 16),
                    steps=3)
    with pytest.raises(ValueError, match=r"lr=0.05 \(now 0.1\)"):
        tiny_train(model_dir, tiny_kanji, lr=0.1, print_fn=print, **settings)
    lines = []
    result = tiny_train(model_dir, tiny_kanji, print_fn=lines.append,
                        **settings)
    assert lines[0].startswith("Resuming from") and "steps 2→3" in lines[0]
    assert result.step == 3
    head = result.trainer.models.head
    assert int(head.iterations.numpy()) == 3
    # The saved file is the run's own: resuming does not rewrite it.
    assert (model_dir / "config.json").read_text() == (
        RELEASE_RUN / "config.json"
    ).read_text()


def test_nonfinite_loss_stops_with_message_and_intact_checkpoint(tmp_path):
    def new_trainer(seed):
        return trainer_lib.Trainer(
            distribution.build_strategy(["/cpu:0"]),
            model_fn(seed=seed),
            global_batch_size=GLOBAL_BATCH,
            learning_rate=0.05,
            model_dir=tmp_path,
            jit=False,
        )

    trainer = new_trainer(3)
    trainer.attach_checkpoint()
    data = batches(4)
    # The third batch carries a NaN: the loss of step 3 is NaN.
    images = data[2][0].numpy()
    images[0, 0, 0, 0] = np.nan
    data[2] = (tf.constant(images), data[2][1])
    lines, states = [], {}

    def log(line):
        lines.append(line)
        states[len(lines)] = state(trainer)

    with pytest.raises(NonFiniteLossError,
                       match=r"step 3: the loss is not finite.*ckpt-2.*"
                       r"intact.*lower lr") as info:
        loop_lib.run_loop(trainer, iter(data), 4, checkpoint_every=2,
                          log_every=1, print_fn=log)
    assert info.value.step == 3
    assert [line.split()[1] for line in lines] == ["1/4", "2/4"]
    assert not all(np.all(np.isfinite(v)) for v in state(trainer).values())
    # The checkpoint holds the weights after step 2, all finite.
    restored = new_trainer(99)
    assert restored.attach_checkpoint().endswith("ckpt-2")
    assert int(restored.step.numpy()) == 2
    restored_state = state(restored)
    assert all(np.all(np.isfinite(v)) for v in restored_state.values())
    assert_same_state(restored_state, states[2], atol=0)


def test_steps_per_loop_3_equals_1_across_checkpoints_and_resume(
    tmp_path, tiny_kanji, monkeypatch
):
    """K = 3 steps per compiled call, stopped at step 7 and resumed, ends
    with the weights of one uninterrupted K = 1 run, and logs and
    checkpoints at the same steps (loops of 3, 1 and 2 steps, cut at the
    log, checkpoint and stop steps)."""
    settings = dict(steps=12, checkpoint_every=5, log_every=4,
                    max_to_keep=10, head="asoftmax", lambda_ring=0.01,
                    margin_warmup_steps=0)
    one_lines, loop_lines, loops = [], [], []
    train_loop = trainer_lib.Trainer.train_loop

    def recorded(self, iterator, num_steps):
        loops.append(num_steps)
        return train_loop(self, iterator, num_steps)

    monkeypatch.setattr(trainer_lib.Trainer, "train_loop", recorded)
    one = tiny_train(tmp_path / "one", tiny_kanji, print_fn=one_lines.append,
                     **settings)
    first = tiny_train(tmp_path / "loop", tiny_kanji, steps_per_loop=3,
                       stop_at_step=7, print_fn=loop_lines.append, **settings)
    assert first.step == 7
    loop = tiny_train(tmp_path / "loop", tiny_kanji, steps_per_loop=3,
                      print_fn=loop_lines.append, **settings)
    assert loop.step == 12

    def logged_steps(lines):
        return [line.split()[1] for line in lines if line.startswith("step")]

    assert logged_steps(one_lines) == [
        "1/12", "4/12", "8/12", "12/12"]
    assert logged_steps(loop_lines) == [
        "1/12", "4/12", "7/12", "8/12", "12/12"]

    def checkpoints(directory):
        return sorted(int(p.name[5:-6]) for p in directory.glob("*.index"))

    assert checkpoints(tmp_path / "one") == [5, 10, 12]
    assert checkpoints(tmp_path / "loop") == [5, 7, 10, 12]
    assert_same_checkpoints(tmp_path / "one", tmp_path / "loop", 1e-6)
    assert one.last["loss"] == pytest.approx(loop.last["loss"],
                                                rel=1e-6)
    # Steps 2-4 | 5 | 6-7, then after the resume's single step 8: 9-10 |
    # 11-12; the K = 1 run made no loop call.
    assert loops == [3, 1, 2, 2, 2]
    head = loop.trainer.models.head
    assert int(head.iterations.numpy()) == 12


def _loop_trainer(model_dir):
    return trainer_lib.Trainer(
        distribution.build_strategy(["/cpu:0"]),
        model_fn(seed=3),
        global_batch_size=GLOBAL_BATCH,
        learning_rate=0.05,
        model_dir=model_dir,
        jit=False,
    )


def _dataset_iterator(data):
    images = tf.stack([x for x, _ in data])
    labels = tf.stack([y for _, y in data])
    return iter(tf.data.Dataset.from_tensor_slices((images, labels)))


def test_nonfinite_loss_inside_a_loop_names_its_step_and_saves_nothing(
    tmp_path
):
    """NaN in step 3 of a loop of steps 2-4: found when step 4 would be
    checkpointed; the error names step 3 and no checkpoint is written."""
    trainer = _loop_trainer(tmp_path)
    trainer.attach_checkpoint()
    data = batches(8)
    images = data[2][0].numpy()
    images[0, 0, 0, 0] = np.nan
    data[2] = (tf.constant(images), data[2][1])
    with pytest.raises(NonFiniteLossError,
                       match=r"step 3: the loss is not finite \(loss nan.*"
                       r"no checkpoint was written yet") as info:
        loop_lib.run_loop(trainer, _dataset_iterator(data), 8,
                          checkpoint_every=4, log_every=100,
                          steps_per_loop=4, print_fn=lambda _: 0)
    assert info.value.step == 3
    assert int(trainer.step.numpy()) == 2
    assert tf.train.latest_checkpoint(str(tmp_path)) is None


def test_a_stop_request_acts_at_the_end_of_the_loop(tmp_path):
    """Requested during steps 2-5 (one loop): checkpointed at step 5."""
    trainer = _loop_trainer(tmp_path)
    trainer.attach_checkpoint()

    def stop_requested():
        return "SIGTERM" if int(trainer.step.numpy()) >= 2 else None

    with pytest.raises(TrainingInterrupted) as info:
        loop_lib.run_loop(trainer, _dataset_iterator(batches(10)), 10,
                          checkpoint_every=100, log_every=100,
                          steps_per_loop=4, print_fn=lambda _: 0,
                          stop_requested=stop_requested)
    assert info.value.step == 5
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-5")


def test_a_loop_on_two_replicas_fed_global_batches_equals_one_device():
    """steps_per_loop=3 on two replicas from a `tf.data` iterator of global
    batches (each replica takes its rows) ends where K = 1 on one device
    does."""
    def run(devices, iterator, steps_per_loop):
        trainer = trainer_lib.Trainer(
            distribution.build_strategy(devices), model_fn(seed=3),
            global_batch_size=GLOBAL_BATCH, learning_rate=0.05, jit=False,
        )
        loop_lib.run_loop(trainer, iterator, 4, checkpoint_every=100,
                          log_every=100, steps_per_loop=steps_per_loop,
                          print_fn=lambda _: 0)
        assert int(trainer.step.numpy()) == 4
        return state(trainer)

    one = run(["/cpu:0"], iter(batches(4)), 1)
    two = run(["/cpu:0", "/cpu:1"], _dataset_iterator(batches(4)), 3)
    assert_same_state(one, two)
