#!/usr/bin/env bash
# Build hotops._C with AddressSanitizer + UndefinedBehaviorSanitizer and run the C++-backed tests
# under it (every ISA variant this CPU runs: the tests' `isa` fixture covers them). Run it from a
# virtual environment that has torch and the test extras (pip install torch==2.13.0 '.[test]').
# Any ASan/UBSan report aborts the run with the report on stderr; exit status 0 means clean.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
build=${BUILD_DIR:-build/sanitize}
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DHOTOPS_SANITIZE=ON \
  -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v "$PY")" >/dev/null
cmake --build "$build"
cp -r python/hotops "$stage/hotops"
cp "$build"/_C*.so "$stage/hotops/"

# The interpreter itself is not instrumented, so the runtimes are preloaded; Python's own
# allocations at exit are not leaks of ours, so leak checking is off.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:detect_odr_violation=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export PYTHONPATH="$stage:tests"
# -p no:cacheprovider: nothing written into the tree; the distributed test spawns fresh
# interpreters that inherit the preload too.
"$PY" -m pytest tests -q -p no:cacheprovider -m "not gpu and not slow" "$@"
echo "sanitize: no ASan/UBSan findings"
