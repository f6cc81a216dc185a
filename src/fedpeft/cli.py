"""The ``fedpeft`` command line.

    fedpeft run [--config FILE] [key=value ...]      one federated run into a run folder
    fedpeft compare [--methods a,b] [key=value ...]  several methods on the same partition + table
    fedpeft partition [key=value ...]                the non-IID split's statistics, no training
    fedpeft methods [key=value ...]                  trainable parameters and bytes per method
    fedpeft export RUN_DIR --format peft|merged --out DIR   the final model, outside fedpeft
    fedpeft run --help-config                        every setting with its default

Settings are ``RunConfig`` fields in kebab case (``num-clients=100``); see ``fedpeft.config``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from . import offline
from .config import ConfigError, RunConfig, describe_fields, load_config

# The embedded default of `fedpeft compare`: a real federated FeDeRA-vs-FedLR run on SemEval
# that finishes in about 10 minutes on 2 CPU cores (see README for the measured output).
DEMO = RunConfig(
    task="semeval", rounds=4, num_clients=10, clients_per_round=3, alpha=1.0, eval_every=2,
)
DEMO_METHODS = ["fedlr", "federa"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come before or after options (`run --overwrite rounds=3 seed=1`).
    args, rest = parser.parse_known_args(argv)
    unknown = [r for r in rest if "=" not in r or r.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
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
    from .partition import PartitionError
    from .runlog import RunExistsError
    from .tasks import DataError

    try:
        return args.func(args)
    # OSError: a model folder or hub id that cannot be read (transformers raises OSError)
    except (ConfigError, DataError, PartitionError, RunExistsError, ValueError, OSError) as err:
        print(f"fedpeft: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedpeft: interrupted; finished rounds are in the run folder", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpeft", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")

    def command(name: str, func: Any, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
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
    compare.add_argument("--seeds", default=None, help="comma-separated seeds (default: seed)")
    compare.add_argument("--root", default=None, help="folder of the runs (default: "
                         "runs/demo for the demo, else runs/compare/<task>-a<alpha>)")
    command("partition", _partition, "print the Dirichlet split's statistics without training")
    command("methods", _methods, "trainable parameters and bytes per client per round, "
            "per method, for the configured model and task")
    export = sub.add_parser("export", help="save a finished run's global model as a PEFT "
                            "adapter or a merged transformers model", description=(
                                "Export RUN_DIR's final global model (see fedpeft.export): "
                                "--format peft for the LoRA family (PeftModel.from_pretrained), "
                                "--format merged for a full model "
                                "(AutoModelFor*.from_pretrained)."))
    export.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder")
    export.add_argument("--format", required=True, choices=["peft", "merged"], dest="fmt")
    export.add_argument("--out", required=True, help="folder to write")
    export.set_defaults(func=_export, overrides=[])
    report = sub.add_parser("report", help="REPORT.md + PNG plots from run folders (tables, "
                            "time to target, partitions, drift)", description=(
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
    report.set_defaults(func=_report, overrides=[])
    return parser


def _report(args: argparse.Namespace) -> int:
    from .report import build_report, parse_rounds, report_command

    path = build_report(args.run_dirs, out=args.out, target=args.target,
                        bandwidth_mbit=args.bandwidth_mbit, rounds=parse_rounds(args.rounds),
                        metric=args.metric, command=report_command(args), up_to=args.up_to)
    print(f"wrote {path} and its figures")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export_run

    out = export_run(args.run_dir, args.fmt, args.out)
    print(f"wrote {args.fmt} export of {args.run_dir} to {out}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from .federation.simulation import simulate

    if args.resume:
        from .federation.checkpoint import resume_config

        if args.config or args.overwrite:
            raise ConfigError("--resume takes the run's own config.toml; drop --config/--overwrite")
        cfg = resume_config(args.resume, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
    summary = simulate(cfg, overwrite=args.overwrite, resume=bool(args.resume))
    print(results_table([summary]))
    if summary.get("failures") or summary.get("rejected") or summary.get("skipped-rounds"):
        print(f"clients failed {summary['failures']} time(s), {summary['rejected']} update(s) "
              f"rejected, {summary['skipped-rounds']} round(s) skipped (see rounds.jsonl)")
    print(f"run folder: {cfg.run_dir()}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .compare import default_root, parse_assignments, plan, run_jobs, select_learning_rates
    from .federation.simulation import simulate

    demo = not (args.overrides or args.config or args.sweep or args.lr_grid)
    base = load_config(args.config, args.overrides, base=DEMO if demo else None)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [base.seed]
    root = args.root or ("runs/demo" if demo else default_root(base))
    jobs = plan(base, methods, parse_assignments(args.sweep, "--sweep"),
                parse_assignments(args.lr_grid, "--lr-grid"), seeds, root)

    def run_one(cfg: RunConfig, resume: bool) -> dict:
        return simulate(cfg, overwrite=not resume, resume=resume)

    results = run_jobs(jobs, run_one, overwrite=args.overwrite,
                       log=lambda line: print(line, file=sys.stderr))
    print(results_table(select_learning_rates(results)))
    return 0


def results_table(summaries: list[dict[str, Any]]) -> str:
    """Markdown table: method, rounds, test metric, trainable params, bytes per client-round."""
    metric = summaries[0]["metric"] if summaries else "metric"
    swept = sorted({k for s in summaries if "job" in s for k in s["job"].sweep})
    seeds = len({s["job"].seed for s in summaries if "job" in s}) > 1
    grid = any("chosen-lr" in s for s in summaries)
    columns = ["method", *swept, *(["seed"] if seeds else []), "rounds", f"test {metric}",
               f"best {metric}", *(["chosen lr (valid)"] if grid else ["lr"]),
               "trainable params", "MB per client-round", "minutes"]
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for s in summaries:
        job = s.get("job")
        cells = [s["method"], *(job.sweep.get(k, "") if job else "" for k in swept),
                 *([str(job.seed if job else "")] if seeds else []), str(s["rounds"]),
                 _fmt(s["final"].get(metric)), _fmt(s["best"]), f"{s['lr']:g}",
                 f"{s['trainable-params']:,}", f"{s['bytes-per-client-round'] / 1e6:.2f}",
                 f"{s['seconds'] / 60:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _partition(args: argparse.Namespace) -> int:
    from .partition import describe, dirichlet_partition
    from .tasks import make_task

    cfg = load_config(args.config, args.overrides)
    task = make_task(cfg)
    classes = task.partition_classes(task.examples("train"))
    partition = dirichlet_partition(classes, cfg.num_clients, cfg.alpha, cfg.seed, cfg.min_size)
    print(f"task={cfg.task} num-clients={cfg.num_clients} alpha={cfg.alpha} seed={cfg.seed}")
    print(describe(partition))
    return 0


def _methods(args: argparse.Namespace) -> int:
    from .methods import METHODS
    from .budget import budget_table

    cfg = load_config(args.config, args.overrides)
    print(budget_table(cfg, list(METHODS)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
