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
    """Unwrap a Flower ArrayRecord into ``{name: ndarray}`` (a packed one too, see ``pack``)."""
    if is_packed(record):
        return unpack(record[PACKED_KEY].numpy())
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


# --- packed wire format (deployment) ----------------------------------------------------------
# Flower stores and sends every Array of a message as objects of their own (an array and its
# chunks), one HTTP request each per hop: a 26-tensor LoRA state is 56 objects, and a deployed
# round moves each message over four hops (ServerApp -> SuperLink -> SuperNode -> ClientApp and
# back), ~220 requests per client and round. Packed, the whole state is one uint8 array (a JSON
# header of names, dtypes and shapes, then the raw bytes): 4 objects. The deployed ServerApp
# packs (``pack_on_wire``); a client answers in the format it was sent; ``from_record`` reads
# both. Not used with client-side DP, whose Flower mods clip the tensors of the record itself.

PACKED_KEY = "fedpeft.packed-state"
_WIRE = {"packed": False}


def pack_on_wire(enabled: bool = True) -> None:
    """Send packed states from this process (the deployed ServerApp turns it on)."""
    _WIRE["packed"] = enabled


def packs_on_wire(dp: str = "none") -> bool:
    return _WIRE["packed"] and not dp.startswith("client-")


def pack(state: Mapping[str, np.ndarray]) -> np.ndarray:
    """``state`` as one uint8 array: 8-byte header length, JSON header, the tensors' bytes."""
    import json

    arrays = [(k, np.asarray(v)) for k, v in state.items()]
    header = json.dumps([[k, v.dtype.str, list(v.shape)] for k, v in arrays]).encode()
    out = np.empty(8 + len(header) + sum(v.nbytes for _, v in arrays), dtype=np.uint8)
    out[:8] = np.frombuffer(len(header).to_bytes(8, "little"), dtype=np.uint8)
    out[8:8 + len(header)] = np.frombuffer(header, dtype=np.uint8)
    at = 8 + len(header)
    for _, v in arrays:
        out[at:at + v.nbytes] = np.ascontiguousarray(v).reshape(-1).view(np.uint8)
        at += v.nbytes
    return out


def unpack(buffer: np.ndarray) -> dict[str, np.ndarray]:
    """Inverse of ``pack`` (each tensor a copy, writable)."""
    import json

    raw = np.ascontiguousarray(buffer).view(np.uint8).reshape(-1)
    size = int.from_bytes(raw[:8].tobytes(), "little")
    at, state = 8 + size, {}
    for key, dtype, shape in json.loads(raw[8:8 + size].tobytes()):
        dt = np.dtype(dtype)
        n = dt.itemsize * int(np.prod(shape, dtype=np.int64))
        state[key] = raw[at:at + n].copy().view(dt).reshape(tuple(shape))
        at += n
    return state


def wire_record(state: Mapping[str, np.ndarray], packed: bool):  # -> flwr.app.ArrayRecord
    """The ArrayRecord that travels: packed into one array, or one Array per tensor."""
    return to_record({PACKED_KEY: pack(state)} if packed else state)


def is_packed(record) -> bool:
    return list(record.keys()) == [PACKED_KEY]
