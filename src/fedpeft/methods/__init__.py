"""Federated fine-tuning methods by name; one file per method family.

| name | what trains and travels (plus the task head, always) | file |
|---|---|---|
| fedft | every parameter | ``full.py`` |
| fedbf | every bias (BitFit) | ``bitfit.py`` |
| fedap | Houlsby bottleneck adapters after attention and FFN outputs | ``adapter.py`` |
| fedlr | LoRA A and B (Gaussian A, zero B) | ``lora.py`` |
| federa | LoRA A and B from the SVD of W, residual frozen | ``lora.py`` |
| ffa-lora | LoRA B only (A random and frozen) | ``lora.py`` |
| slora | sparse masked entries of the targets, then LoRA from their SVD | ``slora.py`` |
| fedsa-lora | LoRA A (B trains, but each client keeps its own) | ``fedsa_lora.py`` |
| rolora | LoRA B in odd rounds, A in even ones (the other frozen) | ``rolora.py`` |
| flora | fresh LoRA per round, rank per client; stacked factors merged into base | ``flora.py`` |
| flexlora | LoRA, rank per client; SVD of the mean product, truncated per rank | ``flexlora.py`` |
| fedex-lora | LoRA A and B (FedAvg) + the residual folded into the base | ``fedex_lora.py`` |
| hetlora | LoRA (ranks per client): padding, sparsity weights, self-pruning | ``hetlora.py`` |
"""

from __future__ import annotations

from ..config import ConfigError, RunConfig
from .adapter import HoulsbyAdapters
from .base import Method
from .bitfit import BitFit
from .fedex_lora import FedExLoRA
from .fedsa_lora import FedSALoRA
from .flexlora import FlexLoRA
from .flora import FLoRA
from .full import FullFineTuning
from .hetlora import HetLoRA
from .lora import FeDeRA, FFALoRA, LoRA
from .rolora import RoLoRA
from .slora import SLoRA

METHODS: dict[str, type[Method]] = {
    "fedft": FullFineTuning,
    "fedbf": BitFit,
    "fedap": HoulsbyAdapters,
    "fedlr": LoRA,
    "federa": FeDeRA,
    "slora": SLoRA,
    "ffa-lora": FFALoRA,
    "fedsa-lora": FedSALoRA,
    "rolora": RoLoRA,
    "flora": FLoRA,
    "flexlora": FlexLoRA,
    "fedex-lora": FedExLoRA,
    "hetlora": HetLoRA,
}


def make_method(cfg: RunConfig, peft_task_type: str) -> Method:
    """The method named by ``cfg.method``."""
    try:
        return METHODS[cfg.method](cfg, peft_task_type)
    except KeyError:
        raise ConfigError(f"unknown method {cfg.method!r}; choose from "
                          f"{', '.join(METHODS)}") from None


def check_method_settings(cfg: RunConfig) -> None:
    """The method's own check of the settings it cannot follow (``Method.check_settings``)."""
    if cfg.method in METHODS:
        METHODS[cfg.method].check_settings(cfg)


__all__ = ["METHODS", "Method", "check_method_settings", "make_method"]
