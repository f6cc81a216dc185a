"""Comparison planning, resumability and learning-rate choice on the validation split."""

import json

import pytest

from fedpeft.compare import parse_assignments, plan, run_jobs, select_learning_rates
from fedpeft.config import ConfigError, RunConfig, to_toml


def fake_simulate(scores: dict):
    """A stand-in for a federated run: the 'valid' and test metrics depend on (method, lr)."""
    calls = []

    def simulate(cfg: RunConfig, resume: bool = False) -> dict:
        calls.append((cfg, resume) if resume else cfg)
        valid, test = scores[(cfg.method, cfg.lr)]
        summary = {"method": cfg.method, "metric": "accuracy", "rounds": cfg.rounds,
                   "final": {"accuracy": test, "valid-accuracy": valid}, "best": test,
                   "lr": cfg.lr, "trainable-params": 10, "bytes-per-client-round": 1e6,
                   "seconds": 60.0}
        cfg.run_dir().mkdir(parents=True, exist_ok=True)
        (cfg.run_dir() / "config.toml").write_text(to_toml(cfg))
        # a real run's checkpoint ends at its last round; this stand-in keeps none
        (cfg.run_dir() / "checkpoint.safetensors").unlink(missing_ok=True)
        (cfg.run_dir() / "summary.json").write_text(json.dumps(summary))
        return summary

    return simulate, calls


def test_plan_expands_methods_sweeps_seeds_and_grids(tmp_path):
    base = RunConfig(num_clients=10, clients_per_round=2)
    jobs = plan(base, ["fedlr", "federa"], parse_assignments(["alpha=0.1,1"], "--sweep"),
                parse_assignments(["fedlr=1e-3,2e-3"], "--lr-grid"), [0, 1], str(tmp_path))
    assert len(jobs) == 2 * 2 * 2 + 1 * 2 * 2  # fedlr: 2 alphas x 2 seeds x 2 lrs; federa: 4
    names = {j.cfg.run_dir().name for j in jobs}
    assert "fedlr-alpha0.1-s1-lr2e-3" in names and "federa-alpha1-s0" in names
    grid = [j for j in jobs if j.lr is not None]
    assert all(j.cfg.valid_fraction == 0.1 for j in grid)  # lr chosen on a validation split
    assert all(j.cfg.valid_fraction == 0.0 for j in jobs if j.lr is None)
    with pytest.raises(ConfigError, match="not in --methods"):
        plan(base, ["fedlr"], {}, {"fedft": ["1e-4"]}, [0], str(tmp_path))
    with pytest.raises(ConfigError, match="unknown setting"):
        plan(base, ["fedlr"], {"alpah": ["1"]}, {}, [0], str(tmp_path))


def test_best_validation_lr_is_chosen_and_test_is_reported(tmp_path):
    scores = {("fedlr", 1e-3): (0.40, 0.50), ("fedlr", 2e-3): (0.45, 0.41),
              ("federa", None): (0.0, 0.55)}
    simulate, calls = fake_simulate(scores)
    jobs = plan(RunConfig(), ["fedlr", "federa"], {}, {"fedlr": ["1e-3", "2e-3"]}, [0],
                str(tmp_path))
    kept = select_learning_rates(run_jobs(jobs, simulate, log=lambda _: None))
    fedlr = next(k for k in kept if k["method"] == "fedlr")
    assert fedlr["chosen-lr"] == 2e-3  # best validation accuracy, although its test is lower
    assert fedlr["final"]["accuracy"] == 0.41
    assert len(kept) == 2 and len(calls) == 3
    assert not fedlr["lr-tied"]
    # A second invocation finds every finished run and redoes none.
    again = run_jobs(jobs, simulate, log=lambda _: None)
    assert len(calls) == 3 and len(again) == 3


def test_rates_tied_on_validation_are_all_kept(tmp_path):
    scores = {("fedlr", 1e-3): (0.40, 0.50), ("fedlr", 2e-3): (0.40, 0.41),
              ("fedlr", 5e-3): (0.30, 0.90)}
    simulate, _ = fake_simulate(scores)
    jobs = plan(RunConfig(), ["fedlr"], {}, {"fedlr": ["1e-3", "2e-3", "5e-3"]}, [0],
                str(tmp_path))
    kept = select_learning_rates(run_jobs(jobs, simulate, log=lambda _: None))
    assert [(k["chosen-lr"], k["lr-tied"]) for k in kept] == [(1e-3, True), (2e-3, True)]
    from fedpeft.compare import results_table
    assert results_table(kept).count("(tied) |") == 2


