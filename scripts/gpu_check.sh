#!/usr/bin/env bash
# The GPU check, run as-is from a fresh GPU machine in at most 8 minutes: `bash scripts/gpu_check.sh`
# (docs/benchmarks/gpu.md gives the device command, the wheels to carry and what each number means).
#
# Stages, each a process under its own `timeout` (a slow stage cannot eat the others' time), each adding to
# $OUT/gpu_check.json as it goes (a stage cut short keeps what it finished): the machine and its measured ceilings;
# `pytest -m gpu`; training tokens/s and peak memory at L = 2,048 (bf16) with the dense training overhead; prefill
# tokens/s at 8k and 32k; decode tokens/s at batch 6, 64 and 1 through the compiled step (CUDA graphs) at positions
# 2k to 10k, with the dense decode overhead; then the report. The measurements: src/densessm_lab/bench/gpu.py.
# Results ($OUT defaults to ./out): gpu_check.{json,md,png,log} and gpu_tests.log.
#
#   --dry-run              the same stages on the CPU with the tiny presets (seconds each; no GPU, no pytest)
#   --overwrite            replace the results already in $OUT
#   --compile-backend B    the decode step's torch.compile backend (default inductor; none in the dry run)
# Stage limits in seconds (environment): MACHINE_S, TESTS_S, TRAIN_S, PREFILL_S, DECODE_S, REPORT_S.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=() decode=() overwrite=() dry=0
while [ $# -gt 0 ]; do
    case $1 in
    --dry-run) dry=1 mode=(--dry-run) ;;
    --overwrite) overwrite=(--overwrite) ;;
    --compile-backend)
        [ $# -ge 2 ] || { echo "gpu_check.sh: --compile-backend needs a backend name (inductor, eager, none)" >&2; exit 2; }
        decode=(--compile-backend "$2")
        shift
        ;;
    -h | --help) sed -n '2,16p' "$0" | cut -c3-; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --dry-run, --overwrite, --compile-backend NAME)" >&2; exit 2 ;;
    esac
    shift
done
OUT=${OUT:-./out}
results=("$OUT"/gpu_check.{json,md,png,log} "$OUT/gpu_tests.log")
for f in "${results[@]}"; do
    if [ -e "$f" ] && [ ${#overwrite[@]} = 0 ]; then
        echo "gpu_check.sh: $f already exists; nothing was measured (pass --overwrite to replace the results)" >&2
        exit 2
    fi
done
started=$SECONDS

# the Python first, then the flags checked by the torch that runs the stages, and only then the results replaced:
# a bad flag costs seconds, not a run of failing stages, and no earlier results (the setup's output joins the log)
setup_log=$(mktemp)
trap 'rm -f "$setup_log"' EXIT
if [ "$dry" = 1 ]; then
    py=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    echo "== dry run on the CPU with $py" | tee "$setup_log"
else
    source scripts/gpu_env.sh > >(tee "$setup_log") 2>&1
    wait $! # the tee has written all of it
fi
rc=0
err=$("$py" -m densessm_lab.bench.gpu decode --out "$OUT" --check-args "${mode[@]}" "${decode[@]}" 2>&1) || rc=$?
if [ "$rc" != 0 ]; then
    [ "$rc" = 2 ] && echo "gpu_check.sh: ${err##*error: }" >&2 || echo "$err" >&2
    exit "$rc"
fi

mkdir -p "$OUT"
rm -f "${results[@]}" # none there, or --overwrite
cat "$setup_log" >"$OUT/gpu_check.log"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

failed=0
stage() { # name, limit in seconds, extra arguments: the stage stops starting work at 3/4 of its limit
    local name=$1 limit=$2 rc=0
    shift 2
    echo "== stage $name (limit ${limit}s, at $((SECONDS - started))s)"
    timeout -k 10 "$limit" "$py" -m densessm_lab.bench.gpu "$name" --out "$OUT" --budget $((limit * 3 / 4)) \
        --command "bash scripts/gpu_check.sh${mode[*]:+ ${mode[*]}}" "${mode[@]}" "$@" || rc=$?
    case $rc in
    0) ;;
    124 | 137) echo "== stage $name: stopped at its limit of ${limit}s; $OUT/gpu_check.json keeps what it finished" ;;
    *) echo "== stage $name: exit $rc" ;;
    esac
    [ "$rc" = 0 ] || failed=1
    return 0
}

stage machine "${MACHINE_S:-30}" "${overwrite[@]}"
[ "$failed" = 0 ] || { echo "== the machine stage failed: nothing else is measured" >&2; exit 1; }
if [ "$dry" = 1 ]; then
    stage tests 30 --pytest-rc "not run (dry run: without a GPU every gpu test skips)"
else
    limit=${TESTS_S:-60} rc=0
    # only the files that hold gpu tests: a module the image cannot import (the server's, the evaluation's) is
    # no GPU failure
    mapfile -t files < <(grep -l 'mark\.gpu' tests/test_*.py || true)
    if [ ${#files[@]} = 0 ]; then
        stage tests 20 --pytest-rc "not run (no test is marked gpu)"
    else
        echo "== pytest -m gpu ${files[*]} (limit ${limit}s)"
        timeout -k 10 "$limit" "$py" -m pytest -m gpu -q -rfEs -p no:cacheprovider --continue-on-collection-errors \
            "${files[@]}" >"$OUT/gpu_tests.log" 2>&1 || rc=$?
        tail -n 30 "$OUT/gpu_tests.log"
        if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then rc="$rc (stopped at the ${limit}s limit)"; fi
        stage tests 20 --pytest-log "$OUT/gpu_tests.log" --pytest-rc "$rc"
    fi
fi
stage train "${TRAIN_S:-90}"
stage prefill "${PREFILL_S:-35}"
stage decode "${DECODE_S:-180}" "${decode[@]}"
stage report "${REPORT_S:-25}"
echo "== done in $((SECONDS - started))s"
ls -l "$OUT"
exit "$failed"
