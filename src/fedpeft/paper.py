"""The FeDeRA paper's numbers beside ours, its claims checked, and which method to use
(``fedpeft paper``).

The paper's Tables 1-5 and 8 ship with the package as data (``data/paper_tables.json``, with
its source). ``paper_page`` reads run folders (the committed logs), groups seeds and chooses
learning rates on validation as ``fedpeft report`` does, and writes one page:

- per dataset and protocol: our metric (in %) at our rounds beside the paper's at its
  checkpoints (the paper runs 2-10x more rounds than a CPU allows, so the round columns are
  named, never matched silently);
- per claim of the paper that our runs can speak to: FeDeRA vs each other method (Tables 2-4's
  ordering), "agrees", "disagrees" or "level";
- "Which method should I use?": per task, heterogeneity (alpha) and budget (bytes per
  client-round), the best method and its margin over the runner-up: first one short answer per
  cell (its broadest comparison), then every experiment (``fedpeft.decision``).

**Level.** A difference no larger than the seed spread (the larger of the two groups' sample
std over seeds) is *level*. With a single seed there is no spread to judge by: the difference is
reported with its sign and marked "1 seed", never called established. An exact tie (to the
printed 0.01 point) is level whatever the seeds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from .report_model import Group, Run, find_runs, fmt_setting, group_runs, label_groups
from .report_tables import (
    choose_target,
    mean_std,
    time_to_target_table,
)

NAMES = {"fedft": "FedFT", "fedbf": "FedBF", "fedap": "FedAP", "fedlr": "FedLR",
         "federa": "FeDeRA", "slora": "SLoRA", "ffa-lora": "FFA-LoRA", "fedsa-lora": "FedSA-LoRA",
         "flora": "FLoRA", "flexlora": "FlexLoRA", "fedex-lora": "FedEx-LoRA",
         "hetlora": "HetLoRA", "rolora": "RoLoRA"}
# Settings that make two runs different experiments rather than two methods of one comparison
# (everything in a group's settings except these, which differ between methods by design).
PER_METHOD = {"method", "lr", "adapter-reduction", "adapter-modules", "slora-stage1-rounds",
              "slora-density", "slora-stage1-lr", "out"}
BUDGET_KNOBS = frozenset({"lora-rank", "lora-alpha", "adapter-reduction"})  # one axis of the
# decision table: runs differing only in these are one experiment at several budgets
SHOWN = {"precision": "auto", "transport-dtype": "fp32", "local-epochs": 1, "batch-size": 16,
         "server-lr": None, "server-momentum": None, "proximal-mu": None, "dp": "none",
         "dp-noise-multiplier": None, "dp-clipping-norm": None}
LINK_MBIT = 25.0  # the paper's clients' WiFi: 20-30 Mbit/s


def paper_tables() -> dict[str, Any]:
    """The transcribed tables (``data/paper_tables.json``)."""
    text = resources.files("fedpeft").joinpath("data/paper_tables.json").read_text("utf-8")
    return json.loads(text)


@dataclass
class Score:
    """A group's final metric over its seeds, in percent."""

    mean: float
    std: float | None  # None with one seed
    seeds: int
    rounds: int

    def __str__(self) -> str:
        return f"{self.mean:.2f}" + ("" if self.std is None else f" ± {self.std:.2f}")


def score(group: Group, metric: str) -> Score | None:
    finals = [r.final(metric) for r in group.runs]
    if not finals or any(v is None for v in finals):
        return None
    mean, std = mean_std([100.0 * float(v) for v in finals])  # type: ignore[arg-type]
    return Score(mean, std, len(finals), group.done)


def verdict(ours: float, spread: float | None, paper: float | None) -> str:
    """Our difference (a - b) against the paper's: agrees / disagrees / level (see module)."""
    if spread is None:
        sign = "ahead" if ours > 0 else "behind" if ours < 0 else "equal"
        agree = "" if paper is None else \
            (", same sign as the paper" if ours * paper > 0 else ", opposite sign to the paper")
        return f"{sign} (1 seed, not established{agree})"
    if abs(ours) <= spread:
        return "level"
    if paper is None:
        return "ahead" if ours > 0 else "behind"
    return "agrees" if ours * paper > 0 else "disagrees"


