"""Tests of ring_loss_tf.config: the one training configuration.

References: hand-written expected configurations (for settings, defaults
and the two config.json versions), the config.json release 0.1.0 wrote
(tests/fixtures/release_0_1_run), a fresh interpreter's module list (for
"imports no TensorFlow").
"""

import dataclasses
import json
import pathlib
import subprocess
import sys

import pytest

from ring_loss_tf import config as config_lib
from ring_loss_tf import registry
from ring_loss_tf.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
RELEASE_CONFIG = REPO / "tests" / "fixtures" / "release_0_1_run" / "config.json"


def test_each_setting_has_one_home_and_a_flag_kind():
    names = [f.name for part in config_lib.PARTS
             for f in dataclasses.fields(getattr(config_lib.TrainConfig(),
                                                 part))]
    assert len(names) == len(set(names)) == len(config_lib.FIELDS)
    kinds = {"str", "int", "float", "bool", "size", "radius", "none"}
    for field in config_lib.FIELDS.values():
        assert field.kind in kinds, field
        assert field.help and field.resume in ("match", "free"), field
    with pytest.raises(dataclasses.FrozenInstanceError):
        config_lib.TrainConfig().model.head = "arcface"


def test_make_and_replace_route_each_setting_to_its_part():
    config = config_lib.make(head="arcface", lr=0.1, seed=7, data_dir="/d")
    assert config.model.head == "arcface" and config.optim.lr == 0.1
    assert config.run.seed == 7 and config.data.data_dir == "/d"
    again = config_lib.replace(config, lr=0.2)
    assert again.optim.lr == 0.2 and config.optim.lr == 0.1
    assert again.model == config.model and again.run == config.run
    assert config_lib.flat(again)["lr"] == 0.2
    with pytest.raises(ConfigError, match=r"learning_rate=0.1: no such "
                       r"setting; see `ring_loss_tf.config.FIELDS`"):
        config_lib.make(learning_rate=0.1)


def test_json_round_trip_of_default_and_resolved_configs():
    plain = config_lib.TrainConfig()
    resolved = config_lib.resolve(
        config_lib.make(head="asoftmax", image_size=(112, 96),
                        ring_radius=20.0, margin=4, steps=10),
        num_classes=31,
    )
    for config in (plain, resolved):
        text = json.dumps(config_lib.to_dict(config))
        saved = json.loads(text)
        assert saved["version"] == config_lib.VERSION
        assert set(saved) == {"version", *config_lib.PARTS}
        assert config_lib.from_dict(saved) == config


def test_save_and_load_write_atomically(tmp_path):
    config = config_lib.make(num_classes=5, head="cosface")
    path = config_lib.save(config, tmp_path / "run")
    assert path.name == config_lib.CONFIG_FILE
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]
    assert config_lib.load(tmp_path / "run") == config
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        config_lib.load(tmp_path / "run")


def test_release_0_1_config_json_loads_with_its_settings():
    saved = json.loads(RELEASE_CONFIG.read_text())
    assert "version" not in saved  # the flat version-1 layout
    config = config_lib.from_dict(saved)
    expected = config_lib.make(
        head="arcface", num_classes=12, embedding_dim=8, image_size=(16, 16),
        channels=1, augment="characters", embedding_block="bn",
        lambda_ring=0.01, margin_warmup_steps=200, center_loss_weight=0.0,
        batch_size=8, warmup_steps=2, data_dir=None,
        cache_dir=saved["kanji_options"]["cache_dir"],
        num_train_identities=12, num_test_identities=6,
        train_samples_per_identity=6, test_samples_per_identity=3,
        kanji_seed=0,
    )
    assert config == expected
    # What release 0.1.0 resolved is what this release resolves.
    assert config_lib.resolve(config) == config


def test_an_older_version_1_file_takes_the_values_of_its_time():
    saved = {"backbone": "small_cnn", "head": "asoftmax", "num_classes": 4,
             "embedding_dim": 16, "image_size": [32, 32], "channels": 1,
             "ring": False, "data_dir": None}
    config = config_lib.from_dict(saved)
    assert config.model.lambda_ring == 0.0
    assert config.model.margin_warmup_steps == 0
    assert config.model.embedding_block == "fc"
    # Only what the file holds is compared on resume.
    now = config_lib.resolve(config_lib.make(
        head="asoftmax", num_classes=4, embedding_dim=16, lambda_ring=0.0,
        lr=0.3, image_size=(32, 32)))
    assert config_lib.differences(saved, now) == []
    assert config_lib.differences(
        saved, config_lib.replace(now, head="arcface")
    ) == ["head='asoftmax' (now 'arcface')"]


def test_differences_name_only_settings_that_must_match():
    saved = config_lib.to_dict(config_lib.make(num_classes=3, steps=10))
    now = config_lib.make(num_classes=3, steps=99, log_every=1, lr=0.1,
                          model_dir="elsewhere", jit=False)
    assert config_lib.differences(saved, now) == ["lr=0.05 (now 0.1)"]


