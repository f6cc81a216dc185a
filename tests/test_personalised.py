"""Personalised evaluation (local-test-fraction): the clients' local splits, federated
evaluation through EVALUATE messages for any method, the statistics over clients, and the
report's table and per-client figure."""

import json

import numpy as np
import pytest
from corpora import FIXTURE_OVERRIDE
from inprocess import InProcessGrid, flower_identity, run_inprocess, tiny_config  # noqa: F401

from fedpeft.config import ConfigError, RunConfig, load_config
from fedpeft.federation.local_eval import client_stats, eval_sample
from fedpeft.federation.runtime import Runtime
from fedpeft.federation.server_app import open_run, run_server
from fedpeft.partition import local_split
from fedpeft.report_model import load_run
from fedpeft.report_extra import local_table
from fedpeft.runlog import read_rounds


def test_local_split_is_seeded_disjoint_and_complete():
    shard = np.array([3, 8, 11, 15, 20, 21, 40, 41, 42, 57])
    train, test = local_split(shard, 0.3, seed=0, client=2)
    assert len(test) == 3 and len(train) == 7
    assert not set(train) & set(test) and sorted([*train, *test]) == list(shard)
    assert list(test) == sorted(test) and list(train) == sorted(train)
    again = local_split(shard[::-1], 0.3, seed=0, client=2)  # order of the shard is irrelevant
    assert np.array_equal(again[1], test) and np.array_equal(again[0], train)
    others = {tuple(local_split(shard, 0.3, seed=s, client=c)[1]) for s in range(3)
              for c in range(3)}
    assert len(others) > 3  # depends on the seed and the client
    assert len(local_split(shard, 0.0, 0, 0)[1]) == 0
    assert len(local_split(shard, 0.01, 0, 0)[1]) == 1  # at least one example held out
    assert len(local_split(shard, 0.99, 0, 0)[0]) == 1  # at least one example trains
    assert len(local_split(shard[:1], 0.5, 0, 0)[1]) == 0


def test_client_stats_by_hand():
    values = [0.9, 0.5, 0.7, 0.1, 0.3, 0.6, 0.8, 0.4, 0.2, 1.0, 0.55]  # 11 clients
    stats = client_stats(values)
    assert stats["mean"] == pytest.approx(sum(values) / 11)
    assert stats["std"] == pytest.approx(np.sqrt(np.mean((np.array(values) - stats["mean"]) ** 2)))
    assert stats["worst-10%"] == pytest.approx((0.1 + 0.2) / 2)  # ceil(11/10) = 2 lowest
    assert stats["min"] == 0.1 and stats["clients"] == 11
    assert client_stats([0.4, 0.8])["worst-10%"] == 0.4  # at least one client
    assert client_stats([]) == {}


def test_eval_sample_is_seeded_and_independent_of_training():
    cfg = RunConfig(num_clients=10, local_test_fraction=0.2, local_eval_clients=3)
    first = eval_sample(cfg, 4)
    assert first == eval_sample(cfg, 4) and len(first) == 3 == len(set(first))
    assert any(eval_sample(cfg, r) != first for r in range(5, 10))
    assert eval_sample(RunConfig(num_clients=5, local_test_fraction=0.2), 1) == [0, 1, 2, 3, 4]


def test_settings_are_checked():
    with pytest.raises(ConfigError, match=r"local-test-fraction must be in \[0, 1\)"):
        load_config(None, ["local-test-fraction=1"])
    with pytest.raises(ConfigError, match="local-eval-clients must be in"):
        load_config(None, ["local-test-fraction=0.1", "num-clients=5", "clients-per-round=2",
                           "local-eval-clients=6"])


def test_runtime_trains_without_the_local_split(tiny_models):
    cfg = load_config(None, [f"model={tiny_models('bert')}", "method=fedlr", "lora-rank=4",
                             "num-clients=4", "clients-per-round=2", "max-train-samples=64",
                             "max-test-samples=32", "local-test-fraction=0.25"])
    rt = Runtime(cfg)
    for pid in range(4):
        shard = rt.partition().clients[pid]
        train, test = rt.client_examples(pid), rt.client_examples(pid, "local-test")
        assert len(train) + len(test) == len(shard) and len(test) == round(0.25 * len(shard))
        assert len(rt.client_rows(pid)) == len(train)
        assert "accuracy" in rt.evaluate_local(pid)


@pytest.mark.parametrize("task, metric", [("wnut17", "f1"), ("mrqa", "exact-match")])
def test_local_splits_of_ner_and_qa_score(tiny_models, task, metric):
    cfg = load_config(None, [f"model={tiny_models('bert')}", f"task={task}", "method=fedsa-lora",
                             "lora-rank=4", "num-clients=2", "clients-per-round=1",
                             "max-train-samples=40", "max-test-samples=8",
                             "local-test-fraction=0.25", FIXTURE_OVERRIDE])
    rt = Runtime(cfg)
    held, kept = rt.client_examples(1, "local-test"), rt.client_examples(1)
    assert len(held) == round(0.25 * 20) and not set(held) & set(kept)
    # the local score is the task's own metric on exactly the held-out training examples
    examples = [rt.task.examples("train")[i] for i in held]
    features = rt.task.featurize(examples, rt.tokenizer, "test")
    expected = rt.task.evaluate(rt.model, examples, features, rt.tokenizer, rt.device)
    assert rt.evaluate_local(1)[metric] == pytest.approx(expected[metric])


