"""LoRA and its initialisation variants: FedLR and FeDeRA.

LoRA (Hu et al., 2021) adds ``s * B @ A`` to each target weight W (``A``: (r, d_in), ``B``:
(d_out, r), ``s = lora_alpha / r``); only A, B and the head train and travel. The variants
differ only in how A and B start, as in PEFT's single ``init_lora_weights`` field:

- ``FedLR``  (FeDeRA paper Sec. 5.1): A ~ N(0, 1/r^2) (PEFT's ``"gaussian"``), B = 0, so
  the model starts as the pretrained one.
- ``FeDeRA`` (Yan et al., 2024, arXiv 2404.18848): A = sqrt(S_r) V_r^T and B = U_r sqrt(S_r)
  from the top-r SVD of W (divided by s), and the frozen weight becomes the residual
  W - s * B @ A, so the model's output is unchanged at init. This is PEFT's
  ``init_lora_weights="pissa"``; here the server computes A0/B0 once with a full,
  deterministic SVD (float64) and every client computes its own residual from its copy of W and
  the A0/B0 it received (the SVD's sign ambiguity cancels in B0 @ A0).
- ``FFA-LoRA`` (Sun et al., ICLR 2024, arXiv 2403.12313): A is drawn once (PEFT's default
  Kaiming-uniform, from the run's seed, so every client draws the same A) and frozen; only B and
  the head train and travel. With A shared, FedAvg of B is exactly FedAvg of s * B @ A.
- ``SLoRA`` (``slora.py``): A and B from the SVD of a sparse federated first stage.

The SVD factorisation is a pure function, ``svd_factors``, shared with SLoRA's stage switch.

Variants, through PEFT's own flags (``lora-dora``, ``lora-rslora``; docs/methods.md):

- rsLoRA (Kalajdzievski, 2023, arXiv 2312.03732): s = alpha / sqrt(r) (PEFT ``use_rslora``).
  Everything here reads the layer's own ``scaling["default"]``, so FeDeRA's factors and residual
  stay exact; ``lora_scaling(cfg)`` gives the same s to the server (exact-lora aggregation).
- DoRA (Liu et al., 2024, arXiv 2402.09353; PEFT ``use_dora``): the layer computes
  m * (W + s B A) / ||W + s B A|| (norms per output row), m trainable (``lora_magnitude_vector``,
  d_out per target), so it trains and travels with A and B. PEFT sets m = ||W + s B A|| when the
  layer is built; FeDeRA replaces W, A and B afterwards, so ``apply_anchor`` sets m again from
  the residual and A0, B0 (``reset_magnitude``): m = ||W_res + s B0 A0|| = ||W||, and the output
  is unchanged at init, as with PEFT's own PiSSA + DoRA (PiSSA first, then DoRA's init).
"""

from __future__ import annotations

import time

import torch

