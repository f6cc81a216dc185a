"""Arm ``b`` of the peer comparison (``peer.py``): the plain Flower + PEFT app.

The Flower app one would write from Flower's own Hugging Face / PEFT examples: a ``ClientApp``
that builds the model for every message, and a ``ServerApp`` running Flower's stock ``FedAvg``
(``peer.py``'s docstring says what is held equal and what differs). Its own module so that Ray's
workers import the app from here (``peer.py`` puts ``benchmarks/`` on their ``PYTHONPATH``).
"""

from __future__ import annotations

import random
import time
from types import SimpleNamespace
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

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
    for (_, before), (server_round, after) in zip(marks, marks[1:], strict=False):
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
