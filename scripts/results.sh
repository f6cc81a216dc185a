#!/usr/bin/env bash
# Copy the experiments' run logs (not their checkpoints or weights) from runs/exp/ into the
# tracked results/ tree, then regenerate the reports from those copies alone:
#
#   bash scripts/results.sh            # results/runs/... + docs/results/REPORT.md (+ PNGs)
#
# Unfinished runs are copied as they stand (the report marks them done/planned); run again
# after more rounds. The comparisons of BENCHMARKS.md are reported into benchmarks/results/.
#
#   SAVE_CHECKPOINTS=1 bash scripts/results.sh   # also an unfinished run's checkpoint
#
# copies the checkpoint.safetensors (and the clients/ state of methods whose clients keep state,
# FedSA-LoRA's B) of every unfinished run up to CHECKPOINT_MAX_MB (default 25) MB, so that a lane
# cut off with its machine resumes on the next one from the committed tree
# (scripts/experiments.sh restores them). A run that has finished drops its committed checkpoint,
# except a grid run stopped at `--select-at` while no other rate of its grid has gone further
# (it may be the chosen one: `may_go_on`).
# clients/ keeps versions by round (client_store.py), so a copy taken right after the
# checkpoint's holds what the checkpoint's next round needs, even while the lane goes on.
set -euo pipefail
cd "$(dirname "$0")/.."
FEDPEFT=${FEDPEFT:-.venv/bin/fedpeft}
mkdir -p results/runs

