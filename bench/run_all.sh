#!/usr/bin/env bash
# Run every calib benchmark in turn; output goes to the terminal and to bench/out/<name>.txt.
#
#   bench/run_all.sh            # full runs (about 1.5 h on 2 cores: the fit benchmark caps PyMC at 45 min a cell)
#   bench/run_all.sh --quick    # smoke run of each benchmark (minutes)
#
# Uses $PYTHON (default: python, the active environment's). Exit status: the
# number of benchmarks that failed (a budget benchmark failing its budget counts).
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
QUICK=""
if [ "${1:-}" = "--quick" ]; then QUICK="--quick"; fi
mkdir -p bench/out
failed=0
run() {  # name, command...
  local name="$1"; shift
  echo "=== $name: $*"
  "$@" 2>&1 | tee "bench/out/$name.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || failed=$((failed + 1))
  echo
}
run predict  "$PY" bench/bench_predict.py $QUICK
run roofline "$PY" bench/bench_roofline.py $QUICK
run import   "$PY" bench/bench_import.py $QUICK
run e2e      "$PY" bench/bench_e2e.py $QUICK
run fit      "$PY" bench/bench_fit.py $QUICK
echo "benchmarks failed: $failed (outputs in bench/out/)"
exit "$failed"
