#!/usr/bin/env bash
# On a machine with a CUDA GPU: build hotops, run the GPU tests and the GPU
# benchmark cases, and write everything under $OUT (or ./gpu-results). Without a GPU it says so
# and exits 0. Budget: under 5 minutes; each family adds its cases to `hotops bench --device cuda`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu-results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA GPU visible to torch here; nothing to check." | tee "$OUT/gpu_check.txt"
  exit 0
fi
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
} 2>&1 | tee "$OUT/machine.txt"

# build against the machine's own torch/triton (no build isolation: nothing can be fetched there)
site=$(mktemp -d)
timeout 240 "$PY" -m pip install -q --no-build-isolation --no-deps --target "$site" . \
  2>&1 | tail -20 | tee "$OUT/build.txt"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"

status=0
timeout 150 "$PY" -m pytest tests -q -m gpu -p no:cacheprovider 2>&1 | tee "$OUT/tests.txt" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
timeout 150 "$PY" -m hotops.bench.cli bench --device cuda --json "$OUT/bench.json" --plot "$OUT" \
  2>&1 | tee "$OUT/bench.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "gpu_check: done (status $status); results in $OUT"
exit $status
