"""Runs one test module through pytest for a Bazel py_test (tests/BUILD).

Usage (Bazel does this): `bazel_pytest.py tests/test_x.py [--full] [pytest
args...]`, from the runfiles root. pytest then applies tests/conftest.py and
the [tool.pytest.ini_options] of pyproject.toml, as `python -m pytest` would.

By default the target checks what tests/bazel_sample.py describes: the
whole module is collected, every import of it and of the project's modules
it uses resolves from the runfiles, and a sample of its tests runs (those
that read the target's data files). `--full` (`bazel test //...
--test_arg=--full`) runs the module's whole fast set, as does a
`--test_filter`, which runs what it selects.

Bazel's test protocol is mapped onto pytest: results go to $XML_OUTPUT_FILE
as JUnit XML (per-test results in `bazel test`), `--test_filter=EXPR` becomes
`-k EXPR` (a module it leaves without tests passes), and everything pytest or
Hypothesis writes stays under $TEST_TMPDIR, outside the runfiles tree (Bazel 4
leaves HOME unset and the sandbox keeps the real home read-only, so HOME is
$TEST_TMPDIR). The virtualenv's bin directory goes first on PATH, as in an
activated virtualenv, for tests that start its tools in a subprocess.
"""

import os
import sys


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[1].endswith(".py"):
        print(
            "bazel_pytest.py: expected the test module's path as the first "
            f"argument (set `args` in tests/BUILD). Received: {argv[1:]!r}",
            file=sys.stderr,
        )
        return 2
    module, extra = argv[1], argv[2:]
    # Python put this script's directory, tests/, first on sys.path, where
    # tests/bench would hide the repository's bench/; the tests import
    # their helpers as `tests.x`, as under `python -m pytest`.
    # (The script is a symlink in the runfiles; Python resolves it.)
    here = os.path.dirname(os.path.realpath(__file__))
    sys.path[:] = [
        entry for entry in sys.path
        if os.path.realpath(entry or os.curdir) != here
    ]
    full = "--full" in extra
    extra = [arg for arg in extra if arg != "--full"]
    tmp = os.environ.get("TEST_TMPDIR")
    # One process: Bazel already runs targets side by side.
    args = [module, "-p", "no:cacheprovider", "-n", "0"]
    if tmp:
        os.environ.setdefault("HOME", tmp)
        args.append(f"--basetemp={os.path.join(tmp, 'pytest')}")
        os.environ.setdefault(
            "HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tmp, "hypothesis")
        )
    os.environ["PATH"] = os.pathsep.join(
        [os.path.dirname(sys.executable), os.environ.get("PATH", "")]
    )
    if os.environ.get("XML_OUTPUT_FILE"):
        args.append(f"--junitxml={os.environ['XML_OUTPUT_FILE']}")
    if os.environ.get("TESTBRIDGE_TEST_ONLY"):
        args += ["-k", os.environ["TESTBRIDGE_TEST_ONLY"]]
    # Leave the runfiles tree as Bazel built it: no __pycache__ in it.
    sys.dont_write_bytecode = True

    import pytest

    plugins = []
    if not full and "-k" not in args:
        plugins.append(_sample_plugin(module))
    status = pytest.main(args + extra, plugins=plugins)
    if status == pytest.ExitCode.NO_TESTS_COLLECTED and "-k" in args:
        # `bazel test //... --test_filter=X`: modules without X are not errors.
        print("bazel_pytest.py: --test_filter matched no test in " + module)
        return 0
    if status == pytest.ExitCode.NO_TESTS_COLLECTED:
        # pyproject.toml deselects the slow set; a module whose every test is
        # in it (tests/slow_set.py) has been imported and collected here,
        # and its tests run once, under `python -m pytest -m slow`.
        print(f"bazel_pytest.py: every test of {module} is in the slow set "
              "(python -m pytest -m slow runs them)")
        return 0
    return status


def _sample_plugin(module):
    """A pytest plugin that keeps the sample of tests/bazel_sample.py once
    the whole module is collected, after checking that its imports resolve
    from the runfiles."""
    import pytest

    return _Sample(module, pytest)


class _Sample:
    def __init__(self, module, pytest):
        self.module = module
        self.pytest = pytest
        self.initial_path = list(sys.path)

    def pytest_collection_modifyitems(self, config, items):
        pytest = self.pytest
        from tests import bazel_sample
        from tests.slow_set import is_slow

        # After collection: the module has run its top level, so a
        # directory it put on sys.path is there.
        # A directory put there outside the runfiles (bench/peer.py adds
        # the source tree it resolves to) is not part of the target.
        root = os.getcwd()
        path = [
            entry for entry in sys.path
            if entry in self.initial_path
            or os.path.abspath(entry or root).startswith(root + os.sep)
            or os.path.abspath(entry or root) == root
        ]
        problems = bazel_sample.import_problems(self.module, root, path)
        if problems:
            raise pytest.UsageError(
                f"{self.module}: imports that this Bazel target cannot "
                "resolve from its files; add what they name to its deps or "
                "data in the BUILD files:\n  " + "\n  ".join(problems)
            )
        name = os.path.basename(self.module)
        runnable = [item for item in items
                    if not is_slow(name, item.name, item.originalname)]
        keep = [
            item for item in items
            if item in runnable and bazel_sample.sampled(
                name, item.originalname, item is runnable[0])
        ]
        dropped = [item for item in items if item not in keep]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = keep
        print(f"\nbazel_pytest.py: {self.module}: {len(items) + len(dropped)} "
              f"tests collected, imports resolved from the runfiles; "
              f"running the Bazel sample of {len(items)} (--full: all)")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
