"""FedSA-LoRA: only A is shared, every client keeps its own B (Guo et al., ICLR 2025,
"Selective Aggregation for Low-Rank Adaptation in Federated Learning", arXiv 2410.01463).

The paper's finding: in federated LoRA the A matrices of the clients learn what is common to
every client and the B matrices what is specific to each. FedSA-LoRA therefore trains A and B
on every client, but only A (here: and the task head, which every fedpeft method shares) is
sent to the server and averaged; each client keeps its B from round to round.

- What travels: A + head, both ways (``export_state``); B never leaves a client, and the server
  never sends one: the global state *is* the shared part.
- Client side (``load_local`` / ``save_local``, around local training): the client loads the
  global A + head, then its own B, the newest version saved before this round in the node's
  ``ClientStore`` (``federation/client_store.py``; before its first round: the initial B), trains
  A, B and the head, saves B as the version of this round and uploads A + head.
- The global model is global A + head with the *initial* B (zero for ``lora-init=gaussian``, so
  the adapters add nothing; B0 for ``lora-init=svd``, where s*B0*A0 restores W): a weak global
  model by design. The model a client uses is its personalised one, global A + its own B:
  ``local-test-fraction`` scores both on every client's held-out data (docs/reports.md).
- ``lora-init=svd``: A and B start from FeDeRA's SVD of W with the residual W - s*B0*A0 frozen
  (FeDeRA's anchor, sent once per client); every client's B starts at B0.
- Aggregation: plain FedAvg of A + head (any ``strategy=``, ``dp=`` clips and noises A + head);
  ``aggregation=exact-lora`` is refused (there is no B on the server to multiply).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, RunConfig
from .lora import FeDeRA, LoRA


def is_local_key(name: str) -> bool:
    """Whether a trainable tensor is a LoRA B factor (kept on the client)."""
    return ".lora_B." in name


def svd_default_lr(method: LoRA) -> float:
    """FeDeRA's default rates (the SVD start needs smaller steps on SemEval, larger on NER/QA)."""
    from .base import task_kind

    return FeDeRA.kind_lrs.get(task_kind(method.peft_task_type), FeDeRA.default_lr)


class SVDStartMixin:
    """``lora-init=svd``: FeDeRA's anchor (A0, B0 from the SVD of W; residual frozen)."""

    cfg: RunConfig

    def _init_value(self) -> Any:
        return False if self.cfg.lora_init == "svd" else "gaussian"

    @property
    def lr(self) -> float:
        """FeDeRA's default rates with the SVD start (unless ``lr`` is set), else LoRA's."""
        if self.cfg.lr is None and self.cfg.lora_init == "svd":
            return svd_default_lr(self)  # type: ignore[arg-type]
        return super().lr  # type: ignore[misc]

    def make_anchor(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        if self.cfg.lora_init != "svd":
            return None
        return FeDeRA.make_anchor(self, model)  # type: ignore[arg-type]

    def apply_anchor(self, model: torch.nn.Module, anchor: dict[str, torch.Tensor]) -> None:
        if self.cfg.lora_init != "svd":
            raise NotImplementedError(f"{self.cfg.method} with lora-init=gaussian has no anchor")
        FeDeRA.apply_anchor(self, model, anchor)  # type: ignore[arg-type]


class FedSALoRA(SVDStartMixin, LoRA):
    """LoRA whose A (and head) is federated while each client keeps its own B."""

    name = "fedsa-lora"
    paper = "FedSA-LoRA (Guo et al., ICLR 2025, arXiv 2410.01463)"
    default_lr = 2e-3  # FedLR's (lora-init=gaussian); FeDeRA's with lora-init=svd
    keeps_local_state = True

    def __init__(self, cfg: RunConfig, peft_task_type: str) -> None:
        super().__init__(cfg, peft_task_type)
        self.init = self._init_value()
        self._initial_b: dict[str, torch.Tensor] = {}  # svd: B0 from the anchor

    @classmethod
    def check_settings(cls, cfg: RunConfig) -> None:
        if cfg.aggregation == "exact-lora":
            raise ConfigError("aggregation=exact-lora multiplies B and A on the server, and "
                              "method=fedsa-lora never sends B; use aggregation=fedavg")

    def apply_anchor(self, model: torch.nn.Module, anchor: dict[str, torch.Tensor]) -> None:
        super().apply_anchor(model, anchor)
        self._initial_b = {k: v.detach().clone() for k, v in anchor.items() if is_local_key(k)}

    # --- what travels: A + head ----------------------------------------------------------------
    def export_state(self, model: torch.nn.Module) -> dict[str, np.ndarray]:
        return {name: p.detach().cpu().numpy().copy() for name, p in model.named_parameters()
                if p.requires_grad and not is_local_key(name)}

    def import_state(self, model: torch.nn.Module, state: Mapping[str, np.ndarray]) -> None:
        """Load the shared A + head and reset every B to its initial value (the global model);
        ``load_local`` then puts a client's own B in."""
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        shared = {n for n in params if not is_local_key(n)}
        if set(state) != shared:
            raise ValueError(f"fedsa-lora state does not match the shared tensors: missing "
                             f"{sorted(shared - set(state))[:3]}, unexpected "
                             f"{sorted(set(state) - shared)[:3]}")
        with torch.no_grad():
            for name, p in params.items():
                if name in state:
                    p.copy_(torch.as_tensor(np.asarray(state[name])).to(p.dtype))
                elif name in self._initial_b:
                    p.copy_(self._initial_b[name].to(p.device, p.dtype))
                else:
                    p.zero_()  # lora-init=gaussian: B starts at 0

    # --- the client's own B ----------------------------------------------------------------
    def local_tensors(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in model.named_parameters() if p.requires_grad and is_local_key(n)}

    def load_local(self, runtime: Any, store: Any, client: int, server_round: int) -> int | None:
        version = store.latest_before(client, server_round)
        if version is None:
            return None  # first round of this client: the initial B from import_state
        saved = store.load(client, version)
        params = self.local_tensors(runtime.model)
        if set(saved) != set(params):
            raise ValueError(f"client {client}'s saved B (round {version}) does not match this "
                             f"model's LoRA B factors; was the run folder reused?")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(torch.from_numpy(saved[name]).to(p.device, p.dtype))
        return version

    def save_local(self, runtime: Any, store: Any, client: int, server_round: int,
                   started_from: int | None) -> None:
        state = {n: p.detach().cpu().numpy() for n, p in self.local_tensors(runtime.model).items()}
        store.save(client, server_round, state, started_from)
