"""Flower's strategies with every method: each runs, its state is checkpointed, FedProx's term,
DP clipping and accounting, a robust aggregator against a hostile client, and the refusals."""

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from inprocess import flower_identity, run_inprocess, tiny_config  # noqa: F401

from fedpeft.config import ConfigError, RunConfig, load_config
from fedpeft.federation.strategies import STRATEGIES
from fedpeft.federation.strategies.build import flower_defaults, make_strategy
from fedpeft.runlog import load_state, read_rounds
from fedpeft.training import proximal_term

# settings that make each strategy do something visible on 2-3 tiny clients
SETTINGS = {"fedavgm": ["server-momentum=0.9"], "fedadam": ["server-lr=0.01"],
            "fedyogi": ["server-lr=0.01"], "fedadagrad": ["server-lr=0.01"],
            "fedprox": ["proximal-mu=0.1"], "krum": ["clients-per-round=3"],
            "multikrum": ["clients-per-round=3", "num-nodes-to-select=2"],
            "bulyan": ["clients-per-round=3"], "fedtrimmedavg": ["clients-per-round=3"]}


@pytest.mark.parametrize("method", ["fedlr", "fedft"])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_strategy_runs_two_rounds(tiny_models, tmp_path, strategy, method,
                                        flower_identity):  # noqa: F811
    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), f"strategy={strategy}",
                      f"method={method}", *SETTINGS.get(strategy, []))
    from fedpeft.federation.runtime import Runtime

    start = Runtime(cfg)
    start.method.make_anchor(start.model)
    initial = start.method.export_state(start.model)
    summary = run_inprocess(cfg)
    rounds = read_rounds(cfg.run_dir())
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["successes"] == cfg.clients_per_round and not r["rejected"] for r in rounds)
    final = load_state(cfg.run_dir() / "final_state.safetensors")
    assert final.keys() == initial.keys()
    assert all(final[k].dtype == initial[k].dtype for k in final)
    moved = [k for k in final if not np.array_equal(final[k], initial[k])]
    assert moved and all(np.all(np.isfinite(v)) for v in final.values())
    assert summary["strategy"] == strategy


@pytest.mark.parametrize("strategy", [["strategy=fedadam", "server-lr=0.01"],
                                      ["strategy=fedavgm", "server-momentum=0.9"]],
                         ids=["fedadam", "fedavgm"])
def test_a_resumed_server_optimiser_equals_an_uninterrupted_one(tiny_models, tmp_path,
                                                                strategy,
                                                                flower_identity):  # noqa: F811
    from fedpeft.federation.checkpoint import load_checkpoint, resume_config

    full = tiny_config(tiny_models("bert"), str(tmp_path / "full"), "rounds=3", *strategy)
    expected = run_inprocess(full)
    part = tiny_config(tiny_models("bert"), str(tmp_path / "part"), "rounds=1", *strategy)
    run_inprocess(part)
    saved = load_checkpoint(part.run_dir())
    assert saved.strategy_tensors  # FedAdam's m_t/v_t, FedAvgM's momentum, after round 1
    resumed = run_inprocess(resume_config(part.run_dir(), ["rounds=3"]), resume=True)
    a = load_state(full.run_dir() / "final_state.safetensors")
    b = load_state(part.run_dir() / "final_state.safetensors")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert expected["final"] == resumed["final"]


def test_without_its_state_fedadam_would_not_resume_equal(tiny_models, tmp_path,
                                                          flower_identity):  # noqa: F811
    """The check above can fail: dropping the moments from the checkpoint changes the run."""
    from fedpeft.federation.checkpoint import load_checkpoint, resume_config, save_checkpoint

    args = ["strategy=fedadam", "server-lr=0.01"]
    full = tiny_config(tiny_models("bert"), str(tmp_path / "full"), "rounds=2", *args)
    run_inprocess(full)
    part = tiny_config(tiny_models("bert"), str(tmp_path / "part"), "rounds=1", *args)
    run_inprocess(part)
    saved = load_checkpoint(part.run_dir())
    saved.strategy_state, saved.strategy_tensors = {}, {}
    save_checkpoint(part.run_dir(), saved)
    run_inprocess(resume_config(part.run_dir(), ["rounds=2"]), resume=True)
    a = load_state(full.run_dir() / "final_state.safetensors")
    b = load_state(part.run_dir() / "final_state.safetensors")
    assert any(not np.array_equal(a[k], b[k]) for k in a)