last_round() {  # last_round RUN: the last round in runs/exp/RUN/rounds.jsonl (0 if none)
  local line
  line=$(tail -n 1 "runs/exp/$1/rounds.jsonl" 2>/dev/null || true)
  [[ "$line" =~ ^\{\"round\":\ ([0-9]+) ]] && echo "${BASH_REMATCH[1]}" || echo 0
}

# may_go_on RUN: a finished grid run (`fedpeft compare` names them <method>-s<seed>-lr<rate>)
# that `--select-at` stopped short of its comparison's rounds (its summary.json says so:
# "select-at": {"round", "rounds"}; runs older than that field: the rounds another run of its
# comparison is set to), and that none of its rates' siblings has gone past: it may be the
# chosen rate, which goes on from its checkpoint.
may_go_on() {
  local run=$1 mine sibling target planned
  [[ "$run" =~ ^(.*-s[0-9]+-lr)[^/]+$ ]] || return 1
  mine=$(last_round "$run")
  target=$(cat "runs/exp/$(dirname "$run")"/*/config.toml 2>/dev/null \
    | sed -n 's/^rounds = \([0-9]*\)$/\1/p' | sort -n | tail -n 1)
  planned=$(python3 -c 'import json, sys
print(json.load(open(sys.argv[1])).get("select-at", {}).get("rounds", 0))' \
    "runs/exp/$run/summary.json" 2>/dev/null || echo 0)
  (( planned > ${target:-0} )) && target=$planned
  (( mine < ${target:-0} )) || return 1
  for sibling in runs/exp/"${BASH_REMATCH[1]}"*; do
    [[ "$sibling" == "runs/exp/$run" ]] && continue
    (( $(last_round "${sibling#runs/exp/}") > mine )) && return 1
  done
  return 0
}

if [ -d runs/exp ]; then
  (cd runs/exp && find . -name rounds.jsonl -printf '%h\n') | while read -r run; do
    mkdir -p "results/runs/$run"
    for file in config.toml rounds.jsonl summary.json partition.json; do
      if [ -f "runs/exp/$run/$file" ]; then cp "runs/exp/$run/$file" "results/runs/$run/$file"; fi
    done
    if [[ -f "runs/exp/$run/summary.json" ]] && ! may_go_on "$run"; then
      rm -rf "results/runs/$run/checkpoint.safetensors" "results/runs/$run/clients"
    elif [[ "${SAVE_CHECKPOINTS:-0}" == 1 && -f "runs/exp/$run/checkpoint.safetensors" ]]; then
      size=$(du -sm "runs/exp/$run/checkpoint.safetensors" | cut -f1)
      if [ -d "runs/exp/$run/clients" ]; then
        size=$((size + $(du -sm "runs/exp/$run/clients" | cut -f1)))
      fi
      if [ "$size" -le "${CHECKPOINT_MAX_MB:-25}" ]; then
        cp "runs/exp/$run/checkpoint.safetensors" "results/runs/$run/"
        rm -rf "results/runs/$run/clients"
        if [ -d "runs/exp/$run/clients" ]; then cp -r "runs/exp/$run/clients" "results/runs/$run/"; fi
      else
        echo "results.sh: $run's checkpoint is ${size} MB (> CHECKPOINT_MAX_MB), not copied" >&2
      fi
    fi
  done
fi

report() {  # report OUT RUN_DIR... [options]: once the first (the experiment's own) exists;
  local out=$1  # of the others, only those that exist
  shift
  if [ ! -e "$1" ]; then return 0; fi
  local dirs=() opts=()
  for arg in "$@"; do
    if [[ $arg == --* || ${#opts[@]} -gt 0 ]]; then opts+=("$arg")
    elif [ -e "$arg" ]; then dirs+=("$arg")
    fi
  done
  if [ ${#dirs[@]} -gt 0 ]; then "$FEDPEFT" report "${dirs[@]}" --out "$out" "${opts[@]}"; fi
}

# Issue 8, run 1: SemEval, 100 clients, 10 per round, Dir(1), 100 rounds
report docs/results/semeval-a1 results/runs/semeval-a1 --rounds 10,20,50,100
# Run 1's learning-rate grid for FeDeRA and FedLR (chosen on a validation split)
report docs/results/semeval-a1-lr results/runs/semeval-a1-lr --rounds 10,20,50,100
# Heterogeneity sweep (FedLR vs FeDeRA at several Dir(alpha))
report docs/results/semeval-alpha results/runs/semeval-alpha \
  results/runs/semeval-a1-lr/fedlr-s0-lr5e-3 results/runs/semeval-a1-lr/federa-s0-lr5e-3
# Rank / adapter budget sweeps
report docs/results/semeval-budget results/runs/semeval-rank \
  results/runs/semeval-a1-lr/fedlr-s0-lr5e-3 results/runs/semeval-a1-lr/federa-s0-lr5e-3
report docs/results/semeval-adapter results/runs/semeval-adapter results/runs/semeval-a1/fedap-s0
report docs/results/20news-a0.1 results/runs/20news-a0.1
report docs/results/wnut17-a1 results/runs/wnut17-a1
report docs/results/squad-a1 results/runs/squad-a1 --rounds 10,20,30,40,50
# Issue 21: FedLR vs FeDeRA on generative SQuAD with the bundled decoder (SmolLM2-135M)
report docs/results/squad-gen results/runs/squad-gen --rounds 2,4,8,12,16
report docs/results/squad-gen-em results/runs/squad-gen --rounds 2,4,8,12,16 --metric exact-match
# Issue 18: Flower's strategies for FedLR and FeDeRA at Dir(0.1), 50 rounds, once the lane's
# runs exist. Its FedAvg runs repeat the first 50 rounds of semeval-alpha's alpha=0.1 runs on the
# lane's machine; until they are there, those runs stand in for FedAvg (the report names their
# precision, bf16 on the AVX512-BF16 machine)
fedavg=(results/runs/strategies/fedavg)
if [ ! -e results/runs/strategies/fedavg ]; then
  fedavg=(results/runs/semeval-alpha/fedlr-alpha0.1-s0 results/runs/semeval-alpha/federa-alpha0.1-s0)
fi
report docs/results/strategies results/runs/strategies/fedprox "${fedavg[@]}" \
  results/runs/strategies/fedavgm results/runs/strategies/fedadam \
  results/runs/strategies/fedadam-tau --up-to 50 --rounds 10,20,30,40,50 --choose server-lr \
  --choose tau
# ... and one client-side DP run beside the same FeDeRA without DP (semeval-alpha's Dir(0.1)
# run: same settings, bf16 on the AVX512-BF16 machine), at its 20 rounds
report docs/results/strategies-dp results/runs/strategies/dp \
  results/runs/semeval-alpha/federa-alpha0.1-s0 --up-to 20 --rounds 10,20
# Issue 19: the federated-LoRA family beside FedLR, FFA-LoRA, FeDeRA and SLoRA (each method at
# the rate its grid chose on validation), and the heterogeneous-rank comparison (flora vs
# flexlora vs hetlora, client ranks 4-32), once their runs exist
for alpha in 0.1 1; do
  report "docs/results/family-a$alpha" "results/runs/family/a$alpha" --rounds 10,20,50,100
done
report docs/results/family-ranks results/runs/family/ranks-a0.1 --rounds 10,20,50,100
# BENCHMARKS.md: exact LoRA aggregation, bf16 transport and bf16 compute vs the main runs, at
# round 40
report benchmarks/results/aggregation results/runs/semeval-a1-exact \
  results/runs/semeval-a1/fedlr-s0 results/runs/semeval-a1/federa-s0 --up-to 40 \
  --rounds 10,20,30,40
report benchmarks/results/transport results/runs/semeval-a1-wire16 \
  results/runs/semeval-a1/federa-s0 --up-to 40 --rounds 10,20,30,40
report benchmarks/results/precision results/runs/fp32/semeval-a1/federa-s0 \
  results/runs/semeval-a1/federa-s0 --up-to 40 --rounds 10,20,30,40
# BENCHMARKS.md section "where a round's time goes": its logs live beside the report
report benchmarks/results/round-time benchmarks/results/round-time/runs
# Issue 22: every committed run beside the FeDeRA paper's tables, and the decision table
# (the protocol runs; the BENCHMARKS.md comparisons above, the DP run and the heterogeneous-rank
# comparison are not paper protocols)
paper_runs=()
for run in semeval-a1 semeval-a1-lr semeval-alpha semeval-rank semeval-adapter 20news-a0.1 \
  wnut17-a1 squad-a1 strategies/fedavg strategies/fedprox strategies/fedavgm \
  strategies/fedadam strategies/fedadam-tau family/a0.1 family/a1 protocol/fedprox-a1 \
  protocol/fedprox-a0.1 protocol/20news-a0.1 protocol/wnut17-a0.1 protocol/ploner-a0.01 \
  protocol/squad-a0.1 protocol/mrqa-a0.01; do
  if [ -e "results/runs/$run" ]; then paper_runs+=("results/runs/$run"); fi
done
"$FEDPEFT" paper "${paper_runs[@]}" --out docs/results/PAPER.md
