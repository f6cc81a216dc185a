"""Shared machinery of the federated-LoRA methods of 2024-26 (flora, flexlora, fedex-lora,
hetlora): heterogeneous client ranks, zero padding and truncation of LoRA factors, a client's own
LoRA scale, and a frozen base that the server moves (the "merged base").

**Client ranks** (``client-ranks``, flora / flexlora / hetlora). Two forms:

- ``client-ranks=4,8,16,32``: the ranks on offer. Partition k gets
  ``ranks[position(k) % len(ranks)]`` where ``position`` is k's place in a permutation of the
  partitions drawn from ``default_rng([seed, 0x4A4E])``: every rank goes to floor(N/m) or
  ceil(N/m) of the N clients, which ones is seeded.
- ``client-ranks=table:4,4,8,16``: one rank per partition, in partition order (exactly
  ``num-clients`` values).

Either way a client's rank is a pure function of (run config, partition id) (``client_rank``), so
nothing extra travels; every rank must be in [1, ``lora-rank``]. Each process builds its model
once, at rank ``lora-rank`` (= r_max), and a rank-r_k client trains the first r_k components:
rows r_k.. of A and columns r_k.. of B are zero, get exactly zero gradients (each is multiplied by
the other's zeros), so AdamW (with or without weight decay) and gradient clipping keep them at
exactly zero (``tests/test_lora_family.py``). A client uploads its r_k components only.

**Scale.** A rank-r_k client's layer computes W x + s_k B_k A_k x. flora and flexlora aggregate
the products, so each client uses PEFT's scale for its own rank, s_k = lora-alpha / r_k
(``per_client_scale``); hetlora averages the factors themselves, so every client keeps the
global model's s = lora-alpha / lora-rank (a truncation keeps the first r_k components of the same
product). rsLoRA and DoRA are refused for these methods (``config.LORA_FAMILY``).

**Merged base** (flora, fedex-lora). The server folds an update into the frozen weights: the
global state carries, per target, the cumulative update D since the start, under keys
``@merged/<module>`` (dense, (d_out, d_in)) or ``@merged/<module>/A`` and ``/B`` (factored:
D = B @ A, while that is smaller than dense). Every process computes the frozen weight the same
way, W = W0 + D (``merged_update``, float64 product cast to float32, then one float32 addition),
so the base a client trains on is the server's current base whichever rounds it missed and
whichever client the worker's model served before. The keys never look like parameters, so the
server's checkpoint keeps them and a resumed run continues from the same base.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, RunConfig
from ..configs import LoraConfig, RankedLoraConfig
from ..models import weight_matrix
from ..tensors import load_trainable_state, trainable_state
from .lora import LoRA, lora_layers

MERGED = "@merged/"  # prefix of the merged-base tensors in a global state
HETEROGENEOUS = ("flora", "flexlora", "hetlora")  # the methods client-ranks applies to
OWN_RULE = ("flora", "flexlora", "fedex-lora", "hetlora")  # their own aggregation rule
_RANK_SEED = 0x4A4E


# --- client ranks ------------------------------------------------------------------------------
def parse_client_ranks(cfg: RunConfig) -> tuple[str, list[int]] | None:
    """``("offer" | "table", ranks)`` of ``cfg.client_ranks``, None when unset; ConfigError for a
    malformed value."""
    raw = (cfg.client_ranks or "").strip()
    if not raw:
        return None
    kind, _, values = raw.partition(":") if raw.startswith("table:") else ("offer", "", raw)
    usage = ("expected ranks like 4,8,16,32 (a seeded balanced assignment) or table:r0,r1,... "
             "(one per partition)")
    try:
        ranks = [int(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"client-ranks={raw!r}: {usage}") from None
    if not ranks:
        raise ConfigError(f"client-ranks={raw!r}: {usage}")
    return kind, ranks


def check_client_ranks(cfg: RunConfig, heterogeneous: bool) -> None:
    """ConfigError unless ``client-ranks`` (if set) fits ``cfg``: a method that takes it, ranks in
    [1, lora-rank], a table with one rank per client. Also hetlora's pruning settings."""
    if not 0.0 < cfg.hetlora_gamma <= 1.0:
        raise ConfigError(f"hetlora-gamma must be in (0, 1], got {cfg.hetlora_gamma}")
    if not (np.isfinite(cfg.hetlora_lambda) and cfg.hetlora_lambda >= 0):
        raise ConfigError(f"hetlora-lambda must be a finite number >= 0, got "
                          f"{cfg.hetlora_lambda}")
    parsed = parse_client_ranks(cfg)
    if parsed is None:
        return
    if not heterogeneous:
        raise ConfigError(f"client-ranks applies to method={' / '.join(HETEROGENEOUS)} "
                          f"(heterogeneous LoRA ranks), not method={cfg.method}; every client "
                          "of it trains at lora-rank")
    kind, ranks = parsed
    bad = [r for r in ranks if not 1 <= r <= cfg.lora_rank]
    if bad:
        raise ConfigError(f"client-ranks={cfg.client_ranks}: every rank must be in [1, "
                          f"lora-rank={cfg.lora_rank}] (the model is built at lora-rank), got "
                          f"{bad[0]}")
    if kind == "table" and len(ranks) != cfg.num_clients:
        raise ConfigError(f"client-ranks=table:... lists {len(ranks)} ranks but num-clients="
                          f"{cfg.num_clients}; expected one rank per partition")


