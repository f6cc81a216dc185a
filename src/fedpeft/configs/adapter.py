"""FedAP's settings: Houlsby bottleneck adapters (``methods/adapter.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import ConfigError, setting


@dataclass
class AdapterConfig:
    """FedAP adapters (methods/adapter.py)"""

    adapter_reduction: int = setting(
        16, "FedAP bottleneck width = hidden size / this (FedPETuning: 16)")
    adapter_modules: list[str] | None = setting(
        None, "FedAP sites under each layer; None = attn/FFN outs")

    def check_adapter(self) -> None:
        if self.adapter_reduction <= 0:
            raise ConfigError(f"adapter-reduction must be > 0, got {self.adapter_reduction}")
