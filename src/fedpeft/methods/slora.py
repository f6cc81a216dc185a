"""SLoRA: LoRA primed by a sparse federated first stage (Babakniya et al., 2023, arXiv 2308.06522).

Stage 1, rounds 1..R1 (``slora-stage1-rounds``): clients fine-tune a random sparse subset of the
LoRA target matrices (query/value by default). For each target W0 (d_out, d_in) a mask of
k = round(density * d_out * d_in) entries is drawn from a seed that the server sends with every
stage-1 message (``client_config``). The layer's weight becomes ``W0 + scatter(delta)`` (a torch
parametrization) whose only trainable tensor is ``delta`` (k,): entries outside the mask are not
parameters at all, so they get no gradient, no AdamW state and no weight decay, and a client
uploads just ``delta`` and the head (payload = density x target parameters + head). FedAvg of the
clients' ``delta`` vectors is FedAvg of their masked entries.

The switch, ``end_round(R1)`` on the server: per target dW = scatter(delta) = W_stage1 - W0; its
top-r SVD gives A, B with s * B @ A = rank-r(dW) (``svd_factors``, shared with FeDeRA). The frozen
base is W0 again, so the new global state (A, B, head) is all a client needs to start stage 2.

Stage 2, rounds R1+1..: ordinary federated LoRA from that initialisation (FedLR's machinery;
SLoRA is an initialisation variant of LoRA). ``state_dict`` (logged every round) records the
stage each round trained in, and the switch with the share of ||dW||^2 the rank-r init kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..config import RunConfig
from ..configs import LoraConfig, SLoRAConfig
from ..models import head_module_names, is_linear, query_value_modules, transposed_weight
from .base import freeze_all_but_head
from .lora import LoRA, lora_layers, reset_magnitude, svd_factors


def sparse_indices(numel: int, density: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted flat indices of ``max(1, round(density * numel))`` distinct entries."""
    k = min(numel, max(1, round(density * numel)))
    return np.sort(rng.choice(numel, size=k, replace=False))


def target_masks(numels: list[int], density: float, seed: int) -> list[np.ndarray]:
    """One mask per target matrix; target ``i``'s comes from ``default_rng([seed, i])``."""
    return [sparse_indices(n, density, np.random.default_rng([seed, i]))
            for i, n in enumerate(numels)]


def stage_of(server_round: int, stage1_rounds: int) -> int:
    """The stage a round trains in: 1 up to and including ``stage1_rounds``, then 2."""
    return 1 if server_round <= stage1_rounds else 2


