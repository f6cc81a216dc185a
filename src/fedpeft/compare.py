"""Comparisons: several methods (and sweeps over any setting, seeds and per-method learning-rate
grids) on the same partition, each run in its own folder, finished runs never redone.

Learning rates (FeDeRA paper Sec. 5.1 picks each method's best from a grid): with a grid for a
method, every rate is run with a validation split carved from the training data
(``valid-fraction``, default 0.1 here) and the rate with the best final *validation* metric is
chosen; the table reports that run's *test* metric and the chosen rate. The test set never
takes part in the choice.

``select_at=S`` (``--select-at``) chooses earlier, to save most of a grid's compute: every rate
runs to round S only, the best validation metric *at round S* is chosen, and only the chosen
rate (all tied ones, then compared again at the end) continues to ``rounds``, resuming its
own run (one rung of successive halving, Jamieson & Talwalkar 2016, written here because the
runs are Flower simulations that a tuning library would have to resume through our
checkpoints). The rates left at round S stay
as finished S-round runs; ``fedpeft report`` compares rates at the last round all of them
reached, so it makes the same choice from the logs.

    fedpeft compare --methods fedlr,federa --lr-grid fedlr=1e-3,2e-3,5e-3 \\
        --lr-grid federa=5e-4,1e-3,2e-3 --sweep alpha=0.1,1 --seeds 0,1 rounds=100
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig, load_config


@dataclasses.dataclass
class Job:
    cfg: RunConfig
    method: str
    sweep: dict[str, str]  # swept setting -> value (as written by the user)
    seed: int
    lr: float | None  # None = the method's default rate (no grid)


def parse_assignments(items: list[str], what: str) -> dict[str, list[str]]:
    """``["alpha=0.1,1", "lora-rank=4,8"]`` -> ``{"alpha": ["0.1", "1"], ...}``."""
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values.strip():
            raise ConfigError(f"{what} {item!r} must look like key=v1,v2,...")
        out[key.strip()] = [v.strip() for v in values.split(",") if v.strip()]
    return out


def plan(base: RunConfig, methods: list[str], sweeps: dict[str, list[str]],
         lr_grids: dict[str, list[str]], seeds: list[int], root: str) -> list[Job]:
    """Every run of the comparison, each with its own resolved, validated config and folder."""
    unknown = sorted(set(lr_grids) - set(methods))
    if unknown:
        raise ConfigError(f"--lr-grid names methods {unknown} that are not in --methods")
    jobs = []
    keys = list(sweeps)
    for method in methods:
        for values in itertools.product(*(sweeps[k] for k in keys)):
            sweep = dict(zip(keys, values, strict=True))
            for seed in seeds:
                for lr in lr_grids.get(method, [None]):
                    name = method + "".join(f"-{k}{v}" for k, v in sweep.items())
                    name += f"-s{seed}" + (f"-lr{lr}" if lr is not None else "")
                    overrides = [f"method={method}", f"seed={seed}", f"out={root}/{name}",
                                 *(f"{k}={v}" for k, v in sweep.items())]
                    if lr is not None:
                        overrides.append(f"lr={lr}")
                        if base.valid_fraction == 0:
                            overrides.append("valid-fraction=0.1")
                    cfg = load_config(None, overrides, base=base)
                    jobs.append(Job(cfg, method, sweep, seed, float(lr) if lr else None))
    return jobs


def run_jobs(jobs: list[Job], simulate: Callable[..., dict[str, Any]],
             overwrite: bool = False, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run each job; return the summaries.

    A job's folder that holds a run is reused only if that run is the job's own: its saved,
    resolved config equals the job's on every setting that can change a result
    (``config.differing_settings``). Then a finished run of the job's rounds is not redone and
    one with a checkpoint (interrupted, or finished and now asked for more rounds) is resumed.
    A folder holding anything else stops the comparison before any job trains, naming the
    settings that differ. ``overwrite`` starts every job afresh. ``simulate(cfg, resume=...)``
    runs one job.
    """
    states = [job_state(job, overwrite) for job in jobs]  # every folder checked before training
    summaries = []
    for i, (job, (state, done)) in enumerate(zip(jobs, states, strict=True), start=1):
        path = job.cfg.run_dir()
        if state == "finished":
            log(f"[{i}/{len(jobs)}] {path}: finished, not redone")
            summary = json.loads((path / "summary.json").read_text())
        else:
            log(f"[{i}/{len(jobs)}] {path}" + (f": resuming after round {done}"
                                                if state == "resume" else ""))
            summary = simulate(job.cfg, resume=state == "resume")
        summaries.append({**summary, "job": job})
    return summaries


