"""The numbers and tables of a report (FeDeRA paper Tables 2 and 5), from the runs and seed
groups of ``fedpeft.report_model``.

- ``results_table``: per group, the metric at chosen rounds and the final metric, mean ± sample
  standard deviation over seeds (Table 2).
- ``sweep_table``: the final metric per method at each value of the settings a sweep varies
  (Fig. 5: alpha; Fig. 6: trainable budget).
- ``time_to_target_table``: rounds and modelled wall time to reach 90/95/99% of a target metric
  (Table 5). Modelled time of a round = the slowest sampled client's measured local training
  (``seconds-client-max``) + one client's payload over a ``bandwidth_mbit`` link, the payload
  being the round's bytes down + up (every attempt of a retried round) per successful client,
  the same per-client-round bytes as Table 2's ``MB / client-round`` (``round_bytes``); plus,
  once, the server's SVD for FeDeRA/SLoRA (``one_off_seconds``). Server aggregation and
  evaluation are not counted (they do not grow with clients' links).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .report_model import Group, Run, fmt_setting, setting_order

SVD_METHODS = {"federa", "slora"}
FRACTIONS = (0.90, 0.95, 0.99)
DRIFT_PANELS = [("A", "magnitude"), ("A", "direction"), ("B", "magnitude"), ("B", "direction")]


# --- numbers ----------------------------------------------------------------------------------

def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1; None for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), (float(array.std(ddof=1)) if len(array) > 1 else None)


def fmt_mean_std(values: Sequence[float | None], digits: int = 4) -> str:
    """``0.5000 ± 0.0100`` over the values given; ``-`` if any is missing (not evaluated)."""
    if not values or any(v is None for v in values):
        return "-"
    mean, std = mean_std([float(v) for v in values])  # type: ignore[arg-type]
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def value_at(run: Run, metric: str, round_: int) -> float | None:
    """The metric evaluated exactly at ``round_`` (None when that round was not evaluated)."""
    return dict(run.series(metric)).get(round_)


def round_bytes(record: dict[str, Any]) -> tuple[int, int]:
    """(bytes down + up, successful clients) of one logged round.

    ``bytes-down``/``bytes-up`` count every message of every attempt of the round (a retried
    round resends the global state to a new sample), while ``clients`` is the last attempt's
    sample only and ``successes`` the updates that counted; so bytes are only ever divided by
    ``successes``: what each client-round that counted cost."""
    return int(record["bytes-down"]) + int(record["bytes-up"]), int(record["successes"])


def bytes_per_client_round(run: Run) -> float:
    """Bytes down + up per successful client-round, over the logged rounds (every attempt's
    traffic included; a skipped round's traffic is charged to the run's other rounds)."""
    pairs = [round_bytes(r) for r in run.rounds]
    return sum(b for b, _ in pairs) / max(1, sum(n for _, n in pairs))


def round_seconds(record: dict[str, Any], bandwidth_mbit: float) -> tuple[float, float]:
    """Modelled (compute, communication) seconds of one round: the slowest client's measured
    local training, and one client's payload over its own link, the payload being the round's
    bytes per successful client (``round_bytes``: Table 2's per-client-round bytes, retries
    included). A skipped round (no success) spreads its bytes over the clients it sampled."""
    total, successes = round_bytes(record)
    payload = total / max(1, successes or len(record["clients"]))  # bytes per client
    return float(record["seconds-client-max"]), payload * 8 / (bandwidth_mbit * 1e6)


def one_off_seconds(run: Run) -> tuple[float, str]:
    """One-off server time the method needs beyond FedAvg (FeDeRA's initial SVD, SLoRA's SVD at
    its stage switch) and where it was read: ``seconds-svd`` from ``summary.json`` if logged;
    else an upper bound: FeDeRA's whole ``seconds-setup`` (model loading included), SLoRA's
    largest ``seconds-aggregate`` (its switch round); 0 for the other methods."""
    summary = run.summary or {}
    if summary.get("seconds-svd") is not None:
        return float(summary["seconds-svd"]), "seconds-svd"
    if run.method == "slora" and run.rounds:
        return max(float(r.get("seconds-aggregate", 0.0)) for r in run.rounds), "seconds-aggregate"
    svd = run.method in SVD_METHODS or summary.get("anchor-params", 0)
    if svd and summary.get("seconds-setup") is not None:
        return float(summary["seconds-setup"]), "seconds-setup"
    return 0.0, ""


def time_to_target(run: Run, metric: str, threshold: float,
                   bandwidth_mbit: float) -> tuple[int, float] | None:
    """First evaluated round whose metric reaches ``threshold``, and the modelled wall time to
    the end of it (one-off + per round compute + communication); None if never reached."""
    elapsed = one_off_seconds(run)[0]
    for record in run.rounds:
        elapsed += sum(round_seconds(record, bandwidth_mbit))
        value = record.get("metrics", {}).get(metric)
        if value is not None and value >= threshold:
            return int(record["round"]), elapsed
    return None


def choose_target(groups: Sequence[Group], metric: str) -> tuple[float, str] | None:
    """The best mean final metric among the groups, and the label of the group holding it;
    None while no run has evaluated the metric."""
    finals = [(fin, g.label) for g in groups
              if None not in (fin := [r.final(metric) for r in g.runs])]
    if not finals:
        return None
    best = max(finals, key=lambda f: float(np.mean(f[0])))  # type: ignore[arg-type]
    return float(np.mean(best[0])), best[1]  # type: ignore[arg-type]


def default_rounds(runs: Sequence[Run], metric: str) -> list[int]:
    """10/50/100 where every run evaluated them, else up to 3 evenly spaced common rounds."""
    common = set.intersection(*({r for r, _ in run.series(metric)} for run in runs))
    chosen = [r for r in (10, 50, 100) if r in common]
    if chosen or not common:
        return chosen
    ordered = sorted(common)
    picks = np.linspace(0, len(ordered) - 1, num=min(3, len(ordered))).round().astype(int)
    return [ordered[i] for i in dict.fromkeys(picks.tolist())]


# --- tables -----------------------------------------------------------------------------------
def results_table(groups: Sequence[Group], metric: str, rounds: Sequence[int]) -> str:
    """Table-2-style markdown: per group, metric at ``rounds`` and final, mean ± std."""
    columns = ["method", "lr", "trainable params", "MB / client-round", "seeds", "rounds",
               *(f"{metric} @{r}" for r in rounds), f"final {metric}"]
    lines = [md_row(columns), md_rule(len(columns))]
    for g in groups:
        summaries = [r.summary for r in g.runs if r.summary]
        params = f"{summaries[0]['trainable-params']:,}" if summaries else "-"
        lr = fmt_lr(g.settings["lr"])
        mb = float(np.mean([bytes_per_client_round(r) for r in g.runs])) / 1e6
        lines.append(md_row([
            g.label, lr + (f" ({g.lr_note})" if g.lr_note else ""), params, f"{mb:.2f}",
            str(len(g.runs)), str(g.done) if g.done == g.planned else f"{g.done}/{g.planned}",
            *(fmt_mean_std([value_at(r, metric, n) for r in g.runs]) for n in rounds),
            fmt_mean_std([r.final(metric) for r in g.runs])]))
    return "\n".join(lines)


def sweep_rows(groups: Sequence[Group], swept: Sequence[str]
               ) -> list[tuple[tuple[Any, ...], dict[str, Group]]]:
    """``groups`` pivoted for a sweep: one row per combination of the ``swept`` settings' values
    (numbers in numeric order), each a {method: group} dict."""
    rows: dict[tuple[Any, ...], dict[str, Group]] = {}
    for g in groups:
        rows.setdefault(tuple(g.settings.get(k) for k in swept), {})[g.method] = g
    return sorted(rows.items(), key=lambda row: [setting_order(v) for v in row[0]])


def trainable_params(group: Group) -> int | None:
    """The group's trainable parameters (``summary.json``), None while no run has finished."""
    counts = [r.summary["trainable-params"] for r in group.runs
              if r.summary and "trainable-params" in r.summary]
    return int(counts[0]) if counts else None


