#!/usr/bin/env bash
# Generation speed on one CUDA GPU, run as-is from a fresh GPU machine: `bash scripts/bench_gpu.sh`.
# Two runs of `densessm bench generate --device cuda` (the 350M models at batch 6): the recurrent models'
# decode steps compiled (torch.compile, CUDA graphs), then all eager. Each run is capped by `timeout` (about
# 6 minutes together) and saves its JSON after every model, so a run cut short keeps what it measured.
# Results: $OUT/generation_cuda{,_eager}.{md,json,png,log} ($OUT defaults to ./out).
#
# Python and wheels: scripts/gpu_env.sh (the GPU check, scripts/gpu_check.sh, measures more than this).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./out}
COMPILE_TIMEOUT=${COMPILE_TIMEOUT:-240}
EAGER_TIMEOUT=${EAGER_TIMEOUT:-120}
mkdir -p "$OUT"
source scripts/gpu_env.sh

common=(--models dense_retnet_350m retnet_350m dense_mamba_360m mamba_360m llama_350m_stock --batch 6
    --new-tokens 512 --contexts 1024 8192 --steps 20 --overhead-steps 30)
failed=0
bench() { # name, seconds, extra arguments
    local name=$1 limit=$2 rc=0
    shift 2
    echo "== densessm bench generate --device cuda $* ${common[*]} --out $OUT/$name  (timeout ${limit}s)"
    timeout "$limit" "$py" -m densessm.cli bench generate --device cuda "$@" "${common[@]}" --out "$OUT/$name" 2>&1 |
        tee "$OUT/$name.log" || rc=$?
    if [ "$rc" = 124 ]; then
        echo "== $name: timed out after ${limit}s; $OUT/$name.json, if there, holds the models it finished"
    else
        echo "== $name: exit $rc"
    fi
    [ "$rc" = 0 ] || failed=1
}
bench generation_cuda "$COMPILE_TIMEOUT" --compile
bench generation_cuda_eager "$EAGER_TIMEOUT"
ls -l "$OUT"
exit "$failed"