@pytest.mark.parametrize(
    "saved, pattern",
    [
        ({"version": 3}, r"version 3 is not one this ring_loss_tf reads "
         r"\(1..2\); upgrade"),
        ({"version": 2, "data": {}, "model": {"heads": "x"}, "optim": {},
          "run": {}}, r"unknown setting model.heads"),
        ({"version": 2, "data": {}, "model": {"lr": 0.1}, "optim": {},
          "run": {}}, r"unknown setting model.lr"),
        ({"version": 2, "data": {}}, r"'model' must be an object"),
        ([1, 2], r"expected a JSON object"),
    ],
)
def test_unreadable_config_json_says_why(saved, pattern):
    with pytest.raises(ValueError, match=pattern):
        config_lib.from_dict(saved, "run/config.json")


@pytest.mark.parametrize(
    "settings, expected",
    [
        (dict(), dict(image_size=(32, 32), channels=1, augment="characters",
                      embedding_dim=128, embedding_block="fc",
                      margin_warmup_steps=0, center_loss_weight=0.0)),
        (dict(data_dir="/faces", backbone="sphereface20", head="arcface"),
         dict(image_size=(112, 96), channels=3, augment="face",
              embedding_dim=512, embedding_block="bn",
              margin_warmup_steps=200, center_loss_weight=0.0)),
        (dict(head="centerloss", kanji_image_size=16),
         dict(image_size=(16, 16), center_loss_weight=0.003,
              margin_warmup_steps=0)),
        (dict(head="asoftmax", margin=4.0, margin_warmup_steps=0,
              embedding_block="bn", center_loss_weight=0.01),
         dict(margin=4, margin_warmup_steps=0, embedding_block="bn",
              center_loss_weight=0.01)),
        # insightface's networks bring their input and output block, on the
        # embedded set too; the flags still win.
        (dict(backbone="iresnet50"),
         dict(image_size=(112, 112), channels=3, augment="characters",
              embedding_dim=512, embedding_block="bn")),
        (dict(data_dir="/faces", backbone="mobilefacenet", head="arcface"),
         dict(image_size=(112, 112), channels=3, augment="face",
              embedding_dim=512, embedding_block="gdc")),
        (dict(backbone="iresnet18", image_size=(112, 96), channels=1,
              embedding_dim=128, embedding_block="fc"),
         dict(image_size=(112, 96), channels=1, embedding_dim=128,
              embedding_block="fc")),
    ],
)
def test_resolve_fills_the_data_and_head_defaults(settings, expected):
    resolved = config_lib.flat(
        config_lib.resolve(config_lib.make(**settings), num_classes=9)
    )
    assert resolved["num_classes"] == 9
    for name, value in expected.items():
        assert resolved[name] == value and type(resolved[name]) is type(
            value
        ), name


def test_resolve_refuses_data_of_one_identity():
    with pytest.raises(ConfigError, match=r"^data_dir='/faces': holds 1 "
                       r"identity, and a classifier needs at least 2 "
                       r"identities; add a folder per identity under "
                       r"<data_dir>/train$"):
        config_lib.resolve(config_lib.make(data_dir="/faces"), num_classes=1)
    assert config_lib.resolve(config_lib.make(), num_classes=2).model \
        .num_classes == 2


def test_the_pixel_budget_default_is_the_image_ops_one():
    # config imports no TensorFlow, so it repeats the number.
    from ring_loss_tf.data import images

    assert config_lib.TrainConfig().data.max_image_pixels == (
        images.MAX_IMAGE_PIXELS) == 8192 * 8192


def test_registry_defaults_are_the_ones_resolve_uses():
    for name, head in registry.HEADS.items():
        resolved = config_lib.resolve(config_lib.make(head=name)).model
        assert resolved.margin_warmup_steps == head.margin_warmup_steps
        assert resolved.embedding_block == head.embedding_block
        assert resolved.center_loss_weight == head.center_loss_weight
        assert head.has_margin == head.shardable == (
            name in ("asoftmax", "cosface", "arcface"))


def test_registry_margin_defaults_are_the_layers_own():
    """The registry holds the training defaults of each margin head; a
    Keras user building the layer alone gets the same ones."""
    import inspect

    from ring_loss_tf import layers

    for name in registry.shardable_heads():
        head = registry.head(name)
        layer = getattr(layers, head.layer.partition(":")[2])
        signature = inspect.signature(layer.__init__).parameters
        for argument, value in head.margin_arguments.items():
            assert signature[argument].default == value, (name, argument)
        for option in head.layer_options:
            assert signature[option].default == getattr(
                config_lib.ModelConfig(), option), (name, option)