def client_rank(cfg: RunConfig, client: int) -> int:
    """The LoRA rank of partition ``client`` (``lora-rank`` without ``client-ranks``)."""
    parsed = parse_client_ranks(cfg)
    if parsed is None:
        return cfg.lora_rank
    kind, ranks = parsed
    if kind == "table":
        return ranks[client]
    order = np.random.default_rng([cfg.seed, _RANK_SEED]).permutation(cfg.num_clients)
    position = int(np.flatnonzero(order == client)[0])
    return ranks[position % len(ranks)]


def distinct_ranks(cfg: RunConfig) -> dict[int, int]:
    """``{rank: first partition with it}``, ranks ascending (the budget's rows)."""
    found: dict[int, int] = {}
    for client in range(cfg.num_clients):
        found.setdefault(client_rank(cfg, client), client)
    return dict(sorted(found.items()))


def check_own_rule(cfg: RunConfig) -> None:
    """The settings a method with its own aggregation rule cannot honour."""
    if cfg.strategy != "fedavg" or cfg.dp != "none" or cfg.aggregation != "fedavg":
        raise ConfigError(f"method={cfg.method} aggregates with its own rule (docs/methods.md): "
                          f"it cannot be combined with strategy={cfg.strategy}, dp={cfg.dp} or "
                          f"aggregation={cfg.aggregation}; use strategy=fedavg dp=none "
                          "aggregation=fedavg")


# --- LoRA factors in a state ---------------------------------------------------------------------
def lora_key(module: str, factor: str) -> str:
    return f"{module}.lora_{factor}.default.weight"


def lora_modules(state: Mapping[str, Any]) -> list[str]:
    """The modules whose A factor is in ``state``, in the state's order."""
    return [k.split(".lora_A.")[0] for k in state if ".lora_A." in k]


def state_rank(state: Mapping[str, np.ndarray]) -> int | None:
    """The rank of the LoRA factors in ``state`` (rows of its first A), None without factors."""
    modules = lora_modules(state)
    return int(state[lora_key(modules[0], "A")].shape[0]) if modules else None


def truncate(state: Mapping[str, np.ndarray], rank: int,
             factor: float = 1.0) -> dict[str, np.ndarray]:
    """``state`` with every LoRA factor cut to its first ``rank`` components (rows of A, columns
    of B), both multiplied by ``factor`` (so that products scale by factor^2)."""
    out = {}
    for key, value in state.items():
        if ".lora_A." in key:
            value = value[:rank]
        elif ".lora_B." in key:
            value = value[:, :rank]
        else:
            out[key] = value
            continue
        out[key] = np.ascontiguousarray(value * np.asarray(factor, value.dtype)
                                        if factor != 1.0 else value)
    return out


