"""Tests of the test modules themselves: each one runs on its own.

Bazel runs each test module (tests/test_*.py, tests/<stage>/test_*.py) as
its own target (tests/BUILD) with the
helper modules of `//tests:helpers`, not with the other test modules. An
import of one test module from another passes under `python -m pytest`,
where the whole directory is on disk, and fails under `bazel test` with
`ModuleNotFoundError`. Helpers that several modules use belong in a helper
module such as tests/data_files.py. The test modules are parsed here, not
imported, so the check needs no TensorFlow and sees imports inside functions.
"""

import ast
import pathlib
import sys

import pytest

# Not resolved: under Bazel this is the runfiles tree, which holds the test
# modules this target lists as data, not the source tree.
TESTS = pathlib.Path(__file__).parent


def _module_files():
    """Each test module's file name -> its path: tests/ holds the tests of
    the package's top-level modules and of the repository as a whole, and
    tests/<stage>/ those of ring_loss_tf/<stage>/ (and of bench/)."""
    return {path.name: path for path in sorted(TESTS.rglob("test_*.py"))}


def _test_module(name, level=0):
    """The test module `name` (dotted, `level` dots relative) names, or None.

    `tests.test_x...`, `tests.<stage>.test_x...`, `.test_x...` and a bare
    `test_x` (importable when tests/ is on sys.path) are test modules;
    `tests.layer_checks` and another package's `test_*` module are not.
    """
    parts = [part for part in name.split(".") if part]
    if level == 0:
        if parts[:1] == ["tests"]:
            parts = parts[1:]
        elif len(parts) > 1:
            return None
    if len(parts) > 1 and parts[1].startswith("test_"):
        parts = parts[1:]  # a stage's folder: tests/data/test_x.py
    if parts and parts[0].startswith("test_"):
        return parts[0]
    return None


def imported_test_modules(source):
    """The test modules that Python `source` imports, anywhere in it.

    Counts `import`, `from ... import` and calls of `importlib.import_module`
    or `__import__` with a literal module name.
    """
    found = set()
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            names = [(f"{module}.{alias.name}", node.level)
                     for alias in node.names]
        elif isinstance(node, ast.Call) and node.args:
            function = node.func
            callee = (function.attr if isinstance(function, ast.Attribute)
                      else getattr(function, "id", None))
            name = getattr(node.args[0], "value", None)
            if callee in ("import_module", "__import__") and isinstance(
                name, str
            ):
                names = [(name, len(name) - len(name.lstrip(".")))]
        for name, level in names:
            module = _test_module(name, level)
            if module:
                found.add(module)
    return found


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from tests.test_data import make_folder", {"test_data"}),
        ("from tests import test_data", {"test_data"}),
        ("import tests.test_data as t", {"test_data"}),
        ("import test_data", {"test_data"}),
        ("from .test_data import pack", {"test_data"}),
        ("from . import test_data", {"test_data"}),
        ("from tests.data.test_pipeline import pack", {"test_pipeline"}),
        ("from tests.data import test_pipeline", {"test_pipeline"}),
        ("from ..data.test_pipeline import pack", {"test_pipeline"}),
        ("from ..data import test_pipeline", {"test_pipeline"}),
        ("def f():\n    from tests.test_fuzz import x", {"test_fuzz"}),
        ("importlib.import_module('tests.test_data')", {"test_data"}),
        ("__import__('test_data')", {"test_data"}),
        ("from tests import layer_checks", set()),
        ("from tests.data_files import constant_png", set()),
        ("import kill_resume", set()),
        ("from tensorflow.python.framework import test_util", set()),
        ("import evaluate; importlib.import_module('evaluate')", set()),
    ],
)
def test_imported_test_modules_finds_each_form_of_import(source, expected):
    assert imported_test_modules(source) == expected


def test_no_test_module_imports_another():
    modules = list(_module_files().values())
    # Guards against a vacuous pass, e.g. a Bazel target without the modules
    # as data: these three once imported test_data (now test_pipeline).
    assert {"test_pipeline.py", "test_bad_inputs.py", "test_fuzz.py"} <= {
        module.name for module in modules
    }, modules
    offenders = {}
    for module in modules:
        imported = imported_test_modules(module.read_text()) - {module.stem}
        if imported:
            offenders[module.name] = sorted(imported)
    assert not offenders, (
        f"test modules import other test modules: {offenders}. Bazel runs "
        "each test module without the others (tests/BUILD); move what they "
        "share into a helper module such as tests/data_files.py."
    )


