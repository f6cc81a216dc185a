"""Peer comparison (issue 18, item 7): fedpeft vs a plain Flower + PEFT app, same protocol.

The comparison a user would make before adopting fedpeft: the same federated LoRA fine-tuning
run by fedpeft and by the Flower app one would write from Flower's own Hugging Face / PEFT
examples (``examples/quickstart-huggingface``, the FlowerTune template of ``flwr new``), side
by side on one machine, one after the other, each arm in its own process.

Arm ``a``, fedpeft: ``fedpeft.federation.simulation.simulate`` with method=fedlr (LoRA r=32,
alpha=32 on query/value, the head trained), the SemEval protocol (100 clients, 10 per round,
Dirichlet(1), L=64, batch 16, 1 local epoch of AdamW), evaluation after the last round only.

Arm ``b``, the plain app (this file, ``plain_*``): a ``ClientApp`` whose ``@app.train()``
handler, for EVERY message, loads the pretrained model
(``AutoModelForSequenceClassification.from_pretrained``), wraps it with
``peft.get_peft_model(LoraConfig(r, lora_alpha, target_modules=["query", "value"],
task_type="SEQ_CLS"))``, loads the received arrays with ``set_peft_model_state_dict``, trains
one epoch with AdamW over its shard (a ``DataLoader``, shuffled, ``DataCollatorWithPadding``),
and replies ``ArrayRecord(get_peft_model_state_dict(model))`` + ``num-examples``. The
``ServerApp`` runs Flower's stock ``FedAvg(fraction_train=K/N).start(...)`` with an
``evaluate_fn`` that, after the last round, loads the model + the global arrays and computes
test accuracy with a simple loop. Started with ``flwr.simulation.run_simulation`` on the same
Ray settings as fedpeft (fedpeft's ``backend_config``: the same number of actors and CPUs per
actor, no dashboard, loopback); ``--sim-workers`` (default: what fedpeft's ``sim-workers=auto``
picks on this machine, resolved once) sets the actors for both arms.

What is held equal, for a fair comparison: the model file, the data (the plain app's shards are
built with fedpeft's own task, tokenisation and ``dirichlet_partition``, same seed and alpha,
so client k holds the same sentences, tokenised identically, in both arms), batch size, lr,
epochs, max length, AdamW (weight decay 0) with gradient clipping at 1.0 (fedpeft's
``max-grad-norm``; also Hugging Face Trainer's default, which the FlowerTune template uses),
dynamic padding, precision (``--precision``), the number of clients sampled per round, the test
set. What differs, by design: the plain app builds its model for every message, as the
examples do; which K clients a round samples (Flower samples with Python's ``random``, seeded
here; fedpeft with its own seeded sampler) and the LoRA init (PEFT's default vs fedpeft's
Gaussian A), so accuracies should be in the same range, not equal. Like the examples' cached
``FederatedDataset`` (``fds = None`` in their ``task.py``), the plain app keeps the tokenised
data in its process between messages: only the model is rebuilt per message.

Measured per arm: seconds per round, excluding the final evaluation (fedpeft:
``seconds - seconds-eval`` of each line of its rounds.jsonl, which leaves out the run log and
checkpoint writes after each round, milliseconds for 302k parameters: the JSON also has the
time between rounds, ``seconds-between-callbacks``, to check that; plain app: time between the calls
of FedAvg's ``evaluate_fn``, which ``FedAvg.start`` makes before round 1 and after every round,
taken when the call starts, so the last round's evaluation is left out as well); the
evaluation's seconds; the clients' summed local training and handler seconds (model building
included for the plain app); total wall seconds of the arm's process; peak RSS summed over the
process tree and the Ray cluster it starts (``benchmarks/memory.py``'s ``tree_rss``, sampled
every 0.2 s); final test accuracy. The arms run one after the other (``--arms b,a`` reverses
the order): on a machine that is not quiet, the load changes between them and so do the times.

    .venv/bin/python benchmarks/peer.py                          # the full protocol, both arms
    .venv/bin/python benchmarks/tables.py peer                   # its table for BENCHMARKS.md
    .venv/bin/python benchmarks/peer.py --rounds 2 --num-clients 10 --clients-per-round 2 \\
        --max-train-samples 200 --max-test-samples 64 --out /tmp/peer-smoke.json   # smoke run
"""

from __future__ import annotations

