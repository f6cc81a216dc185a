"""Numbers a report can be trusted for, on hand-made run folders: a retried round's bytes, one
learning rate per SLoRA group however far its runs got, macro-F1 over every class that occurs,
old and new drift records told apart, and report modules that import without a circle."""

import ast
import json
from pathlib import Path

import numpy as np
import pytest

from fedpeft.report import build_report, find_runs, group_runs
from fedpeft.report_tables import (
    bytes_per_client_round,
    drift_table,
    results_table,
    round_seconds,
    time_to_target,
)

MB = 1_000_000


def write_run(root: Path, name: str, method: str, records: list[dict], seed: int = 0,
              rounds: int | None = None, summary: dict | None = None, **settings) -> Path:
    """A run folder with the given round records (missing timing fields filled in)."""
    folder = root / name
    folder.mkdir(parents=True)
    config = {"task": "semeval", "method": method, "rounds": rounds or len(records),
              "seed": seed, "out": str(folder), **settings}
    folder.joinpath("config.toml").write_text(
        "".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items()))
    base = {"clients": [0, 1], "attempts": 1, "successes": 2, "skipped": False, "failures": [],
            "rejected": [], "train-loss": 1.0, "metrics": {}, "bytes-down": 2_500_000,
            "bytes-up": 2_500_000, "seconds": 12.0, "seconds-train": 11.0,
            "seconds-client-max": 10.0, "seconds-aggregate": 0.1, "seconds-eval": 0.9}
    folder.joinpath("rounds.jsonl").write_text("".join(
        json.dumps({**base, "round": i + 1, **r}) + "\n" for i, r in enumerate(records)))
    if summary is not None:
        folder.joinpath("summary.json").write_text(json.dumps(
            {"task": "semeval", "method": method, "metric": "accuracy", "rounds": len(records),
             "trainable-params": 1234, **summary}))
    return folder


# --- 11a: a retried round ---------------------------------------------------------------------
# Round 1: 2 clients, 1.25 MB each way each. Round 2 is retried: attempt 0 sends 1.25 MB to
# clients 0 and 1, neither replies; attempt 1 sends 1.25 MB to clients 2 and 3, both reply with
# 1.25 MB, client 3's update is rejected. The log sums bytes over both attempts (5 MB down,
# 2.5 MB up) but lists only the last attempt's clients [2, 3]; one update counted.
RETRIED = {"clients": [2, 3], "attempts": 2, "successes": 1,
           "failures": [{"client": 0, "attempt": 0, "reason": "timeout"},
                        {"client": 1, "attempt": 0, "reason": "timeout"}],
           "rejected": [{"client": 3, "attempt": 1, "reason": "non-finite"}],
           "bytes-down": 5 * MB, "bytes-up": int(2.5 * MB), "metrics": {"accuracy": 0.5}}


def test_a_retried_rounds_bytes_are_per_successful_client_in_both_tables(tmp_path):
    (run,) = find_runs([write_run(tmp_path, "fedlr", "fedlr", [{}, RETRIED], summary={})])
    # Table 2: (5 + 7.5) MB over 2 + 1 successful client-rounds.
    assert bytes_per_client_round(run) == pytest.approx(12.5 * MB / 3)
    # Table 5, round 1: 5 MB / 2 clients = 2.5 MB = 20 Mbit -> 0.8 s at 25 Mbit/s.
    assert round_seconds(run.rounds[0], 25.0) == pytest.approx((10.0, 0.8))
    # Round 2: 7.5 MB for its one successful client = 60 Mbit -> 2.4 s (not 5 MB / 2 clients
    # down + 2.5 MB / 1 up = 5 MB -> 1.6 s).
    assert round_seconds(run.rounds[1], 25.0) == pytest.approx((10.0, 2.4))
    assert time_to_target(run, "accuracy", 0.5, 25.0) == (2, pytest.approx(10.8 + 12.4))
    # Consistency: the modelled payloads times the successful clients are the logged bytes.
    payloads = [round_seconds(r, 8.0)[1] * 1e6 * r["successes"] for r in run.rounds]
    assert sum(payloads) == pytest.approx(bytes_per_client_round(run) * 3)


def test_a_skipped_round_spreads_its_bytes_over_the_clients_it_sampled(tmp_path):
    skipped = {"successes": 0, "skipped": True, "attempts": 2, "bytes-down": 5 * MB,
               "bytes-up": 0, "seconds-client-max": 0.0}
    (run,) = find_runs([write_run(tmp_path, "fedlr", "fedlr", [{}, skipped])])
    assert round_seconds(run.rounds[1], 25.0) == pytest.approx((0.0, 0.8))  # 2.5 MB each
    assert bytes_per_client_round(run) == pytest.approx(10 * MB / 2)


# --- 11b: macro-F1 ----------------------------------------------------------------------------
def test_macro_f1_counts_a_class_that_is_only_predicted():
    from fedpeft.tasks.classification import macro_f1

    gold, pred = np.array([0, 0, 1, 1]), np.array([0, 0, 1, 2])
    # class 0: F1 1; class 1: tp 1, 1 predicted, 2 gold -> 2/3; class 2 (predicted only): 0
    assert macro_f1(gold, pred) == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert macro_f1(gold, gold) == 1.0
    assert macro_f1(np.array([1, 1]), np.array([0, 0])) == 0.0


