# Sourced by scripts/gpu_check.sh and scripts/bench_gpu.sh (from the repository root): picks the Python whose torch
# sees the GPU and sets `py`, PYTHONPATH and the run's log settings.
#
# Python: the machine's python3 when its torch already sees the GPU (GPU images hold a CUDA torch and may have no
# package index); otherwise a .venv-gpu with requirements-dev.txt's torch pin from the default index (the CUDA build
# on Linux) and its other pins. Wheels carried in .whl/ are installed, without their dependencies and without
# touching the machine's packages, into a folder ahead of them on PYTHONPATH: GPU images may hold an older
# transformers than the pinned one, and no `datasets`, and no index. Before the device run, on a machine with PyPI:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl \
#       transformers==5.24.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
# and pass ".whl" in the device tool's `carry` (it is git-ignored). Without .whl/, a transformers other than the
# pinned one is fetched from the index when one is reachable.

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

site=/tmp/densessm-gpu-site # packages for this run only, ahead of the interpreter's own
if compgen -G ".whl/*.whl" >/dev/null; then
    echo "== installing the carried wheels into $site: $(cd .whl && echo *.whl)"
    "$py" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --upgrade --target "$site" \
        .whl/*.whl
else
    want=$(pin transformers | cut -d= -f3)
    have=$("$py" -c 'import transformers; print(transformers.__version__)' 2>/dev/null || echo none)
    if [ "$have" != "$want" ]; then
        echo "== transformers $have here, $want pinned, no .whl/: installing it into $site from the index"
        "$py" -m pip install -q --disable-pip-version-check --no-deps --retries 0 --timeout 15 --target "$site" \
            "transformers==$want" || echo "(no index reachable: going on with transformers $have)"
    fi
fi
# the checkout's own code, no install step (an editable install would need setuptools from an index)
export PYTHONPATH="$site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TORCH_LOGS=recompiles
"$py" -c 'import torch, transformers, densessm
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
      f"densessm from {densessm.__file__}, GPU {torch.cuda.get_device_name()}")'
