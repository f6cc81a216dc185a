"""Run folders -> numbers a researcher compares: loading, seed groups and the paper's tables.

    fedpeft report runs/compare/semeval-a1.0 [--out DIR] [--target 0.8] [--rounds 10,50,100]

Everything comes from the run folders (``config.toml``, ``rounds.jsonl``, ``summary.json``,
``partition.json``; see ``fedpeft.runlog``), never from hand-typed numbers. A folder given on
the command line is either a run or a tree of runs. Runs whose configurations differ only in
``seed`` (and in settings that do not change results: ``out``, ``device``, ...) form a group,
reported as mean ± sample standard deviation over its seeds. Groups that differ only in ``lr``
and carry a final validation metric keep the rate with the best mean validation metric (the
paper picks each method's best rate; the test set never takes part in the choice).

``build_report`` writes ``REPORT.md``: the tables of ``fedpeft.report_tables`` (FeDeRA Table 2:
metric at chosen rounds and final; Table 5: rounds and modelled wall time to 90/95/99% of a
target; drift), the figures of ``fedpeft.report_plots`` (metric vs round and vs bytes, client
partitions, drift) and the list of runs read. Definitions: ``docs/reports.md``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import RunConfig

# Settings that do not change a run's results: runs differing only in these (and seed) are seeds
# of one group.
NOT_RESULTS = {"seed", "out", "device", "threads", "sim-workers", "progress", "data-dir"}
LABEL_HIDDEN = {"method", "lr", "task", "valid-fraction"}  # shown elsewhere, not in labels
SWEEP_FIGURES = {"alpha": "Fig. 5", "lora-rank": "Fig. 6", "adapter-reduction": "Fig. 6"}
PAPER_ORDER = ["fedft", "fedbf", "fedap", "fedlr", "federa", "slora"]  # FeDeRA Table 2's rows
# Settings a run's config.toml leaves out (unset, or added to RunConfig after the run was made).
DEFAULTS = {f.name.replace("_", "-"): f.default_factory() if f.default is dataclasses.MISSING
            and f.default_factory is not dataclasses.MISSING else f.default
            for f in dataclasses.fields(RunConfig)}


@dataclass
class Run:
    """One run folder, read as is (an unfinished run has no ``summary``)."""

    path: Path
    config: dict[str, Any]  # config.toml, unset keys filled with RunConfig defaults
    rounds: list[dict[str, Any]]  # rounds.jsonl, in order
    summary: dict[str, Any] | None = None
    partition: dict[str, Any] | None = None

    @property
    def method(self) -> str:
        return str(self.config.get("method", "?"))

    @property
    def task(self) -> str:
        return str(self.config.get("task", "?"))

    @property
    def lr(self) -> float | None:
        lr = self.summary.get("lr") if self.summary else self.config.get("lr")
        if lr is None and not self.summary:  # unfinished, method default: the one it uses
            from .methods import METHODS
            from .tasks import TASKS

            method, task = METHODS.get(self.method), TASKS.get(self.task)
            if method is not None and task is not None:
                lr = method(RunConfig(method=self.method), task.peft_task_type).lr
        return None if lr is None else float(lr)

    def metric(self) -> str:
        """The task's headline metric: ``summary.json``'s, else read off the evaluations."""
        if self.summary and self.summary.get("metric"):
            return str(self.summary["metric"])
        names = [k for r in self.rounds for k in r.get("metrics", {}) if not k.startswith("valid-")]
        return "accuracy" if "accuracy" in names or not names else names[0]

    def series(self, metric: str) -> list[tuple[int, float]]:
        """(round, value) of every evaluated round that logged ``metric``."""
        return [(int(r["round"]), float(r["metrics"][metric])) for r in self.rounds
                if r.get("metrics", {}).get(metric) is not None]

    def final(self, metric: str) -> float | None:
        values = self.series(metric)
        return values[-1][1] if values else None


@dataclass
class Group:
    """Runs of one configuration over seeds; ``label`` names it in tables and plots."""

    key: tuple[tuple[str, Any], ...]
    runs: list[Run]
    label: str = ""
    lr_note: str = ""  # "chosen on valid from 3" after a learning-rate choice
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.runs[0].method


def find_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Every run folder at or below ``paths`` (a run folder holds ``config.toml``)."""
    runs, seen = [], set()
    for path in map(Path, paths):
        if not path.exists():
            raise ValueError(f"{path}: no such folder")
        folders = [path] if (path / "config.toml").exists() else sorted(
            p.parent for p in path.rglob("config.toml"))
        for folder in folders:
            if folder.resolve() not in seen:
                seen.add(folder.resolve())
                runs.append(load_run(folder))
    return runs


