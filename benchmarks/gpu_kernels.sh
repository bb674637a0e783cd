#!/usr/bin/env bash
# On a GPU machine: the kernel tests on CUDA, then the kernel benchmark, logs under --out DIR
# (default out/gpu-kernels).
#
#   bash benchmarks/gpu_kernels.sh                    # tests bench64 bench128 (about 10-12 min on an H100)
#   bash benchmarks/gpu_kernels.sh --out DIR tests bench64   # stages, in the order given:
#       tests     pytest tests/test_kernels.py (CUDA + interpreter variants)   -> tests.log
#       bench64   bench_kernels.py on paper-64 at batch 1, 16, 128              -> bench64.{log,json,md}
#       bench128  the same on paper-128                                         -> bench128.{log,json,md}
#       sweep     launch-heuristic sweep at batch 128 (both presets)            -> sweep.{log,json,md}
#
# Each stage runs under `timeout` ($STAGE_TIMEOUT s, default 540) so that one overrunning stage
# still leaves the others' files; the JSON is rewritten after every benchmark row. Needs python3
# with torch (CUDA) and triton; the repo is used in place (PYTHONPATH), nothing is installed.
# Exit status: non-zero if any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."
results_dir=out/gpu-kernels
if [ "${1:-}" = "--out" ]; then
    results_dir=$2
    shift 2
fi
mkdir -p "$results_dir"
PY=${PYTHON:-python3}
STAGE_TIMEOUT=${STAGE_TIMEOUT:-540}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
unset TRITON_INTERPRET
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests bench64 bench128)

environment() {
    echo "# $(date -u +%FT%TZ) $(hostname)"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1 || true
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__,
'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1
}

status=0
for stage in "${stages[@]}"; do
    case "$stage" in
        tests)
            { environment; timeout "$STAGE_TIMEOUT" "$PY" -m pytest -q -rs tests/test_kernels.py; } 2>&1 | tee "$results_dir/tests.log"
            ;;
        bench64 | bench128)
            p=paper-${stage#bench}
            { environment; timeout "$STAGE_TIMEOUT" "$PY" benchmarks/bench_kernels.py --presets "$p" \
                --out "$results_dir/$stage.json" --md "$results_dir/$stage.md"; } 2>&1 | tee "$results_dir/$stage.log"
            ;;
        sweep)
            { environment; timeout "$STAGE_TIMEOUT" "$PY" benchmarks/bench_kernels.py --batches 128 --impls triton \
                --ops masked_skip/pyramid --sweep --out "$results_dir/sweep.json" --md "$results_dir/sweep.md"; } 2>&1 | tee "$results_dir/sweep.log"
            ;;
        *)
            echo "unknown stage $stage (tests, bench64, bench128, sweep)" >&2
            false
            ;;
    esac
    rc=$?
    [ $rc -ne 0 ] && { echo "stage $stage failed with exit status $rc" >&2; status=1; }
done
ls -l "$results_dir"
exit $status
