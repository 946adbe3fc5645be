#!/usr/bin/env bash
# Generation speed on one CUDA GPU, run as-is from a fresh GPU machine: `bash scripts/bench_gpu.sh`.
# Two runs of `densessm bench generate --device cuda` (the 350M models at batch 6): the recurrent models'
# decode steps compiled (torch.compile, CUDA graphs), then all eager. Each run is capped by `timeout` (about
# 6 minutes together) and saves its JSON after every model, so a run cut short keeps what it measured.
# Results: $OUT/generation_cuda{,_eager}.{md,json,png,log} ($OUT defaults to ./out).
#
# Python: the machine's python3 when its torch already sees the GPU (GPU images hold a CUDA torch and may have
# no package index); otherwise a .venv-gpu with requirements-dev.txt's torch pin from the default index (the
# CUDA build on Linux) and its other pins. A transformers other than the pinned one is replaced, without
# touching the machine's packages, from wheels carried in .whl/ or else from the index when it is reachable.
# GPU images may hold an older transformers and no index: before the device run, on a machine with PyPI,
#   pip download --no-deps --only-binary=:all: -d .whl transformers==5.24.0
# and pass ".whl" in the device tool's `carry` (it is git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./out}
COMPILE_TIMEOUT=${COMPILE_TIMEOUT:-240}
EAGER_TIMEOUT=${EAGER_TIMEOUT:-120}
mkdir -p "$OUT"
pin() { grep -E "^$1==" requirements-dev.txt; }
sees_gpu() { "$1" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; }

echo "== GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,utilization.gpu --format=csv ||
    echo "(nvidia-smi failed)"

if sees_gpu python3; then
    py=python3
    echo "== Python: $(command -v python3), whose torch sees the GPU"
else
    echo "== Python: .venv-gpu with $(pin torch) from the default index and the other pins of requirements-dev.txt"
    [ -x .venv-gpu/bin/python ] || python3 -m venv .venv-gpu
    py=.venv-gpu/bin/python
    # not through this machine's pip configuration, should it point at a local CPU-only torch wheel
    env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
        "$py" -m pip install -q --disable-pip-version-check "$(pin torch)"
    grep -vE '^(torch==|#|$)' requirements-dev.txt >.venv-gpu/requirements-without-torch.txt
    "$py" -m pip install -q --disable-pip-version-check -r .venv-gpu/requirements-without-torch.txt
    sees_gpu "$py" || { echo "the torch in .venv-gpu sees no GPU" >&2; exit 1; }
fi

site=/tmp/densessm-gpu-site  # packages for this run only, ahead of the interpreter's own
want=$(pin transformers | cut -d= -f3)
have=$("$py" -c 'import transformers; print(transformers.__version__)' 2>/dev/null || echo none)
if [ "$have" != "$want" ]; then
    echo "== transformers $have here, $want pinned: installing it into $site"
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$py" -m pip install -q --disable-pip-version-check --no-index --no-deps --upgrade --target "$site" .whl/*.whl
    else
        "$py" -m pip install -q --disable-pip-version-check --no-deps --retries 0 --timeout 15 --target "$site" \
            "transformers==$want" || echo "(no index reachable and no .whl/: going on with transformers $have)"
    fi
fi
# the checkout's own code, no install step (an editable install would need setuptools from an index)
export PYTHONPATH="$site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TORCH_LOGS=recompiles
"$py" -c 'import torch, transformers, densessm
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
      f"densessm from {densessm.__file__}, GPU {torch.cuda.get_device_name()}")'

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
