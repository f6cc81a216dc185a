"""The exchanged state of a model: exactly its trainable tensors, by parameter name."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from ..tensors import (  # noqa: F401 (re-exported: the exchanged state is the trainable one)
    frozen_digest,
    frozen_state,
    load_trainable_state,
    num_parameters,
    trainable_state,
)


def to_record(state: Mapping[str, np.ndarray]):  # -> flwr.app.ArrayRecord
    """Wrap a state as a Flower ArrayRecord (the bytes that travel)."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def from_record(record) -> dict[str, np.ndarray]:  # record: flwr.app.ArrayRecord
    """Unwrap a Flower ArrayRecord into ``{name: ndarray}``."""
    return {k: v.numpy() for k, v in record.items()}


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