# --- FedProx --------------------------------------------------------------------------------

def test_proximal_term_is_zero_at_the_global_weights_and_its_gradient_is_mu_delta():
    torch.manual_seed(0)
    w_global = [torch.randn(3, 2), torch.randn(4)]
    w = [(g + 0.1 * torch.randn_like(g)).requires_grad_() for g in w_global]
    at_global = [g.clone().requires_grad_() for g in w_global]
    assert proximal_term(at_global, w_global, 0.5).item() == 0.0
    term = proximal_term(w, w_global, 0.5)
    expected = 0.25 * sum(float((a.detach() - b).square().sum())
                          for a, b in zip(w, w_global, strict=True))
    assert term.item() == pytest.approx(expected, rel=1e-6)
    term.backward()
    for p, g in zip(w, w_global, strict=True):
        assert torch.allclose(p.grad, 0.5 * (p.detach() - g), atol=1e-7)


def test_fedprox_sends_mu_and_clients_stay_closer_to_the_global_model(
        tiny_models, tmp_path, flower_identity):  # noqa: F811
    # 8 local steps per client (the term is 0 at the first step, where w = w_global)
    common = ["rounds=1", "method=fedlr", "strategy=fedprox", "batch-size=2"]
    free = tiny_config(tiny_models("bert"), str(tmp_path / "free"), *common, "proximal-mu=0")
    held = tiny_config(tiny_models("bert"), str(tmp_path / "held"), *common, "proximal-mu=100")
    from fedpeft.federation.runtime import Runtime

    start = Runtime(free)
    initial = start.method.export_state(start.model)
    run_inprocess(free)
    run_inprocess(held)

    def distance(run):
        final = load_state(run.run_dir() / "final_state.safetensors")
        return np.sqrt(sum(float(np.square(final[k] - initial[k]).sum()) for k in initial))

    assert distance(held) < 0.5 * distance(free)


# --- differential privacy -------------------------------------------------------------------

def _train_message(arrays, config, anchor=None):
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "config": ConfigRecord(config)})
    if anchor is not None:
        content["anchor"] = ArrayRecord({"a0": Array(anchor)})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def test_client_side_clipping_bounds_the_update_norm_by_hand(flower_identity):  # noqa: F811
    from fedpeft.federation.client_app import ANCHOR_KEY
    from fedpeft.federation.strategies.dp import client_dp_mod

    sent = {"w": np.array([1.0, 1.0], np.float32), "b": np.array([0.0], np.float32)}
    trained = {"w": np.array([4.0, 5.0], np.float32), "b": np.array([0.0], np.float32)}
    # update (3, 4, 0): norm 5, clipped to norm 1 -> (0.6, 0.8, 0)

    def client(msg, context):
        assert len(msg.content.array_records) == 1  # the anchor was moved to the node's state
        return Message(RecordDict({
            "arrays": ArrayRecord({k: Array(v) for k, v in trained.items()}),
            "metrics": MetricRecord({"num-examples": 4})}), reply_to=msg)

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    msg = _train_message(sent, {"clipping_norm": 1.0}, anchor=np.ones(2, np.float32))
    reply = client_dp_mod(msg, context, client)
    out = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    assert np.allclose(out["w"], [1.6, 1.8]) and np.allclose(out["b"], [0.0])
    assert np.isclose(np.linalg.norm(np.concatenate([out["w"] - sent["w"], out["b"]])), 1.0)
    assert ANCHOR_KEY in context.state
    # a message that asks for no clipping passes through untouched
    plain = client_dp_mod(_train_message(sent, {}), context, client)
    assert np.array_equal(plain.content["arrays"]["w"].numpy(), trained["w"])


