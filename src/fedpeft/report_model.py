"""What a report is made of: run folders read as they are (``Run``) and their seed groups
(``Group``), with the few formatting helpers every report module shares.

``fedpeft.report`` (the markdown), ``fedpeft.report_tables`` (numbers and tables) and
``fedpeft.report_plots`` (figures) all import from here and never from each other's callers:
``report_model`` <- ``report_tables`` <- ``report_plots`` <- ``report``, no import circle.
Definitions: ``docs/reports.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import RunConfig, resumable_settings
from .configs import AdapterConfig, LoraConfig, RankedLoraConfig, SLoRAConfig
from .configs.base import kebab
from .runlog import validation_series

# Settings that do not change a run's results: runs differing only in these (and seed) are seeds
# of one group.
# Settings runs of one group may differ in: the seed (a group is a set of seeds), where the data
# lives, and how rounds were run rather than what they computed (``resumable`` settings).
NOT_RESULTS = {"seed", "data-dir"} | (resumable_settings() - {"rounds"})
LABEL_HIDDEN = {"method", "lr", "task", "valid-fraction"}  # shown elsewhere, not in labels
# Settings of one method family (LoRA ranks, SLoRA's stage 1, FedAP's adapters): a label names one
# only for the methods that use it, so that FedFT is not called "fedft adapter-reduction=16"
# beside two FedAP widths.
FAMILY_SETTINGS = frozenset(kebab(f.name) for c in (
    LoraConfig, RankedLoraConfig, SLoRAConfig, AdapterConfig) for f in dataclasses.fields(c))
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
        """The method's learning rate, the same while a run is unfinished and once it is done:
        the ``lr`` setting, else the rate its summary logged, else the method's default.

        For a multi-stage method this is the rate of the ``lr`` setting (SLoRA: stage 2's, the
        LoRA stage; its sparse stage 1 has its own setting ``slora-stage1-lr``), never the rate
        of the stage a fresh method object starts in. Summaries written so far log
        ``runtime.method.lr`` after the last round, which for SLoRA is stage 2's too."""
        if self.config.get("lr") is not None:
            return float(self.config["lr"])
        logged = (self.summary or {}).get("lr")
        if isinstance(logged, int | float) and not isinstance(logged, bool):
            return float(logged)
        return default_lr(self.method, self.task)

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


def default_lr(method: str, task: str) -> float | None:
    """The rate ``method`` uses on ``task`` without an ``lr`` setting (None if either is
    unknown). The base ``Method.lr`` rule (the task kind's or the method's default) rather than
    a stage-dependent override: SLoRA's default stage-2 rate, not the stage-1 rate its fresh
    object reports."""
    from .methods import METHODS
    from .methods.base import Method
    from .tasks import TASKS

    cls, task_cls = METHODS.get(method), TASKS.get(task)
    if cls is None or task_cls is None:
        return None
    return float(Method.lr.fget(cls(RunConfig(method=method), task_cls.peft_task_type)))


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

    @property
    def done(self) -> int:
        """Rounds logged by the group's least advanced seed."""
        return min(len(r.rounds) for r in self.runs)

    @property
    def planned(self) -> int:
        return int(self.settings.get("rounds", self.done))


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
    """A run folder as it stands (a killed run's half-written last line is dropped)."""
    config = {**DEFAULTS, **_read(path / "config.toml", tomllib.loads, "TOML")}
    rounds = []
    file = path / "rounds.jsonl"
    if file.exists():
        for line in _read(file, str.splitlines, "text"):
            try:
                rounds.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a run killed mid-write leaves at most one broken last line
    return Run(path, config, rounds, _json(path / "summary.json"), _json(path / "partition.json"))


def _json(path: Path) -> dict[str, Any] | None:
    return _read(path, json.loads, "JSON") if path.exists() else None


