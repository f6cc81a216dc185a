"""`fedpeft report` on synthetic run folders: seed groups, mean ± std, time to target by hand,
and a smoke test that the markdown and the plots are written; and every committed report is
regenerated from the committed run logs."""

import json
from pathlib import Path

import numpy as np
import pytest

from fedpeft.cli import main
from fedpeft.drift import DriftTracker
from fedpeft.report import build_report, find_runs, group_runs, parse_rounds
from fedpeft.report_tables import (
    choose_target,
    default_rounds,
    fmt_duration,
    one_off_seconds,
    results_table,
    round_time_table,
    sweep_table,
    time_to_target,
    time_to_target_table,
)

# Per round: 2 clients, each receiving and sending 1.25 MB -> 2.5 MB = 20 Mbit per client,
# 0.8 s at 25 Mbit/s; the slowest client trains 10 s -> 10.8 s per modelled round.
ROUND_SECONDS = 10.8


def make_run(root: Path, name: str, method: str, evals: dict[int, float], seed: int = 0,
             rounds: int = 4, lr: float | None = None, valid: dict[int, float] | None = None,
             summary: dict | None = None, drift: bool = False, split: bool = False,
             **settings) -> Path:
    """A run folder as `fedpeft run` leaves it, with the given test metric at given rounds."""
    folder = root / name
    folder.mkdir(parents=True)
    config = {"task": "semeval", "method": method, "rounds": rounds, "seed": seed,
              "alpha": 1.0, "out": str(folder), **settings}
    if lr is not None:
        config["lr"] = lr
    folder.joinpath("config.toml").write_text(
        "".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items()))
    tracker, rng = DriftTracker(), np.random.default_rng(seed)
    key = "base_model.model.bert.encoder.layer.{}.attention.self.query.lora_{}.default.weight"
    tracker.observe({key.format(i, f): rng.normal(size=(4, 3)) for i in (0, 1) for f in "AB"})
    lines = []
    for r in range(1, rounds + 1):
        metrics = {"accuracy": evals[r]} if r in evals else {}
        if valid and r in valid:
            metrics["valid-accuracy"] = valid[r]
        record = {"round": r, "clients": [0, 1], "successes": 2, "failures": [],
                  "train-loss": 1.0, "metrics": metrics, "bytes-down": 2_500_000,
                  "bytes-up": 2_500_000, "seconds": 12.0, "seconds-train": 11.0,
                  "seconds-client-max": 10.0, "seconds-aggregate": 0.1, "seconds-eval": 0.9}
        if split:  # 2 clients x 4 s training, 0.5 s handling each; round 1 has 3 s of start-up
            record.update({"seconds-clients": 8.0, "seconds-handlers": 9.0 + 3 * (r == 1)})
        if drift:
            record["drift"] = tracker.observe(
                {key.format(i, f): rng.normal(size=(4, 3)) for i in (0, 1) for f in "AB"})
        lines.append(json.dumps(record))
    folder.joinpath("rounds.jsonl").write_text("\n".join(lines) + "\n")
    if summary is not None:
        folder.joinpath("summary.json").write_text(json.dumps(
            {"task": "semeval", "method": method, "metric": "accuracy", "rounds": rounds,
             "lr": lr if lr is not None else 1e-3, "trainable-params": 1234, **summary}))
    hist = [[5, 0, 1], [0, 6, 0], [2, 2, 2]]
    folder.joinpath("partition.json").write_text(json.dumps(
        {"num-clients": 3, "alpha": 1.0, "seed": seed, "classes": ["a", "b", "c"],
         "sizes": [6, 6, 6], "histograms": hist}))
    return folder


