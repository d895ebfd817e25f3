"""What each Bazel test target runs: collection, imports, and a sample.

`python -m pytest` runs every fast test once; a Bazel test target
(tests/BUILD) is there to prove that its module runs with only what the
target carries. A file missing from a target shows in one of three ways,
and each is checked here, for every target, without re-running the fast set:

1. a module imported at the top of a test module or of what it imports:
   pytest's collection of the whole module fails (every test is collected,
   every parameter list built);
2. a module imported inside a function: `import_problems` parses the test
   module and, transitively, every first-party module it imports (the
   package, tests/ helpers, bench/, train.py, evaluate.py) and resolves
   every import statement, wherever it stands, from the runfiles tree;
3. a data file read by path (tests/fixtures, bench/*.py, the entry points
   started in a subprocess): the tests named in SAMPLE, which read each
   such file the BUILD files list. A module not named in SAMPLE runs its
   first collected test, so conftest.py and the module's set-up run too.

`bazel test //... --test_arg=--full` runs each module's whole fast set
instead (docs/development.md, "Bazel").
"""

import ast
import importlib.machinery
import importlib.util
import os
import pathlib
import sys

# Modules whose entry points, fixtures or bench/ scripts are read as files:
# the tests that read them (function names; every parameter case runs).
SAMPLE = {
    "test_bad_inputs.py": [  # evaluate.py's main, in-process
        "test_evaluate_resizes_images_of_mixed_sizes",
    ],
    "test_config.py": [
        "test_release_0_1_config_json_loads_with_its_settings",  # fixtures/
        "test_train_py_checks_its_flags_without_tensorflow",  # train.py
    ],
    # Cheaper than the module's first test, which trains or compiles.
    "test_export.py": [
        "test_l2_normalize_keeps_tiny_norms_and_maps_zero_to_zero",
    ],
    "test_trainer.py": [
        "test_unfinished_checkpoints_of_a_killed_run_are_removed",
    ],
    "test_protocols.py": [  # evaluate.py in a subprocess
        "test_evaluate_py_flag_and_data_errors",
    ],
    "test_heads.py": [  # fixtures/release_0_1_heads.keras
        "test_release_0_1_keras_file_loads_with_its_weights_and_outputs",
    ],
    "test_assembly.py": [  # fixtures/release_0_1_run
        "test_a_release_0_1_model_dir_is_rebuilt_and_restored",
    ],
    "test_reproduce.py": [  # bench/reproduce.py
        "test_each_verdict_is_printed_beside_the_papers_columns",
    ],
    "test_test_modules.py": [  # every test module, parsed
        "test_no_test_module_imports_another",
        "test_each_slow_set_name_names_a_test_of_its_module",
        "test_each_bazel_sample_name_names_a_test_of_its_module",
    ],
    "test_train.py": [
        "test_flag_errors_stop_with_one_line",  # train.py
        "test_evaluate_refuses_a_bad_config_json_in_one_line",  # evaluate.py
    ],
    "test_loop.py": [  # fixtures/release_0_1_run
        "test_a_run_of_release_0_1_resumes",
    ],
    "test_worker_input.py": [  # bench/worker_input.py, bench/input.py
        "test_paper_table_matches_a_hand_computation",
    ],
}

# Top-level names of the project's own modules: these must resolve inside
# the runfiles tree, never from the source tree or an editable install.
FIRST_PARTY = ("ring_loss_tf", "tests", "bench", "train", "evaluate")


def sampled(module, function, first):
    """Whether a test of `function` in test module file `module` runs under
    Bazel; `first` says whether it is the module's first collected test
    case."""
    names = SAMPLE.get(module)
    return function in names if names is not None else first


def _guarded(tree):
    """Import nodes inside `try:` blocks that catch ImportError (optional
    dependencies, which may be absent on purpose)."""
    nodes = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        caught = set()
        for handler in node.handlers:
            kinds = handler.type
            kinds = kinds.elts if isinstance(kinds, ast.Tuple) else [kinds]
            caught |= {getattr(kind, "id", None) for kind in kinds}
        if caught & {"ImportError", "ModuleNotFoundError", "Exception",
                     None}:
            for statement in node.body:
                nodes |= set(ast.walk(statement))
    return nodes