if __name__ == "__main__":  # run everything inside module ``peer``, which Ray workers import
    import sys

    import peer  # noqa: F401  (benchmarks/ is sys.path[0] when run as a script)

    sys.exit(peer.main())

from fedpeft import offline  # noqa: E402

offline.apply()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from importlib import metadata  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402
from typing import Any  # noqa: E402

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

HERE = Path(__file__).resolve().parent
ARMS = {"a": "fedpeft", "b": "plain"}


# --- the run configuration both arms share ---------------------------------------------------

def overrides(args: argparse.Namespace) -> list[str]:
    """fedpeft settings of the protocol; the plain app reads the same RunConfig."""
    items = [
        "task=semeval", "method=fedlr", "model=all-MiniLM-L6-v2", "lora-rank=32",
        "lora-alpha=32", "lora-dropout=0", "target-modules=query,value", "alpha=1",
        f"seed={args.seed}", f"num-clients={args.num_clients}",
        f"clients-per-round={args.clients_per_round}", f"rounds={args.rounds}",
        f"lr={args.lr}", "batch-size=16", "local-epochs=1", "weight-decay=0",
        "max-grad-norm=1", "max-length=64", f"eval-every={args.rounds}",
        "eval-batch-size=64", f"precision={args.precision}", "device=cpu", "progress=false",
    ]
    if args.max_train_samples:
        items.append(f"max-train-samples={args.max_train_samples}")
    if args.max_test_samples:
        items.append(f"max-test-samples={args.max_test_samples}")
    return items


def sim_workers(cfg: Any, asked: str) -> int:
    """Ray actors for both arms: ``--sim-workers``, or what fedpeft's ``sim-workers=auto``
    resolves to on this machine, fixed once here (it depends on the free memory)."""
    if asked != "auto":
        return int(asked)
    try:
        from fedpeft.federation.resources import plan_resources
    except ImportError:  # a fedpeft without sim-workers=auto
        return 1
    return plan_resources(cfg).workers


def load_cfg(items: list[str]) -> Any:
    from fedpeft.config import load_config

    return load_config(None, items)


# --- arm a: fedpeft ----------------------------------------------------------------------------

def run_fedpeft(cfg: Any, workdir: Path) -> dict[str, Any]:
    from fedpeft.config import load_config
    from fedpeft.federation.simulation import simulate
    from fedpeft.runlog import read_rounds

    run_cfg = load_config(None, [f"out={workdir / 'fedpeft-run'}"], base=cfg)
    stamps: list[float] = []  # when each round's record is out (after its checkpoint)
    start = time.perf_counter()
    summary = simulate(run_cfg, overwrite=True, on_round=lambda _: stamps.append(
        time.perf_counter()))
    seconds = time.perf_counter() - start
    rounds = []
    for i, r in enumerate(read_rounds(run_cfg.run_dir())):
        rounds.append({
            "round": r["round"], "seconds": r["seconds"] - r["seconds-eval"],
            "seconds-with-eval": r["seconds"], "seconds-eval": r["seconds-eval"],
            # cross-check, rounds 2..: time between the rounds' callbacks, less evaluation
            # (includes what ``seconds`` leaves out: the run log and checkpoint writes)
            "seconds-between-callbacks": stamps[i] - stamps[i - 1] - r["seconds-eval"]
            if 0 < i < len(stamps) else None,
            "seconds-clients": r["seconds-clients"], "seconds-handlers": r["seconds-handlers"],
            "clients": len(r["clients"]), "successes": r["successes"],
            "train-loss": r["train-loss"]})
    return {"rounds": rounds, "accuracy": summary["final"].get("accuracy"),
            "seconds-in-process": seconds, "trainable-params": summary["trainable-params"],
            "bytes-per-client-round": summary["bytes-per-client-round"]}


# --- arm b: the plain Flower + PEFT app --------------------------------------------------------

_DATA: dict[str, SimpleNamespace] = {}  # per process, like the examples' cached FederatedDataset


