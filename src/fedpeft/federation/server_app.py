"""The Flower ServerApp: FedAvg rounds over the trainable tensors, with server-side evaluation.

The server drives the rounds itself through the Grid (``send_and_receive``) rather than through
``FedAvg.start``: client sampling is a seeded generator over *partition ids* (so a run is the
same whichever node ids the deployment hands out, and can be replayed), a method may change
what travels between rounds, and every round is measured (bytes each way, seconds per phase).

Per round: sample K of N clients, send each the global trainable state (plus, on its first
contact, the method's anchor), wait for the replies, average them weighted by example count,
evaluate the global model on the test split every ``eval-every`` rounds, and log one line.
"""

from __future__ import annotations

from .. import offline

offline.apply()

import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from ..config import RunConfig  # noqa: E402
from ..partition import mean_pairwise_js  # noqa: E402
from ..runlog import RunLog  # noqa: E402
from .aggregation import fedavg  # noqa: E402
from .runtime import Runtime, anchor_id, set_threads  # noqa: E402
from .state import (  # noqa: E402
    from_record,
    frozen_digest,
    num_parameters,
    to_record,
)


class RoundFailed(RuntimeError):
    pass


def discover_nodes(grid: Grid, num_clients: int, timeout: float = 600.0) -> dict[int, int]:
    """Ask every connected node for its partition id; return ``{partition_id: node_id}``."""
    deadline = time.monotonic() + timeout
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < num_clients and time.monotonic() < deadline:
        time.sleep(1.0)
        node_ids = list(grid.get_node_ids())
    if len(node_ids) < num_clients:
        raise RoundFailed(f"only {len(node_ids)} of num-clients={num_clients} nodes connected")
    messages = [Message(RecordDict({"config": ConfigRecord({"op": "partition-id"})}),
                        dst_node_id=node, message_type=MessageType.QUERY) for node in node_ids]
    mapping: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            raise RoundFailed(f"node {reply.metadata.src_node_id} failed to report its "
                              f"partition: {reply.error.reason}")
        pid = int(reply.content["metrics"]["partition-id"])
        if pid in mapping:
            raise RoundFailed(f"two nodes claim partition-id={pid}")
        mapping[pid] = reply.metadata.src_node_id
    missing = sorted(set(range(num_clients)) - mapping.keys())
    if missing:
        raise RoundFailed(f"no node holds partition ids {missing[:10]} (num-clients={num_clients})")
    return mapping


