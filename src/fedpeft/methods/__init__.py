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
"""

from __future__ import annotations

from ..config import ConfigError, RunConfig
from .adapter import HoulsbyAdapters
from .base import Method
from .bitfit import BitFit
from .full import FullFineTuning
from .lora import FeDeRA, FFALoRA, LoRA
from .slora import SLoRA

METHODS: dict[str, type[Method]] = {
    "fedft": FullFineTuning,
    "fedbf": BitFit,
    "fedap": HoulsbyAdapters,
    "fedlr": LoRA,
    "federa": FeDeRA,
    "slora": SLoRA,
    "ffa-lora": FFALoRA,
}


def make_method(cfg: RunConfig, peft_task_type: str) -> Method:
    """The method named by ``cfg.method``."""
    try:
        return METHODS[cfg.method](cfg, peft_task_type)
    except KeyError:
        raise ConfigError(f"unknown method {cfg.method!r}; choose from "
                          f"{', '.join(METHODS)}") from None


__all__ = ["METHODS", "Method", "make_method"]