def compare_pair(a: Score, b: Score) -> tuple[float, float | None]:
    """(a - b, the seed spread: the larger std of the two; None if either has one seed)."""
    spread = None if a.std is None or b.std is None else max(a.std, b.std)
    return a.mean - b.mean, spread


def protocols(groups: Sequence[Group], ignore: frozenset[str] = frozenset()
              ) -> dict[tuple, list[Group]]:
    """Groups by experiment: equal in every setting except the per-method ones (and
    ``ignore``)."""
    out: dict[tuple, list[Group]] = {}
    skip = PER_METHOD | ignore
    for g in groups:
        key = tuple(sorted((k, repr(v)) for k, v in g.settings.items() if k not in skip))
        out.setdefault(key, []).append(g)
    return out


def protocol_label(group: Group, budget: bool = True, alpha: bool = True) -> str:
    """The experiment in words (``budget=False``: without the budget knobs, e.g. the rank;
    ``alpha=False``: without the Dirichlet concentration)."""
    s = group.settings
    return (f"{s.get('num-clients')} clients, {s.get('clients-per-round')} per round, "
            f"{s.get('partition', 'balanced')}"
            + (f" Dir({fmt_setting(s.get('alpha'))}), " if alpha else ", ")
            + 
            f"{s.get('rounds')} rounds" + (f", max-length {s['max-length']}"
                                          if s.get("max-length") else "")
            + (f", strategy {s['strategy']}" if s.get("strategy", "fedavg") != "fedavg" else "")
            + (f", aggregation {s['aggregation']}"
               if s.get("aggregation", "fedavg") != "fedavg" else "")
            + (f", lora-rank {s['lora-rank']}" if budget and s.get("lora-rank", 32) != 32
               else "")
            + "".join(f", {k} {fmt_setting(s[k])}" for k, default in SHOWN.items()
                      if s.get(k, default) != default)
            + (f", valid-fraction {fmt_setting(s['valid-fraction'])}"
               if s.get("valid-fraction") else ""))


def paper_rows(paper: dict[str, Any], task: str, metric: str) -> dict[str, Any] | None:
    """The paper's table for ``task`` (QA: ``metric`` picks EM or F1)."""
    results = paper["results"]
    key = f"{task}:{metric}" if f"{task}:{metric}" in results else task
    table = results.get(key)
    return table if table and table["metric"] == metric else None


def dataset_section(task: str, groups: list[Group], paper: dict[str, Any]) -> list[str]:
    metric = groups[0].runs[0].metric()
    table = paper_rows(paper, task, metric)
    protocol = paper["protocol"].get(task)
    lines = [f"### {task}: {protocol_label(groups[0])}", ""]
    if protocol:
        lines.append(f"The paper's protocol: {protocol['clients']} clients, "
                     f"{protocol['clients_per_round']} per round, Dir({protocol['alpha']:g}).")
    if table is None:
        lines += ["The paper has no table for this task and metric.", ""]
    columns = ["method", "lr", "seeds", f"ours: {metric} % (final)", "our rounds"]
    models = list(table["rows"]) if table else []
    for model in models:
        columns += [f"paper {model} @{r}" for r in table["rounds"]]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    scores: dict[str, Score] = {}
    for g in groups:
        s = score(g, metric)
        if s is not None:
            scores.setdefault(g.method, s)
        cells = [NAMES.get(g.method, g.method),
                 f"{g.settings['lr']:g}" + (f" ({g.lr_note})" if g.lr_note else ""),
                 str(len(g.runs)),
                 str(s) if s else "-", f"{g.done}/{g.planned}"]
        for model in models:
            values = table["rows"][model].get(g.method)
            cells += [fmt_paper(v) for v in values] if values else ["-"] * len(table["rounds"])
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += ordering_claims(scores, table)
    lines += time_section(task, groups, metric, paper)
    return lines