class SparseDelta(nn.Module):
    """Parametrization ``W0 -> W0 + scatter(delta)``: only the masked entries can move."""

    def __init__(self, indices: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("indices", indices.to(torch.long), persistent=False)
        self.delta = nn.Parameter(torch.zeros(len(indices), dtype=dtype))  # (k,)

    def forward(self, w0: torch.Tensor) -> torch.Tensor:  # (d_out, d_in)
        return w0.reshape(-1).index_add(0, self.indices, self.delta).view_as(w0)

    def dense(self, shape: torch.Size) -> torch.Tensor:
        """The update as a matrix: zeros except ``delta`` at the masked entries."""
        flat = torch.zeros(shape.numel(), dtype=self.delta.dtype, device=self.delta.device)
        return flat.index_add(0, self.indices, self.delta.detach()).view(shape)


def sparse_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Linear layers carrying a ``SparseDelta`` on their weight, by module name."""
    return {name: m for name, m in model.named_modules()
            if is_linear(m) and parametrize.is_parametrized(m, "weight")
            and isinstance(m.parametrizations.weight[0], SparseDelta)}


def sparse_updates(model: nn.Module) -> dict[str, torch.Tensor]:
    """dW = W - W0 of every sparse layer, by module name."""
    return {name: m.parametrizations.weight[0].dense(m.parametrizations.weight.original.shape)
            for name, m in sparse_layers(model).items()}


class SLoRA(LoRA):
    """Sparse fine-tuning for R1 rounds, then LoRA initialised from the SVD of its update."""

    name = "slora"
    config_classes = (LoraConfig, SLoRAConfig)
    paper = "SLoRA (Babakniya et al., 2023, arXiv 2308.06522)"
    default_lr = 2e-3  # stage 2 (LoRA), as FedLR; see docs/methods.md
    stage1_lr = 1e-2  # stage 1 (1% of entries + head), 400 steps: 1e-2 -> 0.63, 5e-3 -> 0.54
    init = False  # stage 2's A/B come from the switch (server) or the global state (clients)

    def __init__(self, cfg: RunConfig, peft_task_type: str) -> None:
        super().__init__(cfg, peft_task_type)
        self.stage = 1
        self.mask_seed = int(np.random.SeedSequence([cfg.seed, 0x5109A]).generate_state(1)[0])
        self.last_round = 0
        self.priming: dict[str, Any] = {}

    @property
    def stage1_rounds(self) -> int:
        return self.cfg.slora_stage1_rounds or max(1, self.cfg.rounds // 4)

    @property
    def lr(self) -> float:
        if self.stage == 1:
            return self.cfg.slora_stage1_lr or self.stage1_lr
        return super().lr

    def apply(self, model: nn.Module) -> nn.Module:
        if self.stage == 2:
            return super().apply(model)
        targets = query_value_modules(model, self.cfg.target_modules)
        self._check_rank(model, targets)  # stage 2 will need it: fail before training
        freeze_all_but_head(model)
        layers = [m for n, m in model.named_modules()
                  if n.rsplit(".", 1)[-1] in targets and is_linear(m)]
        masks = target_masks([m.weight.numel() for m in layers], self.cfg.slora_density,
                             self.mask_seed)
        for layer, mask in zip(layers, masks, strict=True):
            delta = SparseDelta(torch.from_numpy(mask), layer.weight.dtype)
            parametrize.register_parametrization(layer, "weight", delta.to(layer.weight.device))
        return model

    # --- the two stages ----------------------------------------------------------------------
    def client_config(self, server_round: int) -> dict[str, Any]:
        if stage_of(server_round, self.stage1_rounds) == 1:
            return {"slora-stage": 1, "slora-mask-seed": self.mask_seed}
        return {"slora-stage": 2}

    def configure_client(self, runtime: Any, config: Mapping[str, Any]) -> None:
        self._set_stage(runtime, int(config.get("slora-stage", 1)),
                        int(config.get("slora-mask-seed", self.mask_seed)))

    def end_round(self, server_round: int, runtime: Any,
                  global_state: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        self.last_round = server_round
        if self.stage == 1 and server_round >= self.stage1_rounds:
            runtime.model = self.prime(runtime.model, runtime.build_model, server_round)
            return self.export_state(runtime.model)
        return None

    def prime(self, sparse_model: nn.Module, build: Callable[[], nn.Module],
              server_round: int = 0) -> nn.Module:
        """Stage 1 -> 2: a fresh W0 + LoRA model with s*B@A = rank-r(dW) and stage 1's head."""
        updates = sparse_updates(sparse_model)
        heads = {n: getattr(sparse_model, n).state_dict() for n in head_module_names(sparse_model)}
        self.stage = 2
        model = build()
        inner = model.get_base_model()  # the transformers model inside the PEFT wrapper
        kept, started = [], time.perf_counter()
        with torch.no_grad():
            for name, layer in lora_layers(inner).items():
                dw = updates[name]
                if transposed_weight(layer.get_base_layer()):  # Conv1D: dW is (d_in, d_out)
                    dw = dw.T
                a, b = svd_factors(dw, self.cfg.lora_rank, layer.scaling["default"])
                layer.lora_A["default"].weight.copy_(a)
                layer.lora_B["default"].weight.copy_(b)
                reset_magnitude(layer)  # DoRA: m = ||W0 + s B A||, the output stays exact
                total = float(dw.double().square().sum())
                low = float((layer.scaling["default"] * b.double() @ a.double()).square().sum())
                kept.append(low / total if total > 0 else 1.0)
            for name, state in heads.items():
                getattr(inner, name).modules_to_save["default"].load_state_dict(state)
        self.priming = {"round": server_round, "rank": self.cfg.lora_rank,
                        "energy-kept": float(np.mean(kept)),
                        "seconds-svd": time.perf_counter() - started}
        self.svd_seconds = self.priming["seconds-svd"]
        return model

    def _set_stage(self, runtime: Any, stage: int, mask_seed: int) -> None:
        """Rebuild ``runtime.model`` if the requested stage (or stage-1 mask) is not the current."""
        if stage not in (1, 2):
            raise ValueError(f"SLoRA has stages 1 and 2, got {stage}")
        same_mask = stage == 2 or mask_seed == self.mask_seed
        if stage == self.stage and same_mask:
            return
        self.stage, self.mask_seed = stage, mask_seed
        runtime.model = runtime.build_model()

    # --- checkpoint / log ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "stage": self.stage,  # of the global model after this round
            "trained-stage": stage_of(max(1, self.last_round), self.stage1_rounds),
            "stage1-rounds": self.stage1_rounds,
            "density": self.cfg.slora_density,
            "mask-seed": self.mask_seed,
        }
        if self.priming:
            state["priming"] = self.priming
        return state

    def load_state_dict(self, state: Mapping[str, Any], runtime: Any) -> None:
        self.priming = dict(state.get("priming", {}))
        self.svd_seconds = float(self.priming.get("seconds-svd", 0.0))
        self._set_stage(runtime, int(state.get("stage", 1)),
                        int(state.get("mask-seed", self.mask_seed)))
