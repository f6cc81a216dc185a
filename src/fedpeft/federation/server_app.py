"""The Flower ServerApp: FedAvg rounds over the trainable tensors, with server-side evaluation.

The server drives the rounds itself through the Grid rather than through ``FedAvg.start``:
client sampling is a seeded generator over *partition ids* (so a run is the same whichever node
ids the deployment hands out, and can be replayed), a method may change what travels between
rounds, and every round is measured (bytes each way, seconds per phase).

Per round: sample K of N clients, send each the global trainable state (plus, if it does not
hold it yet, the method's anchor), wait up to ``round-timeout`` for the replies, validate each
update (``validation.py``) and average the valid ones weighted by example count, evaluate the
global model every ``eval-every`` rounds, log one line and write a checkpoint
(``checkpoint.py``). A client that raises, hangs or disappears, or whose update is rejected,
is logged and left out; a round with fewer than ``min-train-clients`` valid updates is retried
with a new sample or skipped (``on-round-failure``), never fatal.
"""

from __future__ import annotations

from .. import offline

offline.apply()

import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from flwr.app import (  # noqa: E402
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import Strategy  # noqa: E402
from flwr.supercore.differential_privacy import KEY_NORM_BIT  # noqa: E402

from ..config import ConfigError, RunConfig, to_toml  # noqa: E402
from ..errors import RunFailedError  # noqa: E402
from ..drift import DriftTracker  # noqa: E402
from ..partition import mean_pairwise_js  # noqa: E402
from ..runlog import RunExistsError, RunLog, as_logged, atomic_write  # noqa: E402
from ..schedule import client_lr, sampling_probabilities  # noqa: E402
from ..tracking import check_available, open_tracker  # noqa: E402
from .aggregation import WeightedMean  # noqa: E402
from .checkpoint import (  # noqa: E402
    Checkpoint,
    check_resumable,
    load_checkpoint,
    save_checkpoint,
    saved_config,
)
from .exchange import Nodes, discover_nodes, exchange, refresh_nodes  # noqa: E402
from .strategies.build import (  # noqa: E402
    UNIFORM_WEIGHT,
    SampledGrid,
    make_strategy,
    messages_by_node,
    quiet,
    streams,
)
from .strategies.dp import (  # noqa: E402
    KEY_DP_MOD,
    accounting_note,
    forget_pending_release,
    privacy_spent,
)
from .strategies.state import load_strategy_state, strategy_state  # noqa: E402
from .runtime import Runtime, anchor_id, set_threads  # noqa: E402
from .state import (  # noqa: E402
    decode,
    encode,
    from_record,
    frozen_digest,
    num_parameters,
    to_record,
)
from ..training import resolve_precision  # noqa: E402
from .validation import check_finite, check_update, check_weight, ordered_like  # noqa: E402

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


def prepare(cfg: RunConfig) -> Runtime:
    """The server's runtime: model + method (rank, targets checked), partition, test features.

    Everything that can fail on bad input fails here, before any client trains.
    """
    model = Path(cfg.model).expanduser()
    if cfg.model.startswith(("/", ".", "~")) and not model.is_dir():
        raise ConfigError(f"model={cfg.model}: no such model folder")
    check_available(cfg)  # track=...: its library is installed
    set_threads(cfg, server=True)
    runtime = Runtime(cfg)
    runtime.partition()
    runtime.features("test")  # tokenise once, before the clock of round 1 starts
    return runtime


def open_run(cfg: RunConfig, overwrite: bool = False, resume: bool = False
             ) -> tuple[RunLog, Runtime | None, Record | None]:
    """Check the run folder, build the server's runtime, then create (or reopen) the folder.

    Returns ``(log, runtime, None)`` to run, or ``(log, None, summary)`` when a resumed run has
    already finished. A folder that exists is never replaced without ``overwrite``, and is only
    created once the configuration has been checked against the model and data.
    """
    path = cfg.run_dir()
    if resume:
        saved, done = saved_config(path)
        if saved is None:
            raise ConfigError(f"{path} holds no run to resume (no config.toml)")
        cfg = cfg.resolved(saved)
        check_resumable(saved, cfg, done)
        summary = path / "summary.json"
        if done and done >= cfg.rounds and summary.exists():
            return RunLog(path), None, json.loads(summary.read_text())
        runtime = prepare(cfg)
        log = RunLog(path)
        atomic_write(path / "config.toml", to_toml(cfg))  # the settings now in force
        (path / "summary.json").unlink(missing_ok=True)
        return log, runtime, None
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise RunExistsError(f"run folder {path} already exists; pass --overwrite to replace it, "
                             f"--resume {path} to continue it, or out=... to choose another")
    cfg = cfg.resolved()
    runtime = prepare(cfg)
    return RunLog.create(cfg, overwrite=overwrite), runtime, None


def run_server(grid: Grid, cfg: RunConfig, log: RunLog,
               on_round: Callable[[Record], None] | None = None,
               runtime: Runtime | None = None, resume: bool = False) -> Record:
    """Run the remaining rounds of ``cfg`` on ``grid``, logging into ``log``; return the summary."""
    started = time.perf_counter()
    cfg = cfg.resolved(saved_config(log.path)[0] if resume else None)
    runtime = runtime if runtime is not None else prepare(cfg)
    anchor_t = runtime.method.make_anchor(runtime.model)
    anchor = {k: v.detach().cpu().numpy() for k, v in anchor_t.items()} if anchor_t else None
    anchor_key = anchor_id(anchor)
    digest_start = frozen_digest(runtime.model)
    partition = runtime.partition()
    sizes = [len(c) for c in partition.clients]
    log.write_json("partition.json", {
        "num-clients": cfg.num_clients, "alpha": cfg.alpha, "seed": cfg.seed,
        "classes": partition.classes, "sizes": partition.sizes(),
        "histograms": partition.histograms,
        "mean-pairwise-js": mean_pairwise_js(partition.histograms),
    })
    sampler = np.random.default_rng([cfg.seed, 0x5A])
    checkpoint = load_checkpoint(log.path) if resume else None
    if checkpoint is not None:
        check_resumable(checkpoint.config, cfg, checkpoint.round)
        if checkpoint.anchor_id != anchor_key:
            raise ConfigError("the checkpoint's anchor differs from this model's; was the model "
                              "folder changed?")
        runtime.method.load_state_dict(checkpoint.method_state, runtime)
        global_state = checkpoint.global_state
        runtime.method.import_state(runtime.model, global_state)
        sampler.bit_generator.state = checkpoint.sampler
        history, done, before = checkpoint.history, checkpoint.round, checkpoint.seconds
        log.reset_rounds(history)  # drop a line of a round that finished after the checkpoint
    else:
        global_state = runtime.method.export_state(runtime.model)
        history, done, before = [], 0, 0.0
    strategy = make_strategy(cfg, runtime.method.lr)
    if checkpoint is not None:
        load_strategy_state(strategy, checkpoint.strategy_state, checkpoint.strategy_tensors)
    drift = DriftTracker()  # LoRA factors only; other methods log no drift
    drift.observe(global_state)
    nodes = discover_nodes(grid, cfg.num_clients)
    base_config = {"run-config": cfg.to_json(), "anchor-id": anchor_key,
                   "base-fingerprint": runtime.base_fingerprint}
    failed_in_a_row = 0  # rounds without a valid update, up to now
    for record in reversed(history):
        if not record.get("skipped"):
            break
        failed_in_a_row += 1
    tracker = open_tracker(cfg, log.path, history)  # track=...: TensorBoard, MLflow
    setup_seconds = time.perf_counter() - started

    for server_round in range(done + 1, cfg.rounds + 1):
        t0 = time.perf_counter()
        node_changes = refresh_nodes(grid, nodes, min(cfg.round_timeout or 60.0, 60.0))
        config = {**base_config, **runtime.method.client_config(server_round),
                  "round": server_round, "lr": client_lr(runtime.method, cfg, server_round)}
        result = train_round(grid, cfg, nodes, sampler, global_state, config, anchor, sizes,
                             strategy)
        t_train = time.perf_counter()
        extra: Record = {}
        if result.updates:
            aggregate, extra = aggregate_updates(cfg, result, strategy, server_round,
                                                 global_state)
            problem = "the strategy aggregated nothing" if aggregate is None else \
                check_finite(aggregate)
            if problem is None:
                global_state = aggregate
                runtime.method.import_state(runtime.model, global_state)
            else:  # cannot happen with validated updates; kept as the last line of defence
                result.rejected.append({"client": "aggregate", "reason": problem})
                result.updates = []
        failed_in_a_row = 0 if result.updates else failed_in_a_row + 1
        t_agg = time.perf_counter()
        evaluate = server_round % cfg.eval_every == 0 or server_round == cfg.rounds
        # The model this round trained is evaluated before a method's switch (SLoRA's stage 1
        # -> 2), so the round's metrics are its own; the switched model's go beside them.
        metrics_eval = evaluate_global(cfg, runtime) if evaluate else {}
        t_eval = time.perf_counter()
        switched = runtime.method.end_round(server_round, runtime, global_state)
        switch_metrics: dict[str, float] = {}
        if switched is not None:
            global_state = switched
            strategy = make_strategy(cfg, runtime.method.lr)  # its state restarts with stage 2
            switch_metrics = evaluate_global(cfg, runtime) if evaluate else {}
        t_end = time.perf_counter()
        drifted = drift.observe(global_state)
        weights = [u.weight for u in result.updates]
        record: Record = {
            "round": server_round,
            "clients": result.clients,
            "attempts": result.attempts,
            "successes": len(result.updates),
            "skipped": not result.updates,
            "failures": result.failures,
            "rejected": result.rejected,
            "train-loss": float(np.average([u.loss for u in result.updates], weights=weights))
            if result.updates else float("nan"),
            "metrics": metrics_eval,
            "bytes-down": result.bytes_down,
            "bytes-up": result.bytes_up,
            "lr": config["lr"],  # the clients' rate this round (schedule.py)
            "seconds": t_end - t0,
            "seconds-train": t_train - t0,
            "seconds-client-max": max((u.seconds for u in result.updates), default=0.0),
            "seconds-clients": sum(u.seconds for u in result.updates),  # local training, summed
            "seconds-handlers": sum(u.handler_seconds for u in result.updates),
            "seconds-aggregate": t_agg - t_train + (t_end - t_eval),
            "seconds-eval": t_eval - t_agg,
            **({"metrics-after-switch": switch_metrics} if switch_metrics else {}),
            **({"privacy": spent} if (spent := privacy_spent(strategy)) else {}),
            **({"nodes": node_changes} if node_changes else {}),
            **({"drift": drifted} if drifted else {}),
            **extra,
            **({"method-state": method_state} if (method_state := runtime.method.state_dict())
               else {}),
        }
        log.log_round(record)
        history.append(as_logged(record))  # exactly as a resumed run reads it back
        saved_strategy, strategy_tensors = strategy_state(strategy)
        save_checkpoint(log.path, Checkpoint(
            round=server_round, global_state=global_state, sampler=sampler.bit_generator.state,
            anchored=[p for p, a in nodes.anchors.items() if anchor_key and a == anchor_key],
            method_state=runtime.method.state_dict(), history=history, anchor_id=anchor_key,
            config=cfg.to_dict(), seconds=before + time.perf_counter() - started,
            strategy_state=saved_strategy, strategy_tensors=strategy_tensors))
        if on_round is not None:
            on_round(record)
        tracker.log_round(record)  # once checkpointed: a resume never logs a round twice
        check_progress(cfg, server_round, result, failed_in_a_row)  # after the round is logged

    log.save_state("final_state.safetensors", global_state)
    summary = summarize(cfg, runtime, history, global_state, anchor)
    summary.update({
        "seconds": before + time.perf_counter() - started,
        "seconds-setup": setup_seconds,
        "seconds-svd": runtime.method.svd_seconds,
        "resumed-from-round": done,
        "mean-pairwise-js": mean_pairwise_js(partition.histograms),
        "frozen-digest-start": digest_start,
        "frozen-digest-end": frozen_digest(runtime.model),
        **({"baseline": baseline} if (baseline := runtime.task.baseline()) else {}),
        "strategy": cfg.strategy,
        # what precision=auto meant here (the server's evaluation; clients resolve it alike)
        "precision": resolve_precision(runtime.device, cfg.precision),
        **({"privacy": privacy_spent(strategy) or {"note": accounting_note(cfg)}}
           if cfg.dp != "none" else {}),
    })
    log.write_json("summary.json", summary)
    tracker.finish(summary, log.path)
    return summary


def evaluate_global(cfg: RunConfig, runtime: Runtime) -> dict[str, float]:
    """The global model's test metrics (and ``valid-*`` ones when a validation split exists)."""
    metrics = runtime.evaluate("test")
    if cfg.valid_fraction > 0:  # the split learning rates are chosen on
        metrics.update({f"valid-{k}": v for k, v in runtime.evaluate("valid").items()})
    return metrics


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
                strategy: Strategy) -> RoundResult:
    """Sample, send, collect and validate, retrying with a new sample if too few succeed.

    The strategy configures the round for exactly the sampled nodes (``SampledGrid``): its
    config (FedProx's ``proximal-mu``, DP's clipping norm, ...) goes into each message."""
    result = RoundResult()
    attempts = 1 + (cfg.round_retries if cfg.on_round_failure == "retry" else 0)
    server_round = int(config["round"])
    arrays = to_record(encode(global_state, cfg.transport_dtype))
    exact = to_record(global_state)  # what the strategy sees: the global state, not the wire
    anchor_record = to_record(anchor) if anchor is not None else None
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
        messages, targets = [], []
        for pid in live:
            node = nodes.node(pid)
            if node not in configured:  # the strategy left this node out of the round
                continue
            content = RecordDict({"arrays": arrays,
                                  "config": strategy_config(configured[node], cfg)})
            result.bytes_down += arrays.count_bytes()
            if anchor_record is not None and nodes.anchors.get(pid) != anchor_key:
                content["anchor"] = anchor_record
                result.bytes_down += anchor_record.count_bytes()
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN,
                                    group_id=str(config["round"])))
            targets.append(pid)
        replies, unanswered = exchange(grid, messages, cfg.round_timeout or None)
        for i in unanswered:
            result.failures.append({"client": targets[i], "attempt": attempt, "kind": "timeout",
                                    "reason": f"no reply within round-timeout="
                                              f"{cfg.round_timeout:g} s"})
        for i in sorted(replies):  # partition order: the same sums in every run
            reply, pid = replies.pop(i), targets[i]  # each reply is dropped once read
            if reply.has_error():
                result.failures.append({"client": pid, "attempt": attempt, "kind": "error",
                                        "reason": reply.error.reason})
                continue
            result.replied += 1
            if anchor_record is not None:
                nodes.anchors[pid] = anchor_key  # it replied, so it stored the anchor
            result.bytes_up += reply.content["arrays"].count_bytes() \
                if "arrays" in reply.content else 0
            update, reason = read_update(reply, pid, global_state, sizes[pid], cfg)
            if update is None:
                result.rejected.append({"client": pid, "attempt": attempt, "reason": reason})
                continue
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
                cfg: RunConfig) -> tuple[Update | None, str]:
    """The reply's update if it passes every check, else None and the reason."""
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
    reason = check_weight(weight, size) or check_update(state, reference, cfg.max_update_norm)
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
    return ordered_like(state, reference), extra


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