def time_section(task: str, groups: list[Group], metric: str, paper: dict[str, Any]
                 ) -> list[str]:
    """Table 5's question on our runs: rounds and modelled time to 90/95/99% of the best final
    metric here, with measured compute and the paper's link (``LINK_MBIT``); the paper's hours
    beside, where Table 5 has the task."""
    groups = [replace(g) for g in groups]  # named by what differs within this experiment
    label_groups(groups)
    target = choose_target(groups, metric)
    if target is None:
        return []
    lines = [f"Time to target (Table 5's question): target = {100 * target[0]:.2f} % "
             f"({target[1]}'s final {metric}); modelled with each round's measured slowest "
             f"client and its payload over a {LINK_MBIT:g} Mbit/s link (the paper's 20-30).", "",
             time_to_target_table(groups, metric, target[0], LINK_MBIT), ""]
    hours = paper["time_to_target"].get(task)
    if hours:
        lines.append("The paper's hours to 90 / 95 / 99 % (Jetson AGX Orin clients): " + "; ".join(
            f"{model} " + ", ".join(f"{NAMES.get(m, m)} {fmt_hours(v)}" for m, v in row.items())
            for model, row in hours.items()))
        lines.append("")
    return lines


def fmt_hours(values: list[Any]) -> str:
    def one(v: Any) -> str:
        if v is None:
            return "-"
        return "/".join(f"{x:g}" for x in v) if isinstance(v, list) else f"{v:g}"
    return " / ".join(one(v) for v in values) + " h"


def fmt_paper(value: list[float | None] | None) -> str:
    if value is None:
        return "-"
    mean, std = value
    return f"{mean:.2f}" + ("" if std is None else f" ± {std:.2f}")


def ordering_claims(scores: dict[str, Score], table: dict[str, Any] | None) -> list[str]:
    """Tables 2-4's claim, FeDeRA ahead of the others, checked on our runs."""
    if "federa" not in scores or len(scores) < 2:
        return []
    first_model = next(iter(table["rows"])) if table else None
    lines = ["FeDeRA vs each method (ours: final difference in points; the paper: "
             f"{first_model} at its first checkpoint):" if table else
             "FeDeRA vs each method (final difference in points):"]
    for method, other in scores.items():
        if method == "federa":
            continue
        diff, spread = compare_pair(scores["federa"], other)
        paper_diff = None
        if table:
            row = table["rows"][first_model]
            if row.get("federa") and row.get(method) and row["federa"][0] and row[method][0]:
                paper_diff = row["federa"][0][0] - row[method][0][0]
        spread_text = "" if spread is None else f", spread {spread:.2f}"
        paper_text = "" if paper_diff is None else f"; paper {paper_diff:+.2f}"
        lines.append(f"- FeDeRA vs {NAMES.get(method, method)}: ours {diff:+.2f}{spread_text}"
                     f"{paper_text} -> {verdict(diff, spread, paper_diff)}")
    return lines + [""]


def paper_page(paths: Sequence[str | Path], command: str = "") -> str:
    """The whole page for the run folders under ``paths``."""
    paper = paper_tables()
    runs: list[Run] = [r for r in find_runs(paths) if r.rounds]
    groups = group_runs(runs)
    lines = ["# Our runs beside the FeDeRA paper's numbers", "",
             f"Generated by `{command or 'fedpeft paper ...'}` from the run logs; regenerate it "
             "the same way. The paper's numbers: " + paper["source"] + ". "
             + " ".join(paper["notes"]), "",
             "Ours: the bundled all-MiniLM-L6-v2 (22.7M parameters) on a CPU, far fewer rounds "
             "than the paper's checkpoints (each section names both). A difference no larger "
             "than the seed spread is called level; with one seed a difference is reported but "
             "not established.", "", "## Per dataset", ""]
    by_protocol = protocols(groups)
    for members in sorted(by_protocol.values(),
                          key=lambda m: (m[0].runs[0].task, protocol_label(m[0]))):
        if len(members) < 2 and members[0].method != "federa":
            continue
        lines += dataset_section(members[0].runs[0].task, members, paper)
    # both build on this module's scores, verdicts and protocols
    from .claims import budget_claim, drift_claim, robustness_claim, time_claim
    from .decision import decision_table

    lines += ["## The paper's other claims, on our runs", "", *robustness_claim(groups), "",
              *budget_claim(groups), "", *time_claim(groups), "", *drift_claim(groups), ""]

    lines += ["## Which method should I use?", "",
              "From our runs only: per task, heterogeneity and budget (bytes per client-round), "
              "the best method and its margin over the runner-up.", "", *decision_table(groups),
              "", "## The paper's claims in words", ""]
    lines += [f"- {c['table']}: {c['text']}" for c in paper["claims"]]
    return "\n".join(lines) + "\n"