def test_interrupted_and_extended_runs_resume_from_their_checkpoint(tmp_path):
    import numpy as np

    from fedpeft.federation.checkpoint import Checkpoint, save_checkpoint

    simulate, calls = fake_simulate({("fedlr", None): (0.0, 0.3), ("federa", None): (0.0, 0.4)})
    jobs = plan(RunConfig(rounds=5), ["fedlr", "federa"], {}, {}, [0], str(tmp_path))
    interrupted = jobs[0].cfg.run_dir()  # fedlr: a checkpoint after round 3, no summary
    interrupted.mkdir(parents=True)
    save_checkpoint(interrupted, Checkpoint(
        round=3, global_state={"w": np.zeros(2, np.float32)},
        sampler=np.random.default_rng(0).bit_generator.state, anchored=[], method_state={},
        history=[], anchor_id="", config=jobs[0].cfg.to_dict(), seconds=1.0))
    shorter = jobs[1].cfg.run_dir()  # federa: finished 3 of the 5 rounds now asked for
    shorter.mkdir(parents=True)
    save_checkpoint(shorter, Checkpoint(
        round=3, global_state={"w": np.zeros(2, np.float32)},
        sampler=np.random.default_rng(0).bit_generator.state, anchored=[], method_state={},
        history=[], anchor_id="", config=jobs[1].cfg.to_dict(), seconds=1.0))
    (shorter / "summary.json").write_text(json.dumps({"rounds": 3}))
    lines = []
    run_jobs(jobs, simulate, log=lines.append)
    assert [c[1] if isinstance(c, tuple) else False for c in calls] == [True, True]
    assert "resuming after round 3" in lines[0]
    assert len(run_jobs(jobs, simulate, log=lambda _: None)) == 2 and len(calls) == 2


@pytest.mark.slow
def test_lr_grid_end_to_end_chooses_on_the_logged_validation_metric(tiny_models, tmp_path, capsys):
    """Real federated runs: each rate's server evaluates the carved validation split next to
    the test set, and the rate kept is the one with the best final validation metric."""
    from fedpeft.cli import main
    from fedpeft.report import build_report
    from fedpeft.runlog import read_rounds

    root = tmp_path / "grid"
    assert main(["compare", f"model={tiny_models('bert')}", "task=semeval", "lora-rank=4",
                 "max-train-samples=160", "max-test-samples=32", "num-clients=4",
                 "clients-per-round=2", "rounds=2", "batch-size=8", "progress=false",
                 "--methods", "fedlr", "--lr-grid", "fedlr=1e-3,5e-3", "--root", str(root)]) == 0
    valid = {}
    for lr in ("1e-3", "5e-3"):
        (last,) = [r for r in read_rounds(root / f"fedlr-s0-lr{lr}") if r["round"] == 2]
        assert {"accuracy", "valid-accuracy", "valid-macro-f1"} <= last["metrics"].keys()
        valid[float(lr)] = last["metrics"]["valid-accuracy"]
    chosen = [lr for lr in valid if valid[lr] == max(valid.values())]  # a tie keeps both
    table = capsys.readouterr().out
    report = build_report([root], out=tmp_path / "report").read_text()
    assert "chosen lr (valid)" in table
    for lr in chosen:
        if len(chosen) == 1:
            assert f"| {lr:g} |" in table
            assert f"| fedlr | {lr:g} (chosen on valid-accuracy from 2) |" in report
        else:
            assert f"| {lr:g} (tied) |" in table
            assert f"{lr:g} (tied on valid-accuracy: 2 of 2) |" in report
    for lr in set(valid) - set(chosen):  # the rate not chosen is no row of the report
        assert f" {lr:g} (chosen" not in report and f" {lr:g} (tied" not in report


