"""Learning-rate schedules across rounds (by hand, logged, kept on extension) and client
sampling weighted by shard size."""

import dataclasses
import json
import math

import numpy as np
import pytest
from inprocess import flower_identity, run_inprocess, tiny_config  # noqa: F401

from fedpeft.config import ConfigError, RunConfig, load_config
from fedpeft.schedule import client_lr, round_lr, sampling_probabilities


def cfg(**kw) -> RunConfig:
    return dataclasses.replace(RunConfig(), **kw).validate()


def test_constant_is_the_base_rate():
    c = cfg(rounds=10)
    assert [round_lr(1e-3, t, c) for t in (1, 5, 10, 50)] == [1e-3] * 4
    with pytest.raises(ValueError):
        round_lr(1e-3, 0, c)


def test_cosine_by_hand():
    c = cfg(rounds=10, lr_schedule="cosine", lr_min=1e-4).resolved()
    assert c.lr_schedule_rounds == 10
    base, low = 1e-3, 1e-4
    assert round_lr(base, 1, c) == pytest.approx(base)  # p = 0
    # round 6: p = 5/10, the midpoint
    assert round_lr(base, 6, c) == pytest.approx((base + low) / 2)
    # last round, 10: p = 9/10
    last = low + (base - low) * (1 + math.cos(0.9 * math.pi)) / 2
    assert round_lr(base, 10, c) == pytest.approx(last)
    assert round_lr(base, 11, c) == pytest.approx(low)  # past the horizon: the floor
    assert round_lr(base, 40, c) == pytest.approx(low)
    rates = [round_lr(base, t, c) for t in range(1, 12)]
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False))
    # the PyTorch equivalent: CosineAnnealingLR(T_max=10, eta_min=1e-4), stepped after each round
    import torch

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=low)
    theirs = []
    for _ in range(10):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates[:10] == pytest.approx(theirs)


def test_step_by_hand():
    c = cfg(rounds=20, lr_schedule="step", lr_step_rounds=3, lr_step_gamma=0.5)
    got = [round_lr(8.0, t, c) for t in range(1, 10)]
    assert got == [8.0, 8.0, 8.0, 4.0, 4.0, 4.0, 2.0, 2.0, 2.0]


