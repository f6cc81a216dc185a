"""One round of training: sample, send, collect, validate, aggregate through the strategy.

``train_round`` samples ``clients-per-round`` partitions with the run's seeded generator, lets
the strategy configure the round for exactly their nodes, sends each the global trainable state
(plus the method's anchor where a node lacks it), waits up to ``round-timeout`` for the replies
and validates each update (``validation.py``), retrying with a new sample when too few are valid.
``aggregate_updates`` turns the valid updates into the next global state: FedAvg's running sum,
or the strategy's ``aggregate_train``. ``check_progress`` stops a run that cannot learn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore.differential_privacy import KEY_NORM_BIT

from ..config import RunConfig
from ..errors import RunFailedError
from ..methods import Method
from ..schedule import sampling_probabilities
from .aggregation import WeightedMean
from .exchange import Nodes, exchange
from .state import decode, encode, from_record, packs_on_wire, to_record, wire_record
from .strategies.build import UNIFORM_WEIGHT, SampledGrid, messages_by_node, quiet, streams
from .strategies.dp import KEY_DP_MOD, forget_pending_release
from .validation import check_own_weight, check_update, check_weight, ordered_like

Record = dict[str, Any]
STRATEGY_REPLY_METRICS = (KEY_NORM_BIT,)  # what a client's mods add for the strategy


@dataclass
class Update:
    """A client's validated reply."""

    client: int
    state: dict[str, np.ndarray]
    weight: float
    loss: float
    seconds: float  # local training
    handler_seconds: float  # the client's whole train handler (decode, train, encode)
    strategy_metrics: dict[str, Any] = field(default_factory=dict)  # e.g. adaptive DP's norm bit


@dataclass
class RoundResult:
    """What one round's attempts produced (``updates`` empty if the round is skipped)."""

    clients: list[int] = field(default_factory=list)  # sampled in the last attempt
    attempts: int = 0
    updates: list[Update] = field(default_factory=list)
    failures: list[Record] = field(default_factory=list)
    rejected: list[Record] = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0
    mean: WeightedMean | None = None  # FedAvg of ``updates``, summed as they were read
    replied: int = 0  # clients that returned an update, over every attempt (valid or not)
    # client-ranks: {"<rank>": {"clients", "bytes-down", "bytes-up"}} (``Method.rank_of``)
    by_rank: dict[str, Record] = field(default_factory=dict)

    def count_rank(self, method: Method | None, cfg: RunConfig, pid: int, down: int = 0,
                   up: int = 0) -> None:
        rank = method.rank_of(pid) if method is not None and cfg.client_ranks else None
        if rank is None:
            return
        row = self.by_rank.setdefault(str(rank), {"clients": 0, "bytes-down": 0, "bytes-up": 0})
        row["clients"] += 1 if down else 0
        row["bytes-down"] += down
        row["bytes-up"] += up


def check_progress(cfg: RunConfig, server_round: int, result: RoundResult,
                   failed_in_a_row: int) -> None:
    """Stop a run that cannot learn: raise ``RunFailedError`` when every client sampled in every
    attempt of a skipped round failed with an error (not a time-out, not a rejected update; the
    same error would come back in every later round), or after ``max-failed-rounds`` rounds in a
    row without a valid update."""
    if result.updates:
        return
    errors = [f for f in result.failures if f.get("kind") == "error"]
    if errors and len(errors) == len(result.failures) and not result.replied:
        raise RunFailedError(
            f"round {server_round}: every sampled client failed ({len(errors)} failures in "
            f"{result.attempts} attempt(s)), so the run cannot learn anything; the clients' "
            f"error: {error_summary(errors[0]['reason'])}")
    if cfg.max_failed_rounds and failed_in_a_row >= cfg.max_failed_rounds:
        reasons = [f["reason"] for f in result.failures] + [r["reason"] for r in result.rejected]
        raise RunFailedError(
            f"no valid update for {failed_in_a_row} rounds in a row (max-failed-rounds="
            f"{cfg.max_failed_rounds}), up to round {server_round}; last reason: "
            f"{error_summary(reasons[0]) if reasons else 'none logged'} (see rounds.jsonl)")


def error_summary(reason: str) -> str:
    """The last informative line of a client's error (Flower passes whole tracebacks)."""
    lines = [line.strip() for line in str(reason).strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no message)"