def test_the_test_tree_mirrors_the_package():
    """tests/<stage>/ holds the tests of ring_loss_tf/<stage>/ (or of
    bench/), and file names are unique across the tree: tests/slow_set.py,
    tests/bazel_sample.py and conftest.py name modules by file name."""
    repo = TESTS.parent
    paths = sorted(TESTS.rglob("test_*.py"))
    names = [path.name for path in paths]
    assert len(paths) >= 40, paths
    assert len(set(names)) == len(names), sorted(
        name for name in names if names.count(name) > 1
    )
    folders = {path.parent.relative_to(TESTS) for path in paths}
    folders.discard(pathlib.Path("."))
    stray = [
        str(folder) for folder in folders
        if len(folder.parts) != 1
        or not ((repo / "ring_loss_tf" / folder / "__init__.py").is_file()
                or folder.name == "bench")
    ]
    assert not stray, (
        f"test folders {stray} name no stage of ring_loss_tf/ (nor bench/): "
        "put a module's tests in the folder of its stage"
    )
    assert {"layers", "data", "models", "evaluation", "training",
            "commands", "bench"} <= {str(folder) for folder in folders}


def test_each_slow_set_name_names_a_test_of_its_module():
    """A renamed test would silently leave the slow set for the fast one
    (or a typo never enter it): each name must be a test function of the
    module it is listed under. (Parameter ids are pytest's to make; a
    wrong one leaves that case in the fast set, where it still runs.)"""
    from tests.slow_set import SLOW

    missing = []
    for module, names in SLOW.items():
        source = _module_files()[module].read_text()
        functions = {
            node.name for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.FunctionDef)
        }
        for name in names:
            if name.partition("[")[0] not in functions:
                missing.append(f"{module}::{name}")
    assert not missing, (
        f"tests/slow_set.py names tests that do not exist: {missing}; "
        "rename them there too"
    )


def test_each_bazel_sample_name_names_a_test_of_its_module():
    """A renamed test would leave its Bazel target running nothing of the
    module (tests/bazel_sample.py): each name must be a fast test function
    of the module it is listed under."""
    from tests.bazel_sample import SAMPLE
    from tests.slow_set import is_slow

    missing = []
    for module, names in SAMPLE.items():
        source = _module_files()[module].read_text()
        functions = {
            node.name for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.FunctionDef)
        }
        for name in names:
            if name not in functions or is_slow(module, name, name):
                missing.append(f"{module}::{name}")
    assert not missing, (
        f"tests/bazel_sample.py names no fast test in: {missing}; rename "
        "them there too"
    )


def _tree(root, files):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_bazel_import_check_names_each_import_a_target_lacks(tmp_path):
    """A target without a module its test imports inside a function (which
    collection alone does not show) fails with the file, line and name;
    one found outside the target's files (the source tree) fails too."""
    from tests.bazel_sample import import_problems

    target, source = tmp_path / "runfiles", tmp_path / "source"
    _tree(target, {
        "tests/__init__.py": "",
        "tests/test_x.py": (
            "import os\nfrom tests import helper\n\n"
            "def test_a():\n    from tests import lazy\n"
            "    import bench.tool\n"
        ),
        "tests/helper.py": "from ring_loss_tf import gone\n",
        "ring_loss_tf/__init__.py": "from . import here\n",
        "ring_loss_tf/here.py": "import json\n",
    })
    _tree(source, {"bench/__init__.py": "", "bench/tool.py": ""})
    problems = import_problems(
        target / "tests" / "test_x.py", target,
        search_path=[str(target), str(source)] + sys.path[1:],
    )
    assert sorted(problems) == sorted([
        "test_x.py line 5: import tests.lazy: not found",
        f"test_x.py line 6: import bench.tool: found at {source}/bench/"
        f"tool.py, outside the target's files ({target})",
        "helper.py line 1: import ring_loss_tf.gone: not found",
    ]), problems
    # With every file in the target, nothing is reported.
    _tree(target, {"tests/lazy.py": "", "ring_loss_tf/gone.py": "",
                   "bench/__init__.py": "", "bench/tool.py": ""})
    assert import_problems(
        target / "tests" / "test_x.py", target,
        search_path=[str(target)] + sys.path[1:],
    ) == []
