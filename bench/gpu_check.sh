#!/usr/bin/env bash
# The GPU check in one command: SP-SA fused-vs-eager equality (forward and gradients, fp32 and
# bf16); one SP-SA layer's forward+backward time and peak memory against flash SDPA and the eager
# path (mlp prior, N = 196 and 576, B 64, dim 384, 6 heads, bf16); spvit_s vs DeiT-S training
# images/s at batch 64; a 1-GPU nccl Ray Train trial of a digits candidate; a 3-trial search with
# --gpus-per-worker 1. Writes OUT_DIR/gpu_check.json, OUT_DIR/gpu_check.md and OUT_DIR/gpu_check.log.
#
#   bench/gpu_check.sh OUT_DIR               # on a machine with one CUDA GPU
#   bench/gpu_check.sh OUT_DIR --cpu-smoke   # tiny sizes on CPU: proves the script, no GPU numbers
#
# Python: by default the check first runs `make install` (the project's venv, .venv, created
# with the Makefile's recipe: torch==2.14.1 and the project's dependencies from the package
# registries, which the machine must reach); nothing else is installed. GPU_CHECK_PY=/path/python
# skips the install and uses that interpreter as it is (a machine without registries whose image
# already has torch; parts whose packages are missing are reported "skipped").
# Time: the four parts share a budget of GPU_CHECK_BUDGET_S seconds (default 470, i.e. under 8
# minutes after the install); each part also has its own cap, and a part stopped at its limit is
# reported as such. Scratch run folders go to GPU_CHECK_WORK (default: a new folder under /tmp).
# Exit code: 0 all ran and every target met; 1 a part failed, was skipped or fp32 equality
# failed; 2 bad usage or the install failed; 3 everything ran but a performance target was missed.
set -uo pipefail

usage() { echo "usage: bench/gpu_check.sh OUT_DIR [--cpu-smoke]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
SMOKE=""
for arg in "$@"; do
    case $arg in
        --cpu-smoke) SMOKE="--cpu-smoke" ;;
        *) echo "unknown option '$arg'; the only option is --cpu-smoke" >&2; usage ;;
    esac
done

cd "$(dirname "$0")/.." || exit 2
REPO=$PWD
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$WORK" || exit 2
rm -f "$WORK"/*.json "$WORK"/*.rc
LOG=$OUT/gpu_check.log
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1

if [ -n "${GPU_CHECK_PY:-}" ]; then
    PY=$GPU_CHECK_PY
    echo "python: $PY (as given, nothing installed)"
else
    echo "python: make install (.venv)"
    make install PYTHON="${PYTHON:-python3}" || { echo "make install failed"; exit 2; }
    PY=$REPO/.venv/bin/python
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export RAY_TMPDIR=${RAY_TMPDIR:-$WORK/ray} RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$WORK/inductor}
mkdir -p "$RAY_TMPDIR"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader

if [ -n "$SMOKE" ]; then BUDGET=${GPU_CHECK_BUDGET_S:-1800}; else BUDGET=${GPU_CHECK_BUDGET_S:-470}; fi
DEADLINE=$(( $(date +%s) + BUDGET ))

# part NAME CAP_S ARGS...: run one part under min(CAP_S, what is left of the budget).
part() {
    local name=$1 cap=$2; shift 2
    local left=$(( DEADLINE - $(date +%s) ))
    local limit=$(( cap < left ? cap : left ))
    if [ "$limit" -le 5 ]; then
        echo "124 (no time left in the budget)" >"$WORK/$name.rc"
        echo "[$name] not started: the ${BUDGET}s budget is spent"
        return
    fi
    echo "== $name (limit ${limit}s)"
    GPU_CHECK_PART_LIMIT_S=$limit timeout --kill-after=15 "$limit" "$PY" "$@" \
        --out "$WORK/$name.json" $SMOKE
    echo "$?" >"$WORK/$name.rc"
}

if [ -n "$SMOKE" ]; then
    part kernels 600 bench/gpu_kernels.py
    part model 600 bench/gpu_model.py
    part trial 900 bench/gpu_trials.py trial --work "$WORK"
    part search 900 bench/gpu_trials.py search --work "$WORK"
else
    part kernels 200 bench/gpu_kernels.py
    part model 90 bench/gpu_model.py
    part trial 120 bench/gpu_trials.py trial --work "$WORK"
    part search 200 bench/gpu_trials.py search --work "$WORK"
fi

"$PY" bench/gpu_report.py --parts "$WORK" --out "$OUT" $SMOKE
code=$?
echo "results: $OUT/gpu_check.md, $OUT/gpu_check.json; scratch: $WORK; exit $code"
exit $code