def sweep_table(groups: Sequence[Group], metric: str, swept: Sequence[str]) -> str:
    """Markdown pivot of ``sweep_rows``: the swept values, then each method's final metric;
    a ``trainable params`` column when the count changes from row to row."""
    rows = sweep_rows(groups, swept)
    methods = list(dict.fromkeys(g.method for g in groups))
    params = [[trainable_params(row[m]) if m in row else None for m in methods]
              for _, row in rows]
    show_params = any(len({p[i] for p in params if p[i] is not None}) > 1
                      for i in range(len(methods)))
    columns = [*swept, *(["trainable params"] if show_params else []),
               *(f"{m} final {metric}" for m in methods)]
    lines = [md_row(columns), md_rule(len(columns))]
    for (values, row), counts in zip(rows, params, strict=True):
        cells = [fmt_setting(v) for v in values]
        if show_params:
            cells.append(" / ".join("-" if c is None else f"{c:,}" for c in counts))
        for m in methods:
            g = row.get(m)
            if g is None:
                cells.append("")
                continue
            unfinished = f" (r {g.done}/{g.planned})" if g.done < g.planned else ""
            cells.append(fmt_mean_std([r.final(metric) for r in g.runs]) + unfinished)
        lines.append(md_row(cells))
    return "\n".join(lines)