def test_runs_differing_only_in_seed_are_one_group_with_mean_and_sample_std(tmp_path):
    make_run(tmp_path, "fedlr-s0", "fedlr", {2: 0.4, 4: 0.5}, seed=0, summary={})
    make_run(tmp_path, "fedlr-s1", "fedlr", {2: 0.2, 4: 0.7}, seed=1, summary={})
    make_run(tmp_path, "federa-s0", "federa", {2: 0.6, 4: 0.8}, seed=0, summary={})
    groups = group_runs(find_runs([tmp_path]))
    assert [(g.label, len(g.runs)) for g in groups] == [("fedlr", 2), ("federa", 1)]
    table = results_table(groups, "accuracy", [2, 4])
    # fedlr @4: mean(0.5, 0.7) = 0.6, sample std = sqrt(((-.1)^2 + .1^2) / 1) = 0.1414
    assert "| fedlr | 0.001 | 1,234 | 2.50 | 2 | 4 | 0.3000 ± 0.1414 | 0.6000 ± 0.1414 | " \
           "0.6000 ± 0.1414 |" in table
    assert "| federa | 0.001 | 1,234 | 2.50 | 1 | 4 | 0.6000 | 0.8000 | 0.8000 |" in table


def test_settings_that_differ_split_groups_and_name_them(tmp_path):
    make_run(tmp_path, "a", "fedlr", {4: 0.5}, alpha=0.1)
    make_run(tmp_path, "b", "fedlr", {4: 0.6}, alpha=1.0, device="cuda")  # device: same group
    make_run(tmp_path, "c", "fedlr", {4: 0.7}, alpha=1.0, seed=3)
    labels = [(g.label, len(g.runs)) for g in group_runs(find_runs([tmp_path]))]
    assert labels == [("fedlr alpha=0.1", 1), ("fedlr alpha=1", 2)]


def test_groups_of_a_numeric_sweep_are_in_numeric_order(tmp_path):
    for rank in (16, 4, 64, 8):  # as strings: 16 < 4 < 64 < 8
        make_run(tmp_path, f"federa-r{rank}", "federa", {4: 0.5}, **{"lora-rank": rank})
    make_run(tmp_path, "fedlr-r32", "fedlr", {4: 0.5}, **{"lora-rank": 32})
    labels = [g.label for g in group_runs(find_runs([tmp_path]))]
    assert labels == ["fedlr lora-rank=32", "federa lora-rank=4", "federa lora-rank=8",
                      "federa lora-rank=16", "federa lora-rank=64"]


def test_a_family_setting_is_named_only_for_the_methods_that_use_it(tmp_path):
    make_run(tmp_path, "fedft", "fedft", {4: 0.5})  # adapter-reduction: the default, 16
    make_run(tmp_path, "fedap-6", "fedap", {4: 0.5}, **{"adapter-reduction": 6})
    make_run(tmp_path, "fedap-16", "fedap", {4: 0.5}, **{"adapter-reduction": 16})
    make_run(tmp_path, "fedlr", "fedlr", {4: 0.5})
    labels = [g.label for g in group_runs(find_runs([tmp_path]))]
    assert labels == ["fedft", "fedap adapter-reduction=6", "fedap adapter-reduction=16", "fedlr"]


def test_learning_rate_chosen_on_validation_not_test(tmp_path):
    make_run(tmp_path, "lr1", "fedlr", {4: 0.9}, lr=1e-3, valid={4: 0.4}, summary={},
             **{"valid-fraction": 0.1})
    lr2 = make_run(tmp_path, "lr2", "fedlr", {4: 0.5}, lr=2e-3, valid={4: 0.6},
                   **{"valid-fraction": 0.1})
    # lr2 has not finished: no choice yet, both rates side by side.
    assert len(group_runs(find_runs([tmp_path]))) == 2
    lr2.joinpath("summary.json").write_text(json.dumps(
        {"task": "semeval", "method": "fedlr", "metric": "accuracy", "rounds": 4, "lr": 2e-3,
         "trainable-params": 1234}))
    (group,) = group_runs(find_runs([tmp_path]))
    assert group.settings["lr"] == 2e-3 and group.lr_note == "chosen on valid-accuracy from 2"
    assert "| fedlr | 0.002 (chosen on valid-accuracy from 2) |" in results_table(
        [group], "accuracy", [])