def plain_data(cfg_json: str) -> SimpleNamespace:
    """Tokenizer, labels, tokenised train/test data and the client shards: fedpeft's own task,
    tokenisation and Dirichlet partition, so that client k holds what it holds in fedpeft."""
    if cfg_json not in _DATA:
        from transformers import AutoTokenizer, DataCollatorWithPadding

        from fedpeft.config import RunConfig
        from fedpeft.models import quiet_transformers, resolve_model_path
        from fedpeft.partition import dirichlet_partition
        from fedpeft.tasks import make_task

        quiet_transformers()
        cfg = RunConfig.from_json(cfg_json)
        task = make_task(cfg)
        path = resolve_model_path(cfg.model)
        tokenizer = AutoTokenizer.from_pretrained(path)
        train = task.featurize(task.examples("train"), tokenizer, "train")
        partition = dirichlet_partition(task.partition_classes(task.examples("train")),
                                        cfg.num_clients, cfg.alpha, cfg.seed, cfg.min_size)
        _DATA.clear()
        _DATA[cfg_json] = SimpleNamespace(
            cfg=cfg, path=path, labels=task.label_names, train=train, partition=partition,
            collator=DataCollatorWithPadding(tokenizer=tokenizer), task=task,
            tokenizer=tokenizer)
    return _DATA[cfg_json]


def plain_model(data: SimpleNamespace) -> Any:
    """The examples' ``get_model``: pretrained encoder + new head, wrapped with PEFT's LoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    names = data.labels
    model = AutoModelForSequenceClassification.from_pretrained(
        data.path, num_labels=len(names), id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)})
    config = LoraConfig(r=data.cfg.lora_rank, lora_alpha=data.cfg.lora_alpha,
                        target_modules=["query", "value"], task_type="SEQ_CLS")
    return get_peft_model(model, config)


def _autocast(precision: str) -> Any:
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def plain_train_loop(model: Any, loader: Any, lr: float, epochs: int, precision: str) -> float:
    """The examples' ``train``: AdamW over the batches (plus fedpeft's clipping at 1.0)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(epochs):
        for batch in loader:
            with _autocast(precision):
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    return sum(losses) / max(1, len(losses))


plain_client_app = ClientApp()


@plain_client_app.train()
def plain_train(msg: Message, context: Context) -> Message:
    """One client's round, as in Flower's PEFT examples: build the model, load the arrays, train."""
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from torch.utils.data import DataLoader

    start = time.perf_counter()
    config = msg.content["config"]
    data = plain_data(str(config["fedpeft-config"]))
    partition_id = int(context.node_config["partition-id"])
    # Load the model and initialise it with the received weights (every message)
    model = plain_model(data)
    set_peft_model_state_dict(model, msg.content["arrays"].to_torch_state_dict())
    loaded = time.perf_counter()
    rows = data.train.select_examples(data.partition.clients[partition_id]).rows
    generator = torch.Generator().manual_seed(
        data.cfg.seed * 1_000_003 + int(config["server-round"]) * 1009 + partition_id)
    loader = DataLoader(rows, batch_size=int(config["batch-size"]), shuffle=True,
                        collate_fn=data.collator, generator=generator)
    loss = plain_train_loop(model, loader, float(config["lr"]), int(config["local-epochs"]),
                            str(config["precision"]))
    trained = time.perf_counter()
    arrays = ArrayRecord(get_peft_model_state_dict(model))
    metrics = MetricRecord({
        "train-loss": loss, "num-examples": len(rows), "partition-id": partition_id,
        "load-seconds": loaded - start, "train-seconds": trained - loaded,
        "handler-seconds": time.perf_counter() - start, "threads": torch.get_num_threads(),
    })
    return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def plain_evaluate(data: SimpleNamespace, model: Any) -> float:
    """Test accuracy with a simple loop (batches in file order)."""
    import torch
    from torch.utils.data import DataLoader

    test = data.task.featurize(data.task.examples("test"), data.tokenizer, "test")
    loader = DataLoader(test.rows, batch_size=data.cfg.eval_batch_size,
                        collate_fn=data.collator)
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in loader:
            labels = batch.pop("labels")
            with _autocast(data.cfg.precision):
                logits = model(**batch).logits
            correct += int((logits.argmax(-1) == labels).sum())
            total += len(labels)
    return correct / max(1, total)


