"""Update validation: each check on a hand-made case, then bad updates through the round loop."""

import math

import numpy as np
import pytest
from inprocess import InProcessGrid, flower_identity, run_inprocess, tiny_config  # noqa: F401

from fedpeft.federation.state import to_record
from fedpeft.federation.validation import (
    check_finite,
    check_norm,
    check_structure,
    check_update,
    check_weight,
    distance,
    global_norm,
    ordered_like,
)
from fedpeft.runlog import load_state, read_rounds

REF = {"w": np.array([3.0, 4.0], dtype=np.float32), "b": np.zeros((2, 1), dtype=np.float32)}


def test_a_well_formed_update_passes():
    update = {"b": np.ones((2, 1), dtype=np.float32), "w": np.array([3.5, 4.0], dtype=np.float32)}
    assert check_update(update, REF, max_update_norm=100.0) is None
    assert list(ordered_like(update, REF)) == ["w", "b"]


@pytest.mark.parametrize(("update", "expected"), [
    ({"w": REF["w"]}, "missing 1 key(s) ['b']"),
    ({**REF, "x": REF["b"]}, "unexpected 1 key(s) ['x']"),
    ({**REF, "w": np.zeros(3, dtype=np.float32)}, "w: shape (3,) != (2,)"),
    ({**REF, "b": np.zeros((2, 1), dtype=np.float64)}, "b: dtype float64 != float32"),
    ({**REF, "b": np.zeros((2, 1), dtype=np.int32)}, "b: dtype int32 != float32"),
])
def test_structure_mismatches_are_named(update, expected):
    assert check_structure(update, REF) == expected
    assert check_update(update, REF, 100.0) == expected


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected(bad):
    update = {**REF, "w": np.array([bad, 1.0], dtype=np.float32)}
    assert check_finite(update) == "w: 1 non-finite value(s)"
    assert check_update(update, REF, 100.0) == "w: 1 non-finite value(s)"


def test_norms_by_hand():
    # ||REF|| = ||(3, 4, 0, 0)|| = 5; an update moving w by (6, 8) is at distance 10.
    assert global_norm(REF) == 5.0
    moved = {**REF, "w": np.array([9.0, 12.0], dtype=np.float32)}
    assert distance(moved, REF) == 10.0
    # bound = max_update_norm * max(1, 5) = 2 * 5 = 10: distance 10 is allowed, 10.0001 is not
    assert check_norm(moved, REF, 2.0) is None
    assert check_norm(moved, REF, 1.99) == "update norm 10 exceeds max-update-norm bound 9.95"
    assert check_norm(moved, REF, 0.0) is None  # 0 = no bound
    # a tiny reference (norm 0.1 < 1) is measured against 1, not 0.1
    small = {"v": np.array([0.1], dtype=np.float32)}
    assert check_norm({"v": np.array([1.0], dtype=np.float32)}, small, 1.0) is None
    assert check_norm({"v": np.array([1.2], dtype=np.float32)}, small, 1.0) is not None


def test_weight_must_be_the_shard_size():
    assert check_weight(16.0, 16) is None
    assert check_weight(1e9, 16) == \
        "num-examples=1000000000.0 but the client's shard has 16 examples"
    assert check_weight(math.nan, 16) is not None
    assert check_weight(0.0, 16) is not None


def test_bad_updates_are_rejected_and_the_global_state_stays_finite(
        tiny_models, tmp_path, flower_identity):  # noqa: F811
    # Client 1 sends NaNs, client 2 a state with a missing key, client 3 a huge one, client 4
    # lies about its example count; each is rejected, client 0's update is aggregated.
    def tamper(pid, content):
        arrays = {k: v.numpy() for k, v in content["arrays"].items()}
        first = next(iter(arrays))
        if pid == 1:
            arrays[first] = np.full_like(arrays[first], np.nan)
        elif pid == 2:
            del arrays[first]
        elif pid == 3:
            arrays = {k: v * np.float32(1e6) + np.float32(1.0) for k, v in arrays.items()}
        elif pid == 4:
            content["metrics"]["num-examples"] = 10**6
        content["arrays"] = to_record(arrays)
        return content

    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "rounds=2", "num-clients=5",
                      "clients-per-round=5", "on-round-failure=skip")
    grid = InProcessGrid(cfg.num_clients)
    grid.tamper = tamper
    summary = run_inprocess(cfg, grid)
    rounds = read_rounds(cfg.run_dir())
    for r in rounds:
        reasons = {x["client"]: x["reason"] for x in r["rejected"]}
        assert sorted(reasons) == [1, 2, 3, 4]
        assert "non-finite" in reasons[1] and "missing 1 key" in reasons[2]
        assert "exceeds max-update-norm" in reasons[3] and "num-examples=1000000" in reasons[4]
        assert r["successes"] == 1 and not r["skipped"] and not r["failures"]
    assert summary["rejected"] == 8
    final = load_state(cfg.run_dir() / "final_state.safetensors")
    assert all(np.all(np.isfinite(v)) for v in final.values())


