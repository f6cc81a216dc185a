"""Every method on every supported encoder family (tiny random models built from configs).

For each (method, architecture): the model's output at init is the pretrained model's (every
method here promises it), the trainable count matches a hand formula, and one federated round
(two clients train from the global state, FedAvg) changes exactly the trainable tensors.
"""

import numpy as np
import pytest
import torch

from fedpeft.config import RunConfig
from fedpeft.federation.aggregation import fedavg
from fedpeft.federation.runtime import Runtime
from fedpeft.federation.state import frozen_state, num_parameters, trainable_state
from fedpeft.methods import METHODS
from fedpeft.methods.lora_family import OWN_RULE
from fedpeft.models import adapter_sites, head_module_names, load_model, query_value_modules
from fedpeft.training import local_train

ARCHS = ["bert", "roberta", "deberta-v2", "distilbert"]
D, LAYERS, FFN = 32, 2, 64  # tiny models of conftest.py: hidden 32, 2 layers, FFN 64
RANK, REDUCTION, DENSITY = 4, 8, 0.1
TARGETS = 2 * LAYERS  # query and value of every layer
# The key bias cannot change attention (softmax ignores a constant added to a query's logits),
# so its gradient is zero and a round may leave it where it was.
KEY_BIASES = ("key.bias", "k_lin.bias", "key_proj.bias")


def make_cfg(model: str, method: str) -> RunConfig:
    return RunConfig(model=model, method=method, lora_rank=RANK, lora_alpha=8.0,
                     adapter_reduction=REDUCTION, slora_density=DENSITY, num_clients=2,
                     clients_per_round=2, max_train_samples=48, max_test_samples=16,
                     batch_size=8, lr=5e-3, rounds=8).validate()


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(1000, 2000, (3, 12), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def pretrained(rt: Runtime) -> torch.nn.Module:
    return load_model(rt.cfg.model, rt.task.auto_model_class(), seed=rt.cfg.seed,
                      **rt.task.model_kwargs())


def expected_trainable(method: str, arch: str, base: torch.nn.Module) -> int:
    """What each method trains, by hand, for the tiny models (d=32, 2 layers, FFN 64)."""
    head = sum(p.numel() for n in head_module_names(base) for p in getattr(base, n).parameters())
    m = D // REDUCTION
    return {
        "fedft": sum(p.numel() for p in base.parameters()),
        # embedding LayerNorm + per layer (q, k, v, attn-out, LN, FFN-out, LN: 7d; FFN-in: 4d)
        # + BERT's pooler (inside the encoder for BERT; part of the head elsewhere)
        "fedbf": D + LAYERS * (7 * D + FFN) + (D if arch == "bert" else 0) + head,
        "fedap": 2 * LAYERS * (2 * D * m + m + D) + head,  # down (m, d) + b, up (d, m) + b
        "fedlr": TARGETS * RANK * (D + D) + head,  # A (r, d_in), B (d_out, r)
        "federa": TARGETS * RANK * (D + D) + head,
        "ffa-lora": TARGETS * RANK * D + head,  # B only
        "fedsa-lora": TARGETS * RANK * (D + D) + head,  # A and B train (only A travels)
        "rolora": TARGETS * RANK * (D + D) + head,  # the server's model: both factors
        "slora": TARGETS * round(DENSITY * D * D) + head,  # stage 1: the masked entries
        # the federated-LoRA family: the server's model at lora-rank (test_lora_family_runs.py)
        "flora": TARGETS * RANK * (D + D) + head,
        "flexlora": TARGETS * RANK * (D + D) + head,
        "fedex-lora": TARGETS * RANK * (D + D) + head,
        "hetlora": TARGETS * RANK * (D + D) + head,
    }[method]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", list(METHODS))
def test_init_output_and_trainable_count(tiny_models, method, arch):
    server = Runtime(make_cfg(tiny_models(arch), method))
    server.method.make_anchor(server.model)
    base = pretrained(server)
    assert torch.allclose(logits(server.model), logits(base), atol=1e-5)
    assert num_parameters(trainable_state(server.model)) == expected_trainable(method, arch, base)


# flora, flexlora, fedex-lora and hetlora aggregate with their own rules and move the frozen base
# (flora, fedex-lora): their round on every architecture is tests/test_lora_family_runs.py's
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", [m for m in METHODS if m not in OWN_RULE])
def test_one_round_changes_exactly_the_trainable_tensors(tiny_models, method, arch):
    cfg = make_cfg(tiny_models(arch), method)
    server = Runtime(cfg)
    anchor = server.method.make_anchor(server.model)
    start = server.method.export_state(server.model)
    client = Runtime(cfg)  # one worker serving both clients, as in the simulation
    if anchor is not None:
        client.method.apply_anchor(client.model, {k: v.clone() for k, v in anchor.items()})
    client.method.configure_client(client, server.method.client_config(1))
    frozen = frozen_state(client.model)
    server_frozen = frozen_state(server.model)
    # same base everywhere (a RoLoRA client also freezes the factor this round does not train)
    assert server_frozen.keys() <= frozen.keys()
    assert all(torch.equal(frozen[k], server_frozen[k]) for k in server_frozen)

    states, weights = [], []
    for pid in range(cfg.num_clients):
        client.method.import_state(client.model, start)
        result = local_train(client.model, client.client_rows(pid), client.collate,
                             lr=client.method.lr, epochs=1, batch_size=cfg.batch_size,
                             weight_decay=0.01, max_grad_norm=1.0, device=client.device,
                             generator=torch.Generator().manual_seed(pid),
                             after_step=client.method.after_step(client.model))
        assert result.steps >= 2
        states.append(client.method.export_state(client.model))
        weights.append(result.num_examples)
    uploaded = fedavg(states, weights)  # what travelled: the method's upload reference
    assert uploaded.keys() == server.method.upload_reference(start, 0, 1).keys()
    new = {**start, **uploaded}  # RoLoRA's frozen factor keeps its global value
    server.method.import_state(server.model, new)
    assert server.method.end_round(1, server, new) is None  # rounds=8: SLoRA switches after 2

    assert new.keys() == start.keys()
    unchanged = {k for k in uploaded if np.allclose(start[k], new[k])}
    assert all(k.endswith(KEY_BIASES) for k in unchanged), sorted(unchanged)[:3]
    after = frozen_state(client.model)
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)  # nothing frozen moved
    assert all(np.array_equal(v, trainable_state(server.model)[k]) for k, v in new.items())


