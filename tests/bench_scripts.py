"""Loads a script of bench/ as a module, for the tests of its functions.

bench/ is not a package: each script runs as `python bench/<name>.py`.
"""

import importlib.util
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]


def load(name):
    """bench/<name>.py, executed once as the module `name`."""
    spec = importlib.util.spec_from_file_location(
        name, REPO / "bench" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
