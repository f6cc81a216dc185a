"""Every method on the real task with the real model: SemEval-2010 Task 8 as the package ships it
and the bundled all-MiniLM-L6-v2 (the demo's model), one federated round each in-process (two for
SLoRA across its stage switch, and FedSA-LoRA), the ranked methods with heterogeneous client
ranks. Tiny data, real weights and tokenizer: what the tiny random models of the other tests
cannot show."""

from __future__ import annotations

import numpy as np
import pytest
from inprocess import flower_identity, run_inprocess, tiny_config  # noqa: F401 (fixture)

from fedpeft.federation.runtime import Runtime
from fedpeft.methods import METHODS
from fedpeft.runlog import load_state, read_rounds

# they fold an update into the frozen base: every round, or (SLoRA) the sparse stage's at its end
MERGING = {"flora", "fedex-lora", "slora"}
RANKED = {"flora", "flexlora", "hetlora"}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_on_semeval_with_the_bundled_model(tmp_path, flower_identity,  # noqa: F811
                                                               method):  # noqa: F811
    # FedSA-LoRA's A only gets a gradient once the client's own B has left zero: two rounds
    extra = {"slora": ["rounds=2", "slora-stage1-rounds=1", "slora-density=0.05"],
             "fedsa-lora": ["rounds=2"],
             **{m: ["client-ranks=4,8"] for m in RANKED}}.get(method, [])
    cfg = tiny_config("all-MiniLM-L6-v2", str(tmp_path / "run"), "task=semeval",
                      f"method={method}", "rounds=1", "max-train-samples=64",
                      "max-test-samples=32", "lr=5e-3", "lora-rank=8", *extra)
    summary = run_inprocess(cfg)
    rounds = read_rounds(cfg.run_dir())
    assert [r["round"] for r in rounds] == list(range(1, cfg.rounds + 1))
    assert all(r["successes"] == 2 and np.isfinite(r["train-loss"]) for r in rounds)
    assert rounds[-1]["metrics"].keys() >= {"accuracy", "macro-f1"}
    assert summary["trainable-params"] > 0 and rounds[-1]["bytes-up"] > 0
    init = Runtime(cfg)
    init.method.make_anchor(init.model)
    start = init.method.export_state(init.model)
    final = load_state(cfg.run_dir() / "final_state.safetensors")
    merged = summary["frozen-digest-start"] != summary["frozen-digest-end"]
    assert merged == (method in MERGING), summary
    # the head trains (SLoRA's stage 2 names it the PEFT way: base_model.model...modules_to_save)
    head = {k: final.get(k, final.get(f"base_model.model.{k}".replace(
        "classifier.", "classifier.modules_to_save.default."))) for k in start if "classifier" in k}
    assert head and all(v is not None and not np.array_equal(start[k], v)
                        for k, v in head.items()), sorted(final)[:4]
    body = [k for k in start if k not in head and k in final]
    if method not in MERGING:  # the merging methods restart their factors
        assert any(not np.allclose(start[k], final[k]) for k in body), method
