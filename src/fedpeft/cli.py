"""The ``fedpeft`` command line.

    fedpeft run [--config FILE] [key=value ...]      one federated run into a run folder
    fedpeft compare [--methods a,b] [key=value ...]  several methods on the same partition + table
    fedpeft partition [key=value ...]                the non-IID split's statistics, no training
    fedpeft methods [key=value ...]                  trainable parameters and bytes per method
    fedpeft tasks                                    the tasks, their metric and the data each reads
    fedpeft strategies                               aggregation strategies, their settings, DP
    fedpeft export RUN_DIR --format peft|merged --out DIR   the final model, outside fedpeft
    fedpeft run --help-config                        every setting with its default

Settings are ``RunConfig`` fields in kebab case (``num-clients=100``); see ``fedpeft.config``.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import offline
from .config import ConfigError, RunConfig, describe_fields, load_config
from .errors import FedpeftError
from .runlog import check_run_folder, is_run_folder

# The embedded default of `fedpeft compare`: FeDeRA vs FedLR on SemEval, 20 clients of ~400
# sentences (Dir(1)), 4 per round, 7 rounds, lr 5e-3 (the rate the federated lr grid chose for
# both), one test evaluation after the last round; fewer, larger clients than the paper's 100 x
# 80 so that 11,200 examples and 25 local steps per client fit (measured output in the README).
DEMO = RunConfig(task="semeval", rounds=7, num_clients=20, clients_per_round=4, alpha=1.0,
                 eval_every=7, lr=5e-3)
DEMO_METHODS = ["fedlr", "federa"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return the exit status (0 ok, 2 a user error, 1 a fedpeft bug,
    130 interrupted). ``--debug`` (anywhere, or ``FEDPEFT_DEBUG=1``) adds the traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("FEDPEFT_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        return _main(argv, debug)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("fedpeft: interrupted; finished rounds are in the run folder", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every failure ends as one line (see explain)
        if debug:
            traceback.print_exc()
        code, message = explain(err)
        print(f"fedpeft: error: {message}", file=sys.stderr)
        return code


def _main(argv: list[str], debug: bool) -> int:
    parser = _parser()
    try:
        # Overrides may come before or after options (`run --overwrite rounds=3 seed=1`).
        args, rest = parser.parse_known_args(argv)
        unknown = [r for r in rest if "=" not in r or r.startswith("-")]
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as done:  # --help, or a usage error already printed by _Parser.error
        return done.code if isinstance(done.code, int) else 0
    if rest:
        args.overrides = [*args.overrides, *rest]
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "help_config", False):
        print("Settings (key=value on the command line, or `key = value` in a TOML file):")
        print(describe_fields())
        return 0
    offline.apply()
    return args.func(args)


def explain(err: BaseException) -> tuple[int, str]:
    """The exit status and one-line message for an exception that ended a command.

    A ``FedpeftError`` (a setting, a file, a model, a run folder, a federation) and the errors of
    the libraries that stem from what the user gave (``ValueError``, ``OSError``: a file that
    cannot be read or written, a full disk; out of memory) are the user's to fix: status 2.
    Anything else is a bug in fedpeft: status 1, with the exception named.
    """
    text = _one_line(str(err))
    if isinstance(err, FedpeftError):
        return 2, text or type(err).__name__
    memory = _out_of_memory(err)
    if memory:
        return 2, memory
    if type(err).__name__ == "SafetensorError":  # a damaged file in a run folder
        return 2, (f"a .safetensors file is damaged or is not one ({text}); rerun with --debug "
                   "to see which")
    if isinstance(err, OSError):
        name = err.filename if err.filename is not None else ""
        cause = err.strerror or text or type(err).__name__
        return 2, f"{name}: {cause}" if name else cause
    if isinstance(err, UnicodeError):  # the file is unknown here; say what was expected
        return 2, f"a file is not UTF-8 text ({text}); rerun with --debug to see which"
    if isinstance(err, ValueError):
        return 2, text or type(err).__name__
    return 1, (f"unexpected {type(err).__name__}: {text or '(no message)'} -- a bug in fedpeft; "
               "rerun with --debug for the traceback")


def _out_of_memory(err: BaseException) -> str | None:
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        gpu = "CUDA" in str(err) or "cuda" in type(err).__module__
        where = "the GPU" if gpu else "this machine"
        return (f"out of memory on {where}; lower batch-size, eval-batch-size, max-length or "
                "sim-workers")
    return None


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.strip().splitlines() if line.strip())


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line ``fedpeft: error: ...`` (exit 2)."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("fedpeft").strip()
        where = f"fedpeft {command}" if command else "fedpeft"
        print(f"fedpeft: error: {command + ': ' if command else ''}{message} (see `{where} "
              "--help`)", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedpeft", description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)  # options of every command
    common.add_argument("--debug", action="store_true", help="on an error, show the traceback "
                        "too (also before the command, or FEDPEFT_DEBUG=1)")
    parser.add_argument("--debug", action="store_true", help="on an error, show the traceback "
                        "too (may also follow the command; or set FEDPEFT_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    def command(name: str, func: Any, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=[common])
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="settings, e.g. method=federa rounds=50 (see --help-config)")
        p.add_argument("--config", help="TOML file of settings (overrides win over it)")
        p.add_argument("--help-config", action="store_true", help="list every setting and exit")
        p.set_defaults(func=func)
        return p

    run = command("run", _run, "one federated fine-tuning run (simulation on this machine)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its last "
                     "finished round (its config.toml; only rounds, timeouts and the like may "
                     "be overridden)")
    compare = command("compare", _compare, "several methods on the same partition, then a table; "
                      "with no arguments, the embedded FeDeRA-vs-FedLR demo on SemEval")
    compare.add_argument("--methods", default=",".join(DEMO_METHODS),
                         help="comma-separated methods (default: %(default)s)")
    compare.add_argument("--overwrite", action="store_true", help="redo finished runs")
    compare.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                         help="run every value of a setting (repeatable: a grid)")
    compare.add_argument("--lr-grid", action="append", default=[], metavar="METHOD=LR1,LR2",
                         help="learning rates to try for a method; the best on a validation "
                         "split carved from train is kept (repeatable)")
    compare.add_argument("--select-at", type=int, default=None, metavar="ROUND",
                         help="choose each grid's rate on validation at ROUND: every rate runs "
                         "to ROUND, only the chosen one on to rounds (default: at the end)")
    compare.add_argument("--seeds", default=None, help="comma-separated seeds (default: seed)")
    compare.add_argument("--root", default=None, help="folder of the runs (default: "
                         "runs/demo for the demo, else runs/compare/<task>-a<alpha>)")
    command("partition", _partition, "print the client split's statistics without training")
    tasks = sub.add_parser("tasks", parents=[common], help="the tasks, their metric, default "
                           "max-length and the data each reads")
    tasks.set_defaults(func=_tasks)
    command("methods", _methods, "trainable parameters and bytes per client per round, "
            "per method, for the configured model and task")
    command("strategies", _strategies, "the aggregation strategies (Flower's), their settings "
            "with Flower's defaults, and the differential-privacy modes")
    export = sub.add_parser("export", parents=[common], help="save a finished run's global "
                            "model as a PEFT adapter or a merged transformers model", description=(
                                "Export RUN_DIR's final global model (see fedpeft.export): "
                                "--format peft for the LoRA family (PeftModel.from_pretrained), "
                                "--format merged for a full model "
                                "(AutoModelFor*.from_pretrained)."))
    export.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder")
    export.add_argument("--format", required=True, choices=["peft", "merged"], dest="fmt")
    export.add_argument("--out", required=True, help="folder to write")
    export.set_defaults(func=_export, overrides=[])
    report = sub.add_parser("report", parents=[common], help="REPORT.md + PNG plots from run "
                            "folders (tables, time to target, partitions, drift)", description=(
                                "Build REPORT.md and its plots from run folders only (see "
                                "docs/reports.md). RUN_DIR: a run folder or a tree of them."))
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", default=None,
                        help="output folder (default: report/ beside the runs)")
    report.add_argument("--target", type=float, default=None, help="target metric for time to "
                        "target (default: the best mean final metric among the runs)")
    report.add_argument("--bandwidth-mbit", type=float, default=25.0,
                        help="client link for the modelled time, Mbit/s (default: %(default)s)")
    report.add_argument("--rounds", default=None, help="comma-separated rounds for the table "
                        "(default: 10,50,100 where evaluated, else up to 3 evaluated rounds)")
    report.add_argument("--metric", default=None, help="metric to report (default: the task's)")
    report.add_argument("--up-to", type=int, default=None, metavar="ROUND",
                        help="read rounds 1..ROUND of every run only (compare runs of different "
                             "lengths at an equal number of rounds)")
    report.add_argument("--choose", action="append", default=[], metavar="SETTING",
                        help="besides lr, a setting to choose on the validation split among runs "
                             "that differ only in it, e.g. server-lr (repeatable)")
    report.set_defaults(func=_report, overrides=[])
    paper = sub.add_parser("paper", parents=[common], help="our runs beside the FeDeRA paper's "
                           "tables, its claims checked, and which method to use (one page)")
    paper.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    paper.add_argument("--out", required=True, help="the markdown file to write")
    paper.set_defaults(func=_paper, overrides=[])
    return parser


def _paper(args: argparse.Namespace) -> int:
    from .paper import paper_page

    out = Path(args.out)
    inside = next((p for p in [out.resolve().parent, *out.resolve().parents]
                   if is_run_folder(p)), None)
    if inside is not None:
        raise ConfigError(f"--out {out} is inside the run folder {inside}; write the page "
                          "elsewhere (run folders are never written into)")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; expected a markdown file name")
    command = " ".join(["fedpeft paper", *map(str, args.run_dirs), "--out", str(out)])
    text = paper_page(args.run_dirs, command=command)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import build_report, parse_rounds, report_command

    out = Path(args.out) if args.out else None
    if out is None:  # report/ beside the runs: beside a single run folder, not inside it
        common = Path(os.path.commonpath([Path(p).resolve() for p in args.run_dirs]))
        top = next((p for p in reversed([common, *common.parents]) if is_run_folder(p)), None)
        out = (top.parent if top is not None else common) / "report"
    inside = next((p for p in [out.resolve(), *out.resolve().parents] if is_run_folder(p)), None)
    if inside is not None:
        raise ConfigError(f"--out {out} is inside the run folder {inside}; write the report "
                          "elsewhere (run folders are never written into)")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; expected a folder for REPORT.md")
    path = build_report(args.run_dirs, out=out, target=args.target,
                        bandwidth_mbit=args.bandwidth_mbit, rounds=parse_rounds(args.rounds),
                        metric=args.metric, command=report_command(args), up_to=args.up_to,
                        choose=args.choose)
    print(f"wrote {path} and its figures")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export_run

    out = export_run(args.run_dir, args.fmt, args.out)
    print(f"wrote {args.fmt} export of {args.run_dir} to {out}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from .compare import results_table
    from .federation.simulation import simulate

    if args.resume:
        from .federation.checkpoint import resume_config

        if args.config or args.overwrite:
            raise ConfigError("--resume takes the run's own config.toml; drop --config/--overwrite")
        cfg = resume_config(args.resume, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
        check_run_folder(cfg.run_dir(), args.overwrite)
    summary = simulate(cfg, overwrite=args.overwrite, resume=bool(args.resume))
    print(results_table([summary]))
    if summary.get("failures") or summary.get("rejected") or summary.get("skipped-rounds"):
        print(f"clients failed {summary['failures']} time(s), {summary['rejected']} update(s) "
              f"rejected, {summary['skipped-rounds']} round(s) skipped (see rounds.jsonl)")
    print(f"run folder: {cfg.run_dir()}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .compare import (baseline_line, default_root, parse_assignments, plan, results_table,
                          run_jobs, run_selected, select_learning_rates)
    from .federation.simulation import simulate

    demo = not (args.overrides or args.config or args.sweep or args.lr_grid)
    base = load_config(args.config, args.overrides, base=DEMO if demo else None)
    methods = _methods_list(args.methods)
    seeds = _seeds_list(args.seeds) if args.seeds else [base.seed]
    root = args.root or ("runs/demo" if demo else default_root(base))
    if is_run_folder(Path(root)) or any(map(is_run_folder, Path(root).resolve().parents)):
        raise ConfigError(f"--root {root} is (inside) a run folder; pass a folder for the "
                          "comparison's runs (each gets a subfolder)")
    sweeps = parse_assignments(args.sweep, "--sweep")
    for key in sweeps:
        other = {"method": "--methods", "seed": "--seeds", "lr": "--lr-grid", "out": "--root"}
        if key.replace("_", "-") in other:
            raise ConfigError(f"--sweep {key}=...: use {other[key.replace('_', '-')]} instead")
    jobs = plan(base, methods, sweeps, parse_assignments(args.lr_grid, "--lr-grid"), seeds, root)
    for job in jobs:  # each job's folder is (re)started with overwrite unless it is resumed
        check_run_folder(job.cfg.run_dir(), overwrite=True)

    def run_one(cfg: RunConfig, resume: bool) -> dict:
        return simulate(cfg, overwrite=not resume, resume=resume)

    def log(line: str) -> None:
        print(line, file=sys.stderr)

    if args.select_at is not None:
        kept = run_selected(jobs, run_one, args.select_at, overwrite=args.overwrite, log=log)
    else:
        kept = select_learning_rates(run_jobs(jobs, run_one, overwrite=args.overwrite, log=log))
    print(results_table(kept))
    print(baseline_line(kept))
    return 0


def _methods_list(text: str) -> list[str]:
    """``--methods a,b``: known method names, each once, in order."""
    from .methods import METHODS

    methods = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        what = f"unknown method {unknown[0]!r}" if unknown else "no method"
        raise ConfigError(f"--methods {text!r}: {what}; expected comma-separated names from "
                          f"{', '.join(METHODS)}")
    return methods


def _seeds_list(text: str) -> list[int]:
    """``--seeds 0,1,2``: integers, each once, in order."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise ConfigError(f"--seeds must be comma-separated integers, got {text!r}")
    return list(dict.fromkeys(seeds))


