"""The paper's tables beside ours (`fedpeft paper`): the data file, the verdicts, the decision
table, and the committed page regenerating from the committed logs."""

import re
import shlex
from pathlib import Path

import pytest
from test_report import make_run

from fedpeft.cli import main
from fedpeft.decision import decision_rows, short_answers
from fedpeft.paper import NAMES, compare_pair, paper_page, paper_tables, verdict
from fedpeft.report_model import find_runs, group_runs

REPO = Path(__file__).resolve().parents[1]
SHARED_TABLES = REPO.parent / "shared" / "PAPER-TABLES.md"


def test_transcribed_tables_match_the_markdown_they_came_from():
    """Every number of Tables 2 and 3 in the data file is the one in the transcription (when
    ../shared is beside the repository); Table 1's protocol is the paper's."""
    if not SHARED_TABLES.exists():
        pytest.skip(f"{SHARED_TABLES} is not beside this clone")
    text = SHARED_TABLES.read_text()
    data = paper_tables()
    rows = [((m, line.split("|")[2].strip()), line) for line in text.splitlines()
            if (m := line.split("|")[1].strip() if line.startswith("| ") else None)
            in ("RoBERTa", "DeBERTaV3")]
    names = {"FedFT": "fedft", "FedBF": "fedbf", "FedAP": "fedap", "FedLR": "fedlr",
             "FeDeRA": "federa"}
    checked = 0
    for (model, name), line in rows:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 9 or "±" not in cells[3]:  # Table 2 rows only
            continue
        expected = [float(c.split("±")[0]) for c in cells[3:9]]
        got = [v[0] for v in data["results"]["20news"]["rows"][model][names[name]]] + \
              [v[0] for v in data["results"]["semeval"]["rows"][model][names[name]]]
        assert got == expected, (model, name)
        checked += 1
    assert checked == 10
    assert data["protocol"]["squad"]["clients"] == 300
    assert data["protocol"]["wnut17"]["alpha"] == 0.1


def test_verdicts_call_differences_within_the_spread_level():
    assert verdict(0.5, 1.0, paper=5.0) == "level"
    assert verdict(2.0, 1.0, paper=5.0) == "agrees"
    assert verdict(-2.0, 1.0, paper=5.0) == "disagrees"
    assert verdict(2.0, None, paper=5.0).startswith("ahead (1 seed, not established, same sign")
    assert "opposite sign" in verdict(-2.0, None, paper=5.0)


def _scored(tmp_path, finals: dict[str, list[float]], **settings):
    for method, values in finals.items():
        for seed, value in enumerate(values):
            make_run(tmp_path, f"{method}-s{seed}", method, {4: value}, seed=seed,
                     summary={"final": {"accuracy": value}}, **settings)
    return group_runs(find_runs([tmp_path]))


def test_spread_is_the_larger_std_of_the_two_groups(tmp_path):
    groups = {g.method: g for g in _scored(tmp_path, {"federa": [0.70, 0.72, 0.74],
                                                      "fedlr": [0.60, 0.61, 0.62]})}
    from fedpeft.paper import score

    a, b = score(groups["federa"], "accuracy"), score(groups["fedlr"], "accuracy")
    diff, spread = compare_pair(a, b)
    assert diff == pytest.approx(11.0)
    assert spread == pytest.approx(2.0)  # std of 70, 72, 74 (points), the larger one


def test_decision_table_names_the_best_and_says_no_difference_within_the_spread(tmp_path):
    clear = _scored(tmp_path / "clear", {"federa": [0.70, 0.72, 0.74],
                                         "fedlr": [0.60, 0.61, 0.62]})
    (row,) = decision_rows(clear)
    assert (row["best"], row["runner-up"], row["level"]) == ("federa", "fedlr", False)
    assert row["budget"] == "1-10 MB"  # 5 MB per client-round in make_run's rounds
    close = _scored(tmp_path / "close", {"federa": [0.70, 0.72, 0.74],
                                         "fedlr": [0.69, 0.71, 0.73]})
    (row,) = decision_rows(close)
    assert row["best"] == "federa" and row["level"] is True
    page = paper_page([tmp_path / "close"])
    assert "no difference" in page


