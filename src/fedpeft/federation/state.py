"""The exchanged state of a model: exactly its trainable tensors, by parameter name."""

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


def to_record(state: Mapping[str, np.ndarray]):  # -> flwr.app.ArrayRecord
    """Wrap a state as a Flower ArrayRecord (the bytes that travel)."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def from_record(record) -> dict[str, np.ndarray]:  # record: flwr.app.ArrayRecord
    """Unwrap a Flower ArrayRecord into ``{name: ndarray}``."""
    return {k: v.numpy() for k, v in record.items()}


def frozen_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the frozen parameters (names and bytes): shows the base never moved."""
    import hashlib

    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


TRANSPORT_DTYPES = ("fp32", "fp16", "bf16")


def encode(state: Mapping[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """Cast float tensors for the wire: ``fp32`` (as is), ``fp16``, or ``bf16`` (sent as the
    raw 16-bit patterns in an int16 array, since numpy has no bfloat16). Halves the bytes."""
    if dtype == "fp32":
        return dict(state)
    if dtype == "fp16":
        return {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in state.items()}
    if dtype == "bf16":
        return {k: torch.from_numpy(np.ascontiguousarray(v)).to(torch.bfloat16).view(torch.int16)
                .numpy() if v.dtype == np.float32 else v for k, v in state.items()}
    raise ValueError(f"transport-dtype must be one of {TRANSPORT_DTYPES}, got {dtype!r}")


def decode(state: Mapping[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """Inverse of ``encode``: back to float32 for training and aggregation."""
    if dtype == "fp32":
        return dict(state)
    if dtype == "fp16":
        return {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in state.items()}
    if dtype == "bf16":
        return {k: torch.from_numpy(np.ascontiguousarray(v)).view(torch.bfloat16).float().numpy()
                if v.dtype == np.int16 else v for k, v in state.items()}
    raise ValueError(f"transport-dtype must be one of {TRANSPORT_DTYPES}, got {dtype!r}")