def time_to_target_table(groups: Sequence[Group], metric: str, target: float,
                         bandwidth_mbit: float, fractions: Sequence[float] = FRACTIONS) -> str:
    """Table-5-style markdown: rounds and modelled time to reach each fraction of ``target``.

    Mean ± std over the seeds that reached it; ``(k/n)`` when only k of n seeds did; ``-`` when
    none did. Also shows the modelled per-round compute and communication and the one-off time.
    """
    columns = ["method", "compute s / round", "comm s / round", "one-off s"]
    for f in fractions:
        columns += [f"rounds to {f:.0%}", f"time to {f:.0%}"]
    lines = [md_row(columns), md_rule(len(columns))]
    for g in groups:
        per_round = np.array([round_seconds(rec, bandwidth_mbit) for r in g.runs
                              for rec in r.rounds])  # (rounds, 2)
        one_off = [one_off_seconds(r) for r in g.runs]
        sources = {src for _, src in one_off}
        mark = (" (setup)" if "seconds-setup" in sources
                else " (aggregate)" if "seconds-aggregate" in sources else "")
        cells = [g.label, f"{per_round[:, 0].mean():.1f}", f"{per_round[:, 1].mean():.2f}",
                 f"{np.mean([s for s, _ in one_off]):.1f}{mark}"]
        for f in fractions:
            hits = [h for r in g.runs if (h := time_to_target(r, metric, f * target,
                                                               bandwidth_mbit))]
            if not hits:
                cells += ["-", "-"]
                continue
            partial = "" if len(hits) == len(g.runs) else f" ({len(hits)}/{len(g.runs)})"
            rounds_mean, rounds_std = mean_std([h[0] for h in hits])
            seconds_mean, seconds_std = mean_std([h[1] for h in hits])
            cells += [f"{rounds_mean:g}" + ("" if rounds_std is None else f" ± {rounds_std:.1f}")
                      + partial, fmt_duration(seconds_mean, seconds_std) + partial]
        lines.append(md_row(cells))
    return "\n".join(lines)


def fmt_duration(seconds: float, std: float | None = None) -> str:
    """Seconds below 2 minutes, minutes below 2 hours, then hours (same unit for the std)."""
    unit, scale = (("s", 1.0) if seconds < 120 else ("min", 60.0) if seconds < 7200
                   else ("h", 3600.0))
    text = f"{seconds / scale:.1f}"
    return text + ("" if std is None or math.isnan(std) else f" ± {std / scale:.1f}") + f" {unit}"


def fmt_lr(lr: float | None) -> str:
    return "-" if lr is None else f"{lr:g}"


def md_rule(columns: int) -> str:
    """Markdown header rule: first column left-aligned, the numbers right-aligned."""
    return "|---|" + "---:|" * (columns - 1)


def md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def drift_records(run: Run) -> list[tuple[int, dict[str, Any]]]:
    """(round, drift record) of every round that logged one."""
    return [(int(r["round"]), r["drift"]) for r in run.rounds if r.get("drift")]


def drift_norms(record: dict[str, Any]) -> str:
    """How a drift record took its norms: ``rows`` (one per output feature, DoRA/PEFT's
    convention, ``fedpeft.drift``) or ``columns`` (one per input feature: records logged before
    that convention carry no ``norms`` field)."""
    return str(record.get("norms", "columns"))