def test_a_server_rate_is_chosen_on_validation_when_asked(tmp_path):
    for name, server_lr, test, valid in (("a", 1e-3, 0.9, 0.3), ("b", 1e-2, 0.4, 0.5)):
        make_run(tmp_path, name, "fedlr", {4: test}, lr=5e-3, valid={4: valid}, summary={},
                 strategy="fedadam", **{"server-lr": server_lr, "valid-fraction": 0.1})
    make_run(tmp_path, "avg", "fedlr", {4: 0.6}, lr=5e-3, valid={4: 0.7}, summary={},
             **{"valid-fraction": 0.1})
    # without --choose, both server rates are rows of their own
    assert len(group_runs(find_runs([tmp_path]))) == 3
    groups = group_runs(find_runs([tmp_path]), choose=["server-lr"])
    fedadam = [g for g in groups if g.settings.get("strategy") == "fedadam"]
    assert [g.settings["server-lr"] for g in fedadam] == [1e-2]  # best valid, not best test
    assert fedadam[0].lr_note == "server-lr chosen on valid-accuracy from 2"
    assert len(groups) == 2
    with pytest.raises(ValueError, match="--choose server-rate: not a setting"):
        build_report([tmp_path], out=tmp_path / "report", choose=["server-rate"])


def test_a_tie_on_validation_keeps_the_tied_settings_side_by_side(tmp_path):
    for name, server_lr, test, valid in (("a", 1e-3, 0.9, 0.5), ("b", 1e-2, 0.4, 0.5),
                                         ("c", 1e-1, 0.8, 0.2)):
        make_run(tmp_path, name, "fedlr", {4: test}, lr=5e-3, valid={4: valid}, summary={},
                 strategy="fedadam", **{"server-lr": server_lr, "valid-fraction": 0.1})
    groups = group_runs(find_runs([tmp_path]), choose=["server-lr"])
    assert [g.settings["server-lr"] for g in groups] == [1e-3, 1e-2]  # not the best test one
    assert [g.lr_note for g in groups] == ["server-lr tied on valid-accuracy: 2 of 3"] * 2
    assert [g.label for g in groups] == ["fedlr server-lr=0.001", "fedlr server-lr=0.01"]


def test_rates_without_validation_are_kept_side_by_side(tmp_path):
    make_run(tmp_path, "lr1", "fedlr", {4: 0.9}, lr=1e-3)
    make_run(tmp_path, "lr2", "fedlr", {4: 0.5}, lr=2e-3)
    assert [g.label for g in group_runs(find_runs([tmp_path]))] == ["fedlr lr=0.001",
                                                                     "fedlr lr=0.002"]


def test_time_to_target_by_hand(tmp_path):
    fedlr = make_run(tmp_path, "fedlr", "fedlr", {2: 0.5, 4: 0.8}, summary={})
    federa = make_run(tmp_path, "federa", "federa", {2: 0.75, 4: 0.7},
                      summary={"seconds-setup": 5.0})
    never = make_run(tmp_path, "fedft", "fedft", {2: 0.1, 4: 0.2}, summary={})
    runs = {r.method: r for r in find_runs([fedlr, federa, never])}
    groups = group_runs(list(runs.values()))
    assert choose_target(groups, "accuracy") == (0.8, "fedlr")
    # 90% of 0.8 = 0.72: fedlr first reaches it at round 4 -> 4 modelled rounds.
    assert time_to_target(runs["fedlr"], "accuracy", 0.72, 25.0) == (4, pytest.approx(
        4 * ROUND_SECONDS))
    # FeDeRA reaches 0.75 at round 2; its one-off (set-up, no seconds-svd logged) counts once.
    assert one_off_seconds(runs["federa"]) == (5.0, "seconds-setup")
    assert time_to_target(runs["federa"], "accuracy", 0.72, 25.0) == (2, pytest.approx(
        5.0 + 2 * ROUND_SECONDS))
    assert time_to_target(runs["fedft"], "accuracy", 0.72, 25.0) is None
    assert one_off_seconds(runs["fedft"]) == (0.0, "")
    # At 10 Mbit/s the 20 Mbit per client-round take 2 s.
    assert time_to_target(runs["fedlr"], "accuracy", 0.72, 10.0)[1] == pytest.approx(4 * 12.0)
    table = time_to_target_table(groups, "accuracy", 0.8, 25.0)
    assert "| fedft | 10.0 | 0.80 | 0.0 | - | - | - | - | - | - |" in table
    assert "| fedlr | 10.0 | 0.80 | 0.0 | 4 | 43.2 s | 4 | 43.2 s | 4 | 43.2 s |" in table
    # 95% of 0.8 = 0.76: FeDeRA never gets there.
    assert "| federa | 10.0 | 0.80 | 5.0 (setup) | 2 | 26.6 s | - | - | - | - |" in table


