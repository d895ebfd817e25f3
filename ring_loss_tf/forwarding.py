"""Names a package serves from one of its modules on first use (PEP 562).

`ring_loss_tf.data`, `.models`, `.training` and `.evaluation` were single
modules before 0.3; each package keeps their names importable from itself
without importing the module (and TensorFlow) until a name is used, so that
the package's TensorFlow-free modules import without it.
"""

from __future__ import annotations

import importlib


def forward(package: str, module: str, names):
    """A module `__getattr__` for `package` that returns `names` from
    `module` (imported on first use) and raises AttributeError otherwise."""
    names = frozenset(names)

    def __getattr__(name):
        if name in names:
            return getattr(importlib.import_module(module), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
