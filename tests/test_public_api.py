"""The public API is what the docs say it is.

Every `ring_loss_tf.X` (and `ring_loss_tf.module.Y`) that README.md and the
docs pages mention resolves; `ring_loss_tf.__all__` lists each public name
once, every layer the package registers with Keras among them; and
`dir(ring_loss_tf)` lists each name once.
"""

import collections
import importlib
import inspect
import pathlib
import re

import keras

import ring_loss_tf
from ring_loss_tf.layers import heads
from ring_loss_tf import layers

REPO = pathlib.Path(__file__).resolve().parents[1]
MENTION = re.compile(r"\bring_loss_tf(?:\.[A-Za-z_]\w*)+")


def _doc_files():
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def _resolve(dotted):
    """The object `dotted` names: the longest importable module prefix,
    then attributes. Raises if any part does not exist."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[split:]:
            target = getattr(target, attribute)
        return target
    raise ModuleNotFoundError(dotted)


def _mentions():
    found = {}
    for path in _doc_files():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for match in MENTION.finditer(line):
                # A file name (ring_loss_tf.commands.train.py) or a sentence's
                # full stop is not part of the name.
                name = re.sub(r"\.(py|md)$", "", match.group(0))
                found.setdefault(name, f"{path.name}:{number}")
    return found


def test_the_docs_mention_names_and_each_resolves():
    mentions = _mentions()
    # The pattern reads the README's layer table and module references.
    assert "ring_loss_tf.RingLoss" in mentions, sorted(mentions)
    unresolved = []
    for name, where in sorted(mentions.items()):
        try:
            _resolve(name)
        except (ImportError, AttributeError) as error:
            unresolved.append(f"{where}: {name} ({error})")
    assert not unresolved, "\n".join(unresolved)


def test_resolve_refuses_a_name_that_does_not_exist():
    assert _resolve("ring_loss_tf.RingLoss") is layers.RingLoss
    assert _resolve("ring_loss_tf.config.TrainConfig").__name__ == (
        "TrainConfig"
    )
    for name in (
        "ring_loss_tf.NoSuchLayer",
        "ring_loss_tf.config.Nothing",
        "ring_loss_tf.nosuchmodule.X",
    ):
        try:
            _resolve(name)
        except (ImportError, AttributeError):
            continue
        raise AssertionError(f"{name} resolved")


def test_all_lists_each_public_name_once_and_each_resolves():
    names = ring_loss_tf.__all__
    assert len(names) == len(set(names)), [
        name for name, count in collections.Counter(names).items() if count > 1
    ]
    for name in names:
        assert getattr(ring_loss_tf, name) is not None, name
    assert "GroupedConv2D" in names
    assert ring_loss_tf.GroupedConv2D is layers.GroupedConv2D


def test_every_registered_layer_is_public():
    registered = {
        name
        for module in (layers, heads)
        for name, value in vars(module).items()
        if inspect.isclass(value)
        and not name.startswith("_")
        and issubclass(value, keras.layers.Layer)
        and value.__module__ == module.__name__
        and keras.saving.get_registered_name(value).startswith("ring_loss_tf>")
    }
    assert registered, "no layer found: the check would be vacuous"
    assert registered <= set(ring_loss_tf.__all__), sorted(
        registered - set(ring_loss_tf.__all__)
    )


def test_dir_lists_each_name_once():
    names = dir(ring_loss_tf)
    assert len(names) == len(set(names)), [
        name for name, count in collections.Counter(names).items() if count > 1
    ]
    assert set(ring_loss_tf.__all__) <= set(names)
