"""Tiny random decoders (Llama, Qwen2, GPT-2) on the committed byte-level BPE tokenizer
(``tests/fixtures/decoder_tokenizer``, built by ``build_decoder_tokenizer.py``), saved to a
folder as a hub model would be. The Llama one ties its output embeddings to the input ones, as
SmolLM2 does; Qwen2 has attention biases, Llama none; GPT-2 uses ``Conv1D`` projections and its
tokenizer has no chat template and no pad token (the plain-prompt path)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TOKENIZER = Path(__file__).resolve().parent / "fixtures" / "decoder_tokenizer"
DECODERS = ("llama", "qwen2", "gpt2")
POSITIONS = 512


def decoder_tokenizer(arch: str = "llama"):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    if arch == "gpt2":  # GPT-2's kind: EOS <|endoftext|>, no pad token, no chat template
        tokenizer.chat_template = None
        tokenizer.eos_token = "<|endoftext|>"
        tokenizer.pad_token = None
    return tokenizer


def decoder_config(arch: str, tokenizer):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    ids = dict(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=POSITIONS)
    if arch == "llama":
        return LlamaConfig(**shape, **ids, tie_word_embeddings=True)
    if arch == "qwen2":
        return Qwen2Config(**shape, **ids, tie_word_embeddings=False)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=POSITIONS,
                          vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                          bos_token_id=tokenizer.eos_token_id)
    raise ValueError(arch)


def save_tiny_decoder(arch: str, folder: Path) -> str:
    from transformers import AutoModelForCausalLM

    tokenizer = decoder_tokenizer(arch)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(decoder_config(arch, tokenizer))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_decoders(tmp_path_factory: pytest.TempPathFactory):
    """``tiny_decoders(arch)`` -> path of a saved tiny random decoder (built once a session)."""
    root = tmp_path_factory.mktemp("tiny-decoders")
    cache: dict[str, str] = {}

    def get(arch: str = "llama") -> str:
        if arch not in cache:
            cache[arch] = save_tiny_decoder(arch, root / arch)
        return cache[arch]

    return get


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run 10x faster on one thread than on two when the cores are busy (imported
    by the decoder test modules, where it applies to every test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
