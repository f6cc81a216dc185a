#!/usr/bin/env bash
# The experiments of docs/results.md (issue 8) and the comparisons of BENCHMARKS.md, as queues.
#
#   bash scripts/experiments.sh LANE      # LANE: main | side | later; runs in the foreground
#   nohup bash scripts/experiments.sh main > runs/exp/logs/main.out 2>&1 &
#
# Every run has its own folder under runs/exp/ and a checkpoint after each round: running a
# lane again skips finished runs and resumes interrupted ones from their last round (raise
# `rounds` and the finished runs are extended). Two lanes can run at once, one torch thread each
# (on 2 cores that is ~18% more samples/s than one lane with 2 threads). Then:
#
#   .venv/bin/fedpeft report runs/exp/semeval-a1 --out docs/results   (see scripts/results.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
FEDPEFT=${FEDPEFT:-.venv/bin/fedpeft}
THREADS=${THREADS:-1}
mkdir -p runs/exp/logs

# SemEval as in the papers: L=64, 100 clients, 10 per round, Dir(alpha), 100 rounds.
SEMEVAL=(task=semeval num-clients=100 clients-per-round=10 eval-every=10 progress=false
         "threads=$THREADS" slora-stage1-rounds=25)

compare() {  # compare NAME ARGS...: one `fedpeft compare`, its output in runs/exp/logs/NAME.log
  local name=$1
  shift
  echo "$(date -u +%FT%TZ) start $name: $*"
  "$FEDPEFT" compare "$@" >> "runs/exp/logs/$name.log" 2>&1
  echo "$(date -u +%FT%TZ) done  $name"
}

case "${1:-}" in
  main)  # issue 8 run 1, first half; the fp32 FedAvg baselines of BENCHMARKS.md
    compare semeval-a1 "${SEMEVAL[@]}" alpha=1 rounds=100 --root runs/exp/semeval-a1 \
      --methods federa,fedlr,slora,fedft
    ;;
  side)  # BENCHMARKS.md: exact LoRA aggregation and 16-bit transport; then issue 8 run 1
    compare semeval-exact "${SEMEVAL[@]}" alpha=1 rounds=40 --root runs/exp/semeval-a1-exact \
      --methods federa,fedlr --sweep aggregation=exact-lora
    compare semeval-bf16 "${SEMEVAL[@]}" alpha=1 rounds=40 --root runs/exp/semeval-a1-bf16 \
      --methods federa --sweep transport-dtype=bf16
    compare semeval-a1 "${SEMEVAL[@]}" alpha=1 rounds=100 --root runs/exp/semeval-a1 \
      --methods fedbf,fedap
    ;;
  later)  # issue 8 runs 2-5
    compare semeval-alpha "${SEMEVAL[@]}" rounds=100 --root runs/exp/semeval-alpha \
      --methods fedlr,federa --sweep alpha=0.1,0.5,10
    compare 20news "task=20news" max-length=128 num-clients=100 clients-per-round=10 \
      eval-every=10 progress=false "threads=$THREADS" alpha=0.1 rounds=100 \
      --root runs/exp/20news-a0.1 --methods federa,fedlr,fedft
    for rank in 4 8 16 64; do  # FedLR's alpha = r at every rank (scaling 1)
      compare semeval-rank "${SEMEVAL[@]}" alpha=1 rounds=100 "lora-rank=$rank" \
        "lora-alpha=$rank" --root "runs/exp/semeval-rank/r$rank" --methods fedlr,federa
    done
    compare semeval-adapter "${SEMEVAL[@]}" alpha=1 rounds=100 --root runs/exp/semeval-adapter \
      --methods fedap --sweep adapter-reduction=48,24,6  # bottleneck 8, 16, 64 of 384
    compare wnut17 task=wnut17 num-clients=100 clients-per-round=10 eval-every=10 \
      progress=false "threads=$THREADS" alpha=1 rounds=100 --root runs/exp/wnut17-a1 \
      --methods fedlr,federa
    compare squad task=squad num-clients=100 clients-per-round=10 eval-every=10 \
      progress=false "threads=$THREADS" alpha=1 rounds=50 max-train-samples=8000 \
      max-test-samples=1000 --root runs/exp/squad-a1 --methods fedlr,federa
    ;;
  *)
    echo "usage: $0 main|side|later" >&2
    exit 2
    ;;
esac
