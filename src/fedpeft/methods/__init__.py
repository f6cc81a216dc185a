"""Federated fine-tuning methods by name; one file per method family."""

from __future__ import annotations

from ..config import ConfigError, RunConfig
from .base import Method
from .full import FullFineTuning
from .lora import LoRA, FeDeRA

METHODS: dict[str, type[Method]] = {
    "fedft": FullFineTuning,
    "fedlr": LoRA,
    "federa": FeDeRA,
}


def make_method(cfg: RunConfig, peft_task_type: str) -> Method:
    """The method named by ``cfg.method``."""
    try:
        return METHODS[cfg.method](cfg, peft_task_type)
    except KeyError:
        raise ConfigError(f"unknown method {cfg.method!r}; choose from {', '.join(METHODS)}") from None


__all__ = ["METHODS", "Method", "make_method"]
