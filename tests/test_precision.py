"""precision=auto|fp32|bf16: where autocast runs, and that bf16 training on CPU works."""

import numpy as np
import pytest
import torch
from inprocess import flower_identity  # noqa: F401

from fedpeft.config import ConfigError, RunConfig, load_config
from fedpeft.federation.runtime import Runtime
from fedpeft.training import _autocast, local_train, resolve_precision, warn_emulated_bf16


def test_precision_setting_is_checked():
    with pytest.raises(ConfigError, match="precision must be"):
        RunConfig(precision="fp16").validate()


@pytest.mark.parametrize(("precision", "native", "enabled"), [
    ("auto", False, False), ("auto", True, True), ("fp32", True, False), ("fp32", False, False),
    ("bf16", False, True), ("bf16", True, True)])
def test_autocast_on_cpu_when_asked_or_native(precision, native, enabled, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_precision(torch.device("cpu"), precision) == ("bf16" if enabled else "fp32")
    context = _autocast(torch.device("cpu"), precision)
    with context:
        out = torch.nn.functional.linear(torch.ones(2, 4), torch.ones(3, 4))
    assert (out.dtype == torch.bfloat16) is enabled


@pytest.mark.parametrize(("precision", "native", "warns"), [
    ("bf16", False, True), ("bf16", True, False), ("auto", False, False), ("fp32", False, False)])
def test_forced_bf16_on_an_emulating_cpu_warns(precision, native, warns, monkeypatch, recwarn):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    warn_emulated_bf16(torch.device("cpu"), precision)
    messages = [str(w.message) for w in recwarn.list]
    assert any("emulated" in m and "precision=auto picks fp32" in m for m in messages) is warns


def test_auto_follows_what_torch_says_of_this_cpu():
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert resolve_precision(torch.device("cpu")) == ("bf16" if native else "fp32")


def test_the_run_records_what_auto_meant(tiny_models, tmp_path, flower_identity):  # noqa: F811
    from inprocess import run_inprocess, tiny_config

    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "rounds=1")
    summary = run_inprocess(cfg)
    assert summary["precision"] == resolve_precision(torch.device("cpu"), "auto")


def test_bf16_local_training_on_cpu_keeps_fp32_parameters(tiny_models):
    cfg = load_config(None, [f"model={tiny_models('bert')}", "method=federa", "lora-rank=4",
                             "max-train-samples=32", "max-test-samples=16", "precision=bf16"])
    runtime = Runtime(cfg)
    runtime.method.make_anchor(runtime.model)
    seen = []
    layer = next(m for n, m in runtime.model.named_modules() if n.endswith("query.base_layer"))
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    result = local_train(runtime.model, runtime.features("train").rows, runtime.collate, lr=1e-3,
                         epochs=1, batch_size=8, weight_decay=0.0, max_grad_norm=1.0,
                         generator=torch.Generator().manual_seed(0), device=torch.device("cpu"),
                         precision=cfg.precision)
    handle.remove()
    assert result.steps == 4 and np.isfinite(result.loss)
    assert set(seen) == {torch.bfloat16}  # the matmuls ran in bf16
    assert all(p.dtype == torch.float32 for p in runtime.model.parameters())
    assert 0.0 <= runtime.evaluate("test")["accuracy"] <= 1.0