def train_round(grid: Grid, cfg: RunConfig, nodes: Nodes, sampler: np.random.Generator,
                global_state: dict[str, np.ndarray], config: Record,
                anchor: dict[str, np.ndarray] | None, sizes: list[int],
                strategy: Strategy, method: Method | None = None) -> RoundResult:
    """Sample, send, collect and validate, retrying with a new sample if too few succeed.

    The strategy configures the round for exactly the sampled nodes (``SampledGrid``): its
    config (FedProx's ``proximal-mu``, DP's clipping norm, ...) goes into each message. What a
    client is sent, and what its update is checked against, is the method's
    (``Method.client_payload`` / ``upload_reference``): the global state unless the method says
    otherwise (heterogeneous ranks, factors kept on the client)."""
    result = RoundResult()
    attempts = 1 + (cfg.round_retries if cfg.on_round_failure == "retry" else 0)
    server_round = int(config["round"])
    packed = packs_on_wire(cfg.dp)  # deployed: one array per message (state.py)
    shared = wire_record(encode(global_state, cfg.transport_dtype), packed)  # default payload
    exact = to_record(global_state)  # what the strategy sees: the global state, not the wire
    anchor_record = wire_record(anchor, packed) if anchor is not None else None
    anchor_key = str(config["anchor-id"])
    for attempt in range(attempts):
        sampled = sorted(int(p) for p in sampler.choice(cfg.num_clients, cfg.clients_per_round,
                                                        replace=False,
                                                        p=sampling_probabilities(cfg, sizes)))
        result.clients, result.attempts, result.updates = sampled, attempt + 1, []
        result.mean = WeightedMean() if streams(strategy) else None
        live = []
        for pid in sampled:
            if nodes.node(pid) is None:
                result.failures.append({"client": pid, "attempt": attempt, "kind": "no-node",
                                        "reason": "no live node holds this partition"})
            else:
                live.append(pid)
        forget_pending_release(strategy, server_round)
        with quiet():
            configured = messages_by_node(strategy.configure_train(
                server_round, exact, ConfigRecord({**config, "attempt": attempt}),
                SampledGrid(grid, [nodes.node(pid) for pid in live])) if live else [])
        messages, targets, references = [], [], []
        for pid in live:
            node = nodes.node(pid)
            if node not in configured:  # the strategy left this node out of the round
                continue
            sent = method.client_payload(global_state, pid, server_round) if method \
                else global_state
            arrays = shared if sent is global_state else \
                wire_record(encode(sent, cfg.transport_dtype), packed)
            references.append(method.upload_reference(sent, pid, server_round) if method
                              else global_state)
            content = RecordDict({"arrays": arrays,
                                  "config": strategy_config(configured[node], cfg)})
            result.bytes_down += arrays.count_bytes()
            result.count_rank(method, cfg, pid, down=arrays.count_bytes())
            if anchor_record is not None and nodes.anchors.get(pid) != anchor_key:
                content["anchor"] = anchor_record
                result.bytes_down += anchor_record.count_bytes()
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN,
                                    group_id=str(config["round"])))
            targets.append(pid)
        replies, unanswered = exchange(grid, messages, cfg.round_timeout or None)
        for i in unanswered:
            nodes.failed.add(targets[i])  # a new node for it may replace this one (exchange.py)
            nodes.anchors.pop(targets[i], None)  # and would need the anchor again
            if i in getattr(unanswered, "unsent", ()):  # the SuperLink refused: the node left
                result.failures.append({"client": targets[i], "attempt": attempt,
                                        "kind": "no-node", "reason": "the SuperLink did not "
                                        "accept a message for its node (the node left)"})
                continue
            result.failures.append({"client": targets[i], "attempt": attempt, "kind": "timeout",
                                    "reason": f"no reply within round-timeout="
                                              f"{cfg.round_timeout:g} s"})
        for i in sorted(replies):  # partition order: the same sums in every run
            reply, pid = replies.pop(i), targets[i]  # each reply is dropped once read
            if reply.has_error():
                nodes.failed.add(pid)
                if any(w in reply.error.reason.lower() for w in ("anchor", "unavailable")):
                    nodes.anchors.pop(pid, None)  # a restarted node: send the anchor again
                result.failures.append({"client": pid, "attempt": attempt, "kind": "error",
                                        "reason": reply.error.reason})
                continue
            result.replied += 1
            nodes.failed.discard(pid)
            if anchor_record is not None:
                nodes.anchors[pid] = anchor_key  # it replied, so it stored the anchor
            result.bytes_up += reply.content["arrays"].count_bytes() \
                if "arrays" in reply.content else 0
            result.count_rank(method, cfg, pid, up=reply.content["arrays"].count_bytes()
                              if "arrays" in reply.content else 0)
            update, reason = read_update(reply, pid, references[i], sizes[pid], cfg,
                                         own_data=pid in nodes.own_data,
                                         first=nodes.expected_size(pid, sizes[pid]))
            if update is None:
                result.rejected.append({"client": pid, "attempt": attempt, "reason": reason})
                continue
            if pid in nodes.own_data and not nodes.own_data[pid]:
                nodes.own_data[pid] = int(update.weight)  # its weight from now on
            if result.mean is not None:  # FedAvg: add it now, keep only the running sums
                result.mean.add(update.state, update.weight)
                update.state = {}
            result.updates.append(update)
        if len(result.updates) >= cfg.min_train_clients:
            return result
    result.updates = []  # too few valid updates in every attempt: the round is skipped
    return result