def load_run(path: Path) -> Run:
    config = {**DEFAULTS, **tomllib.loads((path / "config.toml").read_text(encoding="utf-8"))}
    rounds = []
    file = path / "rounds.jsonl"
    if file.exists():
        for line in file.read_text(encoding="utf-8").splitlines():
            try:
                rounds.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a run killed mid-write leaves at most one broken last line
    return Run(path, config, rounds, _json(path / "summary.json"), _json(path / "partition.json"))


def _json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Seed groups, learning rates chosen on validation where possible, labelled and ordered."""
    groups: dict[tuple[tuple[str, Any], ...], Group] = {}
    for run in runs:
        settings = {k: v for k, v in run.config.items() if k not in NOT_RESULTS}
        settings["lr"] = run.lr  # the rate actually used (the method default when unset)
        key = tuple(sorted((k, _hashable(v)) for k, v in settings.items()))
        groups.setdefault(key, Group(key, [], settings=settings)).runs.append(run)
    kept = _choose_learning_rates(list(groups.values()))
    varying = varying_settings(kept)
    for g in kept:
        g.label = " ".join([g.method, *(f"{k}={_fmt_setting(g.settings[k])}" for k in varying)])
    labels = [g.label for g in kept]
    for g in kept:  # same label = rates kept side by side: say which is which
        if labels.count(g.label) > 1:
            g.label += f" lr={_fmt_setting(g.settings['lr'])}"
    from .report_tables import setting_order

    order = list(dict.fromkeys([*PAPER_ORDER, *(r.method for r in runs)]))
    return sorted(kept, key=lambda g: (order.index(g.method),
                                       [setting_order(g.settings.get(k)) for k in varying],
                                       g.label))


def varying_settings(groups: Sequence[Group]) -> list[str]:
    """The settings (other than method, lr, task, valid-fraction) whose value differs between
    ``groups``: what a comparison or sweep varies."""
    return sorted({k for g in groups for k in g.settings if k not in LABEL_HIDDEN
                   and len({_hashable(h.settings.get(k)) for h in groups}) > 1})


def _choose_learning_rates(groups: list[Group]) -> list[Group]:
    """Among groups that differ only in ``lr``, keep the best final ``valid-<metric>`` (mean
    over seeds) once every run has finished with one; until then keep them all."""
    families: dict[tuple, list[Group]] = {}
    for g in groups:
        families.setdefault(tuple(kv for kv in g.key if kv[0] != "lr"), []).append(g)
    kept = []
    for family in families.values():
        metric = family[0].runs[0].metric()
        scores = [[r.final(f"valid-{metric}") for r in g.runs] for g in family]
        unfinished = any(r.summary is None for g in family for r in g.runs)
        if len(family) == 1 or unfinished or any(s is None for ss in scores for s in ss):
            kept.extend(family)
            continue
        best = max(range(len(family)), key=lambda i: float(np.mean(scores[i])))
        family[best].lr_note = f"chosen on valid-{metric} from {len(family)}"
        kept.append(family[best])
    return kept


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _fmt_setting(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def parse_rounds(text: str | None) -> list[int] | None:
    """``"10,50,100"`` -> ``[10, 50, 100]``; None or empty -> None (the default choice)."""
    if not text or not text.strip():
        return None
    try:
        return [int(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise ValueError(f"--rounds must be comma-separated round numbers, got {text!r}") from None


def report_command(args: Any) -> str:
    """The ``fedpeft report`` command line that ``args`` (argparse) stands for."""
    parts = ["fedpeft report", *map(str, args.run_dirs)]
    for name in ("out", "target", "bandwidth_mbit", "rounds", "metric", "up_to"):
        value = getattr(args, name, None)
        if value is not None and not (name == "bandwidth_mbit" and value == 25.0):
            parts.append(f"--{name.replace('_', '-')} {value:g}" if isinstance(value, float)
                         else f"--{name.replace('_', '-')} {value}")
    return " ".join(parts)


# --- the report -------------------------------------------------------------------------------
def build_report(paths: Sequence[str | Path], out: str | Path | None = None,
                 target: float | None = None, bandwidth_mbit: float = 25.0,
                 rounds: Sequence[int] | None = None, metric: str | None = None,
                 command: str = "", up_to: int | None = None) -> Path:
    """Read every run under ``paths``, write ``REPORT.md`` and its PNGs into ``out`` (default:
    ``report/`` beside the runs) and return the report's path.

    ``up_to``: read only rounds 1..up_to of every run, as if each had been planned for at most
    that many rounds (compares runs of different lengths at an equal budget; the summaries'
    totals are then not used for the tables)."""
    runs = find_runs(paths)
    if up_to is not None:
        runs = [truncate(r, up_to) for r in runs]
    usable = [r for r in runs if r.rounds]
    if not usable:
        raise ValueError(f"no run with logged rounds under {', '.join(map(str, paths))}")
    folder = Path(out) if out else Path(os.path.commonpath([Path(p).resolve() for p in paths]),
                                        "report")
    folder.mkdir(parents=True, exist_ok=True)
    plots = _has_matplotlib()
    lines = ["# fedpeft report", "",
             f"Generated by `{command or 'fedpeft report'}` from {len(runs)} run folder(s); "
             "every number is read from their logs (`rounds.jsonl`, `summary.json`, "
             "`partition.json`, `config.toml`). Definitions: `docs/reports.md`.", ""]
    if not plots:
        lines += ["(matplotlib is not installed: no figures; `pip install 'fedpeft[plots]'`)", ""]
    tasks = list(dict.fromkeys(r.task for r in usable))
    for task in tasks:
        task_runs = [r for r in usable if r.task == task]
        prefix = f"{task}-" if len(tasks) > 1 else ""
        lines += _task_section(task, task_runs, folder, prefix, plots, target, bandwidth_mbit,
                               rounds, metric)
    lines += _heterogeneity_section(usable, folder, plots)
    lines += _runs_section(runs)
    report = folder / "REPORT.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report


def truncate(run: Run, up_to: int) -> Run:
    """``run`` as it stood after round ``up_to`` (``rounds`` setting capped at ``up_to``)."""
    if up_to < 1:
        raise ValueError(f"--up-to must be a round number >= 1, got {up_to}")
    config = {**run.config, "rounds": min(int(run.config.get("rounds", up_to)), up_to)}
    rounds = [r for r in run.rounds if int(r["round"]) <= up_to]
    return dataclasses.replace(run, config=config, rounds=rounds)


def _task_section(task: str, runs: list[Run], folder: Path, prefix: str, plots: bool,
                  target: float | None, bandwidth_mbit: float, rounds: Sequence[int] | None,
                  metric: str | None) -> list[str]:
    from . import report_tables as tables

    metric = metric or runs[0].metric()
    groups = group_runs(runs)
    at = list(rounds) if rounds else tables.default_rounds(runs, metric)
    lines = [f"## {task}: {metric} per method (FeDeRA Table 2)", "",
             f"Test {metric}, mean ± sample std over seeds (`seeds` runs per row); `@r`: the "
             "global model evaluated after round r (`-`: not evaluated then); `final`: the last "
             "evaluation. `lr`: the rate used (chosen on the validation split when a grid was "
             "run). `rounds`: rounds logged (`done/planned` while a run is unfinished).", "",
             tables.results_table(groups, metric, at), ""]
    if plots:
        from .report_plots import plot_metric

        for x, name in (("round", "round"), ("bytes", "bytes")):
            file = f"{prefix}{metric}-vs-{name}.png"
            plot_metric(groups, metric, folder / file, x=x, title=f"{task}: {metric} vs {name}")
            lines += [f"![{metric} vs {name}]({file})", ""]
    lines += _sweep_section(task, groups, metric, folder, prefix, plots)
    goal: float | None = None
    if target is not None:
        goal, origin = float(target), "given with --target"
    elif (chosen := tables.choose_target(groups, metric)) is not None:
        goal, origin = chosen[0], f"the best mean final {metric} among these runs, reached by " \
            f"{chosen[1]}"
    lines += [f"## {task}: time to target (FeDeRA Table 5)", ""]
    if goal is None:
        lines += [f"No run has evaluated {metric} yet; give a target with `--target`.", ""]
    else:
        lines += [f"Target {metric} = {goal:.4f} ({origin}). Rounds and modelled wall time until "
                  "the first evaluation at or above 90/95/99% of it; `-`: never reached, `(k/n)`: "
                  "reached by k of n seeds (mean over those). Modelled time = one-off + per round "
                  "(slowest client's measured local training + one client's bytes down and up at "
                  f"{bandwidth_mbit:g} Mbit/s). One-off: the server's SVD for FeDeRA/SLoRA "
                  "(`seconds-svd` of the summary; runs older than that field: `(setup)` = "
                  "FeDeRA's whole server set-up, `(aggregate)` = SLoRA's slowest aggregation, "
                  "upper bounds).", "",
                  tables.time_to_target_table(groups, metric, goal, bandwidth_mbit), ""]
    timing = tables.round_time_table(groups)
    if timing.count("\n") > 1:
        lines += [f"## {task}: where a round's time goes", "",
                  "Mean seconds per round over rounds 2.. (round 1 includes start-up), without "
                  "evaluation, split into the clients' local training (summed over the sampled "
                  "clients), the rest of their train handlers (decode/encode), transport + server "
                  "(serialisation, Flower/Ray messaging, validation of updates) and aggregation; "
                  "then the seconds of one evaluation of the global model. Exact with one "
                  "simulation worker; with several, clients overlap and the client columns "
                  "exceed wall time.", "",
                  timing, ""]
    drifting = [g for g in groups if any(r.get("drift") for run in g.runs for r in run.rounds)]
    if drifting:
        lines += [f"## {task}: drift of the LoRA factors (FeDeRA §4.2, Fig. 3/4)", "",
                  "Magnitude variation (mean |change| of column norms) and direction variation "
                  "(mean 1 - cosine of columns) of the global A and B matrices between "
                  "successive rounds, averaged over layers, modules, rounds and seeds.", "",
                  tables.drift_table(drifting), ""]
        if plots:
            from .report_plots import plot_drift, plot_drift_layers

            plot_drift(drifting, folder / f"{prefix}drift.png")
            plot_drift_layers(drifting, folder / f"{prefix}drift-layers.png")
            lines += [f"![drift per round]({prefix}drift.png)", "",
                      f"![drift per layer]({prefix}drift-layers.png)", ""]
    return lines


def _sweep_section(task: str, groups: list[Group], metric: str, folder: Path, prefix: str,
                   plots: bool) -> list[str]:
    """Final metric per method against the settings the groups vary (FeDeRA Fig. 5: alpha;
    Fig. 6: trainable budget; or any other compared setting); nothing when only the method
    varies."""
    from . import report_tables as tables

    swept = varying_settings(groups)
    if not swept:
        return []
    figures = sorted({SWEEP_FIGURES[k] for k in swept if k in SWEEP_FIGURES})
    lines = [f"## {task}: final {metric} vs {', '.join(swept)}"
             + (f" (FeDeRA {', '.join(figures)})" if figures else ""), "",
             f"The final test {metric} of each method (columns) at each value of the swept "
             "settings (rows), mean ± sample std over seeds; `(r done/planned)` marks a run "
             "still unfinished. `trainable params` (when it changes with the setting): per "
             "method, in column order.", "",
             tables.sweep_table(groups, metric, swept), ""]
    if plots:
        from .report_plots import plot_sweep

        file = f"{prefix}{metric}-vs-{'-'.join(swept)}.png"
        if plot_sweep(groups, metric, swept, folder / file,
                      title=f"{task}: final {metric} vs {', '.join(swept)}") is not None:
            lines += [f"![final {metric} vs {', '.join(swept)}]({file})", ""]
    return lines


def _heterogeneity_section(runs: list[Run], folder: Path, plots: bool) -> list[str]:
    """One row (and figure) per distinct partition among the runs."""
    distinct: dict[str, tuple[dict[str, Any], list[Run]]] = {}
    for run in runs:
        if run.partition:
            key = json.dumps([run.task, run.partition.get("alpha"), run.partition.get("seed"),
                              run.partition.get("histograms")])
            distinct.setdefault(key, (run.partition, []))[1].append(run)
    if not distinct:
        return []
    from .partition import mean_pairwise_js

    lines = ["## Heterogeneity of the client partitions (FeDeRA Fig. 7)", "",
             "Dirichlet label skew (smaller alpha = more skewed). JS: Jensen-Shannon divergence "
             "(base 2, 0 = same label mix, 1 = disjoint) between two clients' class "
             "distributions, averaged over all client pairs.", "",
             "| task | alpha | clients | seed | examples | mean pairwise JS | runs |",
             "|---|---:|---:|---:|---:|---:|---|"]
    figures = []
    for i, (part, members) in enumerate(distinct.values()):
        hist = np.asarray(part["histograms"])
        name = f"partition-{members[0].task}-a{part.get('alpha')}-n{len(hist)}-s{part.get('seed')}"
        name += f"-{i}.png" if any(f.startswith(name) for f in figures) else ".png"
        js = mean_pairwise_js(hist)
        lines.append(f"| {members[0].task} | {part.get('alpha')} | {len(hist)} | "
                     f"{part.get('seed')} | {int(hist.sum()):,} | {js:.4f} | "
                     f"{', '.join(sorted({r.path.name for r in members}))} |")
        if plots:
            from .report_plots import plot_partition

            title = (f"{members[0].task}: {len(hist)} clients, alpha={part.get('alpha')}, "
                     f"seed {part.get('seed')}, mean pairwise JS {js:.3f}")
            plot_partition(part, folder / name, title)
            figures.append(name)
    lines.append("")
    for name in figures:
        lines += [f"![partition]({name})", ""]
    return lines


def _runs_section(runs: list[Run]) -> list[str]:
    """Every run folder read, with its own numbers, so each row above can be traced."""
    lines = ["## Runs", "", "| folder | task | method | seed | lr | rounds | metric | final | best "
             "| measured minutes |", "|---|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for run in runs:
        metric = run.metric()
        final = run.final(metric)
        best = max((v for _, v in run.series(metric)), default=None)
        summary = run.summary or {}
        finished = len(run.rounds) == summary.get("rounds")  # all of it (not cut by --up-to)
        minutes = (summary.get("seconds") if finished else None) or sum(
            r.get("seconds", 0) for r in run.rounds)
        lines.append(f"| `{_display(run.path)}` | {run.task} | {run.method} | "
                     f"{run.config.get('seed')} | {'-' if run.lr is None else f'{run.lr:g}'} | "
                     f"{len(run.rounds)}/{run.config.get('rounds')} | "
                     f"{metric} | {'-' if final is None else f'{final:.4f}'} | "
                     f"{'-' if best is None else f'{best:.4f}'} | {minutes / 60:.1f} |")
    return [*lines, ""]


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None
