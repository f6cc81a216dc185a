"""The federated-LoRA methods of 2024-26 (flora, flexlora, fedex-lora, hetlora): their rules on
hand-made two-client cases and heterogeneous client ranks (rule, padding that stays zero, the
refusals). Their federated runs: test_lora_family_runs.py."""

import numpy as np
import pytest
import torch

from fedpeft.config import ConfigError, load_config
from fedpeft.federation.aggregation import exact_lora_mean, fedavg
from fedpeft.methods import make_method
from fedpeft.methods.fedex_lora import fedex_aggregate
from fedpeft.methods.flora import merge, stack
from fedpeft.methods.hetlora import live_rank, sparsity_weighted_mean
from fedpeft.methods.lora_family import (
    MERGED,
    client_rank,
    merged_update,
    pad,
)

A, B = "l.lora_A.default.weight", "l.lora_B.default.weight"
RNG = np.random.default_rng(0)


def _client(rank, d_out=5, d_in=4, head=None):
    return {A: RNG.normal(size=(rank, d_in)).astype(np.float32),
            B: RNG.normal(size=(d_out, rank)).astype(np.float32),
            "classifier.weight": np.full((3,), head if head is not None else RNG.normal(),
                                         np.float32)}


def _product(state, scale):
    return scale * state[B].astype(np.float64) @ state[A].astype(np.float64)


# --- FLoRA ---------------------------------------------------------------------------------

def test_flora_stacked_product_is_the_weighted_sum_of_products():
    c1, c2 = _client(1), _client(3)  # ranks differ
    weights, scales = [3.0, 1.0], [2.0, 2.0 / 3]  # s_k = alpha / r_k with alpha = 2
    a, b = stack([c1, c2], weights, scales, "l")
    assert a.shape == (4, 4) and b.shape == (5, 4)
    expected = 0.75 * _product(c1, 2.0) + 0.25 * _product(c2, 2.0 / 3)
    np.testing.assert_allclose(b.astype(np.float64) @ a.astype(np.float64), expected, atol=1e-5)
    # the naive alternative, averaging zero-padded factors, is not that sum
    mean = fedavg([pad(c1, 3), pad(c2, 3)], weights)
    assert not np.allclose(_product(mean, 1.0), expected, atol=1e-2)


def test_flora_merge_is_factored_while_smaller_than_dense_then_dense():
    prev = {}
    total = np.zeros((5, 4))
    ranks = []
    for _ in range(3):  # rank 2 per round: factored at R=2 (2*9 < 20), dense at R=4 (36 > 20)
        a, b = stack([_client(1), _client(1)], [1.0, 1.0], [1.0, 1.0], "l")
        total += b.astype(np.float64) @ a.astype(np.float64)
        merged = merge(prev, "l", a, b)
        ranks.append(merged[f"{MERGED}l/A"].shape[0] if f"{MERGED}l/A" in merged else "dense")
        prev = merged
        np.testing.assert_allclose(merged_update(merged, "l"), total, atol=1e-5)
    assert ranks == [2, "dense", "dense"]


# --- FedEx-LoRA ----------------------------------------------------------------------------

def test_fedex_fold_makes_the_global_model_the_mean_of_the_clients_models():
    base0 = RNG.normal(size=(5, 4))
    previous = {MERGED + "l": RNG.normal(size=(5, 4)).astype(np.float32)}  # earlier folds
    c1, c2 = _client(2), _client(2)
    s, weights = 0.5, [1.0, 3.0]
    out, ratios = fedex_aggregate([c1, c2], weights, s, previous)
    base_before = base0 + previous[MERGED + "l"]
    base_after = base0 + out[MERGED + "l"].astype(np.float64)
    global_model = base_after + _product(out, s)
    clients_mean = base_before + 0.25 * _product(c1, s) + 0.75 * _product(c2, s)
    np.testing.assert_allclose(global_model, clients_mean, atol=1e-5)
    # without the fold, FedAvg of the factors is not the mean of the clients' models
    assert not np.allclose(base_before + _product(out, s), clients_mean, atol=1e-3)
    assert ratios["l"] > 0.01
    np.testing.assert_array_equal(out[A], fedavg([c1, c2], weights)[A])


# --- FlexLoRA ------------------------------------------------------------------------------

def _flex(ranks, **extra):
    cfg = load_config(None, ["method=flexlora", f"client-ranks=table:{ranks}", "num-clients=2",
                             "clients-per-round=2", "lora-rank=4", "lora-alpha=8",
                             *[f"{k}={v}" for k, v in extra.items()]])
    return cfg, make_method(cfg, "SEQ_CLS")