def run_selected(jobs: list[Job], simulate: Callable[..., dict[str, Any]], select_at: int,
                 overwrite: bool = False, log: Callable[[str], None] = print
                 ) -> list[dict[str, Any]]:
    """``run_jobs`` with the learning rates chosen at round ``select_at`` (module doc): the
    jobs without a grid and the chosen rates' jobs run to the end; returns their summaries in
    the plan's order, the chosen ones with ``chosen-lr``, ``lr-tied``, ``lr-candidates`` (the
    rates' validation metric at round ``select_at``) and ``lr-chosen-at``. Rates tied at
    ``select_at`` all go on; then the best final validation score among them is the choice
    (``lr-tie-broken-at``: the round), the rest leave the table."""
    from .federation.checkpoint import saved_config

    check_select_at(jobs, select_at)
    grid = [job for job in jobs if job.lr is not None]
    states = [job_state(job, overwrite) for job in jobs]  # every folder checked before training
    scores: dict[int, float] = {}
    for i, (job, (state, done)) in enumerate(
            [(j, s) for j, s in zip(jobs, states, strict=True) if j.lr is not None], start=1):
        path = job.cfg.run_dir()
        if done < select_at:
            saved = saved_config(path)[0] if state == "resume" else None
            early = dataclasses.replace(job.cfg.resolved(saved), rounds=select_at)
            log(f"[rate {i}/{len(grid)}] {path}: to round {select_at}"
                + (f", resuming after round {done}" if state == "resume" else ""))
            simulate(early, resume=state == "resume")
            mark_stopped_for_selection(path, select_at, job.cfg.rounds)
        else:
            log(f"[rate {i}/{len(grid)}] {path}: has round {select_at}, not redone")
        scores[id(job)] = valid_at(job, select_at)
    groups: dict[tuple, list[Job]] = {}
    for job in grid:
        groups.setdefault((job.method, tuple(job.sweep.items()), job.seed), []).append(job)
    notes: dict[int, dict[str, Any]] = {}
    for group in groups.values():
        top = max(scores[id(job)] for job in group)
        best = [job for job in group if scores[id(job)] == top]  # a tie is no choice
        for job in best:
            notes[id(job)] = {"chosen-lr": job.lr, "lr-tied": len(best) > 1,
                              "lr-candidates": {j.lr: scores[id(j)] for j in group},
                              "lr-chosen-at": select_at}
    plain = [job for job in jobs if job.lr is None]
    chosen = [job for job in grid if id(job) in notes]
    # the chosen rates continue their own runs (never overwritten: phase one just made them)
    done = run_jobs(plain, simulate, overwrite, log) + run_jobs(chosen, simulate, False, log)
    # rates tied at round S have all gone on (the next rung): the best final validation score
    # among them is the choice, as ``fedpeft report`` makes it from the logs
    final = {id(r["job"]): final_valid(r) for r in done if id(r["job"]) in notes}
    for group in groups.values():
        tied = [job for job in group if id(job) in final]
        if len(tied) < 2:
            continue
        top = max(final[id(job)] for job in tied)
        for job in tied:
            if final[id(job)] == top:
                notes[id(job)] = {**notes[id(job)], "lr-tied": sum(
                    final[id(j)] == top for j in tied) > 1, "lr-tie-broken-at": job.cfg.rounds}
            else:
                del notes[id(job)]
    done = [r for r in done if r["job"].lr is None or id(r["job"]) in notes]
    order = {id(job): i for i, job in enumerate(jobs)}
    done.sort(key=lambda r: order[id(r["job"])])
    return [{**r, **notes.get(id(r["job"]), {})} for r in done]


def mark_stopped_for_selection(path: Path, select_at: int, rounds: int) -> None:
    """Record in ``path``'s summary.json that the run stopped at ``select_at`` for the choice of
    a comparison set to ``rounds`` (``"select-at": {"round", "rounds"}``): the summary is that
    of an early stop, and whoever keeps run folders (scripts/results.sh) can tell from the
    folder alone that its checkpoint may still go on, even before any rate has. The chosen
    rate's own summary replaces it when that run finishes."""
    summary_path = Path(path) / "summary.json"
    if not summary_path.exists():
        return
    from .runlog import atomic_write

    summary = json.loads(summary_path.read_text())
    summary["select-at"] = {"round": select_at, "rounds": rounds}
    atomic_write(summary_path, json.dumps(summary, indent=2) + "\n")


def check_select_at(jobs: list[Job], select_at: int) -> None:
    """``ConfigError`` unless round ``select_at`` can score every grid job's rate."""
    grid = [job for job in jobs if job.lr is not None]
    if not grid:
        raise ConfigError("--select-at chooses among the rates of --lr-grid; give one")
    for job in grid:
        cfg = job.cfg.resolved()
        if not 0 < select_at < cfg.rounds:
            raise ConfigError(f"--select-at {select_at}: expected a round from 1 to "
                              f"rounds-1 = {cfg.rounds - 1}")
        if select_at % cfg.eval_every:
            raise ConfigError(f"--select-at {select_at}: expected a multiple of "
                              f"eval-every={cfg.eval_every}, a round at which every run "
                              "evaluates")
        stage1 = cfg.slora_stage1_rounds if job.method == "slora" else None
        if stage1 is not None and select_at <= stage1:
            raise ConfigError(f"--select-at {select_at}: slora trains at the grid's rate from "
                              f"round {stage1 + 1} on (slora-stage1-rounds={stage1}); expected "
                              "a later round")