def drift_table(groups: Sequence[Group]) -> str:
    """Per group: magnitude and direction variation of A and B (``fedpeft.drift`` records),
    averaged over layers and modules (the record's ``mean``) and rounds; mean ± std over seeds.
    ``norms``: the records' convention (``drift_norms``)."""
    columns = ["method", "between", "norms", "rounds", *(f"{f} {n}" for f, n in DRIFT_PANELS)]
    lines = [md_row(columns), md_rule(len(columns))]
    for g in groups:
        records = [[d for _, d in drift_records(r)] for r in g.runs]
        between = sorted({d.get("between", "weights") for rs in records for d in rs})
        norms = sorted({drift_norms(d) for rs in records for d in rs})
        cells = [g.label, "/".join(between), "/".join(norms),
                 str(min(len(rs) for rs in records))]
        for factor, name in DRIFT_PANELS:
            per_seed = []
            for rs in records:
                values = [v for d in rs if (v := d["mean"].get(factor, {}).get(name)) is not None]
                per_seed.append(float(np.mean(values)) if values else None)
            cells.append(fmt_mean_std(per_seed, digits=5) if per_seed else "-")
        lines.append(md_row(cells))
    return "\n".join(lines)


ROUND_PHASES = ("local training", "client handling", "transport + server", "aggregation")


def round_split(record: dict[str, Any]) -> dict[str, float] | None:
    """Seconds of one round by phase, or None for rounds logged without ``seconds-handlers``.

    local training = the sampled clients' ``train-seconds`` summed; client handling = the rest of
    their train handlers (model set-up on first use, decoding, encoding); transport + server =
    the train phase's remainder (serialisation, Flower/Ray transport, scheduling, validation);
    aggregation (with any method step, e.g. SLoRA's switch). Evaluation is kept apart. The sums
    are wall time only with one simulation worker (clients then train one after another).
    """
    if "seconds-handlers" not in record:
        return None
    clients, handlers = float(record["seconds-clients"]), float(record["seconds-handlers"])
    return {"local training": clients, "client handling": handlers - clients,
            "transport + server": float(record["seconds-train"]) - handlers,
            "aggregation": float(record["seconds-aggregate"])}


def round_time_table(groups: Sequence[Group]) -> str:
    """Per group, over rounds 2.. (round 1 includes the workers' start-up) pooled over seeds:
    mean seconds per round without evaluation, split by phase (``round_split``), the share of
    local training, and the mean seconds of one evaluation (over the rounds that evaluated),
    of which the clients' evaluation on their local splits (``seconds-eval-local``)."""
    columns = ["method", "rounds", "s / round", *ROUND_PHASES, "training share",
               "s / evaluation", "of which local"]
    lines = [md_row(columns), md_rule(len(columns))]
    for g in groups:
        records = [rec for r in g.runs for rec in r.rounds[1:] if round_split(rec) is not None]
        if not records:
            continue
        splits = [split for rec in records if (split := round_split(rec)) is not None]
        total = float(np.mean([rec["seconds"] - rec["seconds-eval"] for rec in records]))
        means = [float(np.mean([s[p] for s in splits])) for p in ROUND_PHASES]
        evals = [rec["seconds-eval"] for r in g.runs for rec in r.rounds if rec.get("metrics")]
        local = [rec["seconds-eval-local"] for r in g.runs for rec in r.rounds
                 if "seconds-eval-local" in rec]
        # handlers that outlast the train phase ran at once on several simulation workers:
        # their sums are not wall time, and the remainder of the phase is not derivable
        overlapped = any(s["transport + server"] < 0 for s in splits)
        cells = [f"{m:.2f}" for m in means]
        if overlapped:
            cells = [f"{means[0]:.2f} (sum)", f"{means[1]:.2f} (sum)", "-", cells[3]]
        lines.append(md_row([g.label, str(len(records)), f"{total:.1f}", *cells,
                           "-" if overlapped else f"{means[0] / total:.0%}",
                           f"{np.mean(evals):.1f}" if evals else "-",
                           f"{np.mean(local):.1f}" if local else "-"]))
    return "\n".join(lines)