def test_a_comparison_at_the_majority_class_recommends_nothing(tmp_path):
    """Two methods both still predicting the commonest class: no best, whatever the order."""
    bar = {"accuracy": 0.1671, "label": "Other"}
    for method, value in (("fedlr", 0.1671), ("federa", 0.1700)):
        make_run(tmp_path, method, method, {4: value},
                 summary={"final": {"accuracy": value}, "baseline": bar})
    (row,) = decision_rows(group_runs(find_runs([tmp_path])))
    assert row["best"] == "federa" and row["learned"] is False  # 0.29 points above the bar
    page = paper_page([tmp_path])
    assert "nothing learned: the best is at the majority class (16.71)" in page
    assert "| best (1 seed" not in page


def test_an_exact_tie_is_no_difference_even_with_one_seed(tmp_path):
    rows = decision_rows(_scored(tmp_path, {"federa": [0.70], "fedlr": [0.70]}))
    assert rows[0]["level"] is True and rows[0]["learned"] is True
    assert "| no difference |" in paper_page([tmp_path])


def test_short_answer_takes_the_broadest_comparison_that_learned(tmp_path):
    """Same task, alpha and budget, three experiments: the one comparing three methods wins
    over a two-method one with a better best, and a three-method one that learned nothing."""
    bar = {"accuracy": 0.20, "label": "Other"}
    for name, rounds, finals in (("narrow", 4, {"fedlr": 0.80, "federa": 0.70}),
                                 ("broad", 6, {"fedlr": 0.60, "federa": 0.65, "slora": 0.62}),
                                 ("flat", 8, {"fedlr": 0.20, "federa": 0.20, "slora": 0.20})):
        for method, value in finals.items():
            make_run(tmp_path / name, method, method, {rounds: value}, rounds=rounds,
                     summary={"final": {"accuracy": value}, "baseline": bar})
    rows = decision_rows(group_runs(find_runs([tmp_path])))
    assert len(rows) == 3
    (answer,) = short_answers(rows)
    assert (answer["best"], answer["methods"], answer["rounds"]) == ("federa", 3, 6)
    page = paper_page([tmp_path]).splitlines()
    short = page[page.index("Every experiment:") - 2]
    assert short.startswith("| semeval | 1 | 1-10 MB | FeDeRA | 65.00 accuracy | +3.00 over SLoRA")
    assert "3 methods, 1 seed, " in short and "6 rounds" in short


def test_unfinished_runs_are_not_in_the_decision_table(tmp_path):
    make_run(tmp_path, "federa", "federa", {4: 0.7}, rounds=4, summary={})
    make_run(tmp_path, "fedlr", "fedlr", {2: 0.6}, rounds=4)
    folder = tmp_path / "fedlr"
    lines = folder.joinpath("rounds.jsonl").read_text().splitlines()[:2]
    folder.joinpath("rounds.jsonl").write_text("\n".join(lines) + "\n")
    assert decision_rows(group_runs(find_runs([tmp_path]))) == []


def test_page_puts_the_papers_numbers_beside_ours(tmp_path):
    _scored(tmp_path, {"federa": [0.70], "fedlr": [0.75]})
    page = paper_page([tmp_path])
    row = next(line for line in page.splitlines() if line.startswith("| FeDeRA"))
    assert "70.00" in row and "80.74 ± 0.60" in row  # ours, then the paper's RoBERTa @200
    claim = next(line for line in page.splitlines() if line.startswith("- FeDeRA vs FedLR"))
    assert "ours -5.00" in claim and "paper +5.93" in claim and "opposite sign" in claim


