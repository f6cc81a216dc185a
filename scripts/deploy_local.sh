#!/usr/bin/env bash
# A real Flower deployment of fedpeft on this machine, over loopback only:
# one SuperLink, N SuperNodes (SuperNode k holds partition k of N), one `flwr run`, then every
# process it started is stopped (also on Ctrl-C or failure).
#
#   scripts/deploy_local.sh [N] [fedpeft key=value ...]
#   scripts/deploy_local.sh 2 rounds=3 max-train-samples=400 max-test-samples=200
#
# Environment (all optional):
#   FEDPEFT_DEPLOY_DIR   work folder: logs, each process's FLWR_HOME, the run (default: mktemp)
#   FEDPEFT_OUT          run folder, absolute (default: $FEDPEFT_DEPLOY_DIR/run)
#   FEDPEFT_PORT         SuperLink port (Fleet, Control and Runtime APIs; default 9093)
#   FEDPEFT_NODE_PORT    first SuperNode Runtime API port; node k uses +k (default 9200)
#   FEDPEFT_RESUME=1     continue FEDPEFT_OUT from its checkpoint instead of starting afresh
#   FEDPEFT_WORKERS=0    no warm worker per SuperNode: each message trains in a fresh process
#   FEDPEFT_NODE_THREADS torch threads per SuperNode (default: cores / N, at least 1)
#   FEDPEFT_SUPERNODE_POLL  seconds a SuperNode waits between pulls that find no message
#                        (default 0.2; 3 = Flower's own; see fedpeft/federation/supernode.py)
#   FEDPEFT_NODE_CONFIG_k  extra --node-config of SuperNode k, e.g. "train-file='/data/k.csv'"
#   FEDPEFT_CERTS=DIR    TLS + SuperNode authentication with the files of scripts/make_certs.sh
#                        (DIR absolute; made with SUPERLINK_HOST 127.0.0.1)
#   VENV_BIN             folder of fedpeft's Python environment (default: .venv/bin)
# See docs/deployment.md for several machines, TLS and node authentication.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV_BIN=${VENV_BIN:-$ROOT/.venv/bin}
N=${1:-2}
[ $# -gt 0 ] && shift
WORK=${FEDPEFT_DEPLOY_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/fedpeft-deploy.XXXXXX")}
OUT=${FEDPEFT_OUT:-$WORK/run}
PORT=${FEDPEFT_PORT:-9093}
NODE_PORT=${FEDPEFT_NODE_PORT:-9200}
RESUME=${FEDPEFT_RESUME:-0}
WORKERS=${FEDPEFT_WORKERS:-1}
CERTS=${FEDPEFT_CERTS:-}
CORES=$(nproc 2>/dev/null || echo 1)
NODE_THREADS=${FEDPEFT_NODE_THREADS:-$(( CORES / N > 0 ? CORES / N : 1 ))}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
: >"$WORK/pids"

# Loopback only: no telemetry, update checks, runtime `uv sync` or hub downloads.
export PATH="$VENV_BIN:$PATH"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
# The Hugging Face hub is left to the caller's environment (the bundled model needs none).
export TOKENIZERS_PARALLELISM=false
# SuperExec looks for new tasks every 1 s by default (the SuperLink's, for the ServerApp; a
# SuperNode's without a worker, for every message).
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL=${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.2}
export FEDPEFT_SUPERNODE_POLL=${FEDPEFT_SUPERNODE_POLL:-0.2}

# Each service runs in a process group of its own (setsid): stopping the group stops the
# SuperExec and app processes it started as well.
PIDS=()
stop_all() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    local alive=0
    for pid in "${PIDS[@]}"; do kill -0 -- "-$pid" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.5
  done
  for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
started() {  # remember a service's process group (also on disk, in case this script is killed)
  PIDS+=("$1")
  echo "$1" >>"$WORK/pids"
}
trap stop_all EXIT
trap 'exit 130' INT TERM

echo "fedpeft deployment: $N SuperNodes on 127.0.0.1, work folder $WORK"
if [ -n "$CERTS" ]; then  # TLS for every connection to the SuperLink, and registered SuperNodes
  LINK_SECURITY=(--ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/server.crt"
                 --ssl-keyfile "$CERTS/server.key" --enable-supernode-auth)
  CLI_SECURITY="root-certificates = \"$CERTS/ca.crt\""
else
  LINK_SECURITY=(--insecure)
  CLI_SECURITY="insecure = true"
fi
mkdir -p "$WORK/superlink"
FLWR_HOME="$WORK/superlink" setsid flower-superlink "${LINK_SECURITY[@]}" \
  --disable-runtime-dependency-installation --host 127.0.0.1 --port "$PORT" \
  --database "$WORK/superlink/state.db" >"$WORK/superlink.log" 2>&1 &
started $!

# The `flwr` CLI's connection to this SuperLink, in a FLWR_HOME of its own.
mkdir -p "$WORK/cli"
cat >"$WORK/cli/config.toml" <<EOF
[superlink]
default = "local"

[superlink.local]
address = "127.0.0.1:$PORT"
$CLI_SECURITY
EOF

if [ -n "$CERTS" ]; then  # register each SuperNode's public key (retry until the SuperLink is up)
  for ((k = 0; k < N; k++)); do
    for ((try = 0; try < 60; try++)); do
      FLWR_HOME="$WORK/cli" flwr supernode register "$CERTS/node$k.pub" local \
        >>"$WORK/register.log" 2>&1 && break
      sleep 1
    done
  done
fi

# SuperNode k: flower-supernode (with a shorter idle poll, federation/supernode.py); with a warm
# worker it runs in --isolation process and the worker takes its tasks from its Runtime API
# (federation/worker.py), else Flower starts a ClientApp process per message.
if [ "$WORKERS" = 1 ]; then ISOLATION=process; else ISOLATION=subprocess; fi
for ((k = 0; k < N; k++)); do
  mkdir -p "$WORK/node$k"
  EXTRA_VAR="FEDPEFT_NODE_CONFIG_$k"
  NODE_CONFIG="partition-id=$k num-partitions=$N threads=$NODE_THREADS ${!EXTRA_VAR:-}"
  if [ -n "$CERTS" ]; then
    NODE_SECURITY=(--root-certificates "$CERTS/ca.crt" --auth-supernode-private-key "$CERTS/node$k")
  else
    NODE_SECURITY=(--insecure)
  fi
  FLWR_HOME="$WORK/node$k" setsid python -m fedpeft.federation.supernode "${NODE_SECURITY[@]}" \
    --superlink "127.0.0.1:$PORT" --host 127.0.0.1 --port $((NODE_PORT + k)) \
    --isolation "$ISOLATION" --node-config "$NODE_CONFIG" >"$WORK/node$k.log" 2>&1 &
  started $!
  if [ "$WORKERS" = 1 ]; then
    FLWR_HOME="$WORK/node$k" setsid python -m fedpeft.federation.worker \
      --runtime-api "127.0.0.1:$((NODE_PORT + k))" >"$WORK/worker$k.log" 2>&1 &
    started $!
  fi
done

RESUME_FLAG=false
[ "$RESUME" = 1 ] && RESUME_FLAG=true
SETTINGS="num-clients=$N clients-per-round=$N out=$OUT $*"
# The first attempt may come before the SuperLink listens: retry for up to 60 s.
for ((try = 0; try < 60; try++)); do
  if FLWR_HOME="$WORK/cli" flwr run "$ROOT/deploy" local --stream \
      --run-config "settings='$SETTINGS' resume=$RESUME_FLAG" >"$WORK/flwr-run.log" 2>&1; then
    break
  fi
  if grep -q "Successfully started run" "$WORK/flwr-run.log"; then break; fi
  sleep 1
done
cat "$WORK/flwr-run.log"

if [ -f "$OUT/summary.json" ]; then
  echo "run folder: $OUT"
  exit 0
fi
echo "fedpeft deployment: no summary in $OUT; logs in $WORK" >&2
exit 1
