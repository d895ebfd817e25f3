"""Registers a local Python interpreter (a virtualenv's) as Bazel's toolchain.

Bazel 4 ignores `--python_path` under its default Python toolchains and would
run the system Python, which lacks TensorFlow. This repository rule writes a
`py_runtime` for one interpreter, chosen when the repository is fetched:

1. `RING_LOSS_TF_PYTHON`, e.g. `bazel test --repo_env=RING_LOSS_TF_PYTHON=\
/path/to/venv/bin/python //...` (what `.ci/bazel_test.sh` does);
2. otherwise `python3` on `PATH`, so `bazel test //...` in an activated
   virtualenv just works.

The path is used as given, never resolved: a virtualenv's `bin/python` is a
symlink to the base interpreter, and only the link finds the virtualenv's
site-packages. The stub that starts each py_binary/py_test runs under the
same interpreter (`stub_shebang`), so no system `python3` is needed.
"""

_ENV = "RING_LOSS_TF_PYTHON"

_BUILD = """\
load("@bazel_tools//tools/python:toolchain.bzl", "py_runtime_pair")

# The Python version and every installed distribution: data of //:ring_loss_tf,
# so that changing the virtualenv re-runs the tests instead of reusing cached
# results.
exports_files(["installed.txt"])

py_runtime(
    name = "py3_runtime",
    interpreter_path = "{python}",
    python_version = "PY3",
    stub_shebang = "#!{python}",
)

py_runtime_pair(
    name = "runtime_pair",
    py3_runtime = ":py3_runtime",
)

toolchain(
    name = "toolchain",
    toolchain = ":runtime_pair",
    toolchain_type = "@bazel_tools//tools/python:toolchain_type",
)
"""

# Prints the major version and the missing modules, then the Python version
# and every installed distribution, one a line.
_CHECK = """\
import importlib.metadata, importlib.util, sys
missing = [m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]
print(sys.version_info[0], " ".join(missing))
print(sys.version.replace("\\n", " "))
for name in sorted(
    f"{d.metadata['Name']}=={d.version}"
    for d in importlib.metadata.distributions()
):
    print(name)
"""

def _python_interpreter_impl(rctx):
    python = rctx.os.environ.get(_ENV, "")
    origin = _ENV
    if not python:
        found = rctx.which("python3")
        if found == None:
            fail(("No python3 on PATH: set {env} to the virtualenv's " +
                  "python, e.g. --repo_env={env}=/path/to/venv/bin/python")
                .format(env = _ENV))
        python = str(found)
        origin = "python3 on PATH"
    if not python.startswith("/"):
        fail(("{}={} is not an absolute path: give the full path of " +
              "the virtualenv's python, e.g. /path/to/venv/bin/python")
            .format(_ENV, repr(python)))
    result = rctx.execute(
        [python, "-c", _CHECK] + rctx.attr.required_modules,
        quiet = True,
    )
    if result.return_code != 0:
        fail("{} ({}) does not run: {}Set {} to a working python.".format(
            python,
            origin,
            result.stderr,
            _ENV,
        ))
    lines = result.stdout.strip().split("\n")
    fields = lines[0].strip().split(" ")
    if fields[0] != "3":
        fail("{} ({}) is not Python 3. Set {} to the virtualenv's python."
            .format(python, origin, _ENV))
    if len(fields) > 1:
        fail(("{} ({}) cannot import {}: install the project's " +
              "dependencies into it (see README) or set {} to the " +
              "virtualenv's python.").format(
            python,
            origin,
            ", ".join(fields[1:]),
            _ENV,
        ))
    rctx.file("WORKSPACE", "")
    rctx.file("installed.txt", "\n".join(lines[1:]) + "\n")
    rctx.file("BUILD", _BUILD.format(python = python))

python_interpreter = repository_rule(
    implementation = _python_interpreter_impl,
    attrs = {
        "required_modules": attr.string_list(
            doc = "Modules the interpreter must provide (checked, not run).",
        ),
    },
    environ = [_ENV, "PATH"],
    local = True,
)
