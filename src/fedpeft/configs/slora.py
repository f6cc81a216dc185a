"""SLoRA's settings: its sparse first stage (``methods/slora.py``); stage 2 is LoRA."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .base import ConfigError, check_finite, setting


@dataclass
class SLoRAConfig:
    """SLoRA's sparse first stage (methods/slora.py; stage 2 takes the LoRA settings)"""

    slora_stage1_rounds: int | None = setting(
        None, "SLoRA sparse rounds, then LoRA; None = rounds//4 (>=1)")
    slora_density: float = setting(
        0.01, "SLoRA stage 1: share of each target matrix that trains (~1%)")
    slora_stage1_lr: float | None = setting(
        None, "None = SLoRA's stage-1 default (lr applies to stage 2)")

    def check_slora(self) -> None:
        check_finite(self, "slora_density")
        if not 0.0 < self.slora_density <= 1.0:
            raise ConfigError(f"slora-density must be in (0, 1], got {self.slora_density}")
        r1, rounds = self.slora_stage1_rounds, getattr(self, "rounds", None)
        # the upper bound only where SLoRA runs: a `compare` over several methods shares one
        # slora-stage1-rounds, and a shorter run of another method ignores it
        slora = getattr(self, "method", "slora") == "slora"
        if r1 is not None and not (r1 >= 1 and (rounds is None or not slora or r1 <= rounds)):
            raise ConfigError(f"slora-stage1-rounds must be in [1, rounds={rounds}], got {r1}")
        if self.slora_stage1_lr is not None and not self.slora_stage1_lr > 0:
            raise ConfigError(f"slora-stage1-lr must be > 0, got {self.slora_stage1_lr}")

    def resolve_slora(self, saved: Mapping[str, Any] | None) -> None:
        """Fix the stage switch once, at the start of a run (rounds // 4 of the first rounds;
        a resumed run keeps the one it logged)."""
        if getattr(self, "method", "slora") == "slora" and self.slora_stage1_rounds is None:
            earlier = (saved or {}).get("slora-stage1-rounds")
            self.slora_stage1_rounds = (int(earlier) if earlier
                                        else max(1, self.rounds // 4))