def summarize(cfg: RunConfig, runtime: Runtime, history: list[Record],
              global_state: dict[str, np.ndarray], anchor: dict[str, np.ndarray] | None) -> Record:
    """The run's summary from its round history (the same after a resume)."""
    evaluated = [r for r in history if r["metrics"]]
    final = evaluated[-1]["metrics"] if evaluated else {}
    metric = runtime.task.metric
    return {
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
        "rejected": sum(len(r.get("rejected", [])) for r in history),
        "skipped-rounds": sum(bool(r.get("skipped")) for r in history),
        "retries": sum(r.get("attempts", 1) - 1 for r in history),
    }


def make_server_app(cfg: RunConfig, log: RunLog,
                    on_round: Callable[[Record], None] | None = None,
                    runtime: Runtime | None = None, resume: bool = False,
                    failure: list[BaseException] | None = None) -> ServerApp:
    """A ServerApp bound to ``cfg`` (simulation: ``context.run_config`` is empty there).

    ``failure``: an exception that ends the run is appended there before Flower sees it (Flower's
    simulation logs it and returns normally), so the caller can report it."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            run_server(grid, cfg, log, on_round, runtime=runtime, resume=resume)
        except BaseException as err:
            if failure is not None:
                failure.append(err)
            raise

    return app