def valid_at(job: Job, server_round: int) -> float:
    """The job's validation score at ``server_round`` from its round log: its task's headline
    metric on the validation split, or a personalised method's mean over its clients' local
    validation splits (``runlog.validation_series``)."""
    from .runlog import read_rounds, validation_series
    from .tasks import TASKS

    path = job.cfg.run_dir()
    name, series = validation_series(read_rounds(path), TASKS[job.cfg.task].metric)
    for logged, value in series:
        if logged == server_round:
            return value
    raise ValueError(f"{path}: no {name} at round {server_round} in rounds.jsonl; learning "
                     "rates are chosen on the validation split")


def final_valid(summary: dict[str, Any]) -> float:
    """A run's validation score at its last evaluation (``valid_at``'s rule, on the summary's
    ``final`` and ``final-local``)."""
    from .runlog import validation_series

    last = {"round": summary["rounds"], "metrics": summary["final"],
            "local-eval": {"stats": summary.get("final-local") or {}}}
    name, series = validation_series([last], summary["metric"])
    if not series:
        raise ValueError(f"{summary['job'].cfg.run_dir()}: no final {name}; learning rates are "
                         "chosen on the validation split")
    return series[0][1]


def job_state(job: Job, overwrite: bool = False) -> tuple[str, int]:
    """``(state, rounds done)``, state "new" (no run there, or ``overwrite``), "resume" or
    "finished"; ``ConfigError`` if the job's folder holds something that is not this job's run."""
    from .federation.checkpoint import check_resumable, saved_config

    path = job.cfg.run_dir()
    if overwrite or not path.exists() or not any(path.iterdir()):
        return "new", 0
    saved, done = saved_config(path)
    if saved is None:
        raise ConfigError(f"{path} exists and holds no fedpeft run (no config.toml); move it "
                          "away or choose another --root")
    check_resumable(saved, job.cfg.resolved(saved), done)
    if done >= job.cfg.rounds and (path / "summary.json").exists():
        return "finished", done
    return ("resume" if done > 0 else "new"), done


def select_learning_rates(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep, per (method, sweep, seed), the run whose final validation score (``final_valid``)
    is best; runs without a grid pass through; rates tied on it are all kept (``lr-tied``), as
    the report keeps them. The kept summary gains ``chosen-lr``, ``lr-tied`` and
    ``lr-candidates``."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:
        job: Job = r["job"]
        groups.setdefault((job.method, tuple(job.sweep.items()), job.seed), []).append(r)
    kept = []
    for runs in groups.values():
        if runs[0]["job"].lr is None:
            kept.extend(runs)
            continue
        scores = {id(r): final_valid(r) for r in runs}
        top = max(scores.values())
        best = [r for r in runs if scores[id(r)] == top]  # a tie is no choice: keep them all
        kept.extend({**r, "chosen-lr": r["job"].lr, "lr-tied": len(best) > 1,
                     "lr-candidates": {r["job"].lr: scores[id(r)] for r in runs}} for r in best)
    return kept


def default_root(base: RunConfig) -> str:
    return str(Path("runs") / "compare" / f"{base.task}-a{base.alpha}")


def results_table(summaries: list[dict[str, Any]]) -> str:
    """Markdown table: method, rounds, test metric, trainable params, bytes per client-round."""
    metric = summaries[0]["metric"] if summaries else "metric"
    swept = sorted({k for s in summaries if "job" in s for k in s["job"].sweep})
    seeds = len({s["job"].seed for s in summaries if "job" in s}) > 1
    grid = any("chosen-lr" in s for s in summaries)
    at = next((s["lr-chosen-at"] for s in summaries if "lr-chosen-at" in s), None)
    chosen = "chosen lr (valid" + (f" at round {at})" if at else ")")
    columns = ["method", *swept, *(["seed"] if seeds else []), "rounds", f"test {metric}",
               f"best {metric}", *([chosen] if grid else ["lr"]),
               "trainable params", "MB per client-round", "minutes"]
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for s in summaries:
        job = s.get("job")
        cells = [s["method"], *(job.sweep.get(k, "") if job else "" for k in swept),
                 *([str(job.seed if job else "")] if seeds else []), str(s["rounds"]),
                 _fmt(s["final"].get(metric)), _fmt(s["best"]),
                 f"{s['lr']:g}" + (" (tied)" if s.get("lr-tied") else
                                   f" (best at round {s['lr-tie-broken-at']} of the tied)"
                                   if s.get("lr-tie-broken-at") else ""),
                 f"{s['trainable-params']:,}", f"{s['bytes-per-client-round'] / 1e6:.2f}",
                 f"{s['seconds'] / 60:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def baseline_line(summaries: list[dict[str, Any]]) -> str:
    """The majority-class bar beside a classification table ("" for other tasks)."""
    baseline = next((s["baseline"] for s in summaries if s.get("baseline")), None)
    if not baseline:
        return ""
    return (f"majority-class baseline (always '{baseline['label']}', the commonest training "
            f"label): test accuracy {baseline['accuracy']:.4f}")
