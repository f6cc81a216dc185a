"""Which method should I use? The decision table of ``fedpeft paper``, from our runs only.

Per task, heterogeneity (alpha) and budget class (bytes per client-round), each experiment's
best finished method, its margin over the runner-up and whether the seed spread covers it
(``fedpeft.paper``'s *level*); then one short answer per cell: its broadest comparison in which
something was learned. A comparison whose best method is still within ``NOTHING_LEARNED`` points
of the majority-class bar recommends nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .paper import (
    BUDGET_KNOBS,
    NAMES,
    Score,
    compare_pair,
    protocol_label,
    protocols,
    score,
)
from .report_model import Group, fmt_setting
from .report_tables import bytes_per_client_round

BUDGETS = ((1e6, "<= 1 MB"), (10e6, "1-10 MB"), (float("inf"), "> 10 MB"))
NOTHING_LEARNED = 1.0  # points above the majority-class bar below which a comparison
# recommends nothing (every method still predicts, or nearly predicts, the commonest class)


def budget_class(group: Group) -> str:
    size = float(np.mean([bytes_per_client_round(r) for r in group.runs]))
    return next(label for bound, label in BUDGETS if size <= bound)


def majority_bar(group: Group, metric: str) -> float | None:
    """The majority-class bar (in %) its runs' summaries logged for ``metric`` (classification
    only; None where none did)."""
    for run in group.runs:
        value = ((run.summary or {}).get("baseline") or {}).get(metric)
        if value is not None:
            return 100.0 * float(value)
    return None


def decision_rows(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """Per experiment and budget class with at least two finished methods: the best method,
    the runner-up, the margin and whether the seed spread covers it (an exact tie is level
    too); ``learned`` is False where even the best is within ``NOTHING_LEARNED`` points of the
    majority-class bar, so no method is recommended from it."""
    rows = []
    for members in protocols(groups, BUDGET_KNOBS).values():
        first = members[0]
        metric = first.runs[0].metric()
        by_budget: dict[str, dict[str, tuple[Score, Group]]] = {}
        for g in members:  # each method's best configuration within the budget class
            s = score(g, metric)
            if s is not None and g.done == g.planned:
                cell = by_budget.setdefault(budget_class(g), {})
                if g.method not in cell or s.mean > cell[g.method][0].mean:
                    cell[g.method] = (s, g)
        for budget, cell in by_budget.items():
            if len(cell) < 2:
                continue
            entries = sorted(cell.values(), key=lambda e: -e[0].mean)
            (best, bg), (second, sg) = entries[0], entries[1]
            margin, spread = compare_pair(best, second)
            bar = majority_bar(bg, metric)
            rows.append({"task": first.runs[0].task, "alpha": first.settings.get("alpha"),
                         "protocol": protocol_label(first, budget=False), "budget": budget,
                         "metric": metric, "best": bg.method, "best-score": best,
                         "best-knobs": knobs(bg),
                         "runner-up": sg.method, "margin": margin, "spread": spread,
                         "level": round(margin, 2) == 0 or (spread is not None
                                                           and margin <= spread),
                         "methods": len(cell), "seeds": min(e[0].seeds for e in entries),
                         "rounds": int(first.settings.get("rounds") or 0), "bar": bar,
                         "learned": bar is None or best.mean - bar >= NOTHING_LEARNED})
    return rows


def short_answers(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, alpha, budget class): of the experiments in which something was
    learned, the broadest (most methods compared, then most seeds, then most rounds); a cell
    where nothing was learned keeps its broadest experiment, marked so."""
    cells: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        key = (r["task"], r["alpha"], r["budget"])
        rank = (r["learned"], r["methods"], r["seeds"], r["rounds"])
        if key not in cells or rank > cells[key]["_rank"]:
            cells[key] = {**r, "_rank": rank}
    return list(cells.values())


def knobs(group: Group) -> str:
    """The budget knobs a group sets away from their defaults (e.g. ``lora-rank=8``)."""
    defaults = {"lora-rank": 32, "lora-alpha": 32.0, "adapter-reduction": 16}
    return " ".join(f"{k}={fmt_setting(group.settings[k])}" for k in sorted(BUDGET_KNOBS)
                    if k in group.settings and group.settings[k] != defaults[k]
                    and not (k == "adapter-reduction" and group.method != "fedap")
                    and not (k.startswith("lora") and group.method in ("fedft", "fedbf",
                                                                       "fedap")))


def row_verdict(r: dict[str, Any]) -> str:
    if not r["learned"]:
        return f"nothing learned: the best is at the majority class ({r['bar']:.2f})"
    if r["level"]:
        return "no difference"
    return "best (1 seed, not established)" if r["spread"] is None else "best"


def decision_table(groups: Sequence[Group]) -> list[str]:
    rows = decision_rows(groups)
    if not rows:
        return ["No experiment has two finished methods in one budget class yet."]

    def order(r: dict[str, Any]) -> tuple:
        return (r["task"], float(r["alpha"] or 0), r["budget"], not r["learned"],
                -r["methods"], r["protocol"])

    def best(r: dict[str, Any]) -> str:
        return (f"{NAMES.get(r['best'], r['best'])}"
                f"{' ' + r['best-knobs'] if r['best-knobs'] else ''}")

    def margin(r: dict[str, Any]) -> str:
        spread = "1 seed: no spread" if r["spread"] is None else f"spread {r['spread']:.2f}"
        return (f"+{r['margin']:.2f} over {NAMES.get(r['runner-up'], r['runner-up'])} "
                f"({spread})")

    lines = ["The short answer, one row per task, alpha and budget: the broadest finished "
             "comparison there in which something was learned (most methods, then seeds, then "
             "rounds); every experiment follows below.", "",
             "| task | alpha | budget / client-round | best | its metric % | margin over "
             "runner-up (points) | verdict | from (methods compared, seeds, protocol) |",
             "|---|---:|---|---|---:|---|---|---|"]
    for r in sorted(short_answers(rows), key=order):
        lines.append(f"| {r['task']} | {fmt_setting(r['alpha'])} | {r['budget']} | {best(r)} | "
                     f"{r['best-score']} {r['metric']} | {margin(r)} | {row_verdict(r)} | "
                     f"{r['methods']} methods, {r['seeds']} seed{'s' * (r['seeds'] > 1)}, "
                     f"{r['protocol']} |")
    lines += ["", "Every experiment:", "",
              "| task | alpha | budget / client-round | protocol | methods | best | its metric % "
              "| margin over runner-up (points) | verdict |",
              "|---|---:|---|---|---:|---|---:|---|---|"]
    for r in sorted(rows, key=order):
        lines.append(f"| {r['task']} | {fmt_setting(r['alpha'])} | {r['budget']} | "
                     f"{r['protocol']} | {r['methods']} | {best(r)} | "
                     f"{r['best-score']} {r['metric']} | {margin(r)} | {row_verdict(r)} |")
    return lines
