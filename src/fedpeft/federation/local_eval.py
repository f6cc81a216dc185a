"""Personalised evaluation: clients score the model on their own held-out data.

With ``local-test-fraction=f`` every client holds out a seeded share f of its shard
(``partition.local_split``; that share never trains, and the client's FedAvg weight is the
rest). At every evaluation round ``evaluate_clients`` sends Flower EVALUATE messages, configured
by the run's strategy (``configure_evaluate``, for exactly the nodes fedpeft chose, as for
training), to all clients or to a seeded sample of ``local-eval-clients`` of them
(``eval_sample``: its own generator, so the training sample is the same with or without it).
Each client scores the global model on its local split (``global-<metric>``) and, for a method
whose clients keep their own tensors (fedsa-lora), its personalised model (``personal-<metric>``;
client_app.evaluate_content); with ``local-valid-fraction`` both also on the client's local
validation split (``valid-global-<metric>``, ``valid-personal-<metric>``), on which
``runlog.validation_series`` chooses a personalised method's learning rate. The strategy's
``aggregate_evaluate`` gives the example-weighted mean (of the test scores); ``client_stats``
the spread over clients: mean, standard deviation (over clients, ddof 0), the mean of the worst
10% of clients (the ceil(n/10) lowest) and the minimum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from ..config import RunConfig
from .exchange import Nodes, exchange
from .state import encode, to_record
from .strategies.build import UNIFORM_WEIGHT, SampledGrid, messages_by_node, quiet

Record = dict[str, Any]
EVAL_SEED = 0xE7A1  # the local-eval sample: default_rng([seed, round, EVAL_SEED])


def eval_sample(cfg: RunConfig, server_round: int) -> list[int]:
    """The partitions that evaluate in ``server_round``: all, or ``local-eval-clients`` of them."""
    if not cfg.local_eval_clients or cfg.local_eval_clients >= cfg.num_clients:
        return list(range(cfg.num_clients))
    rng = np.random.default_rng([cfg.seed, server_round, EVAL_SEED])
    return sorted(int(p) for p in rng.choice(cfg.num_clients, cfg.local_eval_clients,
                                             replace=False))


def client_stats(values: Sequence[float]) -> dict[str, float]:
    """Mean, std (ddof 0), mean of the worst 10% (the ceil(n/10) lowest values) and min."""
    array = np.sort(np.asarray(values, dtype=np.float64))
    if not len(array):
        return {}
    worst = max(1, math.ceil(0.1 * len(array)))
    return {"mean": float(array.mean()), "std": float(array.std()),
            "worst-10%": float(array[:worst].mean()), "min": float(array[0]),
            "clients": len(array)}


def evaluate_clients(grid: Grid, cfg: RunConfig, nodes: Nodes, strategy: Strategy, method: Any,
                     global_state: dict[str, np.ndarray], config: Record,
                     anchor: dict[str, np.ndarray] | None, server_round: int) -> Record:
    """One round of federated evaluation on the clients' local splits (see the module doc)."""
    sampled = eval_sample(cfg, server_round)
    failures: list[Record] = []
    live = []
    for pid in sampled:
        if nodes.node(pid) is None:
            failures.append({"client": pid, "kind": "no-node",
                             "reason": "no live node holds this partition"})
        else:
            live.append(pid)
    with quiet():
        configured = messages_by_node(strategy.configure_evaluate(
            server_round, to_record(global_state), ConfigRecord(dict(config)),
            SampledGrid(grid, [nodes.node(pid) for pid in live])) if live else [])
    anchor_record = to_record(anchor) if anchor is not None else None
    anchor_key = str(config.get("anchor-id", ""))
    shared = to_record(encode(global_state, cfg.transport_dtype))
    messages, targets, bytes_down = [], [], 0
    for pid in live:
        node = nodes.node(pid)
        if node not in configured:
            continue
        sent = method.client_payload(global_state, pid, server_round)
        arrays = shared if sent is global_state else to_record(encode(sent, cfg.transport_dtype))
        content = RecordDict({"arrays": arrays,
                              "config": ConfigRecord(dict(configured[node].content["config"]))})
        bytes_down += arrays.count_bytes()
        if anchor_record is not None and nodes.anchors.get(pid) != anchor_key:
            content["anchor"] = anchor_record
            bytes_down += anchor_record.count_bytes()
        messages.append(Message(content, dst_node_id=node, message_type=MessageType.EVALUATE,
                                group_id=f"{server_round}-evaluate"))
        targets.append(pid)
    replies, unanswered = exchange(grid, messages, cfg.round_timeout or None)
    failures += [{"client": targets[i], "kind": "timeout",
                  "reason": f"no reply within round-timeout={cfg.round_timeout:g} s"}
                 for i in unanswered]
    clients, examples, values, kept = [], [], {}, []
    for i in sorted(replies):
        reply, pid = replies[i], targets[i]
        if reply.has_error():
            failures.append({"client": pid, "kind": "error", "reason": reply.error.reason})
            continue
        try:
            metrics = dict(reply.content["metrics"])
            n = int(metrics.pop("num-examples"))
            claimed = int(metrics.pop("partition-id"))
            scores = {k: float(v) for k, v in metrics.items()}
        except (KeyError, TypeError, ValueError) as err:
            failures.append({"client": pid, "kind": "malformed", "reason": repr(err)})
            continue
        if claimed != pid or not all(math.isfinite(v) for v in scores.values()):
            failures.append({"client": pid, "kind": "malformed",
                             "reason": f"reply claims partition {claimed} or has non-finite "
                                       "metrics"})
            continue
        if anchor_record is not None:
            nodes.anchors[pid] = anchor_key  # it replied, so it stored the anchor
        clients.append(pid)
        examples.append(n)
        for key, value in scores.items():
            values.setdefault(key, []).append(value)
        kept.append(Message(RecordDict({"metrics": MetricRecord(
            {**scores, "num-examples": n, UNIFORM_WEIGHT: 1.0})}), dst_node_id=0,
            message_type=MessageType.EVALUATE, group_id=f"{server_round}-evaluate"))
    values = {k: v for k, v in values.items() if len(v) == len(clients)}
    weighted: Record = {}
    if kept:
        with quiet():
            aggregated = strategy.aggregate_evaluate(server_round, kept)
        # weighted by the local test splits' sizes: not the local validation scores' weights
        weighted = {k: float(v) for k, v in (aggregated or {}).items()
                    if k in values and not k.startswith("valid-")}
    return {"clients": clients, "examples": examples, "values": values,
            "stats": {k: client_stats(v) for k, v in values.items()},
            "weighted": weighted, "failures": failures, "bytes-down": bytes_down}