def strategy_config(message: Message, cfg: RunConfig) -> ConfigRecord:
    """The config record the strategy made for a node (fedpeft's settings plus its own)."""
    config = ConfigRecord(dict(message.content["config"]))
    if cfg.dp.startswith("client-"):
        config[KEY_DP_MOD] = cfg.dp.removeprefix("client-")
    return config


def read_update(reply: Message, pid: int, reference: dict[str, np.ndarray], size: int,
                cfg: RunConfig, own_data: bool = False, first: int | None = None
                ) -> tuple[Update | None, str]:
    """The reply's update if it passes every check, else None and the reason. ``own_data``:
    the node trains on its own files, so its weight is checked against ``first`` (its first
    valid update's) instead of the shard ``size`` the server computed."""
    try:
        metrics = reply.content["metrics"]
        claimed = int(metrics["partition-id"])
        weight = float(metrics["num-examples"])
        state = decode(from_record(reply.content["arrays"]), cfg.transport_dtype)
        loss, seconds = float(metrics["train-loss"]), float(metrics["train-seconds"])
        handler = float(metrics.get("handler-seconds", seconds))
    except (KeyError, TypeError, ValueError) as err:
        return None, f"malformed reply: {err!r}"
    if claimed != pid:
        return None, f"reply claims partition {claimed}, expected {pid}"
    reason = (check_own_weight(weight, first) if own_data else check_weight(weight, size)) \
        or check_update(state, reference, cfg.max_update_norm)
    if reason:
        return None, reason
    passed = {k: metrics[k] for k in STRATEGY_REPLY_METRICS if k in metrics}
    return Update(pid, ordered_like(state, reference), weight, loss, seconds, handler,
                  passed), ""


def aggregate_updates(cfg: RunConfig, result: RoundResult, strategy: Strategy,
                      server_round: int, reference: dict[str, np.ndarray]
                      ) -> tuple[dict[str, np.ndarray] | None, Record]:
    """The next global state from the round's valid updates, in partition order (reproducible
    sums): FedAvg's running sum when the strategy is plain FedAvg, else the strategy's own
    ``aggregate_train`` over replies holding exactly the validated updates. None if the
    strategy aggregated nothing (e.g. DP accounting with a client missing)."""
    if result.mean is not None:
        return result.mean.result(), {}
    updates = sorted(result.updates, key=lambda u: u.client)
    replies = [update_reply(u, server_round) for u in updates]
    with quiet():
        arrays, metrics = strategy.aggregate_train(server_round, replies)
    # the strategies' metrics are means of the reply metrics; only exact-lora's is news
    extra: Record = {k: float(v) for k, v in (metrics or {}).items()
                     if k == "lora-truncation-error"}
    if arrays is None:
        return None, extra
    # server optimisers compute in float64; the next round's updates are checked against dtypes
    state = {k: np.asarray(v, dtype=reference[k].dtype) if k in reference else v
             for k, v in from_record(arrays).items()}
    # a method's own rule may change the keys (flora's merged update: factored, then dense)
    return (ordered_like(state, reference) if state.keys() == reference.keys() else state), extra


def update_reply(update: Update, server_round: int) -> Message:
    """A validated update as the reply message a Flower strategy aggregates."""
    content = RecordDict({
        "arrays": to_record(update.state),
        "metrics": MetricRecord({"num-examples": update.weight, UNIFORM_WEIGHT: 1.0,
                                 "train-loss": update.loss, "partition-id": update.client,
                                 **update.strategy_metrics}),
    })
    return Message(content, dst_node_id=0, message_type=MessageType.TRAIN,
                   group_id=str(server_round))
