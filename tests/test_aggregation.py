import numpy as np
import pytest

from fedpeft.federation.aggregation import fedavg


def test_weighted_mean_hand_computed():
    a = {"w": np.array([1.0, 2.0], dtype=np.float32), "b": np.array([[0.0]], dtype=np.float32)}
    b = {"w": np.array([3.0, 6.0], dtype=np.float32), "b": np.array([[4.0]], dtype=np.float32)}
    out = fedavg([a, b], weights=[1, 3])  # (1*a + 3*b) / 4
    assert np.allclose(out["w"], [2.5, 5.0])
    assert np.allclose(out["b"], [[3.0]])
    assert out["w"].dtype == np.float32 and list(out) == ["w", "b"]


def test_identical_clients_give_their_state():
    s = {"x": np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)}
    assert np.allclose(fedavg([s, s, s], [5, 1, 9])["x"], s["x"], atol=1e-7)


def test_mismatched_states_are_rejected():
    with pytest.raises(ValueError, match="keys"):
        fedavg([{"x": np.zeros(2)}, {"y": np.zeros(2)}], [1, 1])
    with pytest.raises(ValueError, match="shape"):
        fedavg([{"x": np.zeros(2)}, {"x": np.zeros(3)}], [1, 1])
    with pytest.raises(ValueError, match="weights"):
        fedavg([{"x": np.zeros(2)}], [0])


def _lora_state(a, b, head):
    return {"l.lora_A.default.weight": np.asarray(a, dtype=np.float32),
            "l.lora_B.default.weight": np.asarray(b, dtype=np.float32),
            "classifier.weight": np.asarray(head, dtype=np.float32)}


def test_exact_lora_with_identical_clients_equals_fedavg():
    from fedpeft.federation.aggregation import exact_lora_mean

    rng = np.random.default_rng(0)
    s = _lora_state(rng.normal(size=(2, 5)), rng.normal(size=(4, 2)), rng.normal(size=(3,)))
    plain = fedavg([s, s], [1, 2])
    exact, errors = exact_lora_mean([s, s], [1, 2], scaling=2.0, rank=2)
    product = lambda st: st["l.lora_B.default.weight"] @ st["l.lora_A.default.weight"]  # noqa: E731
    assert np.allclose(product(exact), product(plain), atol=1e-5)
    assert np.allclose(exact["classifier.weight"], plain["classifier.weight"])
    assert errors["l"] < 1e-6


def test_exact_lora_is_the_rank_r_truncation_of_the_mean_product():
    from fedpeft.federation.aggregation import exact_lora_mean

    # Two rank-1 clients with orthogonal updates: s*B1@A1 = 2*e1 e1^T, s*B2@A2 = 2*e2 e2^T.
    c1 = _lora_state([[1.0, 0.0, 0.0]], [[1.0], [0.0], [0.0]], [0.0])
    c2 = _lora_state([[0.0, 1.0, 0.0]], [[0.0], [1.0], [0.0]], [1.0])
    # weights 3:1 -> mean product = 2 * diag(0.75, 0.25, 0); rank-1 truncation = 2*diag(.75,0,0)
    out, errors = exact_lora_mean([c1, c2], [3, 1], scaling=2.0, rank=1)
    got = 2.0 * out["l.lora_B.default.weight"] @ out["l.lora_A.default.weight"]
    assert np.allclose(got, np.diag([1.5, 0.0, 0.0]), atol=1e-6)
    # FedAvg of factors gives 2*(.75e1+.25e2)(.75e1+.25e2)^T instead: not the mean update.
    plain = fedavg([c1, c2], [3, 1])
    assert not np.allclose(2.0 * plain["l.lora_B.default.weight"]
                           @ plain["l.lora_A.default.weight"], 2.0 * np.diag([0.75, 0.25, 0.0]))
    assert errors["l"] == pytest.approx(0.25 / np.sqrt(0.75**2 + 0.25**2), rel=1e-6)
    assert out["classifier.weight"][0] == pytest.approx(0.25)


def test_running_mean_equals_fedavg_and_checks_each_update():
    from fedpeft.federation.aggregation import WeightedMean

    rng = np.random.default_rng(0)
    states = [{"x": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=2)}
              for _ in range(4)]
    mean = WeightedMean()
    for state, w in zip(states, [3, 1, 0, 2], strict=True):
        mean.add(state, w)
    out = mean.result()
    expected = (3 * states[0]["x"] + states[1]["x"] + 2 * states[3]["x"]) / 6
    assert out["x"].dtype == np.float32 and np.allclose(out["x"], expected, atol=1e-6)
    assert out["b"].dtype == np.float64
    with pytest.raises(ValueError, match="keys that differ"):
        mean.add({"x": states[0]["x"]}, 1)
    with pytest.raises(ValueError, match="shape"):
        mean.add({"x": states[0]["x"], "b": np.zeros(3)}, 1)
    assert np.array_equal(mean.result()["x"], out["x"])  # a rejected update changed nothing
