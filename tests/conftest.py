"""Shared fixtures: tiny random encoders saved to disk (no downloads), and the loopback-only
environment for every test that touches Flower or Ray."""

from __future__ import annotations

from fedpeft import offline

offline.apply()

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from fedpeft.models import resolve_model_path  # noqa: E402

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=128)


def _tiny_config(arch: str, vocab_size: int):
    from transformers import BertConfig, DebertaV2Config, DistilBertConfig, RobertaConfig

    if arch == "bert":
        return BertConfig(vocab_size=vocab_size, **TINY)
    if arch == "roberta":
        return RobertaConfig(vocab_size=vocab_size, pad_token_id=0, bos_token_id=101,
                             eos_token_id=102, **{**TINY, "max_position_embeddings": 130})
    if arch == "deberta-v2":
        return DebertaV2Config(vocab_size=vocab_size, pad_token_id=0, **TINY)
    if arch == "distilbert":
        return DistilBertConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4,
                                hidden_dim=64, max_position_embeddings=128, pad_token_id=0)
    raise ValueError(arch)


def save_tiny_model(arch: str, folder: Path) -> str:
    """A random ``arch`` encoder of hidden size 32 with the bundled model's tokenizer."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))
    torch.manual_seed(0)
    model = AutoModel.from_config(_tiny_config(arch, tokenizer.vocab_size))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory):
    """``tiny_models(arch)`` -> path of a saved tiny random model (built once per session)."""
    root = tmp_path_factory.mktemp("tiny-models")
    cache: dict[str, str] = {}

    def get(arch: str = "bert") -> str:
        if arch not in cache:
            cache[arch] = save_tiny_model(arch, root / arch)
        return cache[arch]

    return get
