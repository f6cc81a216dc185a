"""`fedpeft export`: a run folder's global model as a PEFT adapter and as a merged model, both
loaded back with the standard loaders and giving the in-memory model's logits."""

import numpy as np
import pytest
import torch

from fedpeft.cli import main
from fedpeft.config import load_config
from fedpeft.export import export_run, pissa_to_lora
from fedpeft.federation.runtime import Runtime
from fedpeft.runlog import RunLog

LORA_FAMILY = ["fedlr", "federa", "ffa-lora", "slora"]


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(1000, 2000, (3, 12), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def make_run(model: str, method: str, folder, *extra: str) -> Runtime:
    """A finished run folder whose global state is the init plus seeded noise (as if trained)."""
    cfg = load_config(None, [f"model={model}", f"method={method}", "lora-rank=4", "lora-alpha=8",
                             "rounds=2", "slora-stage1-rounds=1", "slora-density=0.1",
                             "max-train-samples=32", "max-test-samples=8", f"out={folder}",
                             *extra])
    log = RunLog.create(cfg)
    rt = Runtime(cfg)
    rt.method.make_anchor(rt.model)
    rt.method.end_round(1, rt, rt.method.export_state(rt.model))  # SLoRA switches to LoRA here
    rng = np.random.default_rng(0)
    state = {k: v + 0.05 * rng.standard_normal(v.shape).astype(v.dtype)
             for k, v in rt.method.export_state(rt.model).items()}
    rt.method.import_state(rt.model, state)
    log.save_state("final_state.safetensors", state)
    log.log_round({"round": 1, **({"method-state": rt.method.state_dict()}
                                  if rt.method.state_dict() else {})})
    return rt


def test_pissa_to_lora_hand_checked():
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0], [4.0]])  # B@A = [[3, 6], [4, 8]]
    a0, b0 = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0], [1.0]])  # B0@A0 = [[1, 0], [1, 0]]
    a2, b2 = pissa_to_lora(a, b, a0, b0)
    assert a2.shape == (2, 2) and b2.shape == (2, 2)
    assert torch.equal(b2 @ a2, torch.tensor([[2.0, 6.0], [3.0, 8.0]]))


VARIANTS = [(m, ()) for m in LORA_FAMILY] + [
    ("federa", ("lora-rslora=true",)), ("federa", ("lora-dora=true",)),
    ("federa", ("lora-dora=true", "lora-rslora=true")), ("slora", ("lora-dora=true",))]


@pytest.mark.parametrize(("method", "variant"), VARIANTS,
                         ids=["-".join([m, *(v.split("=")[0] for v in x)]) for m, x in VARIANTS])
def test_peft_and_merged_exports_match_the_in_memory_model(tiny_models, tmp_path, method,
                                                           variant):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    rt = make_run(tiny_models("bert"), method, tmp_path / "run", *variant)
    expected = logits(rt.model)
    kwargs = rt.task.model_kwargs()

    export_run(tmp_path / "run", "peft", tmp_path / "peft")
    base = AutoModelForSequenceClassification.from_pretrained(rt.cfg.model, **kwargs)
    adapter = PeftModel.from_pretrained(base, tmp_path / "peft")
    assert torch.allclose(logits(adapter), expected, atol=1e-5)

    assert main(["export", str(tmp_path / "run"), "--format", "merged",
                 "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert torch.allclose(logits(merged), expected, atol=1e-5)
    assert (tmp_path / "merged" / "fedpeft-export.json").exists()


def test_federa_adapter_is_plain_lora_of_twice_the_rank(tiny_models, tmp_path):
    import json

    make_run(tiny_models("bert"), "federa", tmp_path / "run")
    export_run(tmp_path / "run", "peft", tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)


@pytest.mark.parametrize("method", ["fedft", "fedbf"])
def test_non_lora_methods_export_merged_only(tiny_models, tmp_path, method):
    from transformers import AutoModelForSequenceClassification

    rt = make_run(tiny_models("roberta"), method, tmp_path / "run")
    export_run(tmp_path / "run", "merged", tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert torch.allclose(logits(merged), logits(rt.model), atol=1e-5)
    with pytest.raises(ValueError, match="not a LoRA-family method"):
        export_run(tmp_path / "run", "peft", tmp_path / "peft")


def test_adapters_cannot_be_merged(tiny_models, tmp_path):
    make_run(tiny_models("bert"), "fedap", tmp_path / "run")
    with pytest.raises(ValueError, match="cannot be merged"):
        export_run(tmp_path / "run", "merged", tmp_path / "merged")
    with pytest.raises(ValueError, match="not a finished run folder"):
        export_run(tmp_path / "nowhere", "merged", tmp_path / "merged")
