"""Tensors of a model, by parameter name: what trains, what is frozen, and low-rank factors.

Shared by the methods (which decide what trains) and the federation (which moves it), so that
neither imports the other for these.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch


def trainable_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Copies of the parameters that require grad, as float32/16 numpy arrays, by name."""
    return {name: p.detach().cpu().numpy().copy()
            for name, p in model.named_parameters() if p.requires_grad}


def frozen_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the parameters that do not train (for tests and checks)."""
    return {name: p.detach().clone() for name, p in model.named_parameters()
            if not p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Copy ``state`` into the model's trainable parameters; keys and shapes must match exactly."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, extra = params.keys() - state.keys(), state.keys() - params.keys()
    if missing or extra:
        raise ValueError(f"state does not match the trainable parameters: missing "
                         f"{sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            value = torch.as_tensor(np.asarray(state[name]))
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"{name}: shape {tuple(value.shape)} != {tuple(p.shape)}")
            p.copy_(value.to(p.dtype))


def num_parameters(state: Mapping[str, np.ndarray]) -> int:
    return int(sum(v.size for v in state.values()))


def frozen_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the frozen parameters (names and bytes): shows the base never moved."""
    import hashlib

    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def svd_factors(matrix: torch.Tensor, rank: int,
                scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` factors of ``matrix`` (d_out, d_in) such that ``scaling * B @ A`` is its best
    rank-r approximation: A = sqrt(S_r/s) V_r^T (r, d_in), B = U_r sqrt(S_r/s) (d_out, r).

    Computed with a full SVD in float64, so the result does not depend on a random sketch.
    """
    if rank > min(matrix.shape):
        raise ValueError(f"lora-rank={rank} exceeds the layer's smallest dimension "
                         f"{min(matrix.shape)} (shape {tuple(matrix.shape)})")
    u, s, vh = torch.linalg.svd(matrix.detach().to(torch.float64), full_matrices=False)
    root = torch.sqrt(s[:rank] / scaling)  # (r,)
    a = root[:, None] * vh[:rank]  # (r, d_in)
    b = u[:, :rank] * root[None, :]  # (d_out, r)
    return a.to(matrix.dtype), b.to(matrix.dtype)
