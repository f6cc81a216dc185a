"""What a federated fine-tuning method is: which parameters train and travel, and how they start.

A method takes a freshly loaded model (pretrained encoder + new task head) and makes some of its
parameters trainable, adding modules where it needs them (LoRA, adapters). The trainable tensors
are exactly what clients upload and the server averages; the task head is always among them.

Some methods need a one-off, data-independent state on every client before its first round
that is not part of the exchanged tensors: FeDeRA's initial A0/B0, from which each client
computes its frozen residual W - s*B0*A0. The server computes this *anchor* once
(``make_anchor``) and sends it to each client with its first message; clients apply it with
``apply_anchor``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from ..config import RunConfig
from ..models import head_module_names
from ..tensors import load_trainable_state, trainable_state


class Method(ABC):
    name: str = ""
    paper: str = ""  # reference shown by `fedpeft methods`
    default_lr: float = 1e-3  # measured on SemEval with the bundled model (see README)

    # Default rates that differ by task kind ("classification" | "ner" | "qa" | "generation"),
    # where measured.
    kind_lrs: dict[str, float] = {}
    # The settings dataclasses this method reads, beyond what every run has (fedpeft.configs),
    # listed by `fedpeft methods`.
    config_classes: tuple[type, ...] = ()

    def __init__(self, cfg: RunConfig, peft_task_type: str) -> None:
        self.cfg = cfg
        self.peft_task_type = peft_task_type
        self.svd_seconds = 0.0  # server time spent in SVDs (FeDeRA's init, SLoRA's switch)

    @property
    def lr(self) -> float:
        if self.cfg.lr is not None:
            return self.cfg.lr
        return self.kind_lrs.get(task_kind(self.peft_task_type), self.default_lr)

    @abstractmethod
    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        """Set which parameters train (adding modules if needed); return the model to train."""

    def make_anchor(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """Server side: compute and apply the one-off client state; None if the method has none."""
        return None

    def apply_anchor(self, model: torch.nn.Module, anchor: dict[str, torch.Tensor]) -> None:
        """Client side: apply the anchor received from the server to a freshly built model."""
        raise NotImplementedError(f"{self.name} has no anchor")

    def after_step(self, model: torch.nn.Module) -> Callable[[], None] | None:
        """A hook run after every optimizer step (None = nothing to do)."""
        return None

    # --- what travels, and multi-stage methods (SLoRA). The defaults fit single-stage methods.
    def export_state(self, model: torch.nn.Module) -> dict[str, np.ndarray]:
        """The tensors a client uploads and the server broadcasts: the trainable parameters."""
        return trainable_state(model)

    def import_state(self, model: torch.nn.Module, state: Mapping[str, np.ndarray]) -> None:
        """Load a broadcast (or aggregated) state into ``model``."""
        load_trainable_state(model, state)

    def client_config(self, server_round: int) -> dict[str, Any]:
        """Extra settings sent to the clients of ``server_round`` (e.g. SLoRA's stage)."""
        return {}

    def configure_client(self, runtime: Any, config: Mapping[str, Any]) -> None:
        """Client side, before local training: act on ``client_config`` (e.g. switch stage)."""

    def end_round(self, server_round: int, runtime: Any,
                  global_state: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """Server side, after aggregation (global state already loaded into ``runtime.model``).

        Return a new global state when the method changes what trains (SLoRA's switch from
        sparse fine-tuning to LoRA); None to keep going.
        """
        return None

    # --- per-client payloads and a method's own aggregation (the federated-LoRA family:
    # heterogeneous ranks, factors that stay on the client, state folded into the base). The
    # defaults fit every method whose clients all receive and return the global state.
    def client_payload(self, global_state: dict[str, np.ndarray], client: int,
                       server_round: int) -> dict[str, np.ndarray]:
        """Server side: the tensors sent to client ``client`` this round (its rank's truncation,
        a subset, or more than the global state). Return ``global_state`` itself when every
        client gets the same: it is then encoded once per round."""
        return global_state

    def upload_reference(self, sent: dict[str, np.ndarray], client: int,
                         server_round: int) -> dict[str, np.ndarray]:
        """Server side: what client ``client``'s update must look like (keys, shapes, dtypes)
        and is measured against (``validation.check_update``); by default what it was sent."""
        return sent

    def make_strategy(self, cfg: RunConfig, common: dict[str, Any]) -> Any | None:
        """Server side: the method's own aggregation rule as a Flower ``Strategy`` (``common``:
        the arguments every fedpeft strategy gets), or None to use ``strategy=``."""
        return None

    # --- the client's side of a per-client payload (heterogeneous ranks, a merged base; the
    # ClientApp calls ``receive`` instead of ``import_state`` and ``reply`` instead of
    # ``export_state``). The defaults load what was sent and send back the trainable state.
    def receive(self, runtime: Any, incoming: Mapping[str, np.ndarray], client: int) -> None:
        """Client side, before local training: load what the server sent client ``client`` (its
        partition id) into ``runtime.model`` (pad to the model's rank, merge a base update)."""
        self.import_state(runtime.model, incoming)

    def reply(self, runtime: Any, client: int) -> dict[str, np.ndarray]:
        """Client side, after local training: the update client ``client`` sends."""
        return self.export_state(runtime.model)

    def rank_of(self, client: int) -> int | None:
        """The LoRA rank client ``client`` trains at when ranks may differ per client (the round
        log's bytes per rank), else None."""
        return None

    def budget_rows(self, runtime: Any) -> list[dict[str, Any]] | None:
        """Rows of ``fedpeft methods`` when what travels differs per client or round (one per
        rank, the extra tensors sent down); None: ``budget.py`` counts the trainable state."""
        return None

    @classmethod
    def check_settings(cls, cfg: RunConfig) -> None:
        """Raise ``ConfigError`` for settings that make no sense with this method (a strategy,
        DP mode or aggregation it cannot follow); called by ``RunConfig.validate``."""
        return None

    # --- tensors a client keeps between rounds (FedSA-LoRA's own B). ``store`` is the node's
    # ``federation/client_store.ClientStore``, versioned by round; the ClientApp calls
    # ``load_local`` after ``import_state`` and before local training (and before scoring the
    # personalised model), ``save_local`` after local training, before replying.
    keeps_local_state: bool = False

    def load_local(self, runtime: Any, store: Any, client: int, server_round: int) -> int | None:
        """Client side: load client ``client``'s own tensors into ``runtime.model``, the newest
        version saved before ``server_round`` (so a replayed or retried round starts from the
        same ones); return that version, or None when it has none yet (initial values stay)."""
        return None

    def save_local(self, runtime: Any, store: Any, client: int, server_round: int,
                   started_from: int | None) -> None:
        """Client side: save client ``client``'s own tensors as version ``server_round``
        (``started_from``: the version ``load_local`` returned, kept for a replay)."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-able server-side method state, saved in checkpoints (e.g. the current stage)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any], runtime: Any) -> None:
        """Restore ``state_dict`` on resume (rebuilding ``runtime.model`` if the stage needs it)."""


def freeze_all_but_head(model: torch.nn.Module) -> None:
    """Freeze every parameter, then unfreeze the task head (classifier, qa_outputs, ...)."""
    model.requires_grad_(False)
    for name in head_module_names(model):
        getattr(model, name).requires_grad_(True)


def task_kind(peft_task_type: str) -> str:
    """The task family of a PEFT task type: classification, ner, qa or generation."""
    return {"TOKEN_CLS": "ner", "QUESTION_ANS": "qa",
            "CAUSAL_LM": "generation"}.get(peft_task_type, "classification")