@pytest.mark.slow
def test_select_at_end_to_end(tiny_models, tmp_path, capsys):
    """Real federated runs: both rates run 1 round, the one with the better validation metric
    there runs on to round 2 (resumed), and the report keeps the same one."""
    from fedpeft.cli import main
    from fedpeft.report import build_report
    from fedpeft.runlog import read_rounds

    root = tmp_path / "grid"
    assert main(["compare", f"model={tiny_models('bert')}", "task=semeval", "lora-rank=4",
                 "max-train-samples=160", "max-test-samples=32", "num-clients=4",
                 "clients-per-round=2", "rounds=2", "eval-every=1", "batch-size=8",
                 "progress=false", "--methods", "fedlr", "--lr-grid", "fedlr=1e-3,5e-2",
                 "--select-at", "1", "--root", str(root)]) == 0
    logs = {lr: read_rounds(root / f"fedlr-s0-lr{lr}") for lr in ("1e-3", "5e-2")}
    valid = {float(lr): log[0]["metrics"]["valid-accuracy"] for lr, log in logs.items()}
    chosen = [lr for lr in valid if valid[lr] == max(valid.values())]
    assert {float(lr): len(log) for lr, log in logs.items()} == {
        lr: 2 if lr in chosen else 1 for lr in valid}
    table = capsys.readouterr().out
    assert "chosen lr (valid at round 1)" in table
    report = build_report([root], out=tmp_path / "report").read_text()
    if len(chosen) == 1:
        assert f"| fedlr | {chosen[0]:g} (chosen on valid-accuracy at round 1 from 2) |" in report
    else:  # both went on to round 2: the better one there is the choice
        final = {float(lr): log[-1]["metrics"]["valid-accuracy"] for lr, log in logs.items()}
        best = [lr for lr in final if final[lr] == max(final.values())]
        if len(best) == 1:
            assert f"| {best[0]:g} (best at round 2 of the tied) |" in table
            assert f"| fedlr | {best[0]:g} (chosen on valid-accuracy from 2) |" in report
        else:
            assert "(tied on valid-accuracy: 2 of 2) |" in report


def logging_simulate(curves: dict):
    """A stand-in run that logs every round: valid/test accuracy at round r is
    ``curves[(method, lr)][r - 1]``; a resumed run appends the rounds after the last logged."""
    calls = []

    def simulate(cfg: RunConfig, resume: bool = False) -> dict:
        path = cfg.run_dir()
        path.mkdir(parents=True, exist_ok=True)
        log = path / "rounds.jsonl"
        done = len(log.read_text().splitlines()) if resume else 0
        calls.append((cfg.method, cfg.lr, done, cfg.rounds))
        curve = curves[(cfg.method, cfg.lr)]
        with log.open("a" if resume else "w") as out:
            for r in range(done + 1, cfg.rounds + 1):
                out.write(json.dumps({"round": r, "metrics": {
                    "accuracy": curve[r - 1] - 0.1, "valid-accuracy": curve[r - 1]}}) + "\n")
        summary = {"method": cfg.method, "metric": "accuracy", "rounds": cfg.rounds,
                   "final": {"accuracy": curve[cfg.rounds - 1] - 0.1,
                             "valid-accuracy": curve[cfg.rounds - 1]},
                   "best": curve[cfg.rounds - 1] - 0.1, "lr": cfg.lr or 1e-3,
                   "trainable-params": 10, "bytes-per-client-round": 1e6, "seconds": 60.0}
        (path / "config.toml").write_text(to_toml(cfg))
        (path / "summary.json").write_text(json.dumps(summary))
        return summary

    return simulate, calls


def test_select_at_runs_every_rate_to_that_round_and_only_the_chosen_on(tmp_path):
    from fedpeft.compare import results_table, run_selected

    # 1e-3 blooms late (best at round 4), 2e-3 leads at round 2: chosen at 2, it alone goes on
    curves = {("fedlr", 1e-3): [0.2, 0.3, 0.8, 0.9], ("fedlr", 2e-3): [0.3, 0.5, 0.6, 0.7],
              ("fedlr", 5e-3): [0.1, 0.2, 0.2, 0.2], ("federa", None): [0.1, 0.2, 0.3, 0.4]}
    simulate, calls = logging_simulate(curves)
    jobs = plan(RunConfig(rounds=4, eval_every=2), ["fedlr", "federa"], {},
                {"fedlr": ["1e-3", "2e-3", "5e-3"]}, [0], str(tmp_path))
    kept = run_selected(jobs, simulate, 2, log=lambda _: None)
    assert calls == [("fedlr", 1e-3, 0, 2), ("fedlr", 2e-3, 0, 2), ("fedlr", 5e-3, 0, 2),
                     ("federa", None, 0, 4), ("fedlr", 2e-3, 2, 4)]  # the chosen one resumed
    assert [(k["method"], k.get("chosen-lr")) for k in kept] == [("fedlr", 2e-3),
                                                                  ("federa", None)]
    fedlr = kept[0]
    assert fedlr["final"]["accuracy"] == pytest.approx(0.6) and fedlr["rounds"] == 4
    assert fedlr["lr-candidates"] == {1e-3: 0.3, 2e-3: 0.5, 5e-3: 0.2}
    assert "chosen lr (valid at round 2)" in results_table(kept)
    # The rates left at round 2 say so in their summaries (scripts/results.sh reads it: such a
    # run's checkpoint may go on); the chosen run's own summary, written at round 4, does not.
    marks = {lr: json.loads((tmp_path / f"fedlr-s0-lr{lr}" / "summary.json").read_text())
             .get("select-at") for lr in ("1e-3", "2e-3", "5e-3")}
    assert marks == {"1e-3": {"round": 2, "rounds": 4}, "2e-3": None,
                     "5e-3": {"round": 2, "rounds": 4}}
    # Again: every rate has round 2 and the chosen run is finished: nothing is redone.
    assert [k.get("chosen-lr") for k in run_selected(jobs, simulate, 2, log=lambda _: None)] \
        == [2e-3, None] and len(calls) == 5
    # The report makes the same choice from the logs alone, at the round all rates reached.
    from fedpeft.report_model import find_runs, group_runs

    groups = group_runs(find_runs([tmp_path]))
    assert [(g.method, g.settings["lr"], g.lr_note) for g in groups if g.method == "fedlr"] \
        == [("fedlr", 2e-3, "chosen on valid-accuracy at round 2 from 3")]