def test_logged_svd_time_is_preferred_and_partial_seeds_are_marked(tmp_path):
    make_run(tmp_path, "s0", "federa", {2: 0.6, 4: 0.9}, seed=0,
             summary={"seconds-setup": 5.0, "seconds-svd": 1.5})
    make_run(tmp_path, "s1", "federa", {2: 0.5, 4: 0.6}, seed=1,
             summary={"seconds-setup": 5.0, "seconds-svd": 1.5})
    groups = group_runs(find_runs([tmp_path]))
    assert one_off_seconds(groups[0].runs[0]) == (1.5, "seconds-svd")
    # Target 0.6: seed 0 reaches 90% (0.54) at round 2, seed 1 at round 4: 3 ± 1.4 rounds.
    table = time_to_target_table(groups, "accuracy", 0.6, 25.0, fractions=[0.9, 2.0])
    t0, t1 = 1.5 + 2 * ROUND_SECONDS, 1.5 + 4 * ROUND_SECONDS
    std = np.std([t0, t1], ddof=1)
    assert f"| 3 ± 1.4 | {fmt_duration((t0 + t1) / 2, std)} | - | - |" in table
    table = time_to_target_table(groups, "accuracy", 0.9, 25.0, fractions=[1.0])
    assert f"| 4 (1/2) | {fmt_duration(t1)} (1/2) |" in table


def test_slora_without_logged_svd_counts_its_slowest_aggregation(tmp_path):
    (run,) = find_runs([make_run(tmp_path, "slora", "slora", {4: 0.5}, summary={})])
    assert one_off_seconds(run) == (0.1, "seconds-aggregate")  # every round aggregates in 0.1 s


def test_default_rounds_and_durations(tmp_path):
    a = make_run(tmp_path, "a", "fedlr", {r: 0.1 for r in range(2, 101, 2)}, rounds=100)
    b = make_run(tmp_path, "b", "federa", {r: 0.1 for r in range(5, 101, 5)}, rounds=100)
    c = make_run(tmp_path, "c", "fedft", {2: 0.1, 4: 0.2, 6: 0.3, 8: 0.4}, rounds=8)
    assert default_rounds(find_runs([a, b]), "accuracy") == [10, 50, 100]
    assert default_rounds(find_runs([c]), "accuracy") == [2, 6, 8]  # spread over 2, 4, 6, 8
    assert parse_rounds("10, 50,100") == [10, 50, 100] and parse_rounds(None) is None
    with pytest.raises(ValueError, match="--rounds"):
        parse_rounds("ten")
    assert fmt_duration(43.2) == "43.2 s"
    assert fmt_duration(600, 60) == "10.0 ± 1.0 min"
    assert fmt_duration(9000) == "2.5 h"


def test_unfinished_run_with_a_broken_last_line(tmp_path):
    folder = make_run(tmp_path, "live", "federa", {2: 0.3}, rounds=3)
    folder.joinpath("config.toml").write_text(
        folder.joinpath("config.toml").read_text().replace("rounds = 3", "rounds = 10"))
    with open(folder / "rounds.jsonl", "a") as fh:
        fh.write('{"round": 4, "clie')  # killed mid-write
    (run,) = find_runs([tmp_path])
    assert len(run.rounds) == 3 and run.summary is None
    assert "| federa | 0.001 | - | 2.50 | 1 | 3/10 | 0.3000 |" in results_table(
        group_runs([run]), "accuracy", [2])


