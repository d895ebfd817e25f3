"""The package's shape: each subpackage imports only the stages before it,
no import cycle, no private name used across modules, and the layers run
without TensorFlow on other Keras backends."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "ring_loss_tf"

# The stages in import order: a module may import its own stage and those
# before it. The TensorFlow-free top (configuration, registry, cluster,
# errors, quiet output) comes first; the layers (keras.ops only) next; then
# the data flow. Evaluation and export come before training because a
# training run ends by evaluating and exporting its model (training.loop);
# the commands drive everything.
STAGES = ("top", "layers", "data", "models", "evaluation", "export",
          "training", "commands")
# The package's own __init__ re-exports the layers: importing the package
# registers them with Keras.
FACADE = "ring_loss_tf"


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def stage(module):
    parts = module.split(".")
    if len(parts) == 1:
        return None  # the facade
    if parts[1] in STAGES:
        return parts[1]
    return "top"


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_main_block(node):
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare)
            and isinstance(test.left, ast.Name)
            and test.left.id == "__name__")


def _nodes(tree):
    """The nodes of `tree` outside `if __name__ == "__main__":` blocks: a
    module run as a program (`python -m ring_loss_tf.export`) may hand over
    to its command, which is not an import of the library."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_main_block(node):
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def imports(path):
    """(module, name or None, line) of every ring_loss_tf import in `path`,
    with `from package import module` resolved to the module."""
    found = []
    for node in _nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(FACADE):
                    found.append((alias.name, None, node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.module and (
            node.module.split(".")[0] == FACADE
        ):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if submodule in MODULES:
                    found.append((submodule, None, node.lineno))
                else:
                    found.append((node.module, alias.name, node.lineno))
    return found


def test_the_stages_cover_every_module():
    assert {stage(m) for m in MODULES} - {None} <= set(STAGES)
    assert {"top", "layers", "data", "models", "evaluation", "training"} <= {
        stage(m) for m in MODULES}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_module_imports_only_earlier_stages(module):
    if module == FACADE:
        return
    own = STAGES.index(stage(module))
    later = [
        f"line {line}: {target}"
        for target, _, line in imports(MODULES[module])
        if target != FACADE and STAGES.index(stage(target)) > own
    ]
    assert not later, f"{module} ({stage(module)}) imports a later stage: " \
        f"{later}"


def test_no_import_cycle():
    graph = {
        module: {t for t, _, _ in imports(path) if t in MODULES}
        for module, path in MODULES.items()
    }
    # Subpackage facades re-export on first use (PEP 562), not at import.
    done, path = set(), []

    def visit(module):
        if module in path:
            cycle = path[path.index(module):] + [module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        path.append(module)
        for target in sorted(graph[module]):
            visit(target)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_no_private_name_is_used_across_modules():
    used = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases = {}
        for target, name, line in imports(path):
            if name is not None and name.startswith("_"):
                used.append(f"{module} line {line}: {target}.{name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and (
                node.module.split(".")[0] == FACADE
            ):
                for alias in node.names:
                    if f"{node.module}.{alias.name}" in MODULES:
                        aliases[alias.asname or alias.name] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute)
                    and isinstance(node.value, ast.Name)
                    and node.value.id in aliases
                    and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                used.append(f"{module} line {node.lineno}: "
                            f"{node.value.id}.{node.attr}")
    assert not used, used


def test_the_layers_import_no_tensorflow_on_jax():
    code = (
        "import sys, ring_loss_tf, ring_loss_tf.layers\n"
        "print(ring_loss_tf.RingLoss.__module__)\n"
        "print(sorted(m for m in sys.modules"
        " if m.split('.')[0] == 'tensorflow'))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True,
        env={**os.environ, "KERAS_BACKEND": "jax"},
        cwd=PACKAGE.parent, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    module, loaded = result.stdout.splitlines()[-2:]
    assert module == "ring_loss_tf.layers.ring"
    assert loaded == "[]"