def run_server(grid: Grid, cfg: RunConfig, log: RunLog,
               on_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run ``cfg.rounds`` FedAvg rounds on ``grid``, logging into ``log``; return the summary."""
    set_threads(cfg)
    started = time.perf_counter()
    runtime = Runtime(cfg)
    anchor_t = runtime.method.make_anchor(runtime.model)
    anchor = {k: v.detach().cpu().numpy() for k, v in anchor_t.items()} if anchor_t else None
    anchor_key = anchor_id(anchor)
    global_state = runtime.method.export_state(runtime.model)
    digest_start = frozen_digest(runtime.model)
    partition = runtime.partition()
    log.write_json("partition.json", {
        "num-clients": cfg.num_clients, "alpha": cfg.alpha, "seed": cfg.seed,
        "classes": partition.classes, "sizes": partition.sizes(),
        "histograms": partition.histograms,
        "mean-pairwise-js": mean_pairwise_js(partition.histograms),
    })
    runtime.features("test")  # tokenise once, before the clock of round 1 starts
    nodes = discover_nodes(grid, cfg.num_clients)
    sampler = np.random.default_rng([cfg.seed, 0x5A])
    anchored: set[int] = set()
    base_config = {"run-config": cfg.to_json(), "anchor-id": anchor_key}
    history: list[dict[str, Any]] = []
    setup_seconds = time.perf_counter() - started

    for server_round in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        sampled = sorted(sampler.choice(cfg.num_clients, cfg.clients_per_round, replace=False))
        arrays = to_record(global_state)
        messages, bytes_down = [], 0
        for pid in sampled:
            config = {**base_config, **runtime.method.client_config(server_round),
                      "round": server_round}
            content = RecordDict({"arrays": arrays, "config": ConfigRecord(config)})
            bytes_down += arrays.count_bytes()
            if anchor is not None and pid not in anchored:
                content["anchor"] = to_record(anchor)
                bytes_down += content["anchor"].count_bytes()
            messages.append(Message(content, dst_node_id=nodes[int(pid)],
                                    message_type=MessageType.TRAIN))
        replies = list(grid.send_and_receive(messages))
        t_train = time.perf_counter()

        states, weights, losses, failures, bytes_up, client_seconds = [], [], [], [], 0, []
        for reply in replies:
            if reply.has_error():
                failures.append({"node": reply.metadata.src_node_id, "reason": reply.error.reason})
                continue
            record = reply.content["arrays"]
            bytes_up += record.count_bytes()
            metrics = reply.content["metrics"]
            states.append(from_record(record))
            weights.append(float(metrics["num-examples"]))
            losses.append(float(metrics["train-loss"]))
            client_seconds.append(float(metrics["train-seconds"]))
            anchored.add(int(metrics["partition-id"]))
        if not states:
            reasons = "; ".join(f["reason"] for f in failures[:3])
            raise RoundFailed(f"round {server_round}: every sampled client failed: {reasons}")
        global_state = fedavg(states, weights)
        runtime.method.import_state(runtime.model, global_state)
        switched = runtime.method.end_round(server_round, runtime, global_state)
        if switched is not None:
            global_state = switched
        t_agg = time.perf_counter()

        metrics_eval: dict[str, float] = {}
        if server_round % cfg.eval_every == 0 or server_round == cfg.rounds:
            metrics_eval = runtime.evaluate("test")
        t_end = time.perf_counter()
        record = {
            "round": server_round,
            "clients": [int(p) for p in sampled],
            "successes": len(states),
            "failures": failures,
            "train-loss": float(np.average(losses, weights=weights)),
            "metrics": metrics_eval,
            "bytes-down": bytes_down,
            "bytes-up": bytes_up,
            "seconds": t_end - t0,
            "seconds-train": t_train - t0,
            "seconds-client-max": max(client_seconds),
            "seconds-aggregate": t_agg - t_train,
            "seconds-eval": t_end - t_agg,
            **({"method-state": runtime.method.state_dict()} if runtime.method.state_dict() else {}),
        }
        log.log_round(record)
        history.append(record)
        if on_round is not None:
            on_round(record)

    log.save_state("final_state.safetensors", global_state)
    evaluated = [r for r in history if r["metrics"]]
    final = evaluated[-1]["metrics"] if evaluated else {}
    metric = runtime.task.metric
    summary = {
        "task": cfg.task,
        "method": cfg.method,
        "model": cfg.model,
        "metric": metric,
        "rounds": cfg.rounds,
        "final": final,
        "best": max((r["metrics"][metric] for r in evaluated), default=None),
        "lr": runtime.method.lr,
        "trainable-params": num_parameters(global_state),
        "total-params": sum(p.numel() for p in runtime.model.parameters()),
        "anchor-params": num_parameters(anchor) if anchor else 0,
        "bytes-per-client-round": (sum(r["bytes-down"] + r["bytes-up"] for r in history)
                                   / max(1, sum(r["successes"] for r in history))),
        "bytes-down": sum(r["bytes-down"] for r in history),
        "bytes-up": sum(r["bytes-up"] for r in history),
        "failures": sum(len(r["failures"]) for r in history),
        "seconds": time.perf_counter() - started,
        "seconds-setup": setup_seconds,
        "mean-pairwise-js": mean_pairwise_js(partition.histograms),
        "frozen-digest-start": digest_start,
        "frozen-digest-end": frozen_digest(runtime.model),
    }
    log.write_json("summary.json", summary)
    return summary


def make_server_app(cfg: RunConfig, log: RunLog,
                    on_round: Callable[[dict[str, Any]], None] | None = None) -> ServerApp:
    """A ServerApp bound to ``cfg`` (simulation: ``context.run_config`` is empty there)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, cfg, log, on_round)

    return app
