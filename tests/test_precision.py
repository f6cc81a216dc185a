"""precision=auto|fp32|bf16: where autocast runs, and that bf16 training on CPU works."""

import numpy as np
import pytest
import torch

from fedpeft.config import ConfigError, RunConfig, load_config
from fedpeft.federation.runtime import Runtime
from fedpeft.training import _autocast, local_train


def test_precision_setting_is_checked():
    with pytest.raises(ConfigError, match="precision must be"):
        RunConfig(precision="fp16").validate()


@pytest.mark.parametrize(("precision", "enabled"), [("auto", False), ("fp32", False),
                                                    ("bf16", True)])
def test_autocast_on_cpu_only_when_asked(precision, enabled):
    context = _autocast(torch.device("cpu"), precision)
    with context:
        out = torch.nn.functional.linear(torch.ones(2, 4), torch.ones(3, 4))
    assert (out.dtype == torch.bfloat16) is enabled


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