def test_unresolvable_modules_list_the_linear_layers(tiny_models):
    cfg = make_cfg(tiny_models("bert"), "fedlr")
    model = pretrained(Runtime(cfg))
    model.config.model_type = "mystery-encoder"
    with pytest.raises(ValueError, match=r"target-modules=.*query, value"):
        query_value_modules(model)
    with pytest.raises(ValueError, match=r"adapter-modules=.*dense, key"):
        adapter_sites(model)
    assert query_value_modules(model, ["key"]) == ["key"]  # an override resolves it
    assert len(adapter_sites(model, ["output.dense"])) == LAYERS
    for method, key in (("fedlr", "target-modules"), ("fedap", "adapter-modules"),
                        ("slora", "target-modules")):
        bad = RunConfig.from_mapping({key: ["no_such_layer"]}, base=make_cfg(cfg.model, method))
        with pytest.raises(ValueError, match="linear layers.*query"):
            Runtime(bad)


def test_adapter_sites_per_architecture(tiny_models):
    expected = {"bert": "attention.output.dense", "roberta": "attention.output.dense",
                "deberta-v2": "attention.output.dense", "distilbert": "attention.out_lin"}
    for arch, attn in expected.items():
        model = pretrained(Runtime(make_cfg(tiny_models(arch), "fedap")))
        sites = adapter_sites(model)
        assert len(sites) == 2 * LAYERS, (arch, sites)
        assert sum(s.endswith(attn) for s in sites) == LAYERS, (arch, sites)


def test_default_learning_rate_depends_on_method_and_task_kind():
    from fedpeft.methods import make_method

    federa = RunConfig(method="federa")
    assert make_method(federa, "SEQ_CLS").lr == 1e-3
    assert make_method(federa, "TOKEN_CLS").lr == 5e-3  # NER stays all-O at 1e-3
    assert make_method(RunConfig(method="federa", lr=2e-4), "TOKEN_CLS").lr == 2e-4  # user wins
    assert make_method(RunConfig(method="fedft"), "TOKEN_CLS").lr == 5e-5