def _partition(args: argparse.Namespace) -> int:
    from .partition import describe, make_partition, partition_summary
    from .tasks import make_task

    cfg = load_config(args.config, args.overrides)
    task = make_task(cfg)
    classes = task.partition_classes(task.examples("train"))
    partition = make_partition(classes, cfg)
    print(f"task={cfg.task} num-clients={cfg.num_clients} {partition_summary(cfg)} "
          f"min-size={cfg.min_size} seed={cfg.seed}")
    print(describe(partition))
    return 0


def _strategies(args: argparse.Namespace) -> int:
    from .federation.strategies.build import strategies_table

    print(strategies_table())
    return 0


def _methods(args: argparse.Namespace) -> int:
    from .budget import budget_table
    from .methods import METHODS

    cfg = load_config(args.config, args.overrides)
    print(budget_table(cfg, list(METHODS)))
    print(method_settings(METHODS))
    return 0


def _tasks(args: argparse.Namespace) -> int:
    from .tasks import task_table

    print(task_table())
    return 0


def method_settings(methods: dict[str, Any]) -> str:
    """Which settings dataclass (fedpeft.configs) each method reads, with its keys."""
    from .config import own_fields

    users: dict[type, list[str]] = {}
    for name, cls in methods.items():
        for group in cls.config_classes:
            users.setdefault(group, []).append(name)
    lines = ["settings of each method beyond those of every run (`fedpeft run --help-config`):"]
    for group, names in users.items():
        keys = ", ".join(f.name.replace("_", "-") for f in own_fields(group))
        lines.append(f"  {group.__name__} ({', '.join(names)}): {keys}")
    bare = [name for name, cls in methods.items() if not cls.config_classes]
    if bare:
        lines.append(f"  none ({', '.join(bare)})")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