@pytest.mark.parametrize(("settings", "message"), [
    (["lora-rank=64"], "lora-rank=64 exceeds the smallest dimension"),
    (["lora-alpha=0"], "lora-alpha must be > 0"),
    (["clients-per-round=9"], "clients-per-round=9 exceeds num-clients=4"),
    (["num-client=4"], "did you mean num-clients?"),
    (["slora-density=1.5"], "slora-density must be in (0, 1]"),
    (["target-modules=nope"], "are not linear layers of this model"),
    (["method=fedap", "adapter-modules=nope"], "cannot place adapters in model type 'bert'"),
    (["model=/no/such/model"], "model=/no/such/model: no such model folder"),
    (["min-train-clients=3"], "min-train-clients must be in [1, clients-per-round=2]"),
    (["fail-mode=hang", "fail-rate=0.5", "round-timeout=0"],
     "fail-mode=hang needs round-timeout > 0"),
])
def test_bad_settings_fail_in_one_line_before_anything_runs(tiny_models, tmp_path, capsys,
                                                           settings, message):
    from fedpeft.cli import main

    out = tmp_path / "run"
    code = main(["run", f"model={tiny_models('bert')}", "num-clients=4", "clients-per-round=2",
                 "max-train-samples=32", f"out={out}", "progress=false", *settings])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("fedpeft: error: ") and message in err
    assert "\n" not in err and "Traceback" not in err
    assert not out.exists()  # no run folder for a run that cannot start


def test_an_existing_run_folder_is_never_overwritten_silently(tmp_path, capsys):
    from fedpeft.cli import main

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "rounds.jsonl").write_text("precious\n")
    assert main(["run", f"out={tmp_path / 'run'}"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "run" / "rounds.jsonl").read_text() == "precious\n"
    assert main(["run", "--resume", str(tmp_path / "nothing")]) == 2
    assert "is not a run folder" in capsys.readouterr().err


@pytest.mark.parametrize("settings", [["transport-dtype=fp16"], ["transport-dtype=bf16"],
                                      ["aggregation=exact-lora"]])
def test_encoded_transport_and_exact_lora_pass_validation(tiny_models, tmp_path, settings,
                                                         flower_identity):  # noqa: F811
    # 16-bit payloads are decoded to float32 before they are checked against the global state
    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), *settings)
    summary = run_inprocess(cfg)
    rounds = read_rounds(cfg.run_dir())
    assert all(r["successes"] == 2 and not r["rejected"] for r in rounds)
    assert summary["failures"] == summary["rejected"] == 0
    if "aggregation=exact-lora" in settings:
        assert all(0.0 <= r["lora-truncation-error"] < 1.0 for r in rounds)
    else:  # fewer bytes than the same two float32 states would take
        fp32 = to_record(load_state(cfg.run_dir() / "final_state.safetensors")).count_bytes()
        assert rounds[1]["bytes-up"] < 0.7 * 2 * fp32


def test_global_state_is_the_fedavg_of_what_the_clients_sent(tiny_models, tmp_path,
                                                             flower_identity):  # noqa: F811
    # The server sums each update as it reads it (WeightedMean) and keeps none of them; the
    # result must be FedAvg of the replies, weighted by their example counts.
    from fedpeft.federation.aggregation import fedavg

    sent = {}

    def record(pid, content):
        sent[pid] = ({k: v.numpy() for k, v in content["arrays"].items()},
                     float(content["metrics"]["num-examples"]))
        return content

    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "rounds=1", "num-clients=4",
                      "clients-per-round=4", "max-train-samples=66")  # shards of 17 and 16
    grid = InProcessGrid(cfg.num_clients)
    grid.tamper = record
    run_inprocess(cfg, grid)
    assert len(sent) == 4 and len({w for _, w in sent.values()}) > 1  # unequal weights
    expected = fedavg([s for s, _ in sent.values()], [w for _, w in sent.values()])
    final = load_state(cfg.run_dir() / "final_state.safetensors")
    assert final.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_allclose(final[key], value, rtol=1e-6, atol=1e-7)
    unweighted = fedavg([s for s, _ in sent.values()], [1.0] * len(sent))
    assert any(not np.allclose(final[k], unweighted[k], rtol=1e-6, atol=1e-7) for k in final)