from ..config import RunConfig
from ..configs import LoraConfig
from ..models import (
    head_module_names,
    is_linear,
    query_value_modules,
    transposed_weight,
    weight_matrix,
)
from ..tensors import svd_factors  # noqa: F401 (FeDeRA's and SLoRA's factors)
from .base import Method


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """LoRA-wrapped layers of a PEFT model by module name."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


class LoRA(Method):
    """Federated LoRA with Gaussian A and zero B (the paper's FedLR)."""

    name = "fedlr"
    config_classes = (LoraConfig,)
    paper = "LoRA (Hu et al., 2021) in FedAvg; FeDeRA paper Sec. 5.1 (FedLR)"
    default_lr = 2e-3  # SemEval, bundled model: 2e-3 -> 0.54 acc centralised; 5e-3 diverges
    init = "gaussian"  # PEFT init_lora_weights value used when the model is built

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        from peft import LoraConfig, get_peft_model

        if getattr(model, "is_loaded_in_4bit", False):  # quantize=4bit: QLoRA's preparation
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        targets = query_value_modules(model, self.cfg.target_modules)
        self._check_rank(model, targets)
        config = LoraConfig(
            task_type=self.peft_task_type,
            r=self.cfg.lora_rank,
            lora_alpha=self.cfg.lora_alpha,
            lora_dropout=self.cfg.lora_dropout,
            target_modules=targets,
            modules_to_save=head_module_names(model),  # the head trains and travels
            init_lora_weights=self.init,
            fan_in_fan_out=any(transposed_weight(m) for n, m in model.named_modules()
                               if n.rsplit(".", 1)[-1] in targets),  # GPT-2's Conv1D
            use_dora=self.cfg.lora_dora,
            use_rslora=self.cfg.lora_rslora,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            return get_peft_model(model, config)

    def _check_rank(self, model: torch.nn.Module, targets: list[str]) -> None:
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in targets and is_linear(module):
                if self.cfg.lora_rank > min(module.weight.shape):
                    raise ValueError(f"lora-rank={self.cfg.lora_rank} exceeds the smallest "
                                     f"dimension of {name} {tuple(module.weight.shape)}")


class FeDeRA(LoRA):
    """LoRA initialised from the SVD of the pretrained weights, residual frozen (FeDeRA)."""

    name = "federa"
    paper = "FeDeRA (Yan et al., 2024, arXiv 2404.18848)"
    default_lr = 1e-3  # SemEval, bundled model: 1e-3 -> 0.56 acc centralised; 2e-3 -> 0.53
    # NER/QA (docs/tasks.md): at 1e-3 WNUT-2017 and PLONER stay at the all-O solution (F1 0.00
    # after 6 rounds); 5e-3 reaches F1 0.28 / 0.64. QA: 5e-3 is what the QA runs there used.
    kind_lrs = {"ner": 5e-3, "qa": 5e-3}
    init = False  # A/B are set from the anchor; PEFT's own init is overwritten

    def make_anchor(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        anchor = {}
        started = time.perf_counter()
        for name, layer in lora_layers(model).items():
            weight = weight_matrix(layer.get_base_layer())  # (d_out, d_in), Conv1D too
            a, b = svd_factors(weight, self.cfg.lora_rank, layer.scaling["default"])
            anchor[f"{name}.lora_A.default.weight"] = a
            anchor[f"{name}.lora_B.default.weight"] = b
        self.svd_seconds = time.perf_counter() - started
        self.apply_anchor(model, anchor)
        return anchor

    def apply_anchor(self, model: torch.nn.Module, anchor: dict[str, torch.Tensor]) -> None:
        layers = lora_layers(model)
        expected = {f"{n}.lora_{x}.default.weight" for n in layers for x in "AB"}
        if set(anchor) != expected:
            raise ValueError("FeDeRA anchor does not match this model's LoRA layers: "
                             f"missing {sorted(expected - set(anchor))[:3]}, "
                             f"unexpected {sorted(set(anchor) - expected)[:3]}")
        with torch.no_grad():
            for name, layer in layers.items():
                if getattr(layer, "_fedpeft_residual", False):
                    raise RuntimeError(f"{name} already holds a residual; build a fresh model")
                a = anchor[f"{name}.lora_A.default.weight"]
                b = anchor[f"{name}.lora_B.default.weight"]
                base = layer.get_base_layer()
                matrix = weight_matrix(base)  # a view: GPT-2's Conv1D stores W transposed
                matrix.copy_(residual(matrix, a, b, layer.scaling["default"]))
                layer.lora_A["default"].weight.copy_(a)
                layer.lora_B["default"].weight.copy_(b)
                reset_magnitude(layer)  # DoRA: m from the new W, A, B (no-op without DoRA)
                layer._fedpeft_residual = True


class FFALoRA(LoRA):
    """LoRA with A frozen at its random init; only B and the head train (FFA-LoRA)."""

    name = "ffa-lora"
    paper = "FFA-LoRA (Sun et al., 2024, arXiv 2403.12313)"
    default_lr = 5e-3  # SemEval, bundled model, 400 steps: 5e-3 -> 0.63 acc; 2e-3 0.59, 1e-2 0.44
    init = True  # PEFT default: A Kaiming-uniform (seeded, identical on every client), B = 0

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        model = super().apply(model)
        for layer in lora_layers(model).values():
            layer.lora_A.requires_grad_(False)
        return model


def lora_scaling(cfg: RunConfig) -> float:
    """The LoRA scale s of ``cfg`` as PEFT computes it: alpha / r, or alpha / sqrt(r) (rsLoRA)."""
    import math

    root = math.sqrt(cfg.lora_rank) if cfg.lora_rslora else cfg.lora_rank
    return cfg.lora_alpha / root


def reset_magnitude(layer: torch.nn.Module, adapter: str = "default") -> None:
    """DoRA: set the layer's magnitude m to ||W + s B A|| (per output row) for its current W, A
    and B, as PEFT does when it builds the layer, so that the layer computes W + s B A exactly.
    Uses PEFT's own norm (``DoraLinearLayer.get_weight_norm``), the one its forward divides by.
    A layer without DoRA is left as it is."""
    dora = getattr(layer, "lora_magnitude_vector", {})
    if adapter not in dora:
        return
    magnitude = dora[adapter]
    with torch.no_grad():
        lora_weight = magnitude.get_lora_weight(layer.lora_A[adapter], layer.lora_B[adapter])
        norm = magnitude.get_weight_norm(layer.get_base_layer().weight, lora_weight,
                                         scaling=layer.scaling[adapter])
        magnitude.weight.copy_(norm)


def residual(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
             scaling: float) -> torch.Tensor:
    """FeDeRA's frozen weight: W - s * B @ A, computed in float64 then cast back."""
    w = weight.detach().to(torch.float64)
    return (w - scaling * b.to(torch.float64) @ a.to(torch.float64)).to(weight.dtype)
