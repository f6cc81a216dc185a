#!/usr/bin/env bash
# The experiments of docs/results/ (issue 8) and the comparisons of BENCHMARKS.md, as a queue.
#
#   bash scripts/experiments.sh LANE      # LANE: main | grid | later | squad | strategies | family |
#                                           protocol | decoders
#   nohup bash scripts/experiments.sh main > runs/exp/logs/main.out 2>&1 &
#
# Every run has its own folder under runs/exp/ and a checkpoint after each round: running a
# lane again skips finished runs and resumes interrupted ones from their last round (raise
# `rounds` and finished runs are extended). The logged runs trained and evaluated with bf16
# autocast (precision=bf16: ~2x faster on that machine's AVX512-BF16 CPU, see BENCHMARKS.md),
# except the fp32 reference that measures what bf16 changes; PRECISION below. One lane at a
# time: sim-workers=auto already runs one single-threaded worker per core (BENCHMARKS.md
# section 8). The logged runs of run 5's SQuAD part and of `decoders` ran before that
# default, as two lanes at once with one thread each
# (THREADS=1 bash scripts/experiments.sh squad fedlr & ... squad federa &), the same
# parallelism; with today's default, two lanes at once would put 4 workers on 2 cores. Then:
#
#   bash scripts/results.sh      # copy the logs to results/, regenerate the reports
set -euo pipefail
cd "$(dirname "$0")/.."
FEDPEFT=${FEDPEFT:-.venv/bin/fedpeft}
THREADS=${THREADS:-0}
# auto: bf16 on the AVX512-BF16 machine the logged runs used, fp32 on a CPU that only emulates
# bf16 (14x slower there, BENCHMARKS.md section 3b)
PRECISION=${PRECISION:-auto}
mkdir -p runs/exp/logs

# A fresh checkout has no runs/exp/, only the logs scripts/results.sh committed under results/runs.
# A committed run that finished (it has summary.json) and has no folder under runs/exp/ yet is
# copied there, so the lane counts it as done ("finished, not redone": `fedpeft compare` checks
# its saved config against the job's) and a lane spread over several machines or sessions
# only trains what is still missing. An unfinished run whose checkpoint was committed
# (SAVE_CHECKPOINTS=1 bash scripts/results.sh) is copied whole, so it resumes from its last
# committed round; other unfinished runs start again. RESTORE=0 skips this.
if [[ "${RESTORE:-1}" != 0 && -d results/runs ]]; then
  (cd results/runs && find . -name summary.json -printf '%h\n') | while read -r run; do
    if [ ! -e "runs/exp/$run" ]; then
      mkdir -p "runs/exp/$run"
      cp results/runs/"$run"/{config.toml,rounds.jsonl,summary.json} "runs/exp/$run/"
      if [ -f "results/runs/$run/partition.json" ]; then
        cp "results/runs/$run/partition.json" "runs/exp/$run/"
      fi
      # a grid run stopped at --select-at keeps its checkpoint (scripts/results.sh): the chosen
      # rate goes on from it
      if [ -f "results/runs/$run/checkpoint.safetensors" ]; then
        cp "results/runs/$run/checkpoint.safetensors" "runs/exp/$run/"
        if [ -d "results/runs/$run/clients" ]; then cp -r "results/runs/$run/clients" "runs/exp/$run/"; fi
      fi
    fi
  done
  (cd results/runs && find . -name checkpoint.safetensors -printf '%h\n') | while read -r run; do
    if [[ ! -e "runs/exp/$run" && ! -f "results/runs/$run/summary.json" ]]; then
      mkdir -p "runs/exp/$(dirname "$run")"
      cp -r "results/runs/$run" "runs/exp/$run"
    fi
  done
fi

# SemEval as in the papers: L=64, 100 clients, 10 per round, Dir(alpha), 100 rounds.
COMMON=(num-clients=100 clients-per-round=10 eval-every=10 progress=false "threads=$THREADS")
SEMEVAL=(task=semeval "${COMMON[@]}" slora-stage1-rounds=25 "precision=$PRECISION")

compare() {  # compare NAME ARGS...: one `fedpeft compare`, its output in runs/exp/logs/NAME.log
  local name=$1
  shift
  if [[ -n "${DRY_RUN:-}" ]]; then  # DRY_RUN=1: print the commands a lane would run, run none
    echo "$FEDPEFT compare $*"
    return
  fi
  echo "$(date -u +%FT%TZ) start $name: $*"
  "$FEDPEFT" compare "$@" >> "runs/exp/logs/$name.log" 2>&1
  echo "$(date -u +%FT%TZ) done  $name"
}

