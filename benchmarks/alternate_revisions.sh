#!/usr/bin/env bash
# Alternate a benchmark between a past revision and the working tree, one process each, pair after pair.
#
# Two builds of the fused decode step cannot share a process (they register the same operators), and speed on
# a shared machine drifts 2-4x within an hour, so a change is measured by alternating whole runs: baseline,
# working tree, baseline, ... The baseline runs from a temporary git worktree of REV, imported first through
# PYTHONPATH; both use this checkout's virtual environment. In the benchmark's arguments, {side} becomes
# "base" or "work" and {pair} the pair's number, so each run writes its own results.
#
#   bash benchmarks/alternate_revisions.sh HEAD 4 -- benchmarks/bench_fused_step.py --skip-steps --overhead \
#       --dtypes float32 --out /tmp/ab_{side}_{pair}
set -euo pipefail

if [ $# -lt 4 ] || [ "$3" != "--" ]; then
  echo "usage: $0 REV PAIRS -- SCRIPT [ARGS...]  ({side} and {pair} in ARGS are filled in)" >&2
  exit 2
fi
rev=$1 pairs=$2
shift 3
root=$(git rev-parse --show-toplevel)
python=${PYTHON:-$root/.venv/bin/python}
base=$(mktemp -d)
cleanup() { git -C "$root" worktree remove --force "$base" >/dev/null 2>&1 || rm -rf "$base"; }
trap cleanup EXIT
git -C "$root" worktree add --detach --quiet "$base" "$rev"

for pair in $(seq 1 "$pairs"); do
  for side in base work; do
    tree=$root
    [ "$side" = base ] && tree=$base
    args=()
    for arg in "$@"; do
      arg=${arg//\{side\}/$side}
      args+=("${arg//\{pair\}/$pair}")
    done
    echo "== pair $pair, $side ($( [ "$side" = base ] && echo "$rev" || echo "working tree")): ${args[*]}"
    (cd "$tree" && PYTHONPATH="$tree/src" "$python" "${args[@]}")
  done
done