def _read(path: Path, parse: Any, kind: str) -> Any:
    """``parse`` of a run folder's file; a ``FedpeftError`` naming it if it cannot be read."""
    from .errors import FedpeftError

    try:
        return parse(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:  # TOML/JSON/UTF-8 errors are ValueErrors
        cause = err.strerror if isinstance(err, OSError) and err.strerror else err
        raise FedpeftError(f"{path}: not a readable run folder file (expected {kind}: "
                           f"{cause})") from None


def truncate(run: Run, up_to: int) -> Run:
    """``run`` as it stood after round ``up_to`` (``rounds`` setting capped at ``up_to``)."""
    if up_to < 1:
        raise ValueError(f"--up-to must be a round number >= 1, got {up_to}")
    config = {**run.config, "rounds": min(int(run.config.get("rounds", up_to)), up_to)}
    rounds = [r for r in run.rounds if int(r["round"]) <= up_to]
    return dataclasses.replace(run, config=config, rounds=rounds)


def group_runs(runs: Sequence[Run], choose: Sequence[str] = ()) -> list[Group]:
    """Seed groups, learning rates (and the ``choose`` settings, e.g. ``server-lr``) chosen on
    validation where possible, labelled and ordered."""
    groups: dict[tuple[tuple[str, Any], ...], Group] = {}
    for run in runs:
        settings = {k: v for k, v in run.config.items() if k not in NOT_RESULTS}
        settings["lr"] = run.lr  # the rate actually used (the method default when unset)
        resolved = (run.summary or {}).get("precision")
        if settings.get("precision") == "auto" and resolved:
            settings["precision"] = resolved  # what auto ran on that machine: bf16 or fp32
        key = tuple(sorted((k, hashable(v)) for k, v in settings.items()))
        groups.setdefault(key, Group(key, [], settings=settings)).runs.append(run)
    kept = _choose_on_validation(list(groups.values()), ("lr", *choose))
    varying = label_groups(kept)
    order = list(dict.fromkeys([*PAPER_ORDER, *(r.method for r in runs)]))
    return sorted(kept, key=lambda g: (order.index(g.method),
                                       [setting_order(g.settings.get(k)) for k in varying],
                                       g.label))


def label_groups(groups: Sequence[Group]) -> list[str]:
    """Name each group by its method and the settings that differ between ``groups`` (those
    left unset, ``None``, are not named: ``fedlr strategy=fedavg`` beside ``fedlr
    server-lr=0.01 strategy=fedadam``; a method family's own setting is named only for the
    methods that use it, or where it differs between groups of one method: ``fedft`` beside
    ``fedap adapter-reduction=6`` and ``fedap adapter-reduction=16``); returns the differing
    settings."""
    varying = varying_settings(groups)
    for g in groups:
        own = [h for h in groups if h.method == g.method]
        named = [k for k in varying if g.settings.get(k) is not None and (
            k not in FAMILY_SETTINGS or k in method_settings(g.method)
            or len({hashable(h.settings.get(k)) for h in own}) > 1)]
        g.label = " ".join([g.method, *(f"{k}={fmt_setting(g.settings[k])}" for k in named)])
    labels = [g.label for g in groups]
    for g in groups:  # same label = rates kept side by side: say which is which
        if labels.count(g.label) > 1:
            g.label += f" lr={fmt_setting(g.settings['lr'])}"
    return varying


@functools.cache
def method_settings(method: str) -> frozenset[str]:
    """The family settings ``method`` uses (its ``config_classes``; all of them for a name this
    version does not know). Imported here, not at the top, so that reading runs needs no torch."""
    from .methods import METHODS

    if method not in METHODS:
        return FAMILY_SETTINGS
    return frozenset(kebab(f.name) for c in METHODS[method].config_classes
                     for f in dataclasses.fields(c))


def varying_settings(groups: Sequence[Group]) -> list[str]:
    """The settings (other than method, lr, task, valid-fraction) whose value differs between
    ``groups``: what a comparison or sweep varies."""
    return sorted({k for g in groups for k in g.settings if k not in LABEL_HIDDEN
                   and len({hashable(h.settings.get(k)) for h in groups}) > 1})


def _choose_on_validation(groups: list[Group], keys: Sequence[str] = ("lr",)) -> list[Group]:
    """Among groups that differ only in the settings ``keys`` (the clients' ``lr``, and any
    other asked for, e.g. FedAdam's ``server-lr``), keep the best validation score
    (``runlog.validation_series``: ``valid-<metric>``, or a personalised method's mean over its
    clients' local validation splits; mean over seeds) once every run has finished with one;
    until then keep them all.

    Candidates are compared at the last round all of them reached: their final round when all
    ran to the end; round S when the losers of ``fedpeft compare --select-at S`` stopped there
    (their ``rounds`` differ from the chosen run's, which is still one choice, made as soon as
    the stopped rates are done, while the chosen one goes on; groups that differ in ``rounds``
    alone are a sweep of it, not a choice). Rates tied at S all go on; once they have all
    finished the grid's rounds, the best of them where they all ended is the choice."""
    families: dict[tuple, list[Group]] = {}
    for g in groups:
        families.setdefault(tuple(kv for kv in g.key if kv[0] not in (*keys, "rounds")),
                            []).append(g)
    kept = []
    for family in _split_rounds_sweeps(list(families.values()), keys):
        metric = family[0].runs[0].metric()
        # valid-<metric>, or a personalised method's mean over its clients' local validation
        on = validation_series(family[0].runs[0].rounds, metric)[0]
        series = [[validation_series(r.rounds, metric)[1] for r in g.runs] for g in family]
        rounds = [g.planned for g in family]
        target = max(rounds)
        # Rounds that differ within one choice are ``--select-at``'s: the rates it left stopped
        # at round S (their ``rounds`` setting), the chosen one going on to the grid's rounds.
        # Every candidate is then planned to the grid's rounds, so that ``rounds`` neither
        # labels them nor reads as a sweep, and a chosen rate still short of them shows as
        # unfinished (r done/planned) instead of as a shorter, finished run.
        # The disk keeps no record of S itself: once the chosen rate is past S and its loser is
        # a finished run of the grid's rounds, the family reads as a plain grid, unfinished, so
        # no choice is shown until the chosen rate finishes too.
        for g in family:
            g.settings = {**g.settings, "rounds": target}
        finished = [all(r.summary is not None for r in g.runs) for g in family]
        stopped = [f for f, n in zip(finished, rounds, strict=True) if n < target]
        if len(family) == 1 or any(not s for ss in series for s in ss):
            kept.extend(family)
            continue
        # chosen at S once every stopped rate is done (the chosen may be going on); a plain
        # grid once all of it is done
        if not all(stopped if stopped else finished):
            kept.extend(family)
            continue
        common = (min(n for n in rounds if n < target) if stopped
                  else min(s[-1][0] for ss in series for s in ss))
        if any(s[0][0] > common or s[-1][0] < common for ss in series for s in ss):
            kept.extend(family)  # no score at that round
            continue
        best = _best_at(family, series, common)
        chosen = [k for k in keys if len({hashable(g.settings.get(k)) for g in family}) > 1]
        what = "" if chosen == ["lr"] else " and ".join(chosen) + " "
        when = "" if all(s[-1][0] == common for ss in series for s in ss) \
            else f" at round {common}"
        tied = len(best)
        index = {id(g): i for i, g in enumerate(family)}
        if tied > 1 and stopped and all(finished[index[id(g)]] and rounds[index[id(g)]] == target
                                        for g in best):
            # rates tied at S all went on (``fedpeft compare --select-at``'s next rung): once
            # they have finished, the best of them where they all ended is the choice
            ends = min(s[-1][0] for g in best for s in series[index[id(g)]])
            best = _best_at(best, [series[index[id(g)]] for g in best], ends)
            for g in best:
                g.lr_note = (f"{what}chosen on {on} at round {ends} among the {tied} tied at "
                             f"round {common}, of {len(family)}" if len(best) == 1 else
                             f"{what}tied on {on} at rounds {common} and {ends}: {len(best)} "
                             f"of {len(family)}")
            kept.extend(best)
            continue
        for g in best:  # a tie is no choice: the tied settings stay side by side, named so
            g.lr_note = (f"{what}chosen on {on}{when} from {len(family)}" if len(best) == 1
                         else f"{what}tied on {on}{when}: {len(best)} of {len(family)}")
        kept.extend(best)
    return kept


def _best_at(groups: list[Group], series: list[list[list[tuple[int, float]]]],
             server_round: int) -> list[Group]:
    """The groups whose score (mean over seeds of ``series``) at ``server_round`` is best."""
    means = [float(np.mean([_at(s, server_round) for s in ss])) for ss in series]
    return [g for g, m in zip(groups, means, strict=True) if m == max(means)]


def _split_rounds_sweeps(families: list[list[Group]], keys: Sequence[str]) -> list[list[Group]]:
    """A family in which two groups share every chosen setting differs in ``rounds`` as a
    sweep: split it by ``rounds``."""
    out = []
    for family in families:
        values = [tuple(hashable(g.settings.get(k)) for k in keys) for g in family]
        if len(set(values)) == len(values):
            out.append(family)
            continue
        by_rounds: dict[Any, list[Group]] = {}
        for g in family:
            by_rounds.setdefault(hashable(g.settings.get("rounds")), []).append(g)
        out.extend(by_rounds.values())
    return out


def _at(series: list[tuple[int, float]], server_round: int) -> float:
    """The series' value at ``server_round`` (its last one up to that round)."""
    return [v for r, v in series if r <= server_round][-1]


# --- shared helpers ---------------------------------------------------------------------------
def hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def fmt_setting(value: Any) -> str:
    """A setting's value in labels and table cells: floats by ``:g`` (0.001, 5e-05)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def setting_order(value: Any) -> tuple[int, Any]:
    """Sort key for a setting's values: numbers by value (4 < 16 < 32), then anything else."""
    return (0, float(value)) if isinstance(value, int | float) else (1, str(value))