def test_warmup_then_schedule_by_hand():
    c = cfg(rounds=10, warmup_rounds=4)
    assert [round_lr(1.0, t, c) for t in range(1, 7)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    s = cfg(rounds=20, warmup_rounds=2, lr_schedule="step", lr_step_rounds=2, lr_step_gamma=0.1)
    assert [round_lr(1.0, t, s) for t in range(1, 7)] == pytest.approx(
        [0.5, 1.0, 1.0, 1.0, 0.1, 0.1])
    # cosine after a warm-up of 2 over a horizon of 10: round 3 is p = 0, round 7 p = 4/8
    k = cfg(rounds=10, warmup_rounds=2, lr_schedule="cosine").resolved()
    assert round_lr(1.0, 2, k) == 1.0 and round_lr(1.0, 3, k) == pytest.approx(1.0)
    assert round_lr(1.0, 7, k) == pytest.approx(0.5)
    assert round_lr(1.0, 11, k) == pytest.approx(0.0)


def test_slora_stage1_keeps_its_own_rate():
    from fedpeft.methods.slora import SLoRA

    c = cfg(method="slora", rounds=8, lr=2e-3, slora_stage1_lr=1e-2, lr_schedule="cosine",
            lr_min=0.0).resolved()
    method = SLoRA(c, "SEQ_CLS")
    assert method.stage1_rounds == 2
    assert [client_lr(method, c, t) for t in (1, 2)] == [1e-2, 1e-2]
    assert [client_lr(method, c, t) for t in (3, 8)] == [round_lr(2e-3, 3, c),
                                                         round_lr(2e-3, 8, c)]


@pytest.mark.parametrize("overrides,match", [
    (["lr-schedule=linear"], "lr-schedule"),
    (["lr-step-gamma=0"], "lr-step-gamma"),
    (["lr-step-rounds=0"], "lr-step-rounds"),
    (["warmup-rounds=-1"], "warmup-rounds"),
    (["lr-schedule=cosine", "rounds=4", "warmup-rounds=4"], "warmup-rounds"),
    (["lr=1e-3", "lr-min=1e-2"], "lr-min"),
    (["client-sampling=weighted"], "client-sampling"),
    (["strategy=qfedavg", "lr-schedule=cosine"], "qfedavg"),
])
def test_bad_schedule_settings_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_horizon_is_resolved_once():
    first = cfg(rounds=4, lr_schedule="cosine").resolved()
    assert first.lr_schedule_rounds == 4
    extended = cfg(rounds=10, lr_schedule="cosine").resolved(first.to_dict())
    assert extended.lr_schedule_rounds == 4  # the saved horizon wins over the new rounds
    assert cfg(rounds=10).resolved().lr_schedule_rounds is None  # constant: nothing to fix


def test_size_sampling_weights():
    assert sampling_probabilities(cfg(), [1, 2, 3]) is None
    p = sampling_probabilities(cfg(client_sampling="size"), [1, 2, 5])
    assert p == pytest.approx([0.125, 0.25, 0.625])


def test_size_sampling_prefers_large_shards_and_uniform_is_unchanged():
    sizes = [5, 10, 20, 40, 80, 160]
    uniform, weighted = cfg(num_clients=6, clients_per_round=2), \
        cfg(num_clients=6, clients_per_round=2, client_sampling="size")

    def draws(c, seed=0):
        rng = np.random.default_rng([seed, 0x5A])
        return [sorted(int(p) for p in rng.choice(6, 2, replace=False,
                                                   p=sampling_probabilities(c, sizes)))
                for _ in range(2000)]

    # uniform: exactly the draws of the sampler without p (what runs did before the option)
    rng = np.random.default_rng([0, 0x5A])
    assert draws(uniform) == [sorted(int(p) for p in rng.choice(6, 2, replace=False))
                              for _ in range(2000)]
    counts = np.bincount(np.ravel(draws(weighted)), minlength=6)
    assert all(a < b for a, b in zip(counts, counts[1:], strict=False))  # larger, more often
    assert draws(weighted) == draws(weighted)  # deterministic for a seed
    assert draws(weighted, 1) != draws(weighted)


def rounds_log(run) -> list[dict]:
    return [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_logged_rate_and_extension_keep_past_rates(tiny_models, tmp_path,
                                                   flower_identity):  # noqa: F811
    run = tmp_path / "run"
    cfg2 = tiny_config(tiny_models("bert"), str(run), "method=fedlr", "lr-schedule=cosine",
                       "warmup-rounds=1", "lr-min=1e-4", "rounds=3")
    run_inprocess(cfg2)
    done = rounds_log(run)
    horizon = cfg2.resolved()
    assert [r["lr"] for r in done] == pytest.approx([round_lr(5e-3, t, horizon)
                                                     for t in (1, 2, 3)])
    assert done[0]["lr"] == pytest.approx(5e-3)  # warm-up of 1 round: the full rate
    assert 'lr-schedule-rounds = 3' in (run / "config.toml").read_text()
    # extend to 5 rounds: rounds 1-3 keep their rates, the curve continues on the same horizon
    more = tiny_config(tiny_models("bert"), str(run), "method=fedlr", "lr-schedule=cosine",
                       "warmup-rounds=1", "lr-min=1e-4", "rounds=5")
    run_inprocess(more, resume=True)
    extended = rounds_log(run)
    assert [r["lr"] for r in extended[:3]] == [r["lr"] for r in done]
    assert [r["lr"] for r in extended[3:]] == pytest.approx([1e-4, 1e-4])  # past horizon 3
    # a run planned for 5 rounds from the start would have decayed more slowly
    assert round_lr(5e-3, 3, more.resolved()) > done[2]["lr"]


@pytest.mark.slow
def test_clients_train_at_the_logged_rate(tiny_models, tmp_path, flower_identity,  # noqa: F811
                                          monkeypatch):
    from fedpeft.federation import client_app

    seen = []
    real = client_app.local_train

    def spy(*args, **kwargs):
        seen.append(kwargs["lr"])
        return real(*args, **kwargs)

    monkeypatch.setattr(client_app, "local_train", spy)
    run = tmp_path / "run"
    run_inprocess(tiny_config(tiny_models("bert"), str(run), "method=fedlr",
                              "lr-schedule=step", "lr-step-rounds=1", "lr-step-gamma=0.5",
                              "client-sampling=size"))
    logged = rounds_log(run)
    assert [r["lr"] for r in logged] == [5e-3, 2.5e-3]
    assert seen == [5e-3, 5e-3, 2.5e-3, 2.5e-3]  # 2 clients per round
