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
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from flwr.app import (  # noqa: E402
    Context,
)
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from ..config import ConfigError, RunConfig, to_toml  # noqa: E402
from ..drift import DriftTracker  # noqa: E402
from ..partition import mean_pairwise_js  # noqa: E402
from ..runlog import RunExistsError, RunLog, as_logged, atomic_write  # noqa: E402
from ..schedule import client_lr  # noqa: E402
from ..tracking import check_available, open_tracker  # noqa: E402
from ..training import resolve_precision, warn_emulated_bf16  # noqa: E402
from .checkpoint import (  # noqa: E402
    PRECISION_RAN,
    Checkpoint,
    check_resumable,
    checkpoint_config,
    keep_precision_record,
    load_checkpoint,
    save_checkpoint,
    saved_config,
)
from .client_store import run_key  # noqa: E402
from .exchange import discover_nodes, refresh_nodes  # noqa: E402
from .local_eval import evaluate_clients  # noqa: E402
from .rounds import aggregate_updates, check_progress, train_round  # noqa: E402
from .runtime import Runtime, anchor_id, set_threads  # noqa: E402
from .state import (  # noqa: E402
    frozen_digest,
    num_parameters,
)
from .strategies.build import (  # noqa: E402
    make_strategy,
)
from .strategies.dp import (  # noqa: E402
    accounting_note,
    privacy_spent,
)
from .strategies.state import load_strategy_state, strategy_state  # noqa: E402
from .validation import check_finite  # noqa: E402

Record = dict[str, Any]


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
    warn_emulated_bf16(runtime.device, cfg.precision)
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
        keep_precision_record(path, saved)  # before the summary that may hold it goes
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
    # what precision=auto means here (the server's device; clients resolve it alike)
    precision = resolve_precision(runtime.device, cfg.precision)
    anchor_t = runtime.method.make_anchor(runtime.model)
    anchor = {k: v.detach().cpu().numpy() for k, v in anchor_t.items()} if anchor_t else None
    anchor_key = anchor_id(anchor)
    digest_start = frozen_digest(runtime.model)
    partition = runtime.partition()
    # FedAvg weights, validated num-examples and size sampling: what each client trains on
    sizes = [len(runtime.client_examples(p)) for p in range(cfg.num_clients)]
    log.write_json("partition.json", {
        "num-clients": cfg.num_clients, "alpha": cfg.alpha, "seed": cfg.seed,
        "classes": partition.classes, "sizes": partition.sizes(),
        "histograms": partition.histograms,
        "mean-pairwise-js": mean_pairwise_js(partition.histograms),
    })
    sampler = np.random.default_rng([cfg.seed, 0x5A])
    checkpoint = load_checkpoint(log.path) if resume else None
    if checkpoint is not None:
        check_resumable(checkpoint_config(checkpoint, log.path), cfg, checkpoint.round)
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
        if resume:  # killed before its first checkpoint: a logged round 1 is done again
            log.reset_rounds([])
    strategy = make_strategy(cfg, runtime.method.lr, runtime.method)
    if checkpoint is not None:
        load_strategy_state(strategy, checkpoint.strategy_state, checkpoint.strategy_tensors)
    drift = DriftTracker()  # LoRA factors only; other methods log no drift
    drift.observe(global_state)
    nodes = discover_nodes(grid, cfg.num_clients, min_nodes=cfg.min_train_clients,
                           query_timeout=min(cfg.round_timeout or 60.0, 60.0))
    if nodes.own_data and cfg.client_sampling != "uniform":
        raise ConfigError(f"client-sampling={cfg.client_sampling} weighs partitions by the "
                          f"server's shard sizes, but the nodes of partitions "
                          f"{sorted(nodes.own_data)[:10]} train on their own files, whose sizes "
                          "the server does not know; use client-sampling=uniform")
    base_config = {"run-config": cfg.to_json(), "anchor-id": anchor_key,
                   "base-fingerprint": runtime.base_fingerprint,
                   # the head's labels, for nodes that train on their own files (nodedata.py)
                   "label-names": json.dumps(runtime.task.label_names)}
    if runtime.method.keeps_local_state:  # fedsa-lora's B: where clients keep it (client_store)
        base_config.update({"client-store": str((log.path / "clients").resolve()),
                            "client-store-key": run_key(log.path)})
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
                             strategy, runtime.method)
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
        t_global = time.perf_counter()
        # the clients' own held-out data (local-test-fraction): global and personalised models
        local_eval = evaluate_clients(grid, cfg, nodes, strategy, runtime.method, global_state,
                                      config, anchor, server_round) \
            if evaluate and cfg.local_test_fraction > 0 else {}
        t_eval = time.perf_counter()
        switched = runtime.method.end_round(server_round, runtime, global_state)
        switch_metrics: dict[str, float] = {}
        if switched is not None:
            global_state = switched
            strategy = make_strategy(cfg, runtime.method.lr, runtime.method)  # restarts
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
            **({"bytes-by-rank": {k: result.by_rank[k] for k in sorted(result.by_rank, key=int)}}
               if result.by_rank else {}),  # client-ranks: bytes per client rank
            "lr": config["lr"],  # the clients' rate this round (schedule.py)
            "seconds": t_end - t0,
            "seconds-train": t_train - t0,
            "seconds-client-max": max((u.seconds for u in result.updates), default=0.0),
            "seconds-clients": sum(u.seconds for u in result.updates),  # local training, summed
            "seconds-handlers": sum(u.handler_seconds for u in result.updates),
            # the slowest client's handler: a deployed round's compute when nodes run in parallel
            "seconds-handler-max": max((u.handler_seconds for u in result.updates), default=0.0),
            "seconds-aggregate": t_agg - t_train + (t_end - t_eval),
            "seconds-eval": t_eval - t_agg,
            # of which the clients' evaluation on their local splits (local-test-fraction)
            **({"seconds-eval-local": t_eval - t_global} if local_eval else {}),
            **({"metrics-after-switch": switch_metrics} if switch_metrics else {}),
            **({"local-eval": local_eval} if local_eval else {}),
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
            config={**cfg.to_dict(), PRECISION_RAN: precision},
            seconds=before + time.perf_counter() - started,
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
        "precision": precision,
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
        # local-test-fraction: the last evaluation on the clients' own splits (stats per metric)
        **({"final-local": local[-1]["local-eval"]["stats"]}
           if (local := [r for r in history if r.get("local-eval")]) else {}),
        "lr": runtime.method.lr,
        # what trains; fedsa-lora's clients also train their own B, which is not in the state
        "trainable-params": sum(p.numel() for p in runtime.model.parameters() if p.requires_grad)
        if runtime.method.keeps_local_state else num_parameters(global_state),
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
