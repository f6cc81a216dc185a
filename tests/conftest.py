"""Shared fixtures: tiny random encoders saved to disk (no downloads) with real tokenizers of
their kind (RoBERTa's byte-level BPE and DeBERTa-v3's SentencePiece-style Unigram are trained
here in about a second), and the loopback-only environment for every test that touches Flower
or Ray."""

from __future__ import annotations

import os

from fedpeft import offline

# Tests never reach the Hugging Face hub (fedpeft itself leaves the hub to the user's environment)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
offline.apply()

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from fedpeft.models import resolve_model_path  # noqa: E402

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=128)
# Every tiny model takes ids 1000..1999 in some tests, so the tiny tokenizers have 2048 pieces.
TOKENIZER_VOCAB = 2048
TOKENIZER_SENTENCES = 600  # SemEval training sentences the tiny tokenizers learn from


def _tiny_config(arch: str, tokenizer):
    """The tiny ``arch`` config, its vocabulary and special ids those of ``tokenizer``."""
    from transformers import BertConfig, DebertaV2Config, DistilBertConfig, RobertaConfig

    vocab_size = len(tokenizer)
    if arch == "bert":
        return BertConfig(vocab_size=vocab_size, **TINY)
    if arch == "roberta":  # positions start after the pad id (RoBERTa's convention)
        return RobertaConfig(vocab_size=vocab_size, pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id,
                             **{**TINY, "max_position_embeddings": 130})
    if arch == "deberta-v2":
        return DebertaV2Config(vocab_size=vocab_size, pad_token_id=tokenizer.pad_token_id,
                               bos_token_id=tokenizer.cls_token_id,
                               eos_token_id=tokenizer.sep_token_id, **TINY)
    if arch == "distilbert":
        return DistilBertConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4,
                                hidden_dim=64, max_position_embeddings=128, pad_token_id=0)
    raise ValueError(arch)


def _training_sentences() -> list[str]:
    """The first SemEval-2010 training sentences (the package's embedded copy)."""
    import gzip

    import fedpeft

    path = Path(fedpeft.__file__).parent / "data" / "semeval2010_task8" / "TRAIN_FILE.TXT.gz"
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        lines = (line.split("\t", 1)[1].strip().strip('"') for line in fh if "\t" in line)
        return [next(lines) for _ in range(TOKENIZER_SENTENCES)]


def roberta_tokenizer():
    """A real byte-level BPE (RoBERTa's kind) trained on SemEval sentences, with RoBERTa's
    special tokens at RoBERTa's ids (<s> 0, <pad> 1, </s> 2, <unk> 3; <mask> 4)."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import RobertaTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(_training_sentences(), trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return RobertaTokenizerFast(vocab=model["vocab"], merges=merges)


def deberta_v3_tokenizer():
    """A real Unigram (SentencePiece kind, Metaspace "▁" word marks) trained on SemEval
    sentences, with DeBERTa-v3's special tokens ([PAD] 0, [CLS] 1, [SEP] 2, [UNK] 3; [MASK] 4)."""
    import json
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import DebertaV2TokenizerFast

    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    unigram.train_from_iterator(_training_sentences(), trainers.UnigramTrainer(
        vocab_size=TOKENIZER_VOCAB, special_tokens=["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"],
        unk_token="[UNK]", initial_alphabet=list(string.ascii_letters + string.digits
                                                 + string.punctuation),
        show_progress=False))
    model = json.loads(unigram.to_str())["model"]
    return DebertaV2TokenizerFast(vocab=[tuple(v) for v in model["vocab"]],
                                  unk_id=model["unk_id"])


def tiny_tokenizer(arch: str):
    """The tokenizer of the tiny ``arch`` model: RoBERTa's and DeBERTa-v3's kinds trained here,
    else the bundled model's (BERT WordPiece, also DistilBERT's)."""
    if arch == "roberta":
        return roberta_tokenizer()
    if arch == "deberta-v2":
        return deberta_v3_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))


def save_tiny_model(arch: str, folder: Path) -> str:
    """A random ``arch`` encoder of hidden size 32 with its tokenizer (``tiny_tokenizer``)."""
    from transformers import AutoModel

    tokenizer = tiny_tokenizer(arch)
    torch.manual_seed(0)
    model = AutoModel.from_config(_tiny_config(arch, tokenizer))
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
