"""float32 <-> bfloat16/float16 conversions of the CPU kernels, against ml_dtypes and NumPy, over every 16-bit
pattern and every rounding case around each of them."""
import numpy as np
import pytest

from fastopt.kernels.cpu import conversions

ml_dtypes = pytest.importorskip("ml_dtypes")

ALL_PATTERNS = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


def same_bits_or_both_nan(actual_bits, expected_bits, as_float):
    """Equal bit patterns, except that two NaNs need only both be NaN of the same sign (payloads may differ)."""
    actual, expected = as_float(actual_bits), as_float(expected_bits)
    both_nan = np.isnan(actual) & np.isnan(expected)
    same_sign = np.signbit(actual) == np.signbit(expected)
    ok = (actual_bits == expected_bits) | (both_nan & same_sign)
    assert ok.all(), f"{np.count_nonzero(~ok)} mismatches, first at {np.flatnonzero(~ok)[:5]}"


def rounding_cases(widen):
    """float32 values that exercise rounding around every 16-bit pattern: the value itself, the midpoint to the
    next pattern's value (a tie), and the float32 values one ulp either side of that midpoint."""
    values = widen(ALL_PATTERNS)
    following = widen((ALL_PATTERNS.astype(np.uint32) + 1).astype(np.uint16))
    # Neighbours of the same sign (the pattern after 0x7FFF is -0), both finite.
    pairs = np.isfinite(values) & np.isfinite(following) & (ALL_PATTERNS != 0x7FFF) & (ALL_PATTERNS != 0xFFFF)
    midpoint = ((values[pairs].astype(np.float64) + following[pairs]) / 2).astype(np.float32)  # exact in f32
    return np.concatenate([values, midpoint, np.nextafter(midpoint, np.float32(np.inf)),
                           np.nextafter(midpoint, np.float32(-np.inf))]).astype(np.float32)


def test_bfloat16_to_float32_every_pattern():
    out = np.empty(ALL_PATTERNS.size, np.float32)
    conversions.bfloat16_to_float32_array(ALL_PATTERNS, out)
    expected = ALL_PATTERNS.view(ml_dtypes.bfloat16).astype(np.float32)
    same_bits_or_both_nan(out.view(np.uint32), expected.view(np.uint32), lambda b: b.view(np.float32))


def test_float16_to_float32_every_pattern():
    out = np.empty(ALL_PATTERNS.size, np.float32)
    conversions.float16_to_float32_array(ALL_PATTERNS, out)
    expected = ALL_PATTERNS.view(np.float16).astype(np.float32)
    same_bits_or_both_nan(out.view(np.uint32), expected.view(np.uint32), lambda b: b.view(np.float32))


def bfloat16_values(bits):
    return bits.view(ml_dtypes.bfloat16).astype(np.float32)


def float16_values(bits):
    return bits.view(np.float16).astype(np.float32)


@pytest.mark.parametrize("name,convert,widen,reference", [
    ("bfloat16", conversions.float32_to_bfloat16_array, bfloat16_values,
     lambda v: v.astype(ml_dtypes.bfloat16).view(np.uint16)),
    ("float16", conversions.float32_to_float16_array, float16_values,
     lambda v: v.astype(np.float16).view(np.uint16)),
])
def test_float32_to_16_bits_rounds_to_nearest_even(name, convert, widen, reference):
    """Every 16-bit value, each midpoint (a tie: rounds to the even neighbour) and a float32 ulp either side of
    it, both signs, zeros, subnormals, the overflow threshold, infinities and NaNs."""
    with np.errstate(over="ignore", invalid="ignore"):
        values = rounding_cases(widen)
        extremes = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 3.4e38, -3.4e38, 1e-45, -1e-45,
                             65504.0, 65519.99, 65520.0, -65520.0], np.float32)
        values = np.concatenate([values, extremes])
        out = np.empty(values.size, np.uint16)
        convert(values, out)
        same_bits_or_both_nan(out, reference(values), widen)


def test_stochastic_rounding_is_unbiased_reproducible_and_exact_on_representable_values():
    rng = np.random.default_rng(0)
    value = np.float32(1.0 + 2.0 ** -9 + 2.0 ** -11)  # between two bfloat16 neighbours, 5/16 of the way up
    lower, upper = np.float32(1.0), np.float32(1.0 + 2.0 ** -7)
    draws = 1 << 16
    values = np.full(draws, value, np.float32)
    out = np.empty(draws, np.uint16)
    conversions.float32_to_bfloat16_stochastic_array(values, 12345, 7, out)
    rounded = bfloat16_values(out).astype(np.float64)
    assert set(np.unique(rounded)) == {float(lower), float(upper)}
    # The mean of n roundings has standard deviation spacing * sqrt(p (1 - p) / n); allow five of them.
    p = (float(value) - float(lower)) / (float(upper) - float(lower))
    sigma = (float(upper) - float(lower)) * np.sqrt(p * (1 - p) / draws)
    assert abs(rounded.mean() - float(value)) < 5 * sigma
    again = np.empty(draws, np.uint16)
    conversions.float32_to_bfloat16_stochastic_array(values, 12345, 7, again)
    np.testing.assert_array_equal(out, again)  # keyed by (seed, step, element): reproducible
    conversions.float32_to_bfloat16_stochastic_array(values, 12345, 8, again)
    assert not np.array_equal(out, again)  # another step, other bits
    exact = bfloat16_values(rng.integers(0, 0x7F80, 1000, dtype=np.uint16))  # finite, representable
    out = np.empty(exact.size, np.uint16)
    conversions.float32_to_bfloat16_stochastic_array(exact, 1, 1, out)
    np.testing.assert_array_equal(bfloat16_values(out), exact)


def test_stochastic_rounding_keeps_nan_and_infinities():
    values = np.array([np.nan, np.inf, -np.inf], np.float32)
    out = np.empty(3, np.uint16)
    conversions.float32_to_bfloat16_stochastic_array(values, 3, 4, out)
    result = bfloat16_values(out)
    assert np.isnan(result[0]) and result[1] == np.inf and result[2] == -np.inf