# --- 11c: SLoRA's learning rate -------------------------------------------------------------
def test_finished_and_unfinished_slora_runs_are_one_group(tmp_path):
    evals = [{}, {"metrics": {"accuracy": 0.5}}]
    # Finished: the summary logs the method's rate after the last round (stage 2's, 2e-3).
    write_run(tmp_path, "slora-s0", "slora", evals, seed=0, summary={"lr": 2e-3})
    # A newer summary may log stage 1's rate beside it: still the same group.
    write_run(tmp_path, "slora-s1", "slora", evals, seed=1,
              summary={"lr": 2e-3, "slora-stage1-lr": 1e-2})
    # Unfinished (no summary, no lr setting): the default, stage 2's, not stage 1's 1e-2.
    write_run(tmp_path, "slora-s2", "slora", evals[:1], seed=2, rounds=2)
    runs = find_runs([tmp_path])
    assert [r.lr for r in runs] == [2e-3, 2e-3, 2e-3]
    (group,) = group_runs(runs)
    assert group.label == "slora" and len(group.runs) == 3
    assert "| slora | 0.002 | 1,234 |" in results_table([group], "accuracy", [])
    # An lr setting is SLoRA's stage-2 rate, finished or not.
    write_run(tmp_path / "set", "slora-s0", "slora", evals, seed=0, lr=5e-3,
              summary={"lr": 5e-3})
    write_run(tmp_path / "set", "slora-s1", "slora", evals[:1], seed=1, rounds=2, lr=5e-3)
    (group,) = group_runs(find_runs([tmp_path / "set"]))
    assert group.settings["lr"] == 5e-3 and len(group.runs) == 2


def test_precision_auto_is_grouped_by_what_it_ran(tmp_path):
    evals = [{}, {"metrics": {"accuracy": 0.5}}]
    # precision=auto that ran fp32 (a CPU without bf16) and a run that asked for fp32: one
    # precision, so no sweep of it; auto that ran bf16 is another.
    write_run(tmp_path, "fedlr-s0", "fedlr", evals, precision="auto",
              summary={"precision": "fp32"})
    write_run(tmp_path, "fedlr-s1", "fedlr", evals, seed=1, precision="fp32",
              summary={"precision": "fp32"})
    (group,) = group_runs(find_runs([tmp_path]))
    assert group.label == "fedlr" and len(group.runs) == 2
    write_run(tmp_path, "fedlr-s2", "fedlr", evals, seed=2, precision="auto",
              summary={"precision": "bf16"})
    groups = group_runs(find_runs([tmp_path]))
    assert sorted(g.label for g in groups) == ["fedlr precision=bf16", "fedlr precision=fp32"]


# --- 10: drift records of either convention ---------------------------------------------------
def drift(a: float, norms: str | None) -> dict:
    record = {"between": "weights", "mean": {"A": {"magnitude": a, "direction": a / 10},
                                             "B": {"magnitude": a, "direction": a / 10}},
              "layers": {"0": {"query": {"A": {"magnitude": a, "direction": a / 10},
                                         "B": {"magnitude": a, "direction": a / 10}}}}}
    return record if norms is None else {**record, "norms": norms}


def test_drift_records_logged_before_row_norms_are_marked(tmp_path):
    old = write_run(tmp_path / "old", "fedlr", "fedlr",
                    [{"drift": drift(0.2, None)}, {"drift": drift(0.4, None),
                                                   "metrics": {"accuracy": 0.5}}], summary={})
    new = write_run(tmp_path / "new", "federa", "federa",
                    [{"drift": drift(0.1, "rows")}, {"drift": drift(0.3, "rows"),
                                                     "metrics": {"accuracy": 0.6}}], summary={})
    table = drift_table(group_runs(find_runs([old, new])))
    assert "| fedlr | weights | columns | 2 | 0.30000 | 0.03000 | 0.30000 | 0.03000 |" in table
    assert "| federa | weights | rows | 2 | 0.20000 | 0.02000 |" in table
    text = build_report([old, new], out=tmp_path / "out").read_text()
    assert "cannot be recomputed" in text
    assert "cannot be recomputed" not in build_report([new], out=tmp_path / "o2").read_text()


# --- 11d: no import circle among the report modules -----------------------------------------
def test_report_modules_import_each_other_without_a_circle():
    """Every import between fedpeft's report modules (module level, inside functions or under
    TYPE_CHECKING) points one way only."""
    src = Path(__file__).resolve().parent.parent / "src" / "fedpeft"
    modules = {p.stem for p in src.glob("report*.py")}
    edges = {}
    for name in modules:
        found = set()
        for node in ast.walk(ast.parse((src / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= ({node.module} if node.module else {a.name for a in node.names})
        edges[name] = found & modules

    def reaches(start: str, goal: str, seen: frozenset = frozenset()) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n}))
                   for n in edges[start])

    assert {"report", "report_tables", "report_plots"} <= modules
    assert not [m for m in modules if reaches(m, m)], edges
