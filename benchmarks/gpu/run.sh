#!/usr/bin/env bash
# Everything the GPU machine measures, in one call of at most 9 minutes:
#
#   bash benchmarks/gpu/run.sh OUT_DIR            # on the GPU
#   SMOKE=1 bash benchmarks/gpu/run.sh OUT_DIR    # rehearsal on the CPU: every stage, tiny sizes
#
# Without a CUDA GPU (and without SMOKE=1) it stops at once, with one line.
#
# Stages, in order, each under `timeout` (so one that overruns leaves the others' files), each
# writing into OUT_DIR:
#   env       GPU, driver, torch / Triton / CUDA versions                       -> env.txt
#   tests     the CUDA kernel tests: pytest tests/test_kernels.py -m gpu         -> tests.log
#   kernels   benchmarks/kernels/run.py on paper-64 at batch 1, 16, 128        -> kernels64.{log,json,md}
#   bench64   fdm-infer bench on paper-64: batch 1/16/128/256, every variant, and a 1000-step
#             DDPM run of 64 images                                             -> bench64.{log,json,md}
#   bench128  paper-128 at batch 1/16/128: naive, fused, bf16, fast path; no sampling; with the time left
#                                                                               -> bench128.{log,json,md}
# stages.tsv records each stage's exit status and seconds; the summary table is printed last.
# Nothing is installed: the repo is used in place (PYTHONPATH). Exit status non-zero if a stage failed.
set -uo pipefail
if [ $# -ne 1 ]; then
    echo "usage: [SMOKE=1] bash benchmarks/gpu/run.sh OUT_DIR" >&2
    exit 2
fi
case $1 in /*) out_arg=$1 ;; *) out_arg="$PWD/$1" ;; esac
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
SMOKE=${SMOKE:-0}
if [ "$SMOKE" != 1 ] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "benchmarks/gpu/run.sh: no CUDA GPU here (torch sees none); SMOKE=1 rehearses every stage on the CPU" >&2
    exit 1
fi
results_dir=$(mkdir -p "$out_arg" && cd "$out_arg" && pwd) || exit 2
# the whole call; the last stages get what is left. The rehearsal checks that every stage runs, not the
# GPU's time budget: on a CPU that other jobs share its stages take minutes, not seconds.
if [ "$SMOKE" = 1 ]; then TOTAL_S=${TOTAL_S:-1200} SMOKE_CAP_S=300; else TOTAL_S=${TOTAL_S:-530}; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
if [ "$SMOKE" = 1 ]; then
    export TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
    unset TRITON_INTERPRET
fi
start=$SECONDS
printf 'stage\tstatus\tseconds\n' > "$results_dir/stages.tsv"
status=0

# stage NAME CAP_S COMMAND...: runs COMMAND under timeout min(CAP_S, time left - 10 s), logs to NAME.log
stage() {
    local name=$1 cap=$2
    shift 2
    [ "$SMOKE" = 1 ] && cap=$SMOKE_CAP_S
    local left=$((TOTAL_S - (SECONDS - start) - 10))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 30 ]; then
        echo "stage $name: not run, ${left}s left" | tee "$results_dir/$name.log"
        printf '%s\tnot run\t0\n' "$name" >> "$results_dir/stages.tsv"
        return
    fi
    local t0=$SECONDS
    echo "== $name (at most ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$results_dir/$name.log" 2>&1
    local rc=$?
    tail -n 3 "$results_dir/$name.log"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$results_dir/stages.tsv"
    [ $rc -ne 0 ] && status=1
}

{
    date -u +%FT%TZ
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1
    fi
    "$PY" - <<'PYEOF' 2>&1
import torch
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = None
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| triton", triton_version,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
PYEOF
} > "$results_dir/env.txt"
cat "$results_dir/env.txt"

# One set of command lines for both modes; the rehearsal only shrinks the sizes.
if [ "$SMOKE" = 1 ]; then
    p64=tiny-32 p128=tiny-32 kernel_batches="1 2" kernel_smoke=--smoke
    batches64=(--batch-size 1 --batch-size 2) batches128=(--batch-size 1 --batch-size 2) sampling=(--sample-images 2 --sample-steps 5)
    timing=(--repeats 3 --budget 1)
else
    p64=paper-64 p128=paper-128 kernel_batches="1 16 128" kernel_smoke=
    batches64=(--batch-size 1 --batch-size 16 --batch-size 128 --batch-size 256)
    batches128=(--batch-size 1 --batch-size 16 --batch-size 128)
    sampling=(--sample-images 64 --sample-steps 1000) timing=(--repeats 20 --budget 2)
fi
# on the CPU the CUDA tests are collected and skipped
stage tests 90 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_kernels.py -m gpu
# shellcheck disable=SC2086
stage kernels64 90 "$PY" benchmarks/kernels/run.py $kernel_smoke --presets $p64 --batches $kernel_batches \
    --out "$results_dir/kernels64.json" --md "$results_dir/kernels64.md"
stage bench64 270 "$PY" -m fdm_infer.cli bench --preset $p64 "${batches64[@]}" "${timing[@]}" "${sampling[@]}" \
    --save-json "$results_dir/bench64.json" --save-md "$results_dir/bench64.md"
stage bench128 240 "$PY" -m fdm_infer.cli bench --preset $p128 "${batches128[@]}" "${timing[@]}" --no-sampling \
    --inference-path naive --inference-path fused --inference-path bf16 --inference-path triton --save-json "$results_dir/bench128.json" --save-md "$results_dir/bench128.md"
"$PY" benchmarks/gpu/summary.py "$results_dir" | tee "$results_dir/summary.md"
exit $status
