"""SLoRA: the sparse first stage (masks, payload, no leak outside the mask), the switch to LoRA
(output = W0 + rank-r(dW) applied), the clients' stage change, and a simulation across it."""

import numpy as np
import pytest
import torch

from fedpeft.config import load_config
from fedpeft.federation.runtime import Runtime
from fedpeft.federation.state import frozen_digest, num_parameters, trainable_state
from fedpeft.methods.lora import lora_layers
from fedpeft.methods.slora import (
    SparseDelta,
    sparse_indices,
    sparse_layers,
    sparse_updates,
    stage_of,
    target_masks,
)
from fedpeft.models import head_module_names, load_model
from fedpeft.training import local_train

RANK = 4


def make_cfg(model: str, *extra: str):
    return load_config(None, [f"model={model}", "method=slora", f"lora-rank={RANK}",
                              "lora-alpha=8", "slora-density=0.05", "rounds=3",
                              "slora-stage1-rounds=1", "num-clients=3", "clients-per-round=2",
                              "max-train-samples=48", "max-test-samples=16", "batch-size=8",
                              *extra])


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(1000, 2000, (3, 12), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_masks_hand_checked():
    idx = sparse_indices(10, 0.3, np.random.default_rng(0))
    assert len(idx) == 3 and len(set(idx)) == 3 and list(idx) == sorted(idx)
    assert idx.min() >= 0 and idx.max() < 10
    assert list(sparse_indices(4, 1.0, np.random.default_rng(0))) == [0, 1, 2, 3]
    assert len(sparse_indices(1000, 1e-6, np.random.default_rng(0))) == 1  # at least one entry
    a, b = target_masks([100, 100], 0.1, seed=7)
    assert len(a) == len(b) == 10 and not np.array_equal(a, b)  # one draw per target
    assert all(np.array_equal(x, y)
               for x, y in zip(target_masks([100, 100], 0.1, 7), (a, b), strict=True))
    assert [stage_of(r, 2) for r in (1, 2, 3, 4)] == [1, 1, 2, 2]


def test_sparse_delta_adds_only_the_masked_entries():
    w0 = torch.arange(6.0).view(2, 3)
    p = SparseDelta(torch.tensor([1, 5]), torch.float32)
    with torch.no_grad():
        p.delta.copy_(torch.tensor([10.0, 20.0]))
    assert torch.equal(p(w0), torch.tensor([[0.0, 11.0, 2.0], [3.0, 4.0, 25.0]]))
    assert torch.equal(p.dense(w0.shape), torch.tensor([[0.0, 10.0, 0.0], [0.0, 0.0, 20.0]]))


def test_stage1_payload_is_the_mask_and_the_head(tiny_models):
    rt = Runtime(make_cfg(tiny_models("bert")))
    state = rt.method.export_state(rt.model)
    base = load_model(rt.cfg.model, rt.task.auto_model_class(), seed=0, **rt.task.model_kwargs())
    head = sum(p.numel() for n in head_module_names(base) for p in getattr(base, n).parameters())
    masked = [v.size for k, v in state.items() if k.endswith(".delta")]
    assert masked == [round(0.05 * 32 * 32)] * 4  # query and value of 2 layers
    assert num_parameters(state) == sum(masked) + head
    assert rt.method.client_config(1) == {"slora-stage": 1, "slora-mask-seed": rt.method.mask_seed}
    assert rt.method.client_config(2) == {"slora-stage": 2}


def test_training_moves_only_masked_entries_even_with_weight_decay(tiny_models):
    rt = Runtime(make_cfg(tiny_models("bert")))
    before = {n: m.weight.detach().clone() for n, m in sparse_layers(rt.model).items()}
    local_train(rt.model, rt.client_rows(0), rt.collate, lr=1e-2, epochs=2, batch_size=8,
                weight_decay=0.5, max_grad_norm=1.0, generator=torch.Generator().manual_seed(0),
                device=rt.device)
    for name, layer in sparse_layers(rt.model).items():
        moved = (layer.weight.detach() != before[name]).flatten()
        mask = torch.zeros_like(moved)
        mask[layer.parametrizations.weight[0].indices] = True
        assert not moved[~mask].any(), name  # no gradient, no decay outside the mask
        assert moved[mask].float().mean() > 0.9, name
        assert torch.equal(layer.parametrizations.weight.original, before[name])  # W0 frozen


def test_priming_applies_w0_plus_rank_r_of_dw(tiny_models):
    rt = Runtime(make_cfg(tiny_models("bert")))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a stage-1 result: random masked updates and head
        for p in (q for q in rt.model.parameters() if q.requires_grad):
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    updates = sparse_updates(rt.model)
    heads = {n: getattr(rt.model, n).state_dict() for n in head_module_names(rt.model)}
    w0 = {n: m.parametrizations.weight.original.detach().clone()
          for n, m in sparse_layers(rt.model).items()}
    new_state = rt.method.end_round(1, rt, rt.method.export_state(rt.model))

    # Reference: a plain model with W0 + rank-r(dW) written into each target, by numpy's SVD.
    ref = load_model(rt.cfg.model, rt.task.auto_model_class(), seed=0, **rt.task.model_kwargs())
    with torch.no_grad():
        for name, dw in updates.items():
            u, s, vh = np.linalg.svd(dw.double().numpy())
            low = (u[:, :RANK] * s[:RANK]) @ vh[:RANK]
            weight = ref.get_submodule(name).weight
            assert torch.equal(weight, w0[name])
            weight.add_(torch.from_numpy(low).float())
        for name, state in heads.items():
            getattr(ref, name).load_state_dict(state)
    assert torch.allclose(logits(rt.model), logits(ref), atol=1e-5)
    assert new_state is not None and new_state.keys() == trainable_state(rt.model).keys()
    assert all(".lora_" in k or ".modules_to_save." in k for k in new_state)
    assert len(lora_layers(rt.model)) == 4
    fresh = Runtime(make_cfg(tiny_models("bert")))
    fresh.method._set_stage(fresh, 2, fresh.method.mask_seed)
    assert frozen_digest(rt.model) == frozen_digest(fresh.model)  # the base is W0 again
    log = rt.method.state_dict()
    assert log["stage"] == 2 and log["trained-stage"] == 1 and log["priming"]["round"] == 1
    assert 0.0 < log["priming"]["energy-kept"] < 1.0  # rank 4 of a full-rank 32x32 update


def test_clients_follow_the_servers_stage(tiny_models):
    cfg = make_cfg(tiny_models("bert"))
    server = Runtime(cfg)
    primed = server.method.end_round(1, server, server.method.export_state(server.model))
    client = Runtime(cfg)
    client.method.configure_client(client, server.method.client_config(1))
    assert sparse_layers(client.model)  # still stage 1: nothing rebuilt
    client.method.configure_client(client, server.method.client_config(2))
    assert client.method.stage == 2 and not sparse_layers(client.model)
    client.method.import_state(client.model, primed)  # A, B and head: all a client needs
    assert torch.allclose(logits(client.model), logits(server.model), atol=1e-6)
    assert client.method.lr == client.method.default_lr
    client.method.configure_client(client, server.method.client_config(1))  # a new run
    assert client.method.stage == 1 and sparse_layers(client.model)
    resumed = Runtime(cfg)
    resumed.method.load_state_dict(server.method.state_dict(), resumed)
    assert resumed.method.stage == 2 and lora_layers(resumed.model)


@pytest.mark.slow
def test_simulation_crosses_the_stage_switch(tiny_models, tmp_path):
    from fedpeft.federation.simulation import simulate
    from fedpeft.runlog import load_state, read_rounds

    cfg = make_cfg(tiny_models("bert"), "lr=5e-3", "slora-stage1-lr=5e-3",
                   f"out={tmp_path / 'run'}", "progress=false")
    summary = simulate(cfg)
    rounds = read_rounds(cfg.run_dir())
    states = [r["method-state"] for r in rounds]
    assert [s["trained-stage"] for s in states] == [1, 2, 2]
    assert [s["stage"] for s in states] == [2, 2, 2]
    assert states[0]["priming"]["round"] == 1
    assert summary["seconds-svd"] == states[0]["priming"]["seconds-svd"] > 0
    # Drift starts at the switch: round 2 is the first with LoRA factors before and after.
    assert "drift" not in rounds[0] and "drift" in rounds[1] and "drift" in rounds[2]
    assert all(r["successes"] == 2 and not r["failures"] for r in rounds)
    # 2 clients x (4 x 51 masked values + head) up in stage 1, 2 x (4 x 4 x 64 + head) in stage 2
    assert rounds[0]["bytes-up"] < rounds[1]["bytes-up"] == rounds[2]["bytes-up"]
    final = load_state(cfg.run_dir() / "final_state.safetensors")
    stage2 = Runtime(cfg)
    stage2.method._set_stage(stage2, 2, stage2.method.mask_seed)
    assert final.keys() == trainable_state(stage2.model).keys()
    assert summary["frozen-digest-end"] == frozen_digest(stage2.model)  # W0, untouched
