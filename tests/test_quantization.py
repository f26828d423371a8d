"""Group quantization and packing against a float64 numpy implementation of the formulas."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvjax.quantization import dequantize, pack, quantize, unpack


def to_bf16(x, direction):
    """float64 -> the nearest bfloat16 on the side `direction` (-inf or +inf), as float64."""
    r = x.astype(ml_dtypes.bfloat16)
    off = r.astype(np.float64) > x if direction < 0 else r.astype(np.float64) < x
    toward = np.full(r.shape, direction, ml_dtypes.bfloat16)
    return np.where(off, np.nextafter(r, toward), r).astype(np.float64)


def stats64(x, bits, group):
    """Zero and scale of the formulas in float64, stored rounded down / up to bfloat16."""
    levels = 2**bits - 1
    g = x.astype(np.float64).reshape(*x.shape[:-1], -1, group)
    zero = to_bf16(g.min(-1), -np.inf)
    return zero, to_bf16(g.max(-1) / levels - zero / levels, np.inf)


def codes64(x, zero, scale, bits, group):
    """Codes and reconstruction of the formulas in float64, given the stored zero and scale."""
    g = x.astype(np.float64).reshape(*x.shape[:-1], -1, group)
    ratio = (g - zero[..., None]) / np.where(scale > 0, scale, 1.0)[..., None]
    codes = np.clip(np.round(ratio), 0, 2**bits - 1)
    x_hat = codes * scale[..., None] + zero[..., None]
    return codes.reshape(x.shape), x_hat.reshape(x.shape), ratio.reshape(x.shape)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_quantize_matches_float64_formulas(rng, bits, dtype):
    group = 16
    x = (rng.standard_normal((3, 5, 7 * group)) * rng.uniform(0.1, 10)).astype(dtype)
    x64 = np.asarray(x, np.float64)
    codes, scale, zero = quantize(x, bits, group)
    scale, zero = np.asarray(scale, np.float64), np.asarray(zero, np.float64)
    ref_zero, ref_scale = stats64(x64, bits, group)
    np.testing.assert_array_equal(zero, ref_zero)
    # float32 and float64 may land on adjacent bfloat16 values when rounding the scale up.
    np.testing.assert_allclose(scale, ref_scale, rtol=2**-7, atol=0)
    ref_codes, ref_hat, ratio = codes64(x64, zero, scale, bits, group)
    on_tie = np.abs(ratio - np.floor(ratio) - 0.5) < 1e-4  # float32 may round a half either way
    np.testing.assert_array_equal(np.asarray(codes)[~on_tie], ref_codes[~on_tie])
    x_hat = np.asarray(dequantize(codes, scale, zero, group), np.float64)
    np.testing.assert_allclose(x_hat[~on_tie], ref_hat[~on_tie], rtol=1e-6, atol=1e-6)
    # Nothing clips: every element lies within half a stored step of its reconstruction.
    step = np.repeat(scale, group, axis=-1)
    assert (np.abs(x_hat - x64) <= 0.5 * step * (1 + 1e-5) + 1e-6).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_degenerate_groups_stay_finite(dtype):
    group = 8
    x = np.zeros((4, 4 * group), np.float32)
    x[1] = 0.75  # constant group: dequantizes to itself
    x[2, ::3] = 6e4 if dtype == np.float16 else 3e38  # large outliers
    x[3, :group] = -3e4 if dtype == np.float16 else -3e38
    x[3, group:] = np.linspace(-1, 1, 3 * group)
    x = x.astype(dtype)
    for bits in (2, 4, 8):
        codes, scale, zero = quantize(x, bits, group)
        x_hat = np.asarray(dequantize(codes, scale, zero, group))
        assert np.isfinite(x_hat).all() and np.isfinite(np.asarray(scale, np.float32)).all()
        np.testing.assert_array_equal(x_hat[0], 0.0)
        np.testing.assert_array_equal(x_hat[1], 0.75)


def test_bad_quantizer_arguments():
    x = np.zeros((2, 24), np.float32)
    with pytest.raises(ValueError, match=r"bits must be one of \(2, 4, 8\), got 3"):
        quantize(x, 3, 8)
    with pytest.raises(ValueError, match=r"quantized axis \(24\) must be a multiple of the group size \(16\)"):
        quantize(x, 2, 16)
    with pytest.raises(ValueError, match="packed axis"):
        pack(np.zeros((2, 6), np.uint8), 2)


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), rows=st.integers(1, 3), units=st.integers(1, 9),
       seed=st.integers(0, 2**32 - 1))
def test_pack_unpack_round_trip(bits, rows, units, seed):
    n = units * (8 // bits)
    codes = np.random.default_rng(seed).integers(0, 2**bits, (rows, n)).astype(np.uint8)
    packed = np.asarray(pack(codes, bits))
    assert packed.dtype == np.uint8 and packed.shape == (rows, n * bits // 8)
    np.testing.assert_array_equal(np.asarray(unpack(packed, bits)), codes)
    # The layout is the documented planar one: byte c holds codes j*M + c at bits [j*b, (j+1)*b).
    per_byte, m = 8 // bits, n * bits // 8
    expected = sum(codes[:, j * m:(j + 1) * m].astype(np.int64) << (j * bits)
                   for j in range(per_byte))
    np.testing.assert_array_equal(packed, expected)
