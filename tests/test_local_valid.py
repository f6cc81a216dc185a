"""Local validation splits (local-valid-fraction): carved from what each client trains on,
scored at every evaluation round beside the local test split, and the split on which a
personalised method's (fedsa-lora's) learning rate is chosen, by ``fedpeft compare`` and
``fedpeft report`` alike."""

import json

import numpy as np
import pytest
from inprocess import flower_identity, run_inprocess, tiny_config  # noqa: F401

from fedpeft.compare import plan, run_jobs, select_learning_rates, valid_at
from fedpeft.config import ConfigError, RunConfig, load_config, to_toml
from fedpeft.federation.local_eval import client_stats
from fedpeft.federation.runtime import Runtime
from fedpeft.runlog import load_state, read_rounds, validation_series


def test_settings_are_checked():
    with pytest.raises(ConfigError, match=r"local-valid-fraction must be in \[0, 1\)"):
        load_config(None, ["local-test-fraction=0.2", "local-valid-fraction=1"])
    with pytest.raises(ConfigError, match="local-valid-fraction needs local-test-fraction > 0"):
        load_config(None, ["local-valid-fraction=0.1"])


def test_the_valid_split_comes_from_the_training_share_and_leaves_the_test_split(tiny_models):
    common = [f"model={tiny_models('bert')}", "method=fedlr", "lora-rank=4", "num-clients=4",
              "clients-per-round=2", "max-train-samples=80", "max-test-samples=16",
              "local-test-fraction=0.25"]
    plain = Runtime(load_config(None, common))
    rt = Runtime(load_config(None, [*common, "local-valid-fraction=0.2"]))
    for pid in range(4):
        shard = rt.partition().clients[pid]
        train, test, valid = (rt.client_examples(pid, p)
                              for p in ("train", "local-test", "local-valid"))
        assert np.array_equal(test, plain.client_examples(pid, "local-test"))  # unchanged
        before = plain.client_examples(pid)
        assert len(valid) == round(0.2 * len(before)) > 0
        assert sorted([*train, *valid]) == list(before)  # carved from the training share
        assert sorted([*train, *test, *valid]) == sorted(shard)
        assert len(rt.client_rows(pid)) == len(train)
    # the score is the task's metric on exactly those examples
    held = rt.client_examples(1, "local-valid")
    examples = [rt.task.examples("train")[i] for i in held]
    features = rt.task.featurize(examples, rt.tokenizer, "valid")
    expected = rt.task.evaluate(rt.model, examples, features, rt.tokenizer, rt.device)
    assert rt.evaluate_local(1, "local-valid")["accuracy"] == pytest.approx(expected["accuracy"])


def test_a_run_scores_both_local_splits_and_chooses_on_the_personal_one(
        tiny_models, tmp_path, flower_identity):  # noqa: F811
    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "method=fedsa-lora",
                      "valid-fraction=0.2", "local-test-fraction=0.25",
                      "local-valid-fraction=0.25", "rounds=2")
    summary = run_inprocess(cfg)
    rounds = read_rounds(cfg.run_dir())
    for r in rounds:
        local = r["local-eval"]
        assert {"global-accuracy", "personal-accuracy", "valid-global-accuracy",
                "valid-personal-accuracy"} <= set(local["values"])
        for key, values in local["values"].items():
            assert local["stats"][key] == client_stats(values) and len(values) == 4
        # the weights are the test splits' sizes: no weighted mean of the validation scores
        assert "global-accuracy" in local["weighted"]
        assert not [k for k in local["weighted"] if k.startswith("valid-")]
    name, series = validation_series(rounds, "accuracy")
    assert name == "valid-personal-accuracy (mean over clients)"
    assert series == [(r["round"], r["local-eval"]["stats"]["valid-personal-accuracy"]["mean"])
                      for r in rounds]
    # fedlr's clients keep nothing of their own: its rate is chosen on the validation split,
    # and its clients' global-model scores on their local validation splits are replayable
    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "fedlr"), "method=fedlr",
                      "valid-fraction=0.2", "local-test-fraction=0.25",
                      "local-valid-fraction=0.25", "rounds=2")
    run_inprocess(cfg)
    rounds = read_rounds(cfg.run_dir())
    assert validation_series(rounds, "accuracy") == (
        "valid-accuracy", [(r["round"], r["metrics"]["valid-accuracy"]) for r in rounds])
    rt = Runtime(cfg)
    rt.method.import_state(rt.model, load_state(cfg.run_dir() / "final_state.safetensors"))
    logged = rounds[-1]["local-eval"]["values"]["valid-global-accuracy"]
    assert [rt.evaluate_local(p, "local-valid")["accuracy"] for p in range(4)] == \
        pytest.approx(logged)
    assert summary["final-local"]["valid-personal-accuracy"]["clients"] == 4


def _simulate(scores):
    """A stand-in run whose global validation and personalised local validation scores are
    ``scores[lr]`` = (valid-accuracy, mean valid-personal-accuracy), logged at its round 2."""
    def simulate(cfg: RunConfig, resume: bool = False) -> dict:
        valid, personal = scores[cfg.lr]
        values = {"valid-personal-accuracy": [personal - 0.1, personal + 0.1],
                  "personal-accuracy": [0.5, 0.5]}
        stats = {k: client_stats(v) for k, v in values.items()}
        path = cfg.run_dir()
        path.mkdir(parents=True, exist_ok=True)
        records = [{"round": r, "metrics": {"accuracy": 0.3, "valid-accuracy": valid},
                    "local-eval": {"clients": [0, 1], "values": values, "stats": stats}}
                   for r in (1, 2)]
        (path / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        summary = {"method": cfg.method, "metric": "accuracy", "rounds": cfg.rounds,
                   "final": records[-1]["metrics"], "final-local": stats, "best": 0.3,
                   "lr": cfg.lr, "trainable-params": 10, "bytes-per-client-round": 1e6,
                   "seconds": 60.0}
        (path / "config.toml").write_text(to_toml(cfg))
        (path / "summary.json").write_text(json.dumps(summary))
        return summary

    return simulate


def test_compare_and_report_choose_a_personalised_rate_on_its_local_validation(tmp_path):
    # 1e-3 wins on the global validation split, 2e-3 on the clients' personalised models
    scores = {1e-3: (0.6, 0.4), 2e-3: (0.2, 0.7)}
    base = RunConfig(rounds=2, local_test_fraction=0.2, local_valid_fraction=0.1)
    jobs = plan(base, ["fedsa-lora"], {}, {"fedsa-lora": ["1e-3", "2e-3"]}, [0], str(tmp_path))
    kept = select_learning_rates(run_jobs(jobs, _simulate(scores), log=lambda _: None))
    assert [k["chosen-lr"] for k in kept] == [2e-3]
    assert kept[0]["lr-candidates"] == {1e-3: pytest.approx(0.4), 2e-3: pytest.approx(0.7)}
    assert [valid_at(j, 2) for j in jobs] == [pytest.approx(0.4), pytest.approx(0.7)]
    from fedpeft.report_model import find_runs, group_runs

    groups = group_runs(find_runs([tmp_path]))
    assert [(g.settings["lr"], g.lr_note) for g in groups] == [
        (2e-3, "chosen on valid-personal-accuracy (mean over clients) from 2")]