def test_help_text_takes_the_margin_defaults_from_the_registry():
    fields = config_lib.FIELDS
    assert fields["margin"].help == (
        "Head margin: default 4 (asoftmax), 0.35 (cosface), 0.5 (arcface).")
    assert fields["scale"].help == (
        "Head scale s: default 64 (cosface), 64 (arcface).")


def test_backbone_defaults_are_the_ones_resolve_uses():
    for name in registry.BACKBONES:
        entry = registry.backbone(name)
        resolved = config_lib.resolve(config_lib.make(backbone=name))
        assert resolved.data.image_size == (entry.image_size or (32, 32))
        assert resolved.data.channels == (entry.channels or 1)
        assert resolved.model.embedding_dim == entry.embedding_dim
        assert resolved.model.embedding_block == (
            entry.embedding_block or "fc"
        )
    assert config_lib.resolve(config_lib.make()).model.embedding_dim == 128


def test_the_default_config_is_valid():
    config_lib.check(config_lib.TrainConfig())


@pytest.mark.parametrize(
    "setting, value, message",
    [
        ("head", "svm", "head='svm': unknown head; use one of softmax, "
         "asoftmax, l2softmax, centerloss, cosface, arcface"),
        ("backbone", "vgg", "backbone='vgg': unknown backbone; use one of "
         "small_cnn, sphereface4, sphereface20"),
        ("lambda_ring", -0.1, "lambda_ring=-0.1: must be a finite number "
         ">= 0; use 0 to disable the ring loss or e.g. 0.01"),
        ("lambda_ring", float("nan"), "lambda_ring=nan: must be a finite"),
        ("ring_radius", -3.0, "ring_radius=-3.0: must be auto or a positive "
         "number; use auto (mean norm of the first batch) or e.g. 20"),
        ("data_dir", "/no/such/dir", "data_dir='/no/such/dir': no such "
         "directory; give a directory holding train/"),
        ("image_size", (4, 4), "image_size=(4, 4): must be SIZE or "
         "HEIGHT,WIDTH, each >= 8; use e.g. 32 or 112,96"),
        ("channels", 2, "channels=2: must be 1 or 3"),
        ("augment", "flip", "augment='flip': unknown augmentation; use one "
         "of face, characters, none"),
        ("test_samples_per_identity", 1, "test_samples_per_identity=1: must "
         "be >= 2 (genuine pairs need two images)"),
        ("margin_warmup_steps", -1, "margin_warmup_steps=-1: must be an "
         "integer >= 0; use 0 to start with the margin, or e.g. 200"),
        ("margin_warmup_steps", 10, "margin_warmup_steps=10: the softmax "
         "head has no margin to warm up; use it with head "
         "asoftmax/cosface/arcface, or omit it"),
        ("embedding_block", "ln", "embedding_block='ln': unknown embedding "
         "block; use one of fc, bn, gdc"),
        ("center_loss_weight", -0.5, "center_loss_weight=-0.5: must be a "
         "finite number >= 0; use 0 to disable center loss or e.g. 0.003"),
        ("l2_alpha", 0.0, "l2_alpha=0.0: must be a finite number > 0"),
        ("batch_size", 0, "batch_size=0: must be a positive integer"),
        ("steps", 0, "steps=0: must be a positive integer; use e.g. 1000"),
        ("epochs", 0.0, "epochs=0.0: must be a finite number > 0"),
        ("lr", 0.0, "lr=0.0: must be a finite number > 0; use e.g. 0.1"),
        ("lr_schedule", "poly", "lr_schedule='poly': unknown schedule"),
        ("optimizer", "lamb", "optimizer='lamb': unknown optimizer; use one "
         "of sgd, adam"),
        ("momentum", 1.0, "momentum=1.0: must be in [0, 1)"),
        ("model_dir", "", "model_dir='': is empty"),
        ("cpu_replicas", 0, "cpu_replicas=0: must be a positive integer"),
        ("collectives", "mpi", "collectives='mpi': unknown collective "
         "implementation; use one of auto, nccl, ring"),
    ],
)
def test_each_bad_setting_gets_one_line_naming_it_and_the_fix(
    setting, value, message
):
    with pytest.raises(ConfigError) as info:
        config_lib.check(config_lib.make(**{setting: value}))
    assert str(info.value).startswith(message)
    assert info.value.setting == setting and "\n" not in str(info.value)
    assert "; " in str(info.value)  # a fix follows the problem


