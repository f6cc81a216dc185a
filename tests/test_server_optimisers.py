"""The server optimisers, as fedpeft drives them, take the textbook step.

Flower's FedAvgM and FedAdam keep their own copy of the global model (``current_arrays``) and
FedAvgM pairs it with the clients' mean by position, not by name. Whether fedpeft hands them the
model it actually sends, in the order the clients reply in, is invisible in a run's accuracy: a
wrong pairing only trains worse. So these tests record a real run's traffic (the global model
sent in each round, every client's reply and its example count) and recompute each server step
by hand from it: FedAvgM (Hsu et al. 2019) v_t = m v_{t-1} + (w_t - mean_t), w_{t+1} = w_t -
lr v_t; FedAdam (Reddi et al. 2021, with Flower's bias correction) from the same means.
"""

import numpy as np
import pytest
from inprocess import InProcessGrid, flower_identity, run_inprocess, tiny_config  # noqa: F401

from fedpeft.runlog import load_state


def recorded_run(tiny_models, tmp_path, *overrides):
    """Run 3 rounds in-process; return per round (global sent, [(n_k, reply_k)]) and the final
    global state."""
    cfg = tiny_config(tiny_models("bert"), str(tmp_path / "run"), "rounds=3",
                      "num-clients=4", "clients-per-round=3", *overrides)
    grid = InProcessGrid(cfg.num_clients)
    replies: list[tuple[int, dict]] = []

    def record(pid, content):
        replies.append((int(content["metrics"]["num-examples"]),
                        {k: v.numpy().copy() for k, v in content["arrays"].items()}))
        return content

    grid.tamper = record
    run_inprocess(cfg, grid)
    sent = [m for m in grid.sent if m.metadata.message_type == "train"]
    rounds = []
    for r in range(cfg.rounds):
        batch = sent[r * cfg.clients_per_round:(r + 1) * cfg.clients_per_round]
        globals_ = [{k: v.numpy() for k, v in m.content["arrays"].items()} for m in batch]
        assert all(set(g) == set(globals_[0]) for g in globals_)
        assert all(np.array_equal(g[k], globals_[0][k]) for g in globals_ for k in g)
        rounds.append((globals_[0],
                       replies[r * cfg.clients_per_round:(r + 1) * cfg.clients_per_round]))
    final = load_state(cfg.run_dir() / "final_state.safetensors")
    return rounds, final


def weighted_mean(replies, key):
    total = sum(n for n, _ in replies)
    return sum(n * arrays[key] for n, arrays in replies) / total


def assert_close(expected, actual, what):
    assert set(expected) == set(actual), what
    worst = max(float(np.max(np.abs(expected[k] - actual[k])) /
                      (float(np.max(np.abs(expected[k]))) + 1e-12)) for k in expected)
    assert worst < 1e-5, f"{what}: relative error {worst:.2e}"


@pytest.mark.parametrize("method", ["fedlr", "federa"])
def test_fedavgm_step_is_momentum_on_the_pseudo_gradient(tiny_models, tmp_path, method,
                                                         flower_identity):  # noqa: F811
    lr, momentum = 0.5, 0.9
    rounds, final = recorded_run(tiny_models, tmp_path, f"method={method}", "strategy=fedavgm",
                                 f"server-lr={lr}", f"server-momentum={momentum}")
    velocity = None
    for r, (w, replies) in enumerate(rounds):
        grad = {k: w[k] - weighted_mean(replies, k) for k in w}
        velocity = grad if velocity is None else {k: momentum * velocity[k] + grad[k]
                                                  for k in w}
        expected = {k: w[k] - lr * velocity[k] for k in w}
        actual = rounds[r + 1][0] if r + 1 < len(rounds) else final
        assert_close(expected, actual, f"{method} round {r + 1}")
    # and momentum did something: plain FedAvg's step would differ after round 1
    w, replies = rounds[1]
    fedavg = {k: weighted_mean(replies, k) for k in w}
    assert any(not np.allclose(fedavg[k], rounds[2][0][k], rtol=1e-3) for k in w)


@pytest.mark.parametrize("method", ["fedlr", "federa"])
def test_fedadam_step_is_adam_on_the_clients_mean(tiny_models, tmp_path, method,
                                                  flower_identity):  # noqa: F811
    eta, beta1, beta2, tau = 0.01, 0.9, 0.99, 1e-3  # Flower's defaults but the rate
    rounds, final = recorded_run(tiny_models, tmp_path, f"method={method}", "strategy=fedadam",
                                 f"server-lr={eta}")
    m = v = None
    for r, (w, replies) in enumerate(rounds):
        delta = {k: weighted_mean(replies, k) - w[k] for k in w}
        m = {k: (0 if m is None else beta1 * m[k]) + (1 - beta1) * delta[k] for k in w}
        v = {k: (0 if v is None else beta2 * v[k]) + (1 - beta2) * delta[k] ** 2 for k in w}
        t = r + 1
        step = eta * np.sqrt(1 - beta2 ** (t + 1)) / (1 - beta1 ** (t + 1))
        expected = {k: w[k] + step * m[k] / (np.sqrt(v[k]) + tau) for k in w}
        actual = rounds[r + 1][0] if r + 1 < len(rounds) else final
        assert_close(expected, actual, f"{method} round {t}")
