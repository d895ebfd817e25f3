#!/usr/bin/env bash
# Builds every Bazel target and runs Bazel tests offline with a virtualenv's
# Python; installs Bazel 4 from Debian's packages first if it is missing.
#
# usage: ci/bazel_test.sh [--python PATH] [BAZEL_TEST_ARG...]
#
#   --python PATH   the virtualenv's python (default: $RING_LOSS_TF_PYTHON,
#                   else python3 on PATH); it must import tensorflow, keras,
#                   numpy, PIL, absl and pytest.
#   BAZEL_TEST_ARG  target patterns and `bazel test` flags (default: //...),
#                   e.g. //tests:test_layers --test_filter=ring
#
# `bazel build //...` always runs first, so every binary and test target is
# built even when only some tests run. The last line is the test-case count
# of the tests that ran, from their JUnit XML: "bazel: N passed, M failed".
# Set BAZEL_OUTPUT_USER_ROOT to keep Bazel's outputs elsewhere than
# ~/.cache/bazel.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${RING_LOSS_TF_PYTHON:-}
args=()
while (($#)); do
  case $1 in
    --python) python=${2:?"--python needs a path"}; shift 2 ;;
    --python=*) python=${1#--python=}; shift ;;
    -h | --help) sed -n '2,17p' "$0" | cut -c3-; exit 0 ;;
    *) args+=("$1"); shift ;;
  esac
done
targets_given=false
for arg in "${args[@]+"${args[@]}"}"; do
  [[ $arg == -* ]] || targets_given=true
done
$targets_given || args+=(//...)

if [[ -z $python ]]; then
  python=$(command -v python3 || true)
fi
if [[ -z $python || ! -x $python ]]; then
  echo "ci/bazel_test.sh: no runnable python at '${python}': pass" \
    "--python /path/to/venv/bin/python" >&2
  exit 2
fi
# Absolute, but not resolved: a venv's bin/python must stay the symlink.
if [[ $python != /* ]]; then
  python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")"
fi

if ! command -v bazel >/dev/null; then
  sudo=()
  [[ $(id -u) == 0 ]] || sudo=(sudo)
  start=$SECONDS
  echo "Installing Bazel (Debian's bazel-bootstrap)..."
  "${sudo[@]+"${sudo[@]}"}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]+"${sudo[@]}"}" \
    apt-get install -y -qq bazel-bootstrap >/dev/null
  echo "Installed Bazel in $((SECONDS - start)) s."
fi

cd "$repo"
startup=()
if [[ -n ${BAZEL_OUTPUT_USER_ROOT:-} ]]; then
  startup=(--output_user_root="$BAZEL_OUTPUT_USER_ROOT")
fi
bazel() {
  command bazel "${startup[@]+"${startup[@]}"}" "$@"
}
# Stop the server when done, so no JVM outlives the run.
trap 'bazel shutdown >/dev/null 2>&1 || true' EXIT

common=(--repo_env=RING_LOSS_TF_PYTHON="$python")
echo "Bazel: $(command bazel --version 2>/dev/null | head -1), python: $python"

start=$SECONDS
bazel build "${common[@]}" //...
echo "bazel build //...: $((SECONDS - start)) s"

start=$SECONDS
status=0
bazel test "${common[@]}" "${args[@]}" || status=$?
echo "bazel test ${args[*]}: $((SECONDS - start)) s (exit $status)"

# Count test cases in the JUnit XML of each test target the patterns name.
patterns=()
for arg in "${args[@]}"; do
  [[ $arg == -* ]] || patterns+=("$arg")
done
query="tests($(printf '%s + ' "${patterns[@]}"))"
query=${query% + )}")"
testlogs=$(bazel info "${common[@]}" bazel-testlogs 2>/dev/null)
bazel query "${common[@]}" "$query" 2>/dev/null |
  "$python" -c '
import os, sys
import xml.etree.ElementTree as ET

testlogs = sys.argv[1]
passed = failed = skipped = 0
for label in sys.stdin.read().split():
    package, name = label.lstrip("/").split(":")
    xml = os.path.join(testlogs, package, name, "test.xml")
    try:
        suites = ET.parse(xml).getroot().iter("testsuite")
        counts = [
            [int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")]
            for s in suites
        ]
    except (OSError, ET.ParseError):
        counts = []
    if not counts:  # crashed or timed out before pytest wrote its report
        failed += 1
        print(f"{label}: no test report", file=sys.stderr)
        continue
    for tests, failures, errors, skips in counts:
        failed += failures + errors
        skipped += skips
        passed += tests - failures - errors - skips
if int(sys.argv[2]) and not failed:  # e.g. a build error: no test ran
    failed += 1
line = f"bazel: {passed} passed, {failed} failed"
print(line + (f", {skipped} skipped" if skipped else ""))
' "$testlogs" "$status"
exit "$status"
