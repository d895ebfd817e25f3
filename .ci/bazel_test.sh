#!/usr/bin/env bash
# Builds every Bazel target and runs every Bazel test target (or the ones
# given) offline with a virtualenv's Python; installs Bazel 4 from Debian's
# packages (bazel-bootstrap) first if it is missing. .ci/run runs them all.
#
# usage: .ci/bazel_test.sh [--python PATH] [BAZEL_TEST_ARG...]
#
#   --python PATH   the virtualenv's python (default: $RING_LOSS_TF_PYTHON,
#                   else python3 on PATH), with the project and its test
#                   extra installed (pip install -e ".[test]").
#   BAZEL_TEST_ARG  target patterns and `bazel test` flags (default: //...),
#                   e.g. //tests:layers/test_layers --test_filter=ring
#
# `bazel build //...` always runs first, so every binary and test target is
# built even when only some tests run, and each py_binary is started once with
# --help. The last line is the test-case count
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
    -h | --help) sed -n '2,19p' "$0" | cut -c3-; exit 0 ;;
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
  echo ".ci/bazel_test.sh: no runnable python at '${python}': pass" \
    "--python /path/to/venv/bin/python" >&2
  exit 2
fi
# Absolute, but not resolved: a venv's bin/python must stay the symlink.
if [[ $python != /* ]]; then
  python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")"
fi

# Debian's bazel-bootstrap installs Bazel 4 as bazel-4 (and bazel); prefer it
# to any other `bazel` on PATH, e.g. a Bazelisk that would download Bazel.
if ! command -v bazel-4 >/dev/null; then
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
  command bazel-4 "${startup[@]+"${startup[@]}"}" "$@"
}
events=$(mktemp)
# Stop the server when done, so no JVM outlives the run.
trap 'rm -f "$events"; bazel shutdown >/dev/null 2>&1 || true' EXIT

common=(--repo_env=RING_LOSS_TF_PYTHON="$python")
version=$(dpkg-query -W -f='${Version}' bazel-bootstrap 2>/dev/null ||
  command bazel-4 --version)
echo "Bazel ${version}, python ${python}"

start=$SECONDS
bazel build "${common[@]}" //...
echo "bazel build //...: $((SECONDS - start)) s"

# Each binary starts from its runfiles with the toolchain's python and parses
# its flags: argparse prints the help and exits 0, absl exits 1 after it.
# Two at a time: a start-up is mostly single-threaded imports.
start=$SECONDS
bin=$(bazel info "${common[@]}" bazel-bin 2>/dev/null)
binaries=$(bazel query "${common[@]}" 'kind(py_binary, //...)' 2>/dev/null)
helps=$(mktemp -d)
trap 'rm -rf "$events" "$helps"; bazel shutdown >/dev/null 2>&1 || true' EXIT
run_help() {  # run_help TARGET: its --help output and exit code, in $helps
  local target=$1 package=${1#//} name=${1##*:} code=0
  package=${package%%:*}
  "$bin/${package:+$package/}$name" --help >"$helps/$name.out" 2>&1 ||
    code=$?
  echo "$code" >"$helps/$name.code"
}
running=0
for target in $binaries; do
  run_help "$target" &
  running=$((running + 1))
  if ((running == 2)); then
    wait -n || true
    running=$((running - 1))
  fi
done
wait
for target in $binaries; do
  name=${target##*:}
  code=$(cat "$helps/$name.code")
  if [[ $code != 0 ]] && ! grep -q -- --helpfull "$helps/$name.out"; then
    tail -20 "$helps/$name.out"
    echo "$target --help failed (exit $code): see above" >&2
    exit 1
  fi
done
echo "--help of" $binaries": $((SECONDS - start)) s"

start=$SECONDS
status=0
bazel test "${common[@]}" --build_event_json_file="$events" "${args[@]}" ||
  status=$?
echo "bazel test ${args[*]}: $((SECONDS - start)) s (exit $status)"

# Count the test cases of the test targets that ran (or were cached), from
# the build events and each target's JUnit XML.
"$python" - "$events" "$status" <<'EOF'
import json
import sys
import xml.etree.ElementTree as ET
from urllib.parse import unquote, urlparse

events_file, status = sys.argv[1], int(sys.argv[2])
results = {}  # label -> (status, test.xml path); the last attempt wins
with open(events_file) as events:
    for line in events:
        event = json.loads(line)
        if "testResult" not in event.get("id", {}):
            continue
        result = event.get("testResult", {})
        xml = [
            unquote(urlparse(output["uri"]).path)
            for output in result.get("testActionOutput", [])
            if output.get("name") == "test.xml"
        ]
        label = event["id"]["testResult"]["label"]
        results[label] = (result.get("status"), xml[0] if xml else None)

passed = failed = skipped = 0
for label, (result, xml) in sorted(results.items()):
    counts = []
    try:
        for suite in ET.parse(xml).getroot().iter("testsuite"):
            counts.append(
                [
                    int(suite.get(key, 0))
                    for key in ("tests", "failures", "errors", "skipped")
                ]
            )
    except (TypeError, OSError, ET.ParseError):
        pass
    if result != "PASSED" and not any(c[1] + c[2] for c in counts):
        # Crashed or timed out before pytest wrote its report.
        print(f"{label}: {result}, no failing test case reported")
        failed += 1
    for tests, failures, errors, skips in counts:
        failed += failures + errors
        skipped += skips
        passed += tests - failures - errors - skips
if status and not failed:  # e.g. a build error, before any test ran
    failed += 1
line = f"bazel: {passed} passed, {failed} failed"
print(line + (f", {skipped} skipped" if skipped else ""))
EOF
exit "$status"