def test_rates_tied_at_select_at_go_on_and_the_best_at_the_end_is_chosen(tmp_path):
    from fedpeft.compare import results_table, run_selected
    from fedpeft.report_model import find_runs, group_runs

    # 1e-3 and 2e-3 tie at round 2, both go on; 2e-3 is better at round 4
    curves = {("fedlr", 1e-3): [0.2, 0.5, 0.6, 0.7], ("fedlr", 2e-3): [0.3, 0.5, 0.9, 0.8],
              ("fedlr", 5e-3): [0.1, 0.2, 0.2, 0.2]}
    simulate, calls = logging_simulate(curves)
    jobs = plan(RunConfig(rounds=4, eval_every=2), ["fedlr"], {},
                {"fedlr": ["1e-3", "2e-3", "5e-3"]}, [0], str(tmp_path))
    kept = run_selected(jobs, simulate, 2, log=lambda _: None)
    assert calls[3:] == [("fedlr", 1e-3, 2, 4), ("fedlr", 2e-3, 2, 4)]  # both went on
    assert [(k["chosen-lr"], k["lr-tied"], k["lr-tie-broken-at"]) for k in kept] == [
        (2e-3, False, 4)]
    assert kept[0]["lr-candidates"] == {1e-3: 0.5, 2e-3: 0.5, 5e-3: 0.2}
    assert "| 0.002 (best at round 4 of the tied) |" in results_table(kept)
    groups = group_runs(find_runs([tmp_path]))
    assert [(g.settings["lr"], g.lr_note) for g in groups] == [
        (2e-3, "chosen on valid-accuracy at round 4 among the 2 tied at round 2, of 3")]
    # still tied at the end: both stay, named so, in the table and the report
    curves[("fedlr", 2e-3)][3] = 0.7
    kept = run_selected(plan(RunConfig(rounds=4, eval_every=2), ["fedlr"], {},
                             {"fedlr": ["1e-3", "2e-3", "5e-3"]}, [0], str(tmp_path / "b")),
                        simulate, 2, log=lambda _: None)
    assert [(k["chosen-lr"], k["lr-tied"]) for k in kept] == [(1e-3, True), (2e-3, True)]
    assert [g.lr_note for g in group_runs(find_runs([tmp_path / "b"]))] == [
        "tied on valid-accuracy at rounds 2 and 4: 2 of 3"] * 2


def test_select_at_reuses_a_finished_full_run_scored_at_that_round(tmp_path):
    from fedpeft.compare import run_selected

    curves = {("fedlr", 1e-3): [0.2, 0.6, 0.7, 0.8], ("fedlr", 2e-3): [0.3, 0.5, 0.9, 0.9]}
    simulate, calls = logging_simulate(curves)
    jobs = plan(RunConfig(rounds=4, eval_every=2), ["fedlr"], {},
                {"fedlr": ["1e-3", "2e-3"]}, [0], str(tmp_path))
    run_jobs(jobs[1:], simulate, log=lambda _: None)  # 2e-3 already ran all 4 rounds
    kept = run_selected(jobs, simulate, 2, log=lambda _: None)
    # 2e-3 is scored at round 2 (0.5, not its final 0.9): 1e-3 wins and goes on
    assert calls == [("fedlr", 2e-3, 0, 4), ("fedlr", 1e-3, 0, 2), ("fedlr", 1e-3, 2, 4)]
    assert [k["chosen-lr"] for k in kept] == [1e-3]


class Stopped(Exception):
    """The lane killed between the grid's two phases."""