def _imports(path, package):
    """(absolute module name, line, may be a name in its parent) of every
    unguarded import in `path`; `package` resolves relative imports."""
    tree = ast.parse(pathlib.Path(path).read_text(), str(path))
    guarded = _guarded(tree)
    for node in ast.walk(tree):
        if node in guarded:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, False
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".") if package else []
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            yield base, node.lineno, False
            for alias in node.names:
                if alias.name == "*":
                    continue
                # `from package import module` imports a module too; or it
                # names something the package defines.
                yield f"{base}.{alias.name}", node.lineno, True


def import_problems(module_path, root, search_path=None):
    """Imports of the test module `module_path` (and of the first-party
    modules it imports, transitively) that do not resolve from `root`.

    Returns one line per problem: "file line N: import X: why". A name that
    is not a module (`from m import function`) is not a problem; a
    first-party module found outside `root` is.
    """
    # Runfiles are symlinks into the source tree: compare unresolved paths.
    root = os.path.abspath(root)
    old_path = sys.path
    if search_path is not None:
        sys.path = list(search_path)
    try:
        return _problems(pathlib.Path(module_path), root)
    finally:
        sys.path = old_path


def _find(name):
    """The spec of module `name`, or None. The project's own modules are
    looked up on sys.path alone (not in sys.modules, not through an
    editable install's finder), without importing anything."""
    if name.split(".")[0] not in FIRST_PARTY:
        try:
            return importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return None
    spec, path = None, sys.path
    for part in range(1, name.count(".") + 2):
        spec = importlib.machinery.PathFinder.find_spec(
            ".".join(name.split(".")[:part]), path
        )
        if spec is None:
            return None
        path = spec.submodule_search_locations
        if path is None and part <= name.count("."):
            return None  # a module, not a package, has no submodules
    return spec


def _defines(parent, name, first_party):
    """Whether module spec `parent` may define `name`'s last part. For the
    project's own packages: whether their __init__.py binds it."""
    if parent is None:
        return False
    if not first_party or parent.submodule_search_locations is None:
        return True  # a module's names, or another project's package
    if not parent.origin or not os.path.isfile(parent.origin):
        return False  # a namespace package has no names of its own
    tree = ast.parse(pathlib.Path(parent.origin).read_text())
    bound = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef,
                             ast.AsyncFunctionDef)):
            bound.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return name.rpartition(".")[2] in bound


def _problems(module_path, root):
    problems, seen = [], set()
    # The test module's package, tests or tests.<stage>, for its relative
    # imports.
    folders = module_path.parent.parts
    start = len(folders) - 1 - folders[::-1].index("tests")
    queue = [(module_path, ".".join(folders[start:]))]
    while queue:
        path, package = queue.pop()
        if path in seen:
            continue
        seen.add(path)
        for name, line, attribute in _imports(path, package):
            if not name or name in seen:
                continue
            spec = _find(name)
            where = f"{path.name} line {line}: import {name}"
            first_party = name.split(".")[0] in FIRST_PARTY
            if spec is None:
                parent = name.rpartition(".")[0]
                if attribute and _defines(_find(parent), name, first_party):
                    continue  # `from m import not_a_module`
                if first_party or not parent:
                    problems.append(f"{where}: not found")
                continue
            if not first_party or not spec.origin or not spec.has_location:
                continue
            origin = pathlib.Path(spec.origin)
            if not os.path.abspath(origin).startswith(root + os.sep):
                problems.append(
                    f"{where}: found at {origin}, outside the target's "
                    f"files ({root})"
                )
                continue
            seen.add(name)
            queue.append((origin, name if origin.name == "__init__.py"
                          else name.rpartition(".")[0]))
    return problems