def test_report_writes_markdown_and_plots(tmp_path):
    runs = tmp_path / "runs"
    for seed in (0, 1):
        make_run(runs, f"fedlr-s{seed}", "fedlr", {2: 0.3 + seed / 10, 4: 0.5}, seed=seed,
                 summary={}, drift=True)
        make_run(runs, f"federa-s{seed}", "federa", {2: 0.6, 4: 0.7 + seed / 10}, seed=seed,
                 summary={"seconds-setup": 2.0}, drift=True)
    assert main(["report", str(runs), "--out", str(tmp_path / "out"), "--rounds", "2,4"]) == 0
    out = tmp_path / "out"
    text = (out / "REPORT.md").read_text()
    assert "| federa | 0.001 | 1,234 | 2.50 | 2 | 4 | 0.6000 ± 0.0000 | 0.7500 ± 0.0707 |" in text
    assert "Target accuracy = 0.7500" in text and "reached by federa" in text
    assert "## semeval: drift of the LoRA factors" in text
    expected = ["accuracy-vs-round.png", "accuracy-vs-bytes.png", "drift.png",
                "drift-layers.png", "partition-semeval-a1.0-n3-s0.png",
                "partition-semeval-a1.0-n3-s1.png"]
    for name in expected:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name})" in text
    # Every run read is listed, with its own numbers.
    assert text.count("| semeval | fedlr |") == 2 and "runs/fedlr-s1" in text


def test_report_before_any_evaluation(tmp_path):
    make_run(tmp_path / "runs", "fedlr-s0", "fedlr", {}, rounds=3)
    text = build_report([tmp_path / "runs"]).read_text()
    assert "No run has evaluated accuracy yet" in text
    assert "Target accuracy = 0.2500" in build_report([tmp_path / "runs"], target=0.25).read_text()