def test_sharding_a_registered_margin_head_names_it_and_the_fix(
    monkeypatch,
):
    """A head function registered with `margin=True` may warm up its
    margin, but the sharded head needs a margin function to call."""
    monkeypatch.setitem(registry.HEADS, "mymargin",
                        registry.Head("mine:head", margin=True))
    config_lib.check(config_lib.make(head="mymargin",
                                     margin_warmup_steps=5))
    with pytest.raises(ConfigError) as info:
        config_lib.check(config_lib.make(head="mymargin", head_sharding=True))
    assert str(info.value) == (
        "head_sharding=True: the mymargin head has no margin function for "
        "the sharded head to call; shard a margin head "
        "(asoftmax/cosface/arcface), or omit it"
    )
    assert info.value.setting == "head_sharding"
    for head in ("asoftmax", "cosface", "arcface"):
        config_lib.check(config_lib.make(head=head, head_sharding=True))


def test_cross_setting_checks():
    def error(**settings):
        with pytest.raises(ConfigError) as info:
            config_lib.check(config_lib.make(**settings))
        return str(info.value)

    assert error(head="asoftmax", margin=2.5) == (
        "margin=2.5: the asoftmax head's margin must be one of 1, 2, 3, 4; "
        "use 4 or omit it"
    )
    assert error(batch_size=10, cpu_replicas=4) == (
        "batch_size=10: not divisible by the 4 replicas (cpu_replicas=4); "
        "use a multiple of 4, e.g. 8"
    )
    # steps wins over epochs: a bad epochs is not looked at then.
    config_lib.check(config_lib.make(steps=5, epochs=-1.0))


def test_model_dir_that_is_a_file_and_data_dir_without_train(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        config_lib.check(config_lib.make(model_dir=str(tmp_path / "file")))
    with pytest.raises(ConfigError, match="has no train/ folder, "
                       "train-.*tfrecord shards or train.rec; put a folder of images per identity"):
        config_lib.check(config_lib.make(data_dir=str(tmp_path)))
    (tmp_path / "train.rec").write_bytes(b"")
    config_lib.check(config_lib.make(data_dir=str(tmp_path)))


@pytest.mark.parametrize(
    "text, expected",
    [("32", (32, 32)), ("112,96", (112, 96)), ("112x96", (112, 96)),
     (None, None)],
)
def test_parse_image_size(text, expected):
    assert config_lib.parse_image_size(text) == expected


@pytest.mark.parametrize("text", ["7", "a,b", "1,2,3", ""])
def test_parse_image_size_refuses_with_the_checks_wording(text):
    with pytest.raises(ConfigError, match=r"image_size=.*: must be SIZE or "
                       r"HEIGHT,WIDTH, each >= 8"):
        config_lib.parse_image_size(text)


def test_parse_radius():
    assert config_lib.parse_radius("auto") == "auto"
    assert config_lib.parse_radius("20") == 20.0
    with pytest.raises(ConfigError, match=r"ring_radius='big': must be auto "
                       r"or a positive number"):
        config_lib.parse_radius("big")


def test_steps_of_and_kanji_options():
    config = config_lib.make(epochs=2.5, batch_size=100, seed=4,
                             kanji_image_size=16)
    assert config_lib.steps_of(config, 1001) == 26  # ceil(2.5 · 1001 / 100)
    assert config_lib.steps_of(config_lib.replace(config, steps=7), 1) == 7
    options = config_lib.kanji_options(config)
    assert options["seed"] == 4 and options["image_size"] == 16
    assert options["num_train_identities"] == 1000
    fixed = config_lib.kanji_options(config_lib.replace(config, kanji_seed=0))
    assert fixed["seed"] == 0


def test_embedded_set_defaults_are_the_generators():
    """The settings' defaults are kanji.prepare's (kanji imports numpy,
    not TensorFlow, at module level)."""
    import inspect

    from ring_loss_tf.data import kanji

    defaults = {
        name: p.default
        for name, p in inspect.signature(kanji.prepare).parameters.items()
    }
    options = config_lib.kanji_options(config_lib.TrainConfig())
    for name, value in options.items():
        if name not in ("seed", "cache_dir"):
            assert defaults[name] == value, name
    assert set(options) | {"num_workers", "progress"} == set(defaults)


def test_train_py_checks_its_flags_without_tensorflow():
    """A bad flag stops train.py before TensorFlow or Keras is imported."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "train.py", "--lambda_ring=-1"],
        cwd=REPO, text=True, capture_output=True, timeout=120,
    )
    assert result.returncode == 2
    assert "--lambda_ring=-1.0: must be a finite number >= 0" in result.stderr
    imported = [line.rsplit("|", 1)[-1].strip()
                for line in result.stderr.splitlines()
                if line.startswith("import time:")]
    assert "ring_loss_tf.config" in imported
    assert not [m for m in imported
                if m.split(".")[0] in ("tensorflow", "keras")]


def test_paths_are_kept_as_text(tmp_path):
    config = config_lib.make(model_dir=tmp_path / "run", data_dir=tmp_path)
    assert config.run.model_dir == str(tmp_path / "run")
    assert config.data.data_dir == str(tmp_path)
    assert config_lib.from_dict(config_lib.to_dict(config)) == config