def plain_server_app(cfg: Any, out: dict[str, Any]) -> Any:
    from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

    app = ServerApp()
    cfg_json = cfg.to_json()
    marks: list[tuple[int, float]] = []  # (round, perf_counter) at each evaluate_fn call
    replies: dict[int, list[dict[str, float]]] = {}
    out.update(marks=marks, replies=replies)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        from peft import set_peft_model_state_dict

        marks.append((server_round, time.perf_counter()))
        if server_round != cfg.rounds:
            return None
        start = time.perf_counter()
        model = plain_model(plain_data(cfg_json))
        set_peft_model_state_dict(model, arrays.to_torch_state_dict())
        accuracy = plain_evaluate(plain_data(cfg_json), model)
        out.update(accuracy=accuracy, eval_seconds=time.perf_counter() - start)
        return MetricRecord({"accuracy": accuracy})

    def train_metrics(contents: list[Any], weighted_by_key: str) -> MetricRecord:
        """Flower's default aggregation; the per-reply metrics are kept for the timing split."""
        replies[len(marks)] = [{k: float(v) for k, v in c["metrics"].items()} for c in contents]
        return aggregate_metricrecords(contents, weighted_by_key)

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from peft import get_peft_model_state_dict

        random.seed(cfg.seed)  # Flower's FedAvg samples nodes with Python's random
        start = time.perf_counter()
        model = plain_model(plain_data(cfg_json))
        initial = ArrayRecord(get_peft_model_state_dict(model))
        out["trainable-params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        del model
        out["setup-seconds"] = time.perf_counter() - start
        strategy = FedAvg(fraction_train=cfg.clients_per_round / cfg.num_clients,
                          fraction_evaluate=0.0, min_train_nodes=cfg.clients_per_round,
                          min_available_nodes=cfg.num_clients, train_metrics_aggr_fn=train_metrics)
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=cfg.rounds,
                       train_config=ConfigRecord({
                           "fedpeft-config": cfg_json, "lr": float(cfg.lr),
                           "batch-size": cfg.batch_size, "local-epochs": cfg.local_epochs,
                           "precision": cfg.precision}),
                       evaluate_fn=evaluate_fn)

    return app


def run_plain(cfg: Any) -> dict[str, Any]:
    import ray
    from flwr.simulation import run_simulation

    from fedpeft.federation.simulation import backend_config

    backend = backend_config(cfg)  # the same Ray actors and CPUs per actor as fedpeft's
    out: dict[str, Any] = {}
    start = time.perf_counter()
    try:
        run_simulation(server_app=plain_server_app(cfg, out), client_app=plain_client_app,
                       num_supernodes=cfg.num_clients, backend_config=backend)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    seconds = time.perf_counter() - start
    marks, replies = out["marks"], out["replies"]
    rounds = []
    for (_, before), (server_round, after) in zip(marks, marks[1:]):
        got = replies.get(server_round, [])
        if len(got) != cfg.clients_per_round:
            raise RuntimeError(f"plain app: round {server_round} got {len(got)} valid replies, "
                               f"expected {cfg.clients_per_round} (Flower's log above says why)")
        rounds.append({
            "round": server_round, "seconds": after - before,
            "seconds-eval": out.get("eval_seconds", 0.0) if server_round == cfg.rounds else 0.0,
            "seconds-clients": sum(r["train-seconds"] for r in got),
            "seconds-handlers": sum(r["handler-seconds"] for r in got),
            "seconds-model-load": sum(r["load-seconds"] for r in got),
            "clients": len(got), "successes": len(got),
            "train-loss": sum(r["train-loss"] * r["num-examples"] for r in got)
            / max(1, sum(r["num-examples"] for r in got)),
            "client-threads": sorted({int(r["threads"]) for r in got}),
        })
    if len(rounds) != cfg.rounds or "accuracy" not in out:
        raise RuntimeError(f"plain app: {len(rounds)} of {cfg.rounds} rounds finished")
    return {"rounds": rounds, "accuracy": out["accuracy"], "seconds-in-process": seconds,
            "setup-seconds": out["setup-seconds"], "trainable-params": out["trainable-params"]}


# --- one arm in this process (the driver that the parent samples) -----------------------------

def worker(arm: str, spec: Path, result: Path) -> int:
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])  # Ray workers import peer
    cfg = load_cfg(json.loads(spec.read_text())["overrides"])
    import torch

    if arm == "a":
        with tempfile.TemporaryDirectory() as tmp:
            row = run_fedpeft(cfg, Path(tmp))
    else:
        row = run_plain(cfg)
    row["driver-threads"] = torch.get_num_threads()
    try:
        from fedpeft.federation.resources import plan_resources

        plan = plan_resources(cfg)
        row["ray-plan"] = {"workers": plan.workers, "cpus-per-worker": plan.cpus,
                           "threads-per-worker": plan.threads}
    except ImportError:
        pass
    result.write_text(json.dumps(row) + "\n")
    return 0


