"""DoRA and rsLoRA on the LoRA family (PEFT's use_dora / use_rslora): scaling, budgets by hand,
FeDeRA's exact start with each, what travels, and short federated runs."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from inprocess import flower_identity, run_inprocess, tiny_config  # noqa: F401
from test_lora_init import logits  # the same probe inputs as FeDeRA's init tests

from fedpeft.budget import budget_table, method_budget
from fedpeft.config import ConfigError, RunConfig, load_config
from fedpeft.federation.runtime import Runtime
from fedpeft.federation.strategies.build import make_strategy
from fedpeft.methods.lora import lora_layers, lora_scaling
from fedpeft.models import load_model
from fedpeft.tensors import trainable_state

R, ALPHA, D = 4, 8.0, 32  # rank, alpha, the tiny models' hidden size
TARGETS = 2 * 2  # query and value in each of 2 layers


def make_cfg(model: str, method: str, **kw) -> RunConfig:
    return RunConfig(model=model, method=method, lora_rank=R, lora_alpha=ALPHA,
                     max_train_samples=64, max_test_samples=32, **kw).validate()


def pretrained(rt: Runtime) -> torch.nn.Module:
    return load_model(rt.cfg.model, rt.task.auto_model_class(), seed=rt.cfg.seed,
                      **rt.task.model_kwargs())


def head_size(rt: Runtime) -> int:
    return sum(p.numel() for n, p in pretrained(rt).named_parameters() if "classifier" in n)


def magnitudes(state) -> dict:
    return {k: v for k, v in state.items() if "lora_magnitude_vector" in k}


@pytest.mark.parametrize("rslora", [False, True])
def test_scaling_is_peft_s(tiny_models, rslora):
    cfg = make_cfg(tiny_models("bert"), "fedlr", lora_rslora=rslora)
    expected = ALPHA / math.sqrt(R) if rslora else ALPHA / R  # 4.0 or 2.0
    assert lora_scaling(cfg) == pytest.approx(expected)
    for layer in lora_layers(Runtime(cfg).model).values():
        assert layer.scaling["default"] == pytest.approx(expected)


@pytest.mark.parametrize("method,dora,rslora", [
    ("fedlr", True, False), ("fedlr", False, True), ("federa", True, True),
    ("ffa-lora", True, False), ("slora", False, True)])
def test_budget_by_hand(tiny_models, method, dora, rslora):
    cfg = make_cfg(tiny_models("bert"), method, lora_dora=dora, lora_rslora=rslora, rounds=4)
    rows = method_budget(cfg)
    head = head_size(Runtime(cfg))
    per_target = R * D + (R * D if method != "ffa-lora" else 0) + (D if dora else 0)
    lora = TARGETS * per_target + head  # A (r x d) + B (d x r) + DoRA's m (d_out) per target
    name = "+".join([method] + ["dora"] * dora + ["rslora"] * rslora)
    assert rows[-1]["trainable-params"] == lora
    assert rows[-1]["method"].startswith(name)
    assert rows[-1]["bytes-up"] >= 4 * lora  # float32 payload
    if method == "slora":  # stage 1 is sparse, rsLoRA or not
        assert len(rows) == 2 and rows[0]["trainable-params"] < lora


def test_budget_table_lists_every_method_with_dora(tiny_models):
    cfg = load_config(None, [f"model={tiny_models('bert')}", "lora-rank=4", "lora-dora=true",
                             "max-train-samples=64", "max-test-samples=32"])
    table = budget_table(cfg, ["fedft", "fedbf", "fedlr", "federa", "slora"])
    assert "| fedft |" in table and "| fedlr+dora |" in table and "| federa+dora |" in table
    assert "| slora (rounds" in table  # DoRA is not offered with SLoRA (see config.py)


@pytest.mark.parametrize("dora,rslora", [(False, True), (True, False), (True, True)])
def test_federa_variants_keep_the_output(tiny_models, dora, rslora):
    cfg = make_cfg(tiny_models("bert"), "federa", lora_dora=dora, lora_rslora=rslora)
    server = Runtime(cfg)
    base = pretrained(server)
    before = {k: v.copy() for k, v in magnitudes(trainable_state(server.model)).items()}
    anchor = server.method.make_anchor(server.model)
    assert torch.allclose(logits(server.model), logits(base), atol=1e-5)
    scaling = lora_scaling(cfg)
    originals = dict(base.named_modules())
    for name, layer in lora_layers(server.model).items():
        assert layer.scaling["default"] == pytest.approx(scaling)
        w = originals[name.removeprefix("base_model.model.")].weight.detach()
        a, b = anchor[f"{name}.lora_A.default.weight"], anchor[f"{name}.lora_B.default.weight"]
        # the residual W - s*B0@A0 with the rsLoRA/LoRA s, and s*B0@A0 the top-r part of W
        assert torch.allclose(layer.get_base_layer().weight + scaling * b @ a, w, atol=1e-5)
        if dora:  # m = ||W_res + s*B0@A0|| per output row = ||W||
            m = layer.lora_magnitude_vector["default"].weight.detach()
            assert torch.allclose(m, w.norm(dim=1), atol=1e-5)
    if dora:  # PEFT's m, from the random A, B it built, had to be replaced
        after = magnitudes(trainable_state(server.model))
        assert any(not np.allclose(before[k], after[k], atol=1e-4) for k in before)


@pytest.mark.parametrize("rslora", [False, True])
def test_federa_dora_matches_peft_pissa_dora(tiny_models, rslora):
    from peft import LoraConfig, get_peft_model

    cfg = make_cfg(tiny_models("bert"), "federa", lora_dora=True, lora_rslora=rslora)
    ours = Runtime(cfg)
    ours.method.make_anchor(ours.model)
    pissa = get_peft_model(pretrained(ours), LoraConfig(
        task_type="SEQ_CLS", r=R, lora_alpha=ALPHA, target_modules=["query", "value"],
        init_lora_weights="pissa", use_dora=True, use_rslora=rslora))
    theirs = lora_layers(pissa)
    for name, layer in lora_layers(ours.model).items():
        other = theirs[name]
        assert torch.allclose(layer.get_base_layer().weight, other.get_base_layer().weight,
                              atol=1e-5)
        assert torch.allclose(layer.lora_magnitude_vector["default"].weight,
                              other.lora_magnitude_vector["default"].weight, atol=1e-5)
    assert torch.allclose(logits(ours.model), logits(pissa), atol=1e-5)


def test_dora_magnitude_trains_and_travels(tiny_models):
    from fedpeft.training import local_train

    cfg = make_cfg(tiny_models("bert"), "federa", lora_dora=True, lr=1e-2, num_clients=4,
                   clients_per_round=2)
    rt = Runtime(cfg)
    anchor = rt.method.make_anchor(rt.model)
    start = magnitudes(rt.method.export_state(rt.model))
    assert len(start) == TARGETS and all(v.shape == (D,) for v in start.values())
    local_train(rt.model, rt.client_rows(0), rt.collate, lr=1e-2, epochs=1, batch_size=8,
                weight_decay=0.0, max_grad_norm=1.0, generator=torch.Generator().manual_seed(0),
                device=rt.device)
    after = magnitudes(rt.method.export_state(rt.model))
    assert all(not np.array_equal(start[k], after[k]) for k in start)  # it trained
    client = Runtime(cfg)  # a client: residual from the anchor, then the broadcast state
    client.method.apply_anchor(client.model, anchor)
    client.method.import_state(client.model, rt.method.export_state(rt.model))
    assert torch.allclose(logits(client.model), logits(rt.model), atol=1e-5)


def test_ffa_lora_dora_trains_b_and_magnitude_only(tiny_models):
    rt = Runtime(make_cfg(tiny_models("bert"), "ffa-lora", lora_dora=True))
    names = list(trainable_state(rt.model))
    assert not any("lora_A" in n for n in names)
    assert sum("lora_B" in n for n in names) == TARGETS
    assert sum("lora_magnitude_vector" in n for n in names) == TARGETS


def test_exact_lora_uses_the_rslora_scaling(tiny_models):
    cfg = make_cfg(tiny_models("bert"), "fedlr", lora_rslora=True, aggregation="exact-lora")
    assert make_strategy(cfg, 1e-3).scaling == pytest.approx(ALPHA / math.sqrt(R))
    plain = dataclasses.replace(cfg, lora_rslora=False)
    assert make_strategy(plain, 1e-3).scaling == pytest.approx(ALPHA / R)


@pytest.mark.parametrize("method,setting", [("fedft", "lora-dora"), ("fedbf", "lora-rslora"),
                                            ("fedap", "lora-dora")])
def test_variants_outside_the_lora_family_are_refused(method, setting):
    with pytest.raises(ConfigError, match=setting):
        load_config(None, [f"method={method}", f"{setting}=true"])


@pytest.mark.slow
@pytest.mark.parametrize("method,overrides", [
    ("fedlr", ["lora-dora=true"]),
    ("federa", ["lora-dora=true"]),
    ("federa", ["lora-rslora=true", "aggregation=exact-lora"]),
    ("ffa-lora", ["lora-dora=true", "lora-rslora=true"]),
    ("slora", ["lora-rslora=true"]),
])
def test_two_round_run_with_each_variant(tiny_models, tmp_path, flower_identity,  # noqa: F811
                                         method, overrides):
    from safetensors.numpy import load_file

    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), f"method={method}",
                      *overrides)
    rt = Runtime(cfg)
    rt.method.make_anchor(rt.model)
    start = rt.method.export_state(rt.model)
    summary = run_inprocess(cfg)
    assert summary["rounds"] == 2 and summary["skipped-rounds"] == 0
    final = load_file(str(tmp_path / "run" / "final_state.safetensors"))
    if method != "slora":  # SLoRA's stage 2 state is new at the switch
        assert final.keys() == start.keys()
        assert summary["trainable-params"] == sum(v.size for v in start.values())
    dora = "lora-dora=true" in overrides
    assert bool(magnitudes(final)) == dora
    for key, value in magnitudes(final).items():
        assert not np.allclose(value, start[key]), key  # the magnitudes trained and came back


def test_slora_dora_switch_starts_stage_2_at_the_primed_weights(tiny_models, tmp_path,
                                                                flower_identity):  # noqa: F811
    """With m reset to ||W0 + s*B*A|| at the switch, DoRA's stage-2 model computes exactly what
    plain SLoRA's does: the same metrics right after the switch."""
    from inprocess import run_inprocess, tiny_config

    from fedpeft.runlog import read_rounds

    common = ["method=slora", "rounds=2", "slora-stage1-rounds=1", "slora-density=0.1"]
    plain = tiny_config(tiny_models("bert"), str(tmp_path / "plain"), *common)
    dora = tiny_config(tiny_models("bert"), str(tmp_path / "dora"), *common, "lora-dora=true")
    run_inprocess(plain)
    run_inprocess(dora)
    (p1, _), (d1, _) = read_rounds(plain.run_dir()), read_rounds(dora.run_dir())
    assert d1["metrics"] == p1["metrics"]  # stage 1 does not involve DoRA
    assert d1["metrics-after-switch"] == pytest.approx(p1["metrics-after-switch"], abs=1e-6)
