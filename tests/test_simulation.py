"""End to end through Flower's simulation runtime: a tiny model, 4 clients, 2 rounds."""

import json

import numpy as np
import pytest

from fedpeft.config import load_config
from fedpeft.federation.runtime import Runtime
from fedpeft.federation.state import frozen_digest, trainable_state
from fedpeft.runlog import load_state, read_rounds


@pytest.mark.slow
@pytest.mark.parametrize("method", ["federa"])
def test_federated_run_changes_exactly_the_trainable_state(tiny_models, tmp_path, method):
    from fedpeft.federation.simulation import simulate

    cfg = load_config(None, [
        f"model={tiny_models('bert')}", f"method={method}", "lora-rank=4", "num-clients=4",
        "clients-per-round=2", "rounds=2", "max-train-samples=96", "max-test-samples=48",
        "batch-size=8", "lr=5e-3", f"out={tmp_path / 'run'}", "progress=false",
    ])
    summary = simulate(cfg)
    run = cfg.run_dir()
    rounds = read_rounds(run)
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["successes"] == 2 and not r["failures"]
        assert r["bytes-up"] > 0 and r["bytes-down"] > r["bytes-up"] / 2
        assert "accuracy" in r["metrics"] and np.isfinite(r["train-loss"])
    assert len(set(rounds[0]["clients"])) == 2
    # Drift of the global LoRA factors is logged every round, per layer, for A and B.
    for r in rounds:
        assert set(r["drift"]["mean"]) == {"A", "B"}
        assert r["drift"]["mean"]["A"]["magnitude"] > 0 and r["drift"]["mean"]["B"]["direction"] > 0
        assert set(r["drift"]["layers"]) == {"0", "1"}
    assert summary["seconds-svd"] > 0  # FeDeRA's initial SVD, timed on the server
    # FeDeRA: the anchor travels once per client, so round 1 sends more than a later round
    # with the same clients would. Upload per client equals the trainable payload.
    init = Runtime(cfg)
    init.method.make_anchor(init.model)
    start = trainable_state(init.model)
    final = load_state(run / "final_state.safetensors")
    assert final.keys() == start.keys()
    changed = [k for k in start if not np.allclose(start[k], final[k])]
    assert len(changed) == len(start)  # every trainable tensor moved (A, B and the head)
    # The frozen base never moved, and it is the residual that any fresh process computes.
    digest = frozen_digest(init.model)
    assert summary["frozen-digest-start"] == summary["frozen-digest-end"] == digest
    assert summary["trainable-params"] == sum(v.size for v in start.values())
    assert (run / "config.toml").exists() and (run / "partition.json").exists()
    assert json.loads((run / "summary.json").read_text())["rounds"] == 2