def test_robustness_claim_compares_each_methods_drop_between_the_alpha_ends(tmp_path):
    for alpha, finals in ((0.1, {"federa": 0.60, "fedlr": 0.40}),
                          (1.0, {"federa": 0.70, "fedlr": 0.72})):
        for method, value in finals.items():
            make_run(tmp_path, f"{method}-a{alpha}", method, {4: value}, alpha=alpha,
                     summary={"final": {"accuracy": value}})
    page = paper_page([tmp_path])
    line = next(x for x in page.splitlines() if "Dir(1) -> Dir(0.1)" in x)
    assert "FeDeRA 70.00 -> 60.00 (-10.00)" in line and "FedLR 72.00 -> 40.00 (-32.00)" in line
    verdict_line = next(x for x in page.splitlines() if "FeDeRA's drop vs FedLR's" in x)
    assert "-10.00 vs -32.00 -> ahead (1 seed" in verdict_line


def test_robustness_sweep_names_a_local_hold_out_that_differs_by_alpha(tmp_path):
    """Dir(1) held out 10% of every shard for local validation, Dir(0.1) none: one sweep, the
    difference named; a method at the majority class at Dir(1) is left out, not compared."""
    bar = {"accuracy": 0.20, "label": "Other"}
    for alpha, held, finals in ((0.1, 0.0, {"federa": 0.60, "fedlr": 0.40, "fedsa-lora": 0.20}),
                                (1.0, 0.1, {"federa": 0.70, "fedlr": 0.72, "fedsa-lora": 0.20})):
        for method, value in finals.items():
            make_run(tmp_path, f"{method}-a{alpha}", method, {4: value}, alpha=alpha,
                     **{"local-valid-fraction": held},
                     summary={"final": {"accuracy": value}, "baseline": bar})
    page = paper_page([tmp_path]).splitlines()
    line = next(x for x in page if "Dir(1) -> Dir(0.1)" in x)
    assert "(local-valid-fraction 0.1 at Dir(1), 0 at Dir(0.1))" in line
    assert "FedLR 72.00 -> 40.00 (-32.00)" in line
    assert line.endswith("; FedSA-LoRA left out (at the majority class at Dir(1))")
    assert not any("FeDeRA's drop vs FedSA-LoRA's" in x for x in page)
    assert any(x.startswith("  - FeDeRA's drop vs FedLR's: -10.00 vs -32.00 -> ahead")
               for x in page)


def test_drift_claim_is_the_ratio_of_mean_logged_drift(tmp_path):
    make_run(tmp_path, "federa", "federa", {4: 0.7}, drift=True, seed=1, summary={})
    make_run(tmp_path, "fedlr", "fedlr", {4: 0.7}, drift=True, seed=1, summary={})
    from fedpeft.claims import mean_drift

    groups = {g.method: g for g in group_runs(find_runs([tmp_path]))}
    a, b = mean_drift(groups["federa"]), mean_drift(groups["fedlr"])
    assert a == b  # the same seed draws the same drift in make_run
    page = paper_page([tmp_path])
    line = next(x for x in page.splitlines() if x.startswith("- semeval") and "magnitude" in x)
    assert "A magnitude 1.00" in line and "disagrees in part" in line  # equal is not less