squad() {  # SQuAD v1.1 (a subset, L=256 for CPU), at the SemEval grid's rate (no grid here)
  compare "squad-$1" task=squad "${COMMON[@]}" "precision=$PRECISION" alpha=1 rounds=50 lr=5e-3 \
    max-length=256 max-train-samples=8000 max-test-samples=1000 --root runs/exp/squad-a1 \
    --methods "$1"
}

case "${1:-}" in
  main)  # issue 8 run 1 and the BENCHMARKS.md comparisons (40 rounds vs the first 40 of run 1)
    compare semeval-fp32 task=semeval "${COMMON[@]}" slora-stage1-rounds=25 precision=fp32 \
      alpha=1 rounds=40 --root runs/exp/fp32/semeval-a1 --methods federa
    compare semeval-a1 "${SEMEVAL[@]}" alpha=1 rounds=100 --root runs/exp/semeval-a1 \
      --methods federa,fedlr
    compare semeval-exact "${SEMEVAL[@]}" alpha=1 rounds=40 --root runs/exp/semeval-a1-exact \
      --methods federa,fedlr --sweep aggregation=exact-lora
    compare semeval-wire16 "${SEMEVAL[@]}" alpha=1 rounds=40 --root runs/exp/semeval-a1-wire16 \
      --methods federa --sweep transport-dtype=bf16
    compare semeval-a1 "${SEMEVAL[@]}" alpha=1 rounds=100 --root runs/exp/semeval-a1 \
      --methods fedbf,fedap,slora,fedft
    ;;
  grid)  # issue 8 run 1's learning rates: FeDeRA and FedLR, each rate on a validation split
    compare semeval-lr "${SEMEVAL[@]}" alpha=1 rounds=100 --root runs/exp/semeval-a1-lr \
      --methods federa,fedlr --lr-grid federa=1e-3,2e-3,5e-3,1e-2 \
      --lr-grid fedlr=2e-3,1e-3,5e-3,1e-2
    ;;
  later)  # issue 8 runs 2-5
    # FedLR and FeDeRA on SemEval at the rate run 1's grid chose for both (5e-3), on the grid's
    # data (valid-fraction 0.1): the grid's 5e-3 runs are the sweeps' alpha=1 / rank 32 points.
    TUNED=(lr=5e-3 valid-fraction=0.1)
    compare semeval-alpha "${SEMEVAL[@]}" "${TUNED[@]}" rounds=100 --root runs/exp/semeval-alpha \
      --methods federa,fedlr --sweep alpha=0.1
    compare semeval-alpha "${SEMEVAL[@]}" "${TUNED[@]}" rounds=100 --root runs/exp/semeval-alpha \
      --methods federa,fedlr --sweep alpha=0.5,10
    # WNUT-2017 (L=64): both at the rate their SemEval grid chose (no grid on this task)
    compare wnut17 task=wnut17 "${COMMON[@]}" "precision=$PRECISION" alpha=1 rounds=100 lr=5e-3 \
      --root runs/exp/wnut17-a1 --methods fedlr,federa
    for rank in 4 64 8 16; do  # the ends first; FedLR's alpha = r at every rank (scaling 1)
      compare semeval-rank "${SEMEVAL[@]}" "${TUNED[@]}" alpha=1 rounds=100 "lora-rank=$rank" \
        "lora-alpha=$rank" --root "runs/exp/semeval-rank/r$rank" --methods fedlr,federa
    done
    compare semeval-adapter "${SEMEVAL[@]}" alpha=1 rounds=100 --root runs/exp/semeval-adapter \
      --methods fedap --sweep adapter-reduction=48,24,6  # bottleneck 8, 16, 64 of 384
    # 20 Newsgroups (L=128 for CPU): the LoRA family at the rate their SemEval grid chose,
    # FedFT at its default (no grid on this task)
    NEWS=(task=20news max-length=128 "${COMMON[@]}" "precision=$PRECISION" alpha=0.1 rounds=100)
    compare 20news "${NEWS[@]}" lr=5e-3 --root runs/exp/20news-a0.1 --methods fedlr,federa
    compare 20news "${NEWS[@]}" --root runs/exp/20news-a0.1 --methods fedft
    squad fedlr,federa
    ;;
  strategies)  # issue 18: Flower's strategies for FedLR and FeDeRA at Dir(0.1), 50 rounds, at
    # the clients' rate the FedAvg grid chose on validation (5e-3); server settings: FedAvgM at
    # FedAvg's effective step (server-lr = 1 - momentum, Hsu et al. 2019), FedProx mu=0.01 (Li
    # et al. 2020's grid), FedAdam's server rate from {1e-3, 1e-2} (tau 1e-3) and 0.1 with tau 0.1,
    # chosen on validation.
    # `strategies dp` runs the DP line alone. FedAvg's 50 rounds are also the first 50 of the
    # committed semeval-alpha alpha=0.1 runs (same settings, 100 rounds, bf16 on the AVX512-BF16
    # machine); it runs here again so that every arm has the same machine and arithmetic.
    STRAT=("${SEMEVAL[@]}" lr=5e-3 valid-fraction=0.1 alpha=0.1 rounds=50)
    if [[ "${2:-all}" != dp ]]; then
      compare strategies "${STRAT[@]}" strategy=fedprox proximal-mu=0.01 \
        --root runs/exp/strategies/fedprox --methods fedlr,federa
      compare strategies "${STRAT[@]}" strategy=fedavgm server-lr=0.1 server-momentum=0.9 \
        --root runs/exp/strategies/fedavgm --methods fedlr,federa
      compare strategies "${STRAT[@]}" --root runs/exp/strategies/fedavg --methods fedlr,federa
      compare strategies "${STRAT[@]}" strategy=fedadam --sweep server-lr=1e-3,1e-2 \
        --root runs/exp/strategies/fedadam --methods fedlr,federa
      # FedAdam with tau = server-lr: a coordinate whose update is small beside tau moves by
      # about server-lr / tau = 1 times it, FedAvg's step (1e-3 and 1e-2 at Flower's tau 1e-3
      # stayed at the majority class)
      compare strategies "${STRAT[@]}" strategy=fedadam server-lr=0.1 --sweep tau=0.1 \
        --root runs/exp/strategies/fedadam-tau --methods fedlr,federa
    fi
    compare strategies-dp "${STRAT[@]}" rounds=20 dp=client-fixed dp-noise-multiplier=0.3 \
      dp-clipping-norm=1.0 --root runs/exp/strategies/dp --methods federa
    ;;
  family)  # issue 19: the federated-LoRA family beside FedLR, FFA-LoRA, FeDeRA and SLoRA on
    # SemEval, 100 clients, 10 per round, 100 rounds, 20% of every client's shard held out for
    # personalised evaluation (every 10 rounds, all clients). Rates: each method on the grid
    # {2e-3, 5e-3, 1e-2}, chosen on the validation split. Dir(0.1) first, then Dir(1); then the
    # heterogeneous-rank comparison (ranks 4-32 by the seeded rule). `family ranks` runs only
    # that comparison, `family a0.1` / `family a1` one alpha; FAMILY_GRID narrows the grid
    # (FAMILY_GRID=5e-3: the grid's middle point, whose runs a later full grid reuses) and
    # FAMILY_METHODS the methods (FAMILY_METHODS=fedlr: the homogeneous-rank reference).
    # Rates are chosen on validation at round FAMILY_SELECT_AT (default 40; after SLoRA's
    # 25-round sparse stage): every rate runs to it, only the chosen one on to round 100.
    SELECT=(--select-at "${FAMILY_SELECT_AT:-40}")
    FAMILY=("${SEMEVAL[@]}" valid-fraction=0.1 local-test-fraction=0.2 rounds=100)
    GRID=${FAMILY_GRID:-2e-3,5e-3,1e-2}
    METHODS=${FAMILY_METHODS:-fedlr,federa,ffa-lora,slora,fedsa-lora,rolora,flora,flexlora,fedex-lora,hetlora}
    PART=${2:-all}
    if [[ ! "$PART" =~ ^(all|a0\.1|a1|ranks)$ ]]; then
      echo "usage: $0 family [all|a0.1|a1|ranks]; got '$PART'" >&2
      exit 2
    fi
    grids=()
    for m in ${METHODS//,/ }; do grids+=(--lr-grid "$m=$GRID"); done
    # Dir(1) also holds out 10% of each client's training share as its local validation split,
    # on which FedSA-LoRA's rate is chosen (its global model ties across rates; docs/reports.md),
    # every method alike; the Dir(0.1) runs predate local-valid-fraction and go on without it.
    for alpha in 0.1 1; do
      [[ "$PART" == all || "$PART" == "a$alpha" ]] || continue
      local_valid=()
      [[ "$alpha" == 1 ]] && local_valid=(local-valid-fraction=0.1)
      compare family "${FAMILY[@]}" "alpha=$alpha" "${local_valid[@]}" \
        --root "runs/exp/family/a$alpha" --methods "$METHODS" "${grids[@]}" "${SELECT[@]}"
    done
    [[ "$PART" == all || "$PART" == ranks ]] || exit 0
    compare family-ranks "${FAMILY[@]}" alpha=0.1 method=flora client-ranks=4,8,16,32 \
      --root runs/exp/family/ranks-a0.1 --methods flora,flexlora,hetlora \
      --lr-grid flora=$GRID --lr-grid flexlora=$GRID --lr-grid hetlora=$GRID "${SELECT[@]}"
    ;;
  protocol)  # issue 22: the papers' protocols with seeds, in its priority order; PART picks one:
    #   semeval  SemEval at Dir(1), then Dir(0.1), as `family` (whose seed-0 runs it reuses: same
    #            roots and settings) plus FedFT, FedBF and FedAP, every method at the best of its
    #            small grid chosen on validation at round 40, for every seed of PROTOCOL_SEEDS
    #            (0,1,2; one seed is finished, both alphas, before the next starts), and FedProx
    #            (mu 0.01; the strategies lane's runner-up to FedAvg) for FedLR and FeDeRA
    #   20news   20 Newsgroups at Dir(0.1), L=128, 100 clients, 10 per round, 100 rounds: FedFT,
    #            FedLR, FeDeRA, SLoRA and PROTOCOL_NEWS_FAMILY (default flexlora,flora: the
    #            family's two best global accuracies at SemEval Dir(0.1)), same grids and seeds
    #   table1   the FeDeRA paper's Table 1 protocol for the other four tasks, FedLR vs FeDeRA at
    #            SemEval's rate (5e-3), seed 0: WNUT-2017 (30 clients, 5 per round, Dir(0.1) over
    #            entity-tag sets, 100 rounds), the PLONER stand-in (100/10, Dir(0.01), 100
    #            rounds), SQuAD (300/15, Dir(0.1) over the k-means clusters, 8,000 training
    #            questions, L=256, 50 rounds), the MRQA stand-in (300/15, Dir(0.01) over
    #            sources, 8,000 training questions, L=256, 50 rounds)
    PART=${2:-all}
    if [[ ! "$PART" =~ ^(all|semeval|20news|table1)$ ]]; then
      echo "usage: $0 protocol [all|semeval|20news|table1]; got '$PART'" >&2
      exit 2
    fi
    SELECT=(--select-at 40)
    FAMILY=("${SEMEVAL[@]}" valid-fraction=0.1 local-test-fraction=0.2 rounds=100)
    FAMILY_ALL=fedlr,federa,ffa-lora,slora,fedsa-lora,rolora,flora,flexlora,fedex-lora,hetlora
    declare -A RATES=([fedft]=5e-5,1e-4 [fedbf]=5e-3,1e-2 [fedap]=2e-3,5e-3)
    grids() {  # grids METHODS: one --lr-grid per method (the LoRA family: 5e-3,1e-2)
      local m
      for m in ${1//,/ }; do printf -- '--lr-grid\n%s=%s\n' "$m" "${RATES[$m]:-5e-3,1e-2}"; done
    }
    SEEDS=${PROTOCOL_SEEDS:-0,1,2}
    for seed in ${SEEDS//,/ }; do
      [[ "$PART" == all || "$PART" == semeval ]] || continue
      for alpha in 1 0.1; do
        local_valid=()
        [[ "$alpha" == 1 ]] && local_valid=(local-valid-fraction=0.1)  # as `family`
        # FedFT after FedBF and FedAP: its checkpoint (the whole model, ~90 MB) is over
        # CHECKPOINT_MAX_MB, so a session that stops inside one of its runs loses it, while the
        # others' checkpoints are committed and resume
        methods=fedbf,fedap,fedft,$FAMILY_ALL
        mapfile -t g < <(grids "$methods")
        compare protocol "${FAMILY[@]}" "alpha=$alpha" "${local_valid[@]}" \
          --root "runs/exp/family/a$alpha" --methods "$methods" --seeds "$seed" "${g[@]}" \
          "${SELECT[@]}"
        mapfile -t g < <(grids fedlr,federa)
        compare protocol "${FAMILY[@]}" "alpha=$alpha" "${local_valid[@]}" strategy=fedprox \
          proximal-mu=0.01 --root "runs/exp/protocol/fedprox-a$alpha" --methods fedlr,federa \
          --seeds "$seed" "${g[@]}" "${SELECT[@]}"
      done
    done
    if [[ "$PART" == all || "$PART" == 20news ]]; then
      methods=fedft,fedlr,federa,slora,${PROTOCOL_NEWS_FAMILY:-flexlora,flora}
      mapfile -t g < <(grids "$methods")
      for seed in ${SEEDS//,/ }; do
        compare protocol-20news task=20news max-length=128 "${COMMON[@]}" \
          "precision=$PRECISION" slora-stage1-rounds=25 alpha=0.1 rounds=100 valid-fraction=0.1 \
          --root runs/exp/protocol/20news-a0.1 --methods "$methods" --seeds "$seed" "${g[@]}" \
          "${SELECT[@]}"
      done
    fi
    if [[ "$PART" == all || "$PART" == table1 ]]; then
      T1=(eval-every=10 progress=false "threads=$THREADS" "precision=$PRECISION" lr=5e-3
          --methods fedlr,federa)
      QA=(num-clients=300 clients-per-round=15 rounds=50 max-length=256 max-train-samples=8000
          max-test-samples=1000)
      compare protocol-table1 task=wnut17 num-clients=30 clients-per-round=5 alpha=0.1 \
        rounds=100 --root runs/exp/protocol/wnut17-a0.1 "${T1[@]}"
      compare protocol-table1 task=ploner num-clients=100 clients-per-round=10 alpha=0.01 \
        rounds=100 --root runs/exp/protocol/ploner-a0.01 "${T1[@]}"
      compare protocol-table1 task=squad "${QA[@]}" alpha=0.1 \
        --root runs/exp/protocol/squad-a0.1 "${T1[@]}"
      compare protocol-table1 task=mrqa "${QA[@]}" alpha=0.01 \
        --root runs/exp/protocol/mrqa-a0.01 "${T1[@]}"
    fi
    ;;
  squad)  # run 5's QA part alone, e.g. one method per lane with THREADS=1, both lanes at once
    squad "${2:-fedlr,federa}"
    ;;
  decoders)  # FedLR vs FeDeRA on generative SQuAD with the bundled SmolLM2-135M,
    # 20 clients (20 questions each), 5 per round, Dir(0.1) over the question clusters, EM/F1 on
    # 50 seeded test questions every 2 rounds. The committed 16 rounds (docs/results/squad-gen)
    # ran as two 1-thread lanes at once, one per method, with one worker each (the default then):
    #   THREADS=1 DECODER_ROUNDS=16 SIM_WORKERS=1 bash scripts/experiments.sh decoders fedlr &
    #   ... decoders federa &
    # ~203 s of training per round (100 questions) + ~62 s per evaluation each, 66 minutes for
    # both. A worker holds ~8 GiB: two lanes of one worker fit in 24 GiB, not more. Both at one
    # rate (lr 1e-3, DECODER_LR; not tuned on decoders). Then `bash scripts/results.sh`.
    compare squad-gen task=squad-gen model=smollm2-135m num-clients=20 clients-per-round=5 \
      alpha=0.1 "rounds=${DECODER_ROUNDS:-12}" eval-every=2 max-train-samples=400 \
      gen-eval-samples=50 max-new-tokens=24 batch-size=8 eval-batch-size=16 "precision=$PRECISION" \
      progress=false "threads=$THREADS" "sim-workers=${SIM_WORKERS:-auto}" \
      "lr=${DECODER_LR:-1e-3}" --root runs/exp/squad-gen \
      --methods "${2:-fedlr,federa}"
    ;;
  *)
    echo "usage: $0 main|grid|later|squad|strategies|family|protocol|decoders [METHODS]" >&2
    exit 2
    ;;
esac
