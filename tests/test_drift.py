"""Drift metrics (DoRA definitions as PEFT implements them, FeDeRA §4.2) on hand-computed 2x2
and 2x3 cases: one norm per output feature, i.e. per row of the (out, in) matrix."""

import json

import numpy as np
import pytest

from fedpeft.drift import (
    DriftTracker,
    direction,
    direction_variation,
    magnitude,
    magnitude_variation,
    parse_lora_key,
)

KEY = "base_model.model.bert.encoder.layer.{}.attention.self.{}.lora_{}.default.weight"


def test_magnitude_and_direction_are_row_wise():
    m = np.array([[3.0, 4.0], [0.0, 2.0]])  # (out=2, in=2)
    assert magnitude(m).tolist() == [5.0, 2.0]  # one per output feature (row)
    np.testing.assert_allclose(direction(m), [[0.6, 0.8], [0.0, 1.0]])
    # A zero row has no direction: it stays zero rather than becoming NaN.
    np.testing.assert_array_equal(direction(np.zeros((2, 2))), np.zeros((2, 2)))
    np.testing.assert_array_equal(direction(np.array([[0.0, 0.0], [0.0, 2.0]])),
                                  [[0.0, 0.0], [0.0, 1.0]])


def test_magnitude_is_peft_dora_weight_norm():
    """PEFT's DoRA: ``DoraLinearLayer.get_weight_norm`` = ``norm(W + s*BA, dim=1)`` on the
    (out, in) weight, one norm per output feature; a (5, 3) matrix has 5 of them."""
    torch = pytest.importorskip("torch")
    from peft.tuners.lora.dora import DoraLinearLayer

    w = np.random.default_rng(0).normal(size=(5, 3))
    expected = DoraLinearLayer(fan_in_fan_out=False).get_weight_norm(
        torch.from_numpy(w), torch.zeros(5, 3, dtype=torch.float64), scaling=1.0)
    assert magnitude(w).shape == (5,)
    np.testing.assert_allclose(magnitude(w), expected.numpy(), rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(direction(w), axis=1), np.ones(5))


def test_variations_2x2_by_hand():
    before = np.eye(2)  # row norms [1, 1]; directions e1, e2
    after = np.array([[3.0, 4.0], [0.0, 2.0]])  # row norms [5, 2]; directions (.6, .8), e2
    assert magnitude_variation(before, after) == pytest.approx((4 + 1) / 2)
    # cos = 0.6 for row 0 and 1 for row 1 -> mean(0.4, 0) = 0.2
    assert direction_variation(before, after) == pytest.approx(0.2)


def test_variations_2x3_by_hand():
    before = np.array([[1.0, 2.0, 2.0], [2.0, 0.0, 0.0]])  # row norms [3, 2]
    after = np.array([[2.0, 4.0, 4.0], [0.0, 0.0, -3.0]])  # row norms [6, 3]
    assert magnitude_variation(before, after) == pytest.approx((3 + 1) / 2)
    # row 0: same direction (cos 1); row 1: orthogonal (cos 0) -> mean(0, 1) = 0.5
    assert direction_variation(before, after) == pytest.approx(0.5)


def test_zero_rows_are_skipped_in_direction():
    before = np.array([[0.0, 0.0], [1.0, 0.0]])  # row 0 is zero (FedLR's B at init)
    after = np.array([[1.0, 1.0], [-1.0, 0.0]])
    assert direction_variation(before, after) == pytest.approx(2.0)  # only row 1: 1 - (-1)
    assert direction_variation(np.zeros((2, 2)), after) is None
    assert magnitude_variation(np.zeros((2, 2)), after) == pytest.approx((np.sqrt(2) + 1) / 2)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="one shape"):
        magnitude_variation(np.eye(2), np.eye(3))


