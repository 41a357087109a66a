#!/usr/bin/env bash
# The checks that need a GPU, in one run: the CUDA backend's share of the suite on the
# device (no simulator), `bench --device cuda --compare torch`, and a per-kernel profile.
# Run from the project root on a machine with a GPU, numba-cuda and torch (CUDA build).
# Logs and the bench's JSON go to $OUT (default /tmp/fastbn-gpu).  BASELINE=DIR first
# benches the fastbn package in DIR (an earlier version) the same way; NUMBA_LAUNCH=1
# also benches with every kernel launched through Numba (FASTBN_CUDA_DIRECT_LAUNCH=0).
# PYTEST_ARGS goes to pytest (e.g. "-n 6 --dist loadfile": Numba's compiles are the slow part,
# and xdist spreads them over the device machine's cores; the image's pytest-benchmark warns
# under xdist, which filterwarnings=error makes fatal, so it is left out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fastbn-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
$PY -c "import sys, numpy, numba; from numba import cuda; print(sys.version.split()[0], \
'numpy', numpy.__version__, 'numba', numba.__version__, cuda.get_current_device().name)"

echo "== the CUDA backend's tests on the device"
FASTBN_TEST_BACKENDS=numba_cuda timeout "${TEST_SECONDS:-240}" $PY -m pytest -q -p no:cacheprovider \
    -p no:benchmark --ignore=tests/test_cython_backend.py --maxfail=40 ${PYTEST_ARGS:-} tests 2>&1 | tee "$OUT/tests.log" | tail -60
[[ ${PIPESTATUS[0]} == 0 ]] || status=1

if [[ -n "${BASELINE:-}" ]]; then
    echo "== baseline: bench --device cuda --compare torch with PYTHONPATH=$BASELINE"
    (cd "$BASELINE" && PYTHONPATH=$PWD:$PYTHONPATH timeout "${BENCH_SECONDS:-200}" $PY -m fastbn bench \
        --device cuda --compare torch --repeats "${REPEATS:-5}" --json "$OUT/baseline.json" \
        > "$OUT/baseline.log" 2>&1) || status=1
    tail -n 40 "$OUT/baseline.log"
fi

echo "== bench --device cuda --compare torch (${DTYPES:-float32})"
for dtype in ${DTYPES:-float32}; do
    timeout "${BENCH_SECONDS:-200}" $PY -m fastbn bench --device cuda --compare torch \
        --dtype "$dtype" --repeats "${REPEATS:-5}" --json "$OUT/bench-$dtype.json" \
        || status=1
done

if [[ -n "${NUMBA_LAUNCH:-}" ]]; then
    echo "== the same with every launch through Numba (FASTBN_CUDA_DIRECT_LAUNCH=0)"
    FASTBN_CUDA_DIRECT_LAUNCH=0 timeout "${BENCH_SECONDS:-200}" $PY -m fastbn bench \
        --device cuda --compare torch --repeats "${REPEATS:-5}" \
        --json "$OUT/bench-numba-launch.json" > "$OUT/bench-numba-launch.log" 2>&1 || status=1
    tail -n 8 "$OUT/bench-numba-launch.log"
fi

if [[ -n "${PROFILE:-1}" && "${PROFILE:-1}" != 0 ]]; then
    echo "== per-kernel device time (torch.profiler)"
    timeout "${PROFILE_SECONDS:-120}" $PY tools/gpu_profile.py 2>&1 | tee "$OUT/profile.log" || status=1
fi
exit $status