def test_flexlora_sends_each_client_the_rank_rk_truncation_of_the_mean_product():
    cfg, method = _flex("2,4")
    assert [method.rank_of(0), method.rank_of(1)] == [2, 4]
    scales = [method.client_scale(2), method.client_scale(4)]
    assert scales == [4.0, 2.0]  # s_k = alpha / r_k
    c1, c2 = _client(2, 6, 5), _client(4, 6, 5)
    mean = 0.25 * _product(c1, 4.0) + 0.75 * _product(c2, 2.0)
    state, errors = exact_lora_mean([c1, c2], [1.0, 3.0], method.global_scale, 4, scales)
    u, sv, vt = np.linalg.svd(mean)
    for client, rank in ((0, 2), (1, 4)):
        sent = method.client_payload(state, client, 2)
        assert sent[A].shape == (rank, 5) and sent[B].shape == (6, rank)
        best = (u[:, :rank] * sv[:rank]) @ vt[:rank]  # the rank-r_k truncation of the mean
        np.testing.assert_allclose(_product(sent, scales[client]), best, atol=1e-4)
    assert method.client_payload(state, 1, 2) is state  # full rank: the global state itself
    assert errors["l"] > 0  # rank(mean) = 6 > 4: the global rank truncates


def test_flexlora_with_equal_ranks_is_exact_lora():
    c1, c2 = _client(2), _client(2)
    plain, _ = exact_lora_mean([c1, c2], [1.0, 2.0], 0.5, 2)
    flex, _ = exact_lora_mean([c1, c2], [1.0, 2.0], 0.5, 2, [0.5, 0.5])
    np.testing.assert_allclose(_product(flex, 0.5), _product(plain, 0.5), atol=1e-6)


# --- HetLoRA -------------------------------------------------------------------------------

def test_hetlora_pads_weights_by_sparsity_and_reads_a_pruned_rank():
    c1, c2 = _client(2, head=1.0), _client(4, head=5.0)
    out, used = sparsity_weighted_mean([c1, c2], [3.0, 1.0], 4)
    n1, n2 = np.linalg.norm(_product(c1, 1)), np.linalg.norm(_product(c2, 1))
    p = np.array([n1, n2]) / (n1 + n2)
    np.testing.assert_allclose(used["l"], p)
    np.testing.assert_allclose(out[A], p[0] * pad(c1, 4)[A] + p[1] * c2[A], atol=1e-6)
    np.testing.assert_allclose(out[A][2:], p[1] * c2[A][2:], atol=1e-6)  # only c2 has 3, 4
    assert out["classifier.weight"][0] == pytest.approx(2.0)  # head: example counts 3:1
    pruned = {**c2, A: c2[A].copy(), B: c2[B].copy()}
    pruned[A][3:], pruned[B][:, 3:] = 0, 0
    assert live_rank(c2) == 4 and live_rank(pruned) == 3
    cfg = load_config(None, ["method=hetlora", "client-ranks=table:2,4", "num-clients=2",
                             "clients-per-round=2", "lora-rank=4"])
    method = make_method(cfg, "SEQ_CLS")
    method.aggregate(1, [c1, pruned], [1.0, 1.0], [0, 1], {})
    assert method.rank_of(1) == 3 and method.rank_of(0) == 2
    assert method.client_payload(out, 1, 2)[A].shape == (3, 4)
    assert method.state_dict() == {"ranks": {"1": 3}}


def test_hetlora_self_pruning_on_a_client(tiny_models):
    """A large regulariser shrinks the tail, so the client prunes its rank 4 -> 3 (gamma 0.75)
    and sends its factors at the received shape with the tail zeroed; without it, no pruning."""
    from fedpeft.federation.runtime import Runtime
    from fedpeft.training import local_train

    def train(lam):
        cfg = load_config(None, [f"model={tiny_models('bert')}", "method=hetlora",
                                 "lora-rank=4", "num-clients=2", "clients-per-round=2",
                                 "client-ranks=table:4,2", "hetlora-gamma=0.75",
                                 f"hetlora-lambda={lam}", "max-train-samples=32", "threads=1"])
        runtime = Runtime(cfg)
        state = runtime.method.export_state(runtime.model)
        state = {k: v + np.float32(0.1) if ".lora_B." in k else v for k, v in state.items()}
        runtime.method.receive(runtime, state, 0)
        local_train(runtime.model, runtime.client_rows(0), runtime.collate, epochs=1, lr=1e-2,
                    batch_size=8, weight_decay=0.0, max_grad_norm=1.0,
                    generator=torch.Generator().manual_seed(0),
                    device=runtime.device, precision="fp32")
        return runtime.method.reply(runtime, 0)

    pruned, kept = train(50.0), train(0.0)
    assert all(v.shape == (4, 32) for k, v in pruned.items() if ".lora_A." in k)
    assert live_rank(pruned) == 3 and live_rank(kept) == 4