@pytest.mark.parametrize("method", ["fedlr", "federa", "slora"])
def test_federated_evaluation_on_local_splits(tiny_models, tmp_path, method,
                                              flower_identity):  # noqa: F811
    extra = ["slora-stage1-rounds=1", "slora-density=0.1"] if method == "slora" else []
    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), f"method={method}",
                      "local-test-fraction=0.25", "num-clients=4", "clients-per-round=2",
                      "rounds=2", *extra)
    grid = InProcessGrid(cfg.num_clients)
    log, runtime, _ = open_run(cfg)
    sizes = [len(runtime.client_examples(p)) for p in range(4)]
    held = [len(runtime.client_examples(p, "local-test")) for p in range(4)]
    summary = run_server(grid, cfg, log, runtime=runtime)
    rounds = read_rounds(cfg.run_dir())
    assert not summary["rejected"]  # num-examples = the training share: validation agrees
    evaluates = [m for m in grid.sent if m.metadata.message_type == "evaluate"]
    assert len(evaluates) == 2 * 4  # every client, every round (eval-every=1)
    for r in rounds:
        local = r["local-eval"]
        assert local["clients"] == [0, 1, 2, 3] and local["examples"] == held
        acc = local["values"]["global-accuracy"]
        assert local["stats"]["global-accuracy"] == client_stats(acc)
        assert local["weighted"]["global-accuracy"] == pytest.approx(
            np.average(acc, weights=held))
        assert "personal-accuracy" not in local["values"]
        assert 0 < r["seconds-eval-local"] < r["seconds-eval"]  # part of it, after the global
    assert summary["final-local"] == rounds[-1]["local-eval"]["stats"]
    # the train replies' weights are the training shares
    train_sizes = {s for s in sizes}
    assert train_sizes and all(s > 0 for s in sizes)


def test_no_evaluate_messages_without_local_test(tiny_models, tmp_path,
                                                 flower_identity):  # noqa: F811
    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "method=fedlr", "rounds=1")
    grid = InProcessGrid(cfg.num_clients)
    log, runtime, _ = open_run(cfg)
    run_server(grid, cfg, log, runtime=runtime)
    assert not [m for m in grid.sent if m.metadata.message_type == "evaluate"]
    record = read_rounds(cfg.run_dir())[0]
    assert "local-eval" not in record and "seconds-eval-local" not in record


def test_local_eval_sample_in_a_run(tiny_models, tmp_path, flower_identity):  # noqa: F811
    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "method=fedsa-lora",
                      "local-test-fraction=0.25", "local-eval-clients=2", "rounds=2")
    run_inprocess(cfg)
    for r in read_rounds(cfg.run_dir()):
        assert r["local-eval"]["clients"] == eval_sample(cfg, r["round"])


def _fake_run(folder, method, seed, values, test_acc):
    folder.mkdir(parents=True)
    cfg = RunConfig(method=method, seed=seed, rounds=1, local_test_fraction=0.2)
    from fedpeft.config import to_toml

    (folder / "config.toml").write_text(to_toml(cfg))
    local = {"clients": list(range(len(values["global-accuracy"]))), "values": values,
             "stats": {k: client_stats(v) for k, v in values.items()}}
    record = {"round": 1, "clients": [0], "successes": 1, "bytes-down": 10, "bytes-up": 10,
              "seconds-client-max": 1.0, "metrics": {"accuracy": test_acc}, "local-eval": local}
    (folder / "rounds.jsonl").write_text(json.dumps(record) + "\n")


def test_report_table_and_per_client_figure(tmp_path):
    acc_a = [0.2, 0.4, 0.6, 0.8, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5]
    _fake_run(tmp_path / "runs" / "a", "fedsa-lora", 0,
              {"global-accuracy": [0.1] * 10, "personal-accuracy": acc_a}, 0.3)
    _fake_run(tmp_path / "runs" / "b", "fedsa-lora", 1,
              {"global-accuracy": [0.3] * 10, "personal-accuracy": [a + 0.1 for a in acc_a]},
              0.5)
    from fedpeft.report_model import group_runs

    runs = [load_run(tmp_path / "runs" / n) for n in ("a", "b")]
    table = local_table(group_runs(runs), "accuracy")
    rows = [line for line in table.splitlines() if line.startswith("| fedsa-lora")]
    assert len(rows) == 2
    cells = [c.strip() for c in rows[1].split("|")[1:-1]]
    # personalised: client means 0.55 and 0.65 -> 0.6000 ± 0.0707; worst 10% (1 of 10 clients)
    # 0.2 and 0.3 -> 0.2500 ± 0.0707; global test 0.3 and 0.5
    assert cells[1] == "personalised (own B)" and cells[2] == "10"
    assert cells[3] == "0.6000 ± 0.0707" and cells[5] == "0.2500 ± 0.0707"
    assert cells[7] == "0.4000 ± 0.1414"
    from fedpeft.report import build_report

    report = build_report([tmp_path / "runs"], out=tmp_path / "report")
    text = report.read_text()
    assert "local test splits" in text and "accuracy-per-client.png" in text
    assert (tmp_path / "report" / "accuracy-per-client.png").stat().st_size > 1000
