"""FedFT: federated full fine-tuning. Every parameter trains and travels (the paper's upper
baseline in accuracy and in bytes)."""

from __future__ import annotations

import torch

from .base import Method


class FullFineTuning(Method):
    name = "fedft"
    paper = "FedAvg of all parameters (McMahan et al., 2017); FeDeRA paper Sec. 5.1"
    default_lr = 5e-5

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        model.requires_grad_(True)
        return model
