"""FedBF: federated BitFit. Only the bias terms of the encoder (and the task head) train and travel.

BitFit (Ben Zaken, Ravfogel and Goldberg, ACL 2022, arXiv 2106.10199) fine-tunes every bias
vector of the pretrained transformer: the query/key/value/output biases of attention, the two
feed-forward biases and the LayerNorm biases (their Eq. 1-5), about 0.1% of a base model's
parameters. FedBF is BitFit under FedAvg, as compared in FedPETuning (Zhang et al., Findings of
ACL 2023) and the FeDeRA paper (Sec. 5.1). The model is not changed, so its output at init is the
pretrained model's.

Note that the key bias has no effect on attention (softmax is invariant to a constant added to a
query's logits), so its gradient is zero; BitFit trains it anyway, as the paper does.
"""

from __future__ import annotations

import torch

from ..models import head_module_names
from .base import Method, freeze_all_but_head


def bias_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names of the encoder's bias parameters (every ``*.bias``, the task head's excluded)."""
    head = tuple(f"{name}." for name in head_module_names(model))
    return [name for name, _ in model.named_parameters()
            if name.rsplit(".", 1)[-1] == "bias" and not name.startswith(head)]


class BitFit(Method):
    """Federated BitFit: biases + head."""

    name = "fedbf"
    paper = "BitFit (Ben Zaken et al., 2022) in FedAvg; FedPETuning (Zhang et al., 2023) FedBF"
    default_lr = 5e-3  # SemEval, bundled model, 400 steps: 5e-3 -> 0.54 acc; 2e-3 0.44, 1e-2 fails

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        freeze_all_but_head(model)
        names = set(bias_parameter_names(model))
        if not names:
            kind = getattr(getattr(model, "config", None), "model_type", "?")
            raise ValueError(f"method=fedbf trains the bias terms, and {type(model).__name__} "
                             f"(model type {kind!r}) has none (Llama-family decoders such as "
                             "SmolLM2 have no biases; GPT-2 and Qwen2 do); choose another method")
        for name, param in model.named_parameters():
            if name in names:
                param.requires_grad_(True)
        return model
