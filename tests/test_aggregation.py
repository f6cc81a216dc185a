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
