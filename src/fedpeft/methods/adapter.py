"""FedAP: federated Houlsby bottleneck adapters.

Houlsby et al. (ICML 2019, arXiv 1902.00751) insert a small bottleneck module twice in every
transformer layer, after the attention output projection and after the feed-forward output
projection, before the residual connection and LayerNorm:

    h <- h + W_up f(W_down h + b_down) + b_up        W_down: (m, d), W_up: (d, m), m = d / k

with k the reduction factor (``adapter-reduction``; FedPETuning's FedAP uses k = 16: 1.79M
parameters on a 768-wide, 12-layer encoder). Only the adapters and the task head train and travel
(FedPETuning, Zhang et al., Findings of ACL 2023; FeDeRA paper Sec. 5.1). ``W_up`` and ``b_up``
start at zero, so the adapted model computes exactly the pretrained function at init; ``W_down``
starts as N(0, 0.02^2) from a seeded generator. The nonlinearity is GELU, as in the encoders.

AdapterHub's ``adapters`` package pins an older transformers, so this is a small module of our own:
each site's ``nn.Linear`` is wrapped by ``Adapted(base, adapter)``. Sites are resolved per
architecture by ``models.adapter_sites`` (overridable with ``adapter-modules=...``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..models import adapter_sites, out_features
from ..configs import AdapterConfig
from .base import Method, freeze_all_but_head

INIT_STD = 0.02  # std of W_down at init (BERT's initializer range)


class BottleneckAdapter(nn.Module):
    """``h + up(gelu(down(h)))`` on the last dimension; the identity at init (up = 0)."""

    def __init__(self, dim: int, bottleneck: int, generator: torch.Generator) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        with torch.no_grad():
            self.down.weight.copy_(torch.randn(bottleneck, dim, generator=generator) * INIT_STD)
            self.down.bias.zero_()
            self.up.weight.zero_()
            self.up.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d)
        return h + self.up(nn.functional.gelu(self.down(h)))


class Adapted(nn.Module):
    """A frozen linear layer followed by an adapter: ``adapter(base(x))``."""

    def __init__(self, base: nn.Linear, adapter: BottleneckAdapter) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.base(x))


def adapter_size(dim: int, reduction: int) -> int:
    """Parameters of one adapter: 2*d*m + m + d with m = max(1, d // k)."""
    m = bottleneck_width(dim, reduction)
    return 2 * dim * m + m + dim


def bottleneck_width(dim: int, reduction: int) -> int:
    return max(1, dim // reduction)


def add_adapters(model: nn.Module, sites: list[str], reduction: int, seed: int) -> None:
    """Wrap each named linear layer of ``model`` with a fresh bottleneck adapter (in place)."""
    generator = torch.Generator().manual_seed(seed)
    for name in sites:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        dim = out_features(linear)  # nn.Linear or GPT-2's Conv1D
        adapter = BottleneckAdapter(dim, bottleneck_width(dim, reduction), generator)
        setattr(parent, child, Adapted(linear, adapter.to(linear.weight.dtype)))


class HoulsbyAdapters(Method):
    """Federated Houlsby adapters (FedAP): adapters + head."""

    name = "fedap"
    config_classes = (AdapterConfig,)
    paper = "Houlsby adapters (Houlsby et al., 2019) in FedAvg; FedPETuning (Zhang et al., 2023)"
    default_lr = 2e-3  # SemEval, bundled model, 400 steps: 2e-3 -> 0.45 acc; 1e-3 0.38, 5e-3 0.42

    def apply(self, model: nn.Module) -> nn.Module:
        sites = adapter_sites(model, self.cfg.adapter_modules)
        freeze_all_but_head(model)
        add_adapters(model, sites, self.cfg.adapter_reduction, self.cfg.seed)  # trainable
        return model