def test_a_dp_run_clips_adds_noise_and_reports_epsilon(tiny_models, tmp_path,
                                                       flower_identity):  # noqa: F811
    import dp_accounting

    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "rounds=3",
                      "dp=client-fixed", "dp-noise-multiplier=1.0", "dp-clipping-norm=0.5",
                      "dp-delta=1e-3")
    summary = run_inprocess(cfg)
    eps = [r["privacy"]["epsilon"] for r in read_rounds(cfg.run_dir())]
    assert eps == sorted(eps) and len(set(eps)) == 3  # one release per round, composed
    # independently: Google's RDP accountant, 3 unamplified Gaussian releases at sigma=1
    rdp = dp_accounting.rdp.RdpAccountant()
    rdp.compose(dp_accounting.GaussianDpEvent(1.0), 3)
    assert summary["privacy"]["epsilon"] == pytest.approx(rdp.get_epsilon(1e-3), rel=1e-3)
    assert summary["privacy"]["delta"] == 1e-3


def test_an_unaccounted_dp_run_says_why(tiny_models, tmp_path, flower_identity):  # noqa: F811
    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "rounds=1",
                      "strategy=fedmedian", "dp=server-fixed", "dp-noise-multiplier=1.0",
                      "dp-clipping-norm=0.5")
    summary = run_inprocess(cfg)
    assert "does not aggregate as FedAvg" in summary["privacy"]["note"]


# --- robust aggregation ---------------------------------------------------------------------

def _reply(values, weight=1.0):
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.asarray(values, np.float32))}),
                          "metrics": MetricRecord({"num-examples": weight})})
    return Message(content, dst_node_id=0, message_type=MessageType.TRAIN)


@pytest.mark.parametrize(("strategy", "extra"), [("fedmedian", []),
                                                  ("krum", ["num-malicious-nodes=1"])])
def test_a_robust_aggregator_ignores_one_hostile_client(strategy, extra, flower_identity):  # noqa: F811
    cfg = load_config(None, [f"strategy={strategy}", "clients-per-round=5", *extra])
    agg = make_strategy(cfg, client_lr=1e-3)
    honest = [[1.0, 2.0], [1.1, 2.1], [0.9, 1.9], [1.0, 2.05]]
    replies = [_reply(v) for v in honest] + [_reply([1000.0, -1000.0])]
    arrays, _ = agg.aggregate_train(1, replies)
    out = arrays["w"].numpy()
    assert np.all(np.abs(out - [1.0, 2.0]) <= 0.1)
    fedavg = make_strategy(load_config(None, []), client_lr=1e-3)
    fresh = [_reply(v) for v in honest] + [_reply([1000.0, -1000.0])]  # FedMedian pops arrays
    mean, _ = fedavg.aggregate_train(1, fresh)
    assert abs(mean["w"].numpy()[0] - 1.0) > 100  # the plain mean is dragged away


# --- what is refused, and the list ----------------------------------------------------------

@pytest.mark.parametrize(("overrides", "message"), [
    (["aggregation=exact-lora", "strategy=fedadam"], "cannot be combined with strategy=fedadam"),
    (["aggregation=exact-lora", "dp=client-fixed", "dp-noise-multiplier=1",
      "dp-clipping-norm=1"], "cannot be combined"),
    (["proximal-mu=0.1"], "proximal-mu is a setting of strategy fedprox"),
    (["strategy=fedadm"], "strategy='fedadm' is unknown"),
    (["strategy=bulyan", "num-malicious-nodes=1", "clients-per-round=5"],
     "needs clients-per-round >= 7"),
    (["dp=client-fixed", "dp-noise-multiplier=1"], "needs dp-clipping-norm > 0"),
    (["dp-target-quantile=0.5"], "applies to dp=server-adaptive / client-adaptive"),
])
def test_combinations_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_strategies_command_lists_every_strategy_with_flowers_defaults(capsys):
    from fedpeft.cli import main

    assert main(["strategies"]) == 0
    out = capsys.readouterr().out
    for name, spec in STRATEGIES.items():
        assert f"| {name} | {spec.flower_class} |" in out
    assert "server-lr=0.1" in out and "beta-1=0.9" in out  # FedAdam's own defaults
    assert flower_defaults("fedavgm") == {"server_lr": 1.0, "server_momentum": 0.0}
    assert "client-fixed" in out


def test_default_is_flowers_fedavg_with_streaming():
    from flwr.serverapp.strategy import FedAvg

    from fedpeft.federation.strategies.build import streams

    strategy = make_strategy(RunConfig(), client_lr=1e-3)
    assert type(strategy) is FedAvg and streams(strategy)
    assert not streams(make_strategy(load_config(None, ["strategy=fedprox"]), client_lr=1e-3))