def test_report_default_output_beside_the_runs_and_errors(tmp_path):
    make_run(tmp_path / "runs", "only", "fedlr", {4: 0.5})
    assert build_report([tmp_path / "runs"]) == tmp_path / "runs" / "report" / "REPORT.md"
    with pytest.raises(ValueError, match="no such folder"):
        build_report([tmp_path / "missing"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no run"):
        build_report([empty])


def test_round_time_split_by_hand(tmp_path):
    make_run(tmp_path, "fedlr-s0", "fedlr", {4: 0.5}, summary={}, split=True)
    make_run(tmp_path, "federa-s0", "federa", {4: 0.6}, summary={})  # logged before the split
    table = round_time_table(group_runs(find_runs([tmp_path])))
    # rounds 2-4: 12 s each - 0.9 evaluation = 8 training + 1 handling + (11 - 9) transport
    # + 0.1 aggregation; 0.9 s for the one evaluation (round 4)
    assert "| fedlr | 3 | 11.1 | 8.00 | 1.00 | 2.00 | 0.10 | 72% | 0.9 | - |" in table
    assert "federa" not in table
    text = build_report([tmp_path], out=tmp_path / "out").read_text()
    assert "where a round's time goes" in text


def test_round_time_shows_the_local_evaluation_share(tmp_path):
    run = make_run(tmp_path, "fedlr-s0", "fedlr", {2: 0.5, 4: 0.6}, summary={}, split=True)
    lines = (run / "rounds.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    for record, local in zip(records[1::2], (0.3, 0.5), strict=True):  # rounds 2 and 4
        record["seconds-eval-local"] = local
    (run / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    table = round_time_table(group_runs(find_runs([tmp_path])))
    assert "| 72% | 0.9 | 0.4 |" in table  # the mean over the two evaluations


def test_round_time_of_parallel_workers_is_not_split(tmp_path):
    """Two workers: the clients' handler seconds (2 x 9 s) exceed the 11 s train phase; the
    sums are shown as sums, and no transport time or training share is made up."""
    run = make_run(tmp_path, "fedlr-s0", "fedlr", {4: 0.5}, summary={}, split=True)
    lines = (run / "rounds.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    for record in records:
        record.update({"seconds-clients": 16.0, "seconds-handlers": 18.0})
    (run / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    table = round_time_table(group_runs(find_runs([tmp_path])))
    assert "| fedlr | 3 | 11.1 | 16.00 (sum) | 2.00 (sum) | - | 0.10 | - | 0.9 | - |" in table


def test_up_to_compares_runs_of_different_lengths_at_equal_rounds(tmp_path):
    make_run(tmp_path, "federa-long", "federa", {2: 0.4, 4: 0.6, 6: 0.9}, rounds=6, summary={})
    make_run(tmp_path, "federa-exact", "federa", {2: 0.5, 4: 0.7}, rounds=4,
             aggregation="exact-lora")  # unfinished: no summary, lr is the method's default
    text = build_report([tmp_path], out=tmp_path / "out", up_to=4).read_text()
    # rounds 2 and 4 of the 6-round run only: final = round 4's 0.6, not round 6's 0.9
    assert ("| federa aggregation=fedavg | 0.001 | 1,234 | 2.50 | 1 | 4 | 0.4000 | 0.6000 "
            "| 0.6000 |") in text
    assert "| federa aggregation=exact-lora | 0.001 |" in text and "0.9000" not in text
    with pytest.raises(ValueError, match="up-to"):
        build_report([tmp_path], out=tmp_path / "out", up_to=0)


REPO = Path(__file__).resolve().parent.parent
COMMITTED = sorted([*REPO.glob("docs/results/*/REPORT.md"),
                    *REPO.glob("benchmarks/results/*/REPORT.md")])


@pytest.mark.parametrize("report", COMMITTED, ids=lambda p: str(p.parent.relative_to(REPO)))
def test_committed_reports_regenerate_from_committed_logs(report, tmp_path, monkeypatch):
    """Every published REPORT.md is what its own command prints today from the run logs in the
    repository: the logs it reads are committed and nothing in it was typed by hand."""
    import shlex

    first = next(line for line in report.read_text().splitlines() if line.startswith("Generated"))
    args = shlex.split(first.split("`")[1])[1:]  # without the leading `fedpeft`
    out = args[args.index("--out") + 1]
    args[args.index("--out") + 1] = str(tmp_path)
    monkeypatch.chdir(REPO)
    assert main(args) == 0
    fresh = (tmp_path / "REPORT.md").read_text().replace(str(tmp_path), out)
    assert fresh == report.read_text()


def test_sweep_pivots_methods_against_the_swept_setting(tmp_path):
    runs = tmp_path / "runs"
    for alpha, fedlr, federa in ((10.0, 0.7, 0.8), (0.1, 0.3, 0.5), (1.0, 0.6, 0.75)):
        make_run(runs, f"fedlr-a{alpha}", "fedlr", {4: fedlr}, alpha=alpha, summary={})
        make_run(runs, f"federa-a{alpha}", "federa", {4: federa}, alpha=alpha, summary={})
    make_run(runs, "federa-a0.1-s1", "federa", {4: 0.3}, alpha=0.1, seed=1, summary={})
    make_run(runs, "fedlr-a0.5", "fedlr", {2: 0.4}, alpha=0.5, rounds=4)  # cut at round 2
    text = (runs / "fedlr-a0.5" / "rounds.jsonl").read_text().splitlines()
    (runs / "fedlr-a0.5" / "rounds.jsonl").write_text("\n".join(text[:2]) + "\n")
    out = tmp_path / "out"
    report = build_report([runs], out=out).read_text()
    assert "## semeval: final accuracy vs alpha (FeDeRA Fig. 5)" in report
    assert "| alpha | fedlr final accuracy | federa final accuracy |" in report
    rows = [line for line in report.splitlines() if line.startswith("| 0.1 |")
            or line.startswith("| 0.5 |") or line.startswith("| 1 |") or line.startswith("| 10 |")]
    # Numeric order; federa at 0.1: mean(0.5, 0.3) = 0.4, std sqrt(2 * 0.1^2) = 0.1414.
    assert rows == ["| 0.1 | 0.3000 | 0.4000 ± 0.1414 |", "| 0.5 | 0.4000 (r 2/4) |  |",
                    "| 1 | 0.6000 | 0.7500 |", "| 10 | 0.7000 | 0.8000 |"]
    assert (out / "accuracy-vs-alpha.png").read_bytes()[:4] == b"\x89PNG"
    assert "](accuracy-vs-alpha.png)" in report


def test_budget_sweep_shows_the_trainable_parameters_of_each_setting(tmp_path):
    for rank, params, accuracy in ((4, 100, 0.5), (32, 800, 0.6)):
        make_run(tmp_path, f"fedlr-r{rank}", "fedlr", {4: accuracy}, summary={
            "trainable-params": params}, **{"lora-rank": rank, "lora-alpha": rank})
    groups = group_runs(find_runs([tmp_path]))
    table = sweep_table(groups, "accuracy", ["lora-alpha", "lora-rank"])
    report = build_report([tmp_path], out=tmp_path / "out").read_text()
    assert "![final accuracy vs lora-alpha, lora-rank](accuracy-vs-lora-alpha-lora-rank.png)" \
        in report and table in report
    assert table.splitlines()[0] == ("| lora-alpha | lora-rank | trainable params | "
                                     "fedlr final accuracy |")
    assert table.splitlines()[2:] == ["| 4 | 4 | 100 | 0.5000 |", "| 32 | 32 | 800 | 0.6000 |"]
    # One method, nothing varying: no sweep section.
    assert "FeDeRA Fig. 6" in report
    assert "final accuracy vs" not in build_report([tmp_path / "fedlr-r4"]).read_text()


def test_dp_runs_get_their_privacy_spent_beside_the_metric(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs, "federa-dp", "federa", {4: 0.2}, summary={"privacy": {
        "epsilon": 12.3456, "delta": 0.00631, "releases": 4}}, **{
        "dp": "client-fixed", "dp-noise-multiplier": 0.3, "dp-clipping-norm": 1.0,
        "clients-per-round": 2})
    unfinished = make_run(runs, "federa-dp-adaptive", "federa", {4: 0.25}, **{
        "dp": "client-adaptive", "dp-noise-multiplier": 0.3, "dp-clipping-norm": 0.1})
    make_run(runs, "federa-plain", "federa", {4: 0.5}, summary={})
    text = build_report([runs]).read_text()
    section = text.split("differential privacy spent")[1].split("##")[0]
    rows = [line for line in section.splitlines() if line.startswith("| federa")]
    assert len(rows) == 2  # the run without DP is not in the table
    assert rows[0].endswith("| 0 | client-fixed | 0.3 | 1.0 | 2 | 4 | 12.35 | 0.00631 | 4 "
                            "| 0.2000 |")
    # the unfinished adaptive run has no summary and logged no epsilon
    assert rows[1].endswith("| client-adaptive | 0.3 | 0.1 | 10 | 4 | none: not logged | - | - "
                            "| 0.2500 |")
    assert unfinished.name in text


def test_heterogeneous_ranks_get_their_traffic_per_rank(tmp_path):
    runs = tmp_path / "runs"
    folder = make_run(runs, "flora-s0", "flora", {2: 0.3}, rounds=2, summary={})
    lines = folder.joinpath("rounds.jsonl").read_text().splitlines()
    by_rank = [  # round 1: ranks 4 and 8 once each; round 2: rank 4 twice
        {"4": {"clients": 1, "bytes-down": 1_000_000, "bytes-up": 200_000},
         "8": {"clients": 1, "bytes-down": 3_000_000, "bytes-up": 400_000}},
        {"4": {"clients": 2, "bytes-down": 5_000_000, "bytes-up": 400_000}}]
    records = [dict(json.loads(line), **{"bytes-by-rank": b})
               for line, b in zip(lines, by_rank, strict=True)]
    folder.joinpath("rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    make_run(runs, "fedlr-s0", "fedlr", {2: 0.2}, rounds=2, summary={})  # homogeneous: no rows
    text = build_report([runs]).read_text()
    section = text.split("traffic per client rank")[1].split("##")[0]
    rows = [line for line in section.splitlines() if line.startswith("| f")]
    # rank 4: 3 client-rounds, 6 MB down, 0.6 MB up; rank 8: 1 client-round, 3 MB, 0.4 MB
    assert rows == ["| flora | 4 | 3 | 2.000 | 0.200 |", "| flora | 8 | 1 | 3.000 | 0.400 |"]
    plain = tmp_path / "plain"
    make_run(plain, "fedlr-s0", "fedlr", {2: 0.2}, rounds=2, summary={})
    assert "traffic per client rank" not in build_report([plain]).read_text()