@pytest.mark.parametrize("key, expected", [
    (KEY.format(3, "query", "A"), ("3", "query", "A")),
    ("base_model.model.distilbert.transformer.layer.0.attention.q_lin.lora_B.default.weight",
     ("0", "q_lin", "B")),
    ("base_model.model.encoder.layers.11.attn.query_proj.lora_A.weight", ("11", "query_proj", "A")),
    ("base_model.model.pooler.dense.lora_A.default.weight",
     ("base_model.model.pooler", "dense", "A")),
    ("base_model.model.classifier.modules_to_save.default.weight", None),
])
def test_parse_lora_key(key, expected):
    assert parse_lora_key(key) == expected


def states(*ab_pairs):
    """Global states with layer 0 query (A, B) set as given, plus a head that is ignored."""
    return [{KEY.format(0, "query", "A"): a, KEY.format(0, "query", "B"): b,
             "base_model.model.classifier.modules_to_save.default.weight": np.full((2, 2), i)}
            for i, (a, b) in enumerate(ab_pairs)]


def test_tracker_weights_between_successive_global_states():
    s0, s1 = states((np.eye(2), np.zeros((2, 2))),
                    (np.array([[3.0, 4.0], [0.0, 2.0]]), np.array([[0.0, 2.0], [1.0, 0.0]])))
    tracker = DriftTracker()
    assert tracker.observe(s0) is None  # no previous round yet
    record = tracker.observe(s1)
    assert record["between"] == "weights" and record["norms"] == "rows"
    a = record["layers"]["0"]["query"]["A"]
    assert a == {"magnitude": pytest.approx(2.5), "direction": pytest.approx(0.2)}
    b = record["layers"]["0"]["query"]["B"]
    assert b == {"magnitude": pytest.approx(1.5), "direction": None}  # B was zero: no direction
    assert record["mean"] == {"A": {"magnitude": pytest.approx(2.5), "direction": 0.2},
                              "B": {"magnitude": pytest.approx(1.5), "direction": None}}
    json.dumps(record)  # JSON-able as is


def test_tracker_updates_between_successive_global_updates():
    a0 = np.eye(2)
    a1 = a0 + np.eye(2)  # dA_1 = I: norms [1, 1]
    a2 = a1 + np.array([[3.0, 4.0], [0.0, 2.0]])  # dA_2: row norms [5, 2]
    b = np.ones((2, 2))  # B never moves: its updates are zero, no direction
    tracker = DriftTracker(between="updates")
    s0, s1, s2 = states((a0, b), (a1, b), (a2, b))
    assert tracker.observe(s0) is None
    assert tracker.observe(s1) is None  # one update only
    record = tracker.observe(s2)
    assert record["between"] == "updates"
    assert record["layers"]["0"]["query"]["A"] == {"magnitude": pytest.approx(2.5),
                                                   "direction": pytest.approx(0.2)}
    assert record["layers"]["0"]["query"]["B"] == {"magnitude": 0.0, "direction": None}


def test_tracker_orders_layers_and_keeps_modules_apart():
    rng = np.random.default_rng(0)
    keys = [KEY.format(layer, module, f) for layer in (10, 2) for module in ("query", "value")
            for f in "AB"]
    tracker = DriftTracker()
    tracker.observe({k: rng.normal(size=(3, 2)) for k in keys})
    record = tracker.observe({k: rng.normal(size=(3, 2)) for k in keys})
    assert list(record["layers"]) == ["2", "10"]
    assert set(record["layers"]["10"]) == {"query", "value"}
    # The mean is the unweighted mean over the 4 matrices of each kind.
    dirs = [record["layers"][la][m]["A"]["direction"] for la in ("2", "10")
            for m in ("query", "value")]
    assert record["mean"]["A"]["direction"] == pytest.approx(np.mean(dirs), rel=1e-5)


def test_tracker_restarts_keys_whose_shape_changes():
    tracker = DriftTracker()
    tracker.observe({KEY.format(0, "query", "A"): np.eye(2)})
    assert tracker.observe({KEY.format(0, "query", "A"): np.eye(3)}) is None
    assert tracker.observe({KEY.format(0, "query", "A"): 2 * np.eye(3)}) is not None
    with pytest.raises(ValueError, match="between"):
        DriftTracker(between="clients")
