"""FeDeRA's SVD initialisation and the residual rule, and FedLR's Gaussian init."""

import dataclasses

import numpy as np
import pytest
import torch

from fedpeft.config import RunConfig
from fedpeft.federation.runtime import Runtime
from fedpeft.federation.state import frozen_state, trainable_state
from fedpeft.methods.lora import lora_layers, residual, svd_factors
from fedpeft.models import load_model


def make_cfg(model: str, method: str, **kw) -> RunConfig:
    return RunConfig(model=model, method=method, lora_rank=4, lora_alpha=8.0,
                     max_train_samples=64, max_test_samples=32, **kw).validate()


def logits(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (3, 12), generator=g)
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_svd_factors_hand_checked():
    w = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    a, b = svd_factors(w, rank=2, scaling=2.0)
    # s*B@A = best rank-2 approximation = diag(3, 2, 0)
    assert torch.allclose(2.0 * b @ a, torch.diag(torch.tensor([3.0, 2.0, 0.0])), atol=1e-6)
    assert a.shape == (2, 3) and b.shape == (3, 2)
    # A = sqrt(S/s) V^T, B = U sqrt(S/s): row norms of A = sqrt(S/s)
    assert torch.allclose(a.norm(dim=1), torch.sqrt(torch.tensor([1.5, 1.0])), atol=1e-6)
    with pytest.raises(ValueError, match="exceeds"):
        svd_factors(w, rank=4, scaling=1.0)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_federa_keeps_the_output_and_counts_parameters(tiny_models, arch):
    cfg = make_cfg(tiny_models(arch), "federa")
    server = Runtime(cfg)
    before = logits(server.model)  # LoRA with init=False still adds s*B@A: compare to the base
    base = load_model(cfg.model, server.task.auto_model_class(), seed=cfg.seed,
                      **server.task.model_kwargs())
    anchor = server.method.make_anchor(server.model)
    after = logits(server.model)
    assert torch.allclose(after, logits(base), atol=1e-5)
    assert not torch.allclose(before, after, atol=1e-5)  # the anchor did change the adapter
    # r*(d_in+d_out) per target, 2 targets (query, value) per layer, plus the head.
    layers = lora_layers(server.model)
    assert len(layers) == 2 * 2
    head = sum(p.numel() for n, p in base.named_parameters() if "classifier" in n)
    expected = sum(4 * (32 + 32) for _ in layers) + head
    assert sum(v.size for v in trainable_state(server.model).values()) == expected
    assert len(anchor) == 2 * len(layers)


def test_client_residual_equals_the_servers(tiny_models):
    cfg = make_cfg(tiny_models("bert"), "federa")
    server = Runtime(cfg)
    anchor = server.method.make_anchor(server.model)
    client = Runtime(cfg)  # a fresh process's model, built from the pretrained weights
    received = {k: torch.from_numpy(v.numpy().copy()) for k, v in anchor.items()}
    client.method.apply_anchor(client.model, received)
    s, c = frozen_state(server.model), frozen_state(client.model)
    assert s.keys() == c.keys()
    for key in s:
        assert torch.equal(s[key], c[key]), key
    with pytest.raises(RuntimeError, match="already holds a residual"):
        client.method.apply_anchor(client.model, received)


def test_residual_matches_peft_pissa(tiny_models):
    from peft import LoraConfig, get_peft_model

    cfg = make_cfg(tiny_models("bert"), "federa")
    ours = Runtime(cfg)
    ours.method.make_anchor(ours.model)
    base = load_model(cfg.model, ours.task.auto_model_class(), seed=cfg.seed,
                      **ours.task.model_kwargs())
    pissa = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8.0,
                                            target_modules=["query", "value"],
                                            init_lora_weights="pissa"))
    theirs = lora_layers(pissa)
    for name, layer in lora_layers(ours.model).items():
        other = theirs[name]
        ba = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        ba_peft = other.lora_B["default"].weight @ other.lora_A["default"].weight
        assert torch.allclose(ba, ba_peft, atol=1e-5)
        assert torch.allclose(layer.get_base_layer().weight, other.get_base_layer().weight,
                              atol=1e-5)


def test_residual_rule_is_sign_invariant():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, generator=g)
    a, b = svd_factors(w, 2, scaling=1.0)
    flip = torch.tensor([-1.0, 1.0])  # flip the sign of one singular pair
    assert torch.allclose(residual(w, a, b, 1.0), residual(w, flip[:, None] * a, b * flip, 1.0))


def test_fedlr_starts_at_the_pretrained_model(tiny_models):
    cfg = make_cfg(tiny_models("bert"), "fedlr")
    rt = Runtime(cfg)
    base = load_model(cfg.model, rt.task.auto_model_class(), seed=cfg.seed,
                      **rt.task.model_kwargs())
    assert torch.allclose(logits(rt.model), logits(base), atol=1e-6)  # B = 0
    for layer in lora_layers(rt.model).values():
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
        a = layer.lora_A["default"].weight
        assert 0.5 / 4 < a.std().item() < 2.0 / 4  # PEFT "gaussian": N(0, (1/r)^2)
    assert rt.method.make_anchor(rt.model) is None


def test_head_trains_in_every_method(tiny_models):
    for method in ("fedft", "fedlr", "federa"):
        rt = Runtime(make_cfg(tiny_models("bert"), method))
        names = list(trainable_state(rt.model))
        assert any("classifier" in n for n in names), method
        if method != "fedft":
            assert all("lora_" in n or "classifier" in n for n in names), method


def test_rank_larger_than_the_layer_is_rejected(tiny_models):
    cfg = dataclasses.replace(make_cfg(tiny_models("bert"), "fedlr"), lora_rank=64)
    with pytest.raises(ValueError, match="lora-rank=64 exceeds"):
        Runtime(cfg)


def test_trainable_state_round_trip(tiny_models):
    from fedpeft.federation.state import load_trainable_state

    rt = Runtime(make_cfg(tiny_models("bert"), "fedlr"))
    state = {k: np.full_like(v, 0.5) for k, v in trainable_state(rt.model).items()}
    load_trainable_state(rt.model, state)
    assert all(np.all(v == 0.5) for v in trainable_state(rt.model).values())
    with pytest.raises(ValueError, match="missing"):
        load_trainable_state(rt.model, dict(list(state.items())[1:]))
