import numpy as np
import pytest

from fedpeft.federation.state import decode, encode, to_record


@pytest.mark.parametrize("dtype, tol", [("fp32", 0.0), ("fp16", 1e-3), ("bf16", 8e-3)])
def test_round_trip_within_the_format_precision(dtype, tol):
    rng = np.random.default_rng(0)
    state = {"a": rng.normal(size=(64, 32)).astype(np.float32), "b": np.arange(5, dtype=np.float32)}
    back = decode(encode(state, dtype), dtype)
    for k in state:
        assert back[k].dtype == np.float32
        assert np.allclose(back[k], state[k], rtol=tol, atol=tol)
    assert np.array_equal(back["b"], state["b"])  # small integers are exact in every format


def test_sixteen_bit_halves_the_payload():
    state = {"w": np.ones((256, 256), dtype=np.float32)}
    full = to_record(encode(state, "fp32")).count_bytes()
    for dtype in ("fp16", "bf16"):
        half = to_record(encode(state, dtype)).count_bytes()
        assert half == pytest.approx(full / 2, rel=0.01)


def test_bf16_is_bfloat16_rounding():
    x = np.array([1.0 + 2**-9, 3.140625, -2.5], dtype=np.float32)  # 1+2^-9 rounds to 1 in bf16
    back = decode(encode({"x": x}, "bf16"), "bf16")["x"]
    assert back.tolist() == [1.0, 3.140625, -2.5]


def test_unknown_dtype():
    with pytest.raises(ValueError, match="transport-dtype"):
        encode({}, "int8")