# --- the parent: both arms, one after the other -----------------------------------------------

def run_arm(arm: str, spec: Path, tmp: Path) -> dict[str, Any]:
    import psutil
    from memory import tree_rss  # benchmarks/memory.py's sampler

    result, log = tmp / f"{arm}.json", tmp / f"{arm}.log"
    cmd = [sys.executable, str(HERE / "peer.py"), "--worker", arm, "--spec", str(spec),
           "--result", str(result)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start, peak, samples = time.perf_counter(), 0, 0
    with open(log, "w") as stream:
        proc = subprocess.Popen(cmd, stdout=stream, stderr=subprocess.STDOUT, env=env)
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak = max(peak, tree_rss(root))
                samples += 1
            except psutil.Error:
                pass
            time.sleep(0.2)
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not result.exists():
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"arm {arm} ({ARMS[arm]}) failed (exit {proc.returncode}):\n{tail}")
    row = json.loads(result.read_text())
    seconds = [r["seconds"] for r in row["rounds"]]
    row.update({
        "arm": ARMS[arm], "total-seconds": wall, "peak-rss-mb": peak / 2**20,
        "rss-samples": samples, "seconds-per-round-median": statistics.median(seconds),
        "seconds-per-round-mean": statistics.fmean(seconds),
        "seconds-per-round-mean-from-2": statistics.fmean(seconds[1:]) if seconds[1:] else None,
        "seconds-eval": sum(r["seconds-eval"] for r in row["rounds"]),
    })
    return row


def machine() -> dict[str, Any]:
    import psutil

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name in ("torch", "transformers", "peft", "flwr", "ray", "fedpeft"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"cpu-count": os.cpu_count(), "cpu-affinity": len(os.sched_getaffinity(0)),
            "cpu-model": model, "memory-gb": psutil.virtual_memory().total / 2**30,
            "platform": platform.platform(), "python": platform.python_version(),
            "load-average-at-start": os.getloadavg(), "versions": versions}


RATIO_KEYS = ("seconds-per-round-median", "seconds-per-round-mean", "total-seconds",
              "peak-rss-mb")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--num-clients", type=int, default=100)
    parser.add_argument("--clients-per-round", type=int, default=10)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sim-workers", default="auto",
                        help="Ray actors, both arms (auto = fedpeft's choice for this machine)")
    parser.add_argument("--arms", default="both",
                        help="a (fedpeft), b (plain app), a,b = both, or b,a (in that order)")
    parser.add_argument("--max-train-samples", type=int, default=0, help="0 = all (smoke runs)")
    parser.add_argument("--max-test-samples", type=int, default=0, help="0 = all (smoke runs)")
    parser.add_argument("--out", default=str(HERE / "results" / "peer.json"))
    parser.add_argument("--worker", choices=tuple(ARMS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker:
        return worker(args.worker, args.spec, args.result)
    arms = ["a", "b"] if args.arms == "both" else args.arms.split(",")  # run in this order
    if not arms or any(a not in ARMS for a in arms) or len(set(arms)) < len(arms):
        raise SystemExit(f"--arms: expected a, b, a,b, b,a or both, got {args.arms!r}")
    items = overrides(args)
    workers = sim_workers(load_cfg(items), args.sim_workers)  # bad settings fail here
    items.append(f"sim-workers={workers}")
    info = machine()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedpeft-peer-") as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"overrides": items}))
        for arm in arms:
            print(f"arm {arm} ({ARMS[arm]}) ...", file=sys.stderr, flush=True)
            row = run_arm(arm, spec, Path(tmp))
            print(f"arm {arm} ({ARMS[arm]}): {row['total-seconds']:.0f} s, rounds "
                  + ", ".join(f"{r['seconds']:.1f}" for r in row["rounds"]),
                  file=sys.stderr, flush=True)
            rows.append(row)
    by_arm = {r["arm"]: r for r in rows}
    ratios = ({k: by_arm["plain"][k] / by_arm["fedpeft"][k] for k in RATIO_KEYS}
              if len(by_arm) == 2 else None)
    result = {"command": shlex.join(["python", *sys.argv]), "settings": items, "machine": info,
              "arms": rows, "ratios-plain-over-fedpeft": ratios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    from tables import peer as peer_table  # benchmarks/tables.py: the table of BENCHMARKS.md

    print("\n".join(peer_table(str(Path(args.out).resolve()))))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