def test_report_mid_grid_names_rates_not_rounds_and_marks_the_chosen_unfinished(tmp_path):
    """A --select-at grid stopped after its first phase (the grid's middle rate already run to
    round 4, the other rate stopped at round 2, the chosen ones not yet on to round 4): the
    report already makes compare's choice, a tie reads as two rates of one 4-round grid (not
    "rounds=2" beside "rounds=4", nor a sweep of rounds), and a chosen rate still at round 2 as
    unfinished (2/4), not as a finished, shorter run."""
    from fedpeft.compare import run_selected
    from fedpeft.report_model import find_runs, group_runs, varying_settings

    curves = {("fedlr", 1e-3): [0.2, 0.5, 0.7, 0.8], ("fedlr", 2e-3): [0.3, 0.5, 0.6, 0.6],
              ("federa", 1e-3): [0.2, 0.4, 0.5, 0.5], ("federa", 2e-3): [0.3, 0.6, 0.9, 0.9]}
    simulate, calls = logging_simulate(curves)

    def until_phase_two(cfg, resume=False):
        if resume:
            raise Stopped
        return simulate(cfg, resume)

    jobs = plan(RunConfig(rounds=4, eval_every=2), ["fedlr", "federa"], {},
                {"fedlr": ["1e-3", "2e-3"], "federa": ["1e-3", "2e-3"]}, [0], str(tmp_path))
    assert [(j.method, j.lr) for j in jobs] == [("fedlr", 1e-3), ("fedlr", 2e-3),
                                                  ("federa", 1e-3), ("federa", 2e-3)]
    run_jobs([jobs[0], jobs[2]], simulate, log=lambda _: None)  # 1e-3 ran all 4 rounds first
    with pytest.raises(Stopped):
        run_selected(jobs, until_phase_two, 2, log=lambda _: None)
    groups = group_runs(find_runs([tmp_path]))
    got = [(g.label, g.settings["lr"], g.done, g.planned, g.lr_note) for g in groups]
    assert got == [
        ("fedlr lr=0.001", 1e-3, 4, 4, "tied on valid-accuracy at round 2: 2 of 2"),
        ("fedlr lr=0.002", 2e-3, 2, 4, "tied on valid-accuracy at round 2: 2 of 2"),
        ("federa", 2e-3, 2, 4, "chosen on valid-accuracy at round 2 from 2")]
    assert varying_settings(groups) == []
    # The chosen rate going on (round 3 logged, its config now planned to 4, no summary): both
    # rates are then 4-round runs, one unfinished, so no choice yet: both shown as they stand.
    federa = tmp_path / "federa-s0-lr2e-3"
    with (federa / "rounds.jsonl").open("a") as out:
        out.write(json.dumps({"round": 3, "metrics": {}}) + "\n")
    (federa / "summary.json").unlink()
    (federa / "config.toml").write_text(to_toml(jobs[3].cfg))
    groups = group_runs(find_runs([tmp_path]))
    assert [(g.label, g.done, g.planned, g.lr_note) for g in groups if g.method == "federa"] \
        == [("federa lr=0.001", 4, 4, ""), ("federa lr=0.002", 3, 4, "")]
    # A stopped rate without its summary (killed in phase one): no choice yet, both kept.
    (tmp_path / "fedlr-s0-lr2e-3" / "summary.json").unlink()
    assert [g.lr_note for g in group_runs(find_runs([tmp_path])) if g.method == "fedlr"] \
        == ["", ""]


@pytest.mark.parametrize("settings, select_at, message", [
    ({"rounds": 4, "eval_every": 2}, 3, "multiple of eval-every=2"),
    ({"rounds": 4}, 4, "from 1 to rounds-1 = 3"),
    ({"rounds": 8, "method": "slora", "slora_stage1_rounds": 2}, 2, "from round 3 on"),
])
def test_select_at_is_checked_before_anything_runs(tmp_path, settings, select_at, message):
    from fedpeft.compare import run_selected

    simulate, calls = logging_simulate({})
    method = settings.pop("method", "fedlr")
    jobs = plan(RunConfig(**settings), [method], {}, {method: ["1e-3"]}, [0], str(tmp_path))
    with pytest.raises(ConfigError, match=message):
        run_selected(jobs, simulate, select_at, log=lambda _: None)
    jobs = plan(RunConfig(rounds=4), ["fedlr"], {}, {}, [0], str(tmp_path))
    with pytest.raises(ConfigError, match="give one"):
        run_selected(jobs, simulate, 2, log=lambda _: None)
    assert not calls
