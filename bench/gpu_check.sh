#!/usr/bin/env bash
# The GPU check: on a CUDA machine, in about 8 minutes, the CUDA tests and bench/bench_gpu.py (the sampler and the
# learner in bf16, GRPO in process and, where Ray is installed, on Ray with rollout workers on fractional GPUs),
# every figure in $OUT/gpu_check.json (OUT: bench/results unless set). Without a CUDA device it says so, exit 0.
#
#   bench/gpu_check.sh                      # a machine with this project's venv (.venv) or its packages
#   OUT=$OUT PY=python3 bench/gpu_check.sh  # a lent GPU machine, after bench/gpu_wheels.sh here
#
# A lent GPU machine has torch but neither pydantic nor Ray, and takes along at most 64 MiB: pydantic's wheels
# travel (bench/gpu_wheels.sh fetches them into .whl/; carry .whl), Ray's (79 MB) does not, so there the Ray run
# reports "Ray is not installed here" and the in-process run stands for it. tests/test_cuda.py needs no Ray.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: torch sees no CUDA device here: nothing to check"
  exit 0
fi
if [ -d .whl ] && ! "$PY" -c "import pydantic" 2>/dev/null; then  # carried to a machine without network
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dgrpo_site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/dgrpo_site"
fi
nvidia-smi >"$OUT/gpu_check_nvidia_smi.txt" 2>&1 || true
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/gpu_check_tests.txt"
tests=$?
timeout 480 "$PY" -m bench.bench_gpu --device cuda --grpo-minutes "${GRPO_MINUTES:-2}" --out "$OUT/gpu_check.json"
bench=$?
echo "gpu_check: CUDA tests exit $tests, bench exit $bench; figures in $OUT/gpu_check.json"
exit $((tests || bench))