def pad(state: Mapping[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """``state`` with every LoRA factor zero-padded to ``rank`` components."""
    out = {}
    for key, value in state.items():
        if ".lora_A." in key and value.shape[0] < rank:
            value = np.concatenate([value, np.zeros((rank - value.shape[0], value.shape[1]),
                                                    value.dtype)], axis=0)
        elif ".lora_B." in key and value.shape[1] < rank:
            value = np.concatenate([value, np.zeros((value.shape[0], rank - value.shape[1]),
                                                    value.dtype)], axis=1)
        out[key] = value
    return out


def set_scale(model: torch.nn.Module, scale: float) -> None:
    """Every LoRA layer of ``model`` computes W x + scale * B A x (PEFT's ``scaling`` entry)."""
    for layer in lora_layers(model).values():
        layer.scaling["default"] = scale


# --- the merged base -----------------------------------------------------------------------------
def split_merged(state: Mapping[str, np.ndarray]
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(merged-base tensors, the rest) of a state."""
    merged = {k: v for k, v in state.items() if k.startswith(MERGED)}
    return merged, {k: v for k, v in state.items() if not k.startswith(MERGED)}


def merged_modules(merged: Mapping[str, np.ndarray]) -> list[str]:
    """Module names of a state's merged-base tensors, in order."""
    names: list[str] = []
    for key in merged:
        name = key[len(MERGED):].removesuffix("/A").removesuffix("/B")
        if name not in names:
            names.append(name)
    return names


def merged_update(merged: Mapping[str, np.ndarray], module: str) -> np.ndarray:
    """The cumulative update D of ``module`` (float32, (d_out, d_in)): the dense tensor, or
    float32(B @ A) of the factors computed in float64 (the same on every process)."""
    dense = merged.get(MERGED + module)
    if dense is not None:
        return np.asarray(dense, dtype=np.float32)
    a = np.asarray(merged[f"{MERGED}{module}/A"], dtype=np.float64)  # (R, d_in)
    b = np.asarray(merged[f"{MERGED}{module}/B"], dtype=np.float64)  # (d_out, R)
    return (b @ a).astype(np.float32)


def zero_merged(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """An empty cumulative update per LoRA target: factors of rank 0."""
    out = {}
    for name, layer in lora_layers(model).items():
        d_out, d_in = weight_matrix(layer.get_base_layer()).shape
        out[f"{MERGED}{name}/A"] = np.zeros((0, d_in), np.float32)
        out[f"{MERGED}{name}/B"] = np.zeros((d_out, 0), np.float32)
    return out


def apply_merged(model: torch.nn.Module, merged: Mapping[str, np.ndarray]) -> None:
    """Set every target's frozen weight to W0 + D (W0: the weight before the first merge, kept on
    the layer; FeDeRA's residual where the method starts from the SVD)."""
    layers = lora_layers(model)
    names = merged_modules(merged)
    if set(names) != set(layers):
        raise ValueError(f"the merged base does not match this model's LoRA layers: missing "
                         f"{sorted(set(layers) - set(names))[:3]}, unexpected "
                         f"{sorted(set(names) - set(layers))[:3]}")
    with torch.no_grad():
        for name in names:
            layer = layers[name]
            matrix = weight_matrix(layer.get_base_layer())  # a view, (d_out, d_in)
            if not hasattr(layer, "_fedpeft_w0"):
                layer._fedpeft_w0 = matrix.detach().clone()
            delta = torch.from_numpy(merged_update(merged, name)).to(matrix.device)
            matrix.copy_(layer._fedpeft_w0 + delta.to(matrix.dtype))


def merged_bytes(d_out: int, d_in: int, rank: int) -> tuple[bool, int]:
    """Whether a rank-``rank`` cumulative update of a (d_out, d_in) target travels factored, and
    how many float32 values it takes."""
    factored = rank * (d_out + d_in) < d_out * d_in
    return factored, rank * (d_out + d_in) if factored else d_out * d_in


def module_seed(name: str) -> int:
    """A stable number per module name (seeds a module's fresh factors on every process)."""
    return zlib.crc32(name.encode())


# --- a LoRA whose clients may have different ranks -----------------------------------------------
class RankedLoRA(LoRA):
    """LoRA built at ``lora-rank`` in which a client trains its own first r_k components.

    Client side, ``receive`` zero-pads the factors it was sent to the model's rank and sets the
    client's scale; ``reply`` sends back its r_k components. The server's model keeps the full
    rank and the global scale (``import_state``)."""

    config_classes = (LoraConfig, RankedLoraConfig)

    heterogeneous_ranks = True  # takes client-ranks
    per_client_scale = True  # s_k = alpha / r_k (False: everyone at alpha / lora-rank)

    def __init__(self, cfg: RunConfig, peft_task_type: str) -> None:
        super().__init__(cfg, peft_task_type)
        self._client_rank = cfg.lora_rank  # of the client this process trains now

    @classmethod
    def check_settings(cls, cfg: RunConfig) -> None:
        check_own_rule(cfg)

    def rank_of(self, client: int) -> int:
        """The rank client ``client`` trains at (a pure function of the config)."""
        return client_rank(self.cfg, client)

    def client_scale(self, rank: int) -> float:
        return self.cfg.lora_alpha / (rank if self.per_client_scale else self.cfg.lora_rank)

    @property
    def global_scale(self) -> float:
        return self.cfg.lora_alpha / self.cfg.lora_rank

    def receive(self, runtime: Any, incoming: Mapping[str, np.ndarray], client: int) -> None:
        rank = state_rank(incoming) or self.rank_of(client)
        self._client_rank = rank
        load_trainable_state(runtime.model, pad(incoming, self.cfg.lora_rank))
        set_scale(runtime.model, self.client_scale(rank))

    def reply(self, runtime: Any, client: int) -> dict[str, np.ndarray]:
        return truncate(self.export_state(runtime.model), self._client_rank)

    def import_state(self, model: torch.nn.Module, state: Mapping[str, np.ndarray]) -> None:
        load_trainable_state(model, pad(state, self.cfg.lora_rank))
        set_scale(model, self.global_scale)

    def export_state(self, model: torch.nn.Module) -> dict[str, np.ndarray]:
        return trainable_state(model)


def rank_budget_rows(method: Any, runtime: Any, server_round: int = 1,
                     down_extra: Any = None) -> list[dict[str, Any]]:
    """``fedpeft methods`` rows of a federated-LoRA method: one per client rank (one row without
    ``client-ranks``), counting exactly what ``client_payload`` sends a client of that rank in
    ``server_round`` and what ``upload_reference`` says it sends back. ``down_extra(rank)``:
    bytes to add down (flora's merged update, which grows with the rounds)."""
    from ..federation.state import num_parameters, to_record

    anchor = method.make_anchor(runtime.model)
    anchor_bytes = to_record({k: v.cpu().numpy() for k, v in anchor.items()}).count_bytes() \
        if anchor else 0
    global_state = method.export_state(runtime.model)
    total = sum(p.numel() for p in runtime.model.parameters())
    rows = []
    for rank, client in distinct_ranks(method.cfg).items():
        sent = method.client_payload(global_state, client, server_round)
        up = method.upload_reference(sent, client, server_round)
        label = f"{method.name} (r={rank})" if method.cfg.client_ranks else method.name
        rows.append({
            "method": label, "rank": rank,
            "trainable-params": num_parameters(up),
            "trainable-percent": 100.0 * num_parameters(up) / total,
            "bytes-up": to_record(up).count_bytes(),
            "bytes-down": to_record(sent).count_bytes() + (down_extra(rank) if down_extra else 0),
            "anchor-bytes": anchor_bytes,
        })
    return rows
