"""Failing clients: raising, silent (timeout), vanished nodes, too few successes; never a crash.

The in-process tests drive the real round loop and ClientApp without Ray (``inprocess.py``);
the last one injects failures into a real Flower simulation.
"""

import numpy as np
import pytest
from inprocess import InProcessGrid, flower_identity, run_inprocess, tiny_config  # noqa: F401

from fedpeft.federation.client_app import injected_fault
from fedpeft.federation.runtime import Runtime
from fedpeft.runlog import load_state, read_rounds


def test_injected_faults_are_seeded_and_near_the_rate():
    draws = [injected_fault(0, 0.3, r, p, 0) for r in range(1, 101) for p in range(10)]
    assert draws == [injected_fault(0, 0.3, r, p, 0) for r in range(1, 101) for p in range(10)]
    assert 0.25 < np.mean(draws) < 0.35
    assert not any(injected_fault(0, 0.0, r, 0, 0) for r in range(100))
    assert all(injected_fault(0, 1.0, r, 0, 0) for r in range(100))
    # a retried attempt draws again: a client that failed may succeed on the retry
    assert [injected_fault(0, 0.5, 1, 0, a) for a in range(8)] != [True] * 8


def _check_failures_are_the_injected_ones(cfg, rounds):
    for r in rounds:
        for f in r["failures"]:
            assert "injected failure" in f["reason"]
            assert injected_fault(cfg.seed, cfg.fail_rate, r["round"], f["client"], f["attempt"])


def test_raising_clients_are_logged_and_the_others_aggregated(tiny_models, tmp_path,
                                                              flower_identity):  # noqa: F811
    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "rounds=4", "num-clients=5",
                      "clients-per-round=4", "fail-rate=0.3", "min-train-clients=2")
    summary = run_inprocess(cfg)
    rounds = read_rounds(cfg.run_dir())
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    _check_failures_are_the_injected_ones(cfg, rounds)
    assert summary["failures"] == sum(len(r["failures"]) for r in rounds) > 0
    assert all(r["successes"] >= 2 and not r["skipped"] for r in rounds)
    final = load_state(cfg.run_dir() / "final_state.safetensors")
    assert all(np.all(np.isfinite(v)) for v in final.values())


def test_a_silent_node_times_out_and_a_vanished_node_is_skipped(tiny_models, tmp_path,
                                                                flower_identity):  # noqa: F811
    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "rounds=2", "num-clients=3",
                      "clients-per-round=3", "round-timeout=0.5")
    grid = InProcessGrid(cfg.num_clients)
    grid.silent.add(101)  # partition 1 never answers
    rounds_seen = []

    def vanish_after_round_1(record):
        rounds_seen.append(record["round"])
        grid.gone.add(102)  # partition 2's SuperNode dies after round 1

    from fedpeft.federation.server_app import open_run, run_server

    log, runtime, _ = open_run(cfg)
    run_server(grid, cfg, log, on_round=vanish_after_round_1, runtime=runtime)
    r1, r2 = read_rounds(cfg.run_dir())
    assert [(f["client"], f["reason"]) for f in r1["failures"]] == [
        (1, "no reply within round-timeout=0.5 s")]
    assert r1["successes"] == 2
    assert {f["client"]: f["reason"] for f in r2["failures"]} == {
        1: "no reply within round-timeout=0.5 s", 2: "no live node holds this partition"}
    assert r2["nodes"] == ["partition 2: node 102 left"]
    assert r2["successes"] == 1 and not r2["skipped"]


@pytest.mark.parametrize(("policy", "attempts"), [("skip", 1), ("retry", 3)])
def test_too_few_successes_retry_then_skip_without_crashing(
        tiny_models, tmp_path, policy, attempts, flower_identity):  # noqa: F811
    # every update is rejected (NaN): rounds are retried, then skipped, and with
    # max-failed-rounds=0 the run goes on (a run whose clients all *raise* stops: test_trust.py)
    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "rounds=2", "fail-rate=1.0",
                      "fail-mode=nan", f"on-round-failure={policy}", "round-retries=2",
                      "max-failed-rounds=0")
    summary = run_inprocess(cfg)
    rounds = read_rounds(cfg.run_dir())
    assert all(r["skipped"] and r["attempts"] == attempts for r in rounds)
    assert summary["rejected"] == 2 * attempts * cfg.clients_per_round
    assert summary["skipped-rounds"] == 2 and summary["retries"] == 2 * (attempts - 1)
    # nothing was aggregated: the global state is the initial one
    init = Runtime(cfg)
    init.method.make_anchor(init.model)
    start = init.method.export_state(init.model)
    final = load_state(cfg.run_dir() / "final_state.safetensors")
    assert all(np.array_equal(start[k], final[k]) for k in start)


def test_a_retry_draws_a_new_sample_and_can_succeed(tiny_models, tmp_path,
                                                    flower_identity):  # noqa: F811
    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "rounds=3", "num-clients=4",
                      "clients-per-round=2", "min-train-clients=2", "fail-rate=0.5",
                      "round-retries=5")
    run_inprocess(cfg)
    rounds = read_rounds(cfg.run_dir())
    _check_failures_are_the_injected_ones(cfg, rounds)
    assert any(r["attempts"] > 1 for r in rounds)  # seed 0 gives at least one retry
    assert all(r["successes"] == 2 for r in rounds if not r["skipped"])


@pytest.mark.slow
def test_injected_failures_in_a_flower_simulation(tiny_models, tmp_path):
    from fedpeft.federation.simulation import simulate

    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "rounds=5", "num-clients=6",
                      "clients-per-round=4", "fail-rate=0.3", "min-train-clients=2")
    summary = simulate(cfg)
    rounds = read_rounds(cfg.run_dir())
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5]
    _check_failures_are_the_injected_ones(cfg, rounds)
    assert summary["failures"] == sum(len(r["failures"]) for r in rounds) > 0
    assert summary["skipped-rounds"] == sum(r["skipped"] for r in rounds)
    print(f"\nfault injection (simulation): {summary['failures']} failures injected over "
          f"{sum(r['attempts'] for r in rounds)} attempts of {len(rounds)} rounds, "
          f"{summary['retries']} retries, {summary['skipped-rounds']} rounds skipped")


def test_a_restarted_supernode_is_found_again(tiny_models, tmp_path,
                                              flower_identity):  # noqa: F811
    from flwr.app import Context, RecordDict

    from fedpeft.federation.server_app import open_run, run_server

    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "rounds=2", "num-clients=3",
                      "clients-per-round=3")
    grid = InProcessGrid(cfg.num_clients)

    def restart_partition_2(record):
        if record["round"] == 1:  # its SuperNode crashed and came back with a new node id
            grid.gone.add(102)
            grid.contexts[202] = Context(run_id=1, node_id=202, state=RecordDict(), run_config={},
                                         node_config={"partition-id": 2, "num-partitions": 3})

    log, runtime, _ = open_run(cfg)
    run_server(grid, cfg, log, on_round=restart_partition_2, runtime=runtime)
    r1, r2 = read_rounds(cfg.run_dir())
    assert r2["nodes"] == ["partition 2: node 102 left", "partition 2: node 202 joined"]
    assert r2["successes"] == 3 and not r2["failures"]
    # the new node lost the FeDeRA anchor with its state, so the server sent it again
    to_202 = [m for m in grid.sent if m.metadata.dst_node_id == 202
              and m.metadata.message_type == "train"]
    assert len(to_202) == 1 and "anchor" in to_202[0].content