# --- client ranks ----------------------------------------------------------------------------

def test_client_ranks_rule_is_seeded_balanced_and_a_table_is_taken_as_given():
    cfg = load_config(None, ["method=flora", "client-ranks=4,8,16,32", "num-clients=10"])
    ranks = [client_rank(cfg, k) for k in range(10)]
    assert sorted(ranks) == [4, 4, 4, 8, 8, 8, 16, 16, 32, 32]  # 10 over 4: 3, 3, 2, 2
    assert ranks == [client_rank(cfg, k) for k in range(10)]  # a pure function
    other = load_config(None, ["method=flora", "client-ranks=4,8,16,32", "num-clients=10",
                               "seed=1"])
    assert [client_rank(other, k) for k in range(10)] != ranks
    table = load_config(None, ["method=hetlora", "client-ranks=table:8,4,4",
                               "num-clients=3", "clients-per-round=3"])
    assert [client_rank(table, k) for k in range(3)] == [8, 4, 4]
    assert client_rank(load_config(None, ["method=flexlora"]), 5) == 32  # lora-rank


@pytest.mark.parametrize(("overrides", "message"), [
    (["method=fedex-lora", "client-ranks=4,8"], "client-ranks applies to method=flora"),
    (["method=fedlr", "client-ranks=4,8"], "not method=fedlr"),
    (["method=flora", "client-ranks=4,64"], r"in \[1, lora-rank=32\].*got 64"),
    (["method=flora", "client-ranks=4,x"], "expected ranks like 4,8,16,32"),
    (["method=flora", "client-ranks=table:4,8", "num-clients=3", "clients-per-round=3"],
     "lists 2 ranks but num-clients=3"),
    (["method=flexlora", "strategy=fedadam"], "own rule.*strategy=fedadam"),
    (["method=hetlora", "aggregation=exact-lora"], "aggregation=exact-lora"),
    (["method=flora", "transport-dtype=fp16"], "transport-dtype=fp16 would round it"),
    (["method=flora", "lora-init=svd"], "lora-init=svd applies to method="),
    (["method=hetlora", "lora-init=svd"], "not method=hetlora"),
    (["method=flexlora", "lora-init=svd", "client-ranks=4,8"], "one rank for every client"),
    (["method=flora", "lora-rslora=true"], "LoRA family"),
    (["method=hetlora", "hetlora-gamma=0"], "hetlora-gamma must be in"),
])
def test_settings_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_zero_padding_stays_exactly_zero_under_adamw(tiny_models):
    """A rank-2 client in a model built at rank 8: its other 6 components get zero gradients,
    so AdamW with weight decay and clipping leaves them at exactly 0; it sends 2 components."""
    from fedpeft.federation.runtime import Runtime
    from fedpeft.training import local_train

    cfg = load_config(None, [f"model={tiny_models('bert')}", "method=flexlora", "lora-rank=8",
                             "lora-alpha=16", "num-clients=2", "clients-per-round=2",
                             "client-ranks=table:2,8", "max-train-samples=32", "threads=1"])
    runtime = Runtime(cfg)
    method = runtime.method
    state = method.export_state(runtime.model)
    state = {k: v + np.float32(0.05) for k, v in state.items()}  # B != 0: A trains too
    sent = method.client_payload(state, 0, 1)
    method.receive(runtime, sent, 0)
    from fedpeft.methods.lora import lora_layers

    assert {layer.scaling["default"] for layer in lora_layers(runtime.model).values()} == {8.0}
    before = {n: p.detach().clone() for n, p in runtime.model.named_parameters()
              if p.requires_grad}
    local_train(runtime.model, runtime.client_rows(0), runtime.collate, epochs=2, lr=1e-2,
                batch_size=8, weight_decay=0.1, max_grad_norm=1.0,
                generator=torch.Generator().manual_seed(0),
                device=runtime.device, precision="fp32")
    for name, p in runtime.model.named_parameters():
        if ".lora_A." in name:
            assert torch.count_nonzero(p[2:]) == 0 and not torch.equal(p[:2], before[name][:2])
        if ".lora_B." in name:
            assert torch.count_nonzero(p[:, 2:]) == 0 and not torch.equal(p[:, :2],
                                                                          before[name][:, :2])
    reply = method.reply(runtime, 0)
    assert {k: v.shape for k, v in reply.items()} == {k: v.shape for k, v in sent.items()}
    method.import_state(runtime.model, state)  # the server's view: full rank, global scale
    assert {layer.scaling["default"] for layer in lora_layers(runtime.model).values()} == {2.0}