def test_budget_claim_pairs_each_baseline_with_the_nearest_federa(tmp_path):
    """A rank sweep (FeDeRA and FedLR at ranks 4 and 8) and one BitFit run: each baseline point
    against the FeDeRA configuration nearest in trainable parameters."""
    for method, rank, params, value in (("federa", 4, 100_000, 0.70), ("federa", 8, 200_000, 0.72),
                                        ("fedlr", 4, 100_000, 0.71), ("fedlr", 8, 200_000, 0.60),
                                        ("fedbf", 32, 30_000, 0.50)):
        make_run(tmp_path, f"{method}-r{rank}", method, {4: value}, **{"lora-rank": rank},
                 summary={"final": {"accuracy": value}, "trainable-params": params})
    page = paper_page([tmp_path]).splitlines()
    start = next(i for i, x in enumerate(page) if x.startswith("Budget (Fig. 6"))
    section = page[start + 1:page.index("", start)]
    assert any(x.startswith("  - FeDeRA 0.10M (70.00) vs FedBF 0.03M (50.00): +20.00 -> ahead "
                            "(1 seed")
               for x in section)
    assert any(x.startswith("  - FeDeRA 0.10M (70.00) vs FedLR 0.10M (71.00): -1.00 -> behind "
                            "(1 seed")
               for x in section)
    assert any(x.startswith("  - FeDeRA 0.20M (72.00) vs FedLR 0.20M (60.00): +12.00 -> ahead "
                            "(1 seed")
               for x in section)
    assert section[-1] == "  - FeDeRA ahead at 2 of 3 points"


def _time_line(root, evals: dict[str, dict[int, float]]) -> str:
    """The time-claim line of FeDeRA against the other method of ``evals`` (test metric by
    round, the last one final)."""
    for method, by_round in evals.items():
        make_run(root, method, method, by_round,
                 summary={"final": {"accuracy": by_round[max(by_round)]}})
    other = next(NAMES[m] for m in evals if m != "federa")
    return next(x for x in paper_page([root]).splitlines()
                if x.startswith(f"  - FeDeRA vs {other}: 90%"))


def test_time_claim_counts_where_federa_reaches_the_target_first(tmp_path):
    """Equal rounds cost the same in make_run's logs, so time follows the round reached."""
    line = _time_line(tmp_path / "a", {"federa": {2: 0.70, 4: 0.70},
                                       "fedft": {2: 0.30, 4: 0.70}})
    assert line.endswith("-> FeDeRA faster at 3 of 3 (1 seed, not established)")
    assert "% less)" in line and "not reached" not in line
    line = _time_line(tmp_path / "b", {"federa": {2: 0.10, 4: 0.50},
                                       "fedlr": {2: 0.60, 4: 0.70}})
    assert line.startswith("  - FeDeRA vs FedLR: 90% not reached vs ")
    assert line.endswith("-> FeDeRA faster at 0 of 3 (1 seed, not established)")


def test_time_claim_skips_an_experiment_where_nothing_was_learned(tmp_path):
    bar = {"accuracy": 0.1671, "label": "Other"}
    for method in ("federa", "fedlr"):
        make_run(tmp_path, method, method, {4: 0.1671},
                 summary={"final": {"accuracy": 0.1671}, "baseline": bar})
    page = paper_page([tmp_path])
    assert "  - FeDeRA vs FedLR: 90%" not in page
    assert "- no experiment here has FeDeRA and a baseline both finished" in page


def test_cli_refuses_to_write_into_a_run_folder(tmp_path, capsys):
    run = make_run(tmp_path, "federa", "federa", {4: 0.7}, summary={})
    assert main(["paper", str(tmp_path), "--out", str(run / "PAPER.md")]) == 2
    assert "inside the run folder" in capsys.readouterr().err
    assert not (run / "PAPER.md").exists()


COMMITTED = REPO / "docs" / "results" / "PAPER.md"


@pytest.mark.skipif(not COMMITTED.exists(), reason="docs/results/PAPER.md not generated yet")
def test_committed_page_regenerates_from_committed_logs(tmp_path, monkeypatch):
    """docs/results/PAPER.md is exactly what its own command prints from the committed logs."""
    text = COMMITTED.read_text()
    command = re.search(r"Generated by `([^`]+)`", text).group(1)
    args = shlex.split(command)[1:]
    args[args.index("--out") + 1] = str(tmp_path / "PAPER.md")
    monkeypatch.chdir(REPO)
    assert main(args) == 0
    fresh = (tmp_path / "PAPER.md").read_text().replace(str(tmp_path / "PAPER.md"),
                                                         "docs/results/PAPER.md")
    assert fresh == text
