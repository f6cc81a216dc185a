"""The report's tables for what runs add beyond the papers' protocols, from the runs and seed
groups of ``fedpeft.report_model`` (the papers' own tables: ``fedpeft.report_tables``):

- ``local_table``: personalised evaluation, the clients' scores on their local test splits.
- ``rank_bytes_table``: heterogeneous client ranks, the traffic of each rank.
- ``privacy_table``: differential privacy, the (epsilon, delta) spent beside the metric.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .report_model import Group, Run
from .report_tables import fmt_mean_std, md_row, md_rule


# --- personalised evaluation (local-test-fraction; federation/local_eval.py) -------------------
LOCAL_MODELS = (("global", "global model"), ("personal", "personalised (own B)"))


def last_local_eval(run: Run) -> dict[str, Any] | None:
    """The last ``local-eval`` record of a run (the clients' scores on their local splits)."""
    evals = [r["local-eval"] for r in run.rounds if r.get("local-eval")]
    return evals[-1] if evals else None


def local_table(groups: Sequence[Group], metric: str) -> str:
    """Per group and model (global; personalised where the method has one): the last
    evaluation on the clients' local test splits: mean over clients, std over clients, mean of
    the worst 10% of clients, minimum (each mean ± std over seeds), beside the global test
    metric."""
    columns = ["method", "model", "clients", f"mean {metric}", "std over clients",
               "worst 10%", "min", f"global test {metric}"]
    lines = [md_row(columns), md_rule(len(columns))]
    for g in groups:
        evals = [last_local_eval(r) for r in g.runs]
        if any(e is None for e in evals):
            continue
        for prefix, label in LOCAL_MODELS:
            key = f"{prefix}-{metric}"
            stats = [e["stats"].get(key) for e in evals]  # type: ignore[index]
            if any(s is None for s in stats):
                continue
            clients = sorted({int(s["clients"]) for s in stats})
            lines.append(md_row([g.label, label, "/".join(map(str, clients)),
                               *(fmt_mean_std([s[k] for s in stats])
                                 for k in ("mean", "std", "worst-10%", "min")),
                               fmt_mean_std([r.final(metric) for r in g.runs])]))
    return "\n".join(lines)


# --- heterogeneous client ranks (client-ranks; rounds.jsonl's bytes-by-rank) -----------------
def rank_bytes(runs: Sequence[Run]) -> dict[int, tuple[int, int, int]]:
    """Per client rank, over every logged round of the runs: (client-rounds, bytes down, bytes
    up), summed from each round's ``bytes-by-rank``; empty without heterogeneous ranks."""
    totals: dict[int, list[int]] = {}
    for run in runs:
        for record in run.rounds:
            for rank, entry in (record.get("bytes-by-rank") or {}).items():
                t = totals.setdefault(int(rank), [0, 0, 0])
                t[0] += int(entry["clients"])
                t[1] += int(entry["bytes-down"])
                t[2] += int(entry["bytes-up"])
    return {rank: (t[0], t[1], t[2]) for rank, t in sorted(totals.items())}


def rank_bytes_table(groups: Sequence[Group]) -> str:
    """Per group and client rank: client-rounds and MB down / up per client-round (summed over
    the group's runs, every logged round), for the runs that log ``bytes-by-rank``."""
    columns = ["method", "client rank", "client-rounds", "MB down / client-round",
               "MB up / client-round"]
    lines = [md_row(columns), md_rule(len(columns))]
    for g in groups:
        for rank, (clients, down, up) in rank_bytes(g.runs).items():
            if clients:
                lines.append(md_row([g.label, str(rank), str(clients),
                                     f"{down / clients / 1e6:.3f}", f"{up / clients / 1e6:.3f}"]))
    return "\n".join(lines)


# --- differential privacy (dp=...; federation/strategies/dp.py) --------------------------------
def privacy_spent(run: Run) -> dict[str, Any] | None:
    """What a DP run spent: the summary's ``privacy`` once finished, else the last round's."""
    if run.summary and run.summary.get("privacy"):
        return dict(run.summary["privacy"])
    logged = [r["privacy"] for r in run.rounds if r.get("privacy")]
    return dict(logged[-1]) if logged else None


def privacy_table(groups: Sequence[Group], metric: str) -> str:
    """Per DP run: the mechanism's settings, the privacy spent (epsilon at delta, over the
    releases so far) or why none is reported, beside the final metric."""
    columns = ["method", "seed", "dp", "noise multiplier", "clipping norm", "clients / round",
               "rounds", "epsilon", "delta", "releases", f"final {metric}"]
    lines = [md_row(columns), md_rule(len(columns))]
    for g in groups:
        for run in g.runs:
            if run.config.get("dp", "none") == "none":
                continue
            spent = privacy_spent(run) or {}
            epsilon = (f"{spent['epsilon']:.2f}" if "epsilon" in spent
                       else f"none: {spent.get('note', 'not logged')}")
            final = run.final(metric)
            lines.append(md_row([
                g.label, str(run.config.get("seed", 0)), str(run.config["dp"]),
                f"{run.config.get('dp-noise-multiplier')}", f"{run.config.get('dp-clipping-norm')}",
                str(run.config.get("clients-per-round", "")), str(len(run.rounds)), epsilon,
                f"{spent['delta']:.3g}" if "delta" in spent else "-",
                str(spent.get("releases", "-")), "-" if final is None else f"{final:.4f}"]))
    return "\n".join(lines)
