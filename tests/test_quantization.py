"""The 8-bit state format (fastopt.quantization): the code maps, nearest-code encoding against a brute-force argmin,
blocks at awkward sizes, non-finite blocks, the size threshold, and the 8-bit update reference."""
import numpy as np
import pytest

from fastopt import quantization as q

EPS32 = float(np.finfo(np.float32).eps)
SIZES = (0, 1, 255, 256, 257, 509, 1021, 3 * 256 + 5, 4099)  # 509, 1021, 4099: primes


def float32_bits(values):
    return np.asarray(values, dtype=np.float32).view(np.uint32)


def brute_force_codes(x, code_map):
    """argmin over the map of |x - value|, in float64; ties to the larger magnitude, then to the first code."""
    x = np.asarray(x, dtype=np.float32).astype(np.float64).reshape(-1, 1)
    values = code_map.astype(np.float64).reshape(1, -1)
    distance = np.abs(x - values)
    nearest = distance == distance.min(axis=1, keepdims=True)
    score = np.where(nearest, np.abs(values), -1.0)  # among the nearest, the largest magnitude
    return np.argmax(score, axis=1)  # argmax takes the first of equal scores


def awkward_values(code_map, rng):
    """Every map value and midpoint, one ulp either side of each, the extremes, and random magnitudes."""
    values = np.unique(code_map.astype(np.float64))
    midpoints = ((values[:-1] + values[1:]) / 2).astype(np.float32)
    points = np.concatenate([code_map, midpoints])
    around = np.concatenate([points, np.nextafter(points, np.float32(-2)), np.nextafter(points, np.float32(2))])
    magnitudes = np.exp2(rng.uniform(-40, 0, 5_000)).astype(np.float32)
    special = np.array([0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 1e-38, 2.0 ** -33, 2.0 ** -17], dtype=np.float32)
    values = np.concatenate([around, magnitudes, -magnitudes, special]).astype(np.float32)
    return values[np.abs(values) <= 1]


# ------------------------------------------------------------------------------------------------------ the maps
@pytest.mark.parametrize("signed", [True, False])
def test_map_shape_ends_and_spacing(signed):
    code_map = q.code_map_of(signed)
    assert code_map.dtype == np.float32 and code_map.shape == (256,)
    magnitudes = code_map[:128] if signed else code_map
    top = 127 if signed else 255
    assert magnitudes[0] == 0 and magnitudes[top] == 1.0
    assert np.all(np.diff(magnitudes) > 0), "magnitudes increase with the code"
    smallest = 1.25 * 2.0 ** (-16 if signed else -32)
    assert magnitudes[1] == smallest
    # 8 codes per binade: each step up is 1/8 to 1/15 of the value below it (nearest within 1/16 relative)
    ratio = magnitudes[2:].astype(np.float64) / magnitudes[1:-1] - 1
    assert ratio.max() == 1 / 8 and np.isclose(ratio.min(), 1 / 15, rtol=1e-12, atol=0)
    # every midpoint of two neighbours is a float32 number: a kernel compares against it exactly
    midpoints = (magnitudes[:-1].astype(np.float64) + magnitudes[1:]) / 2
    assert np.array_equal(midpoints.astype(np.float32).astype(np.float64), midpoints)


def test_signed_map_is_symmetric():
    """code ^ 0x80 is the negation, bit for bit (0x80 is -0.0)."""
    codes = np.arange(256)
    assert np.array_equal(float32_bits(q.SIGNED_MAP[codes ^ 0x80]), float32_bits(-q.SIGNED_MAP))
    assert float32_bits(q.SIGNED_MAP[0x80]) == 0x80000000


@pytest.mark.parametrize("signed", [True, False])
def test_map_values_encode_to_their_codes(signed):
    code_map = q.code_map_of(signed)
    np.testing.assert_array_equal(q.encode_float_codes(code_map, signed), np.arange(256))


def test_dynamic_map_is_bitsandbytes():
    """Values of bitsandbytes' dynamic map read from bitsandbytes 0.50.2 (bench/quantization_maps.py compares all 256
    where bitsandbytes is installed: importing it here would cost the test file 10 s)."""
    signed, unsigned = q.dynamic_code_map(True), q.dynamic_code_map(False)
    for code_map in (signed, unsigned):
        assert code_map.dtype == np.float32 and np.all(np.diff(code_map) > 0) and code_map[-1] == 1.0
    assert float32_bits(signed[[0, 126, 127, 128, 254]]).tolist() == [
        0xBF7E3333, 0xB513A3B7, 0x0, 0x3513A3B7, 0x3F7E3333]
    assert unsigned[0] == 0 and float32_bits(unsigned[[1, 254]]).tolist() == [0x34AE7BAA, 0x3F7F199A]


# ------------------------------------------------------------------------------------------------------ encoding
@pytest.mark.parametrize("signed", [True, False])
def test_closed_form_is_the_nearest_code(signed):
    rng = np.random.default_rng(0)
    code_map = q.code_map_of(signed)
    x = awkward_values(code_map, rng)
    codes = q.encode_float_codes(x, signed)
    expected = brute_force_codes(x, code_map)
    # the same value (the brute force picks +0 for -0 and tiny negatives; the closed form keeps the sign)
    np.testing.assert_array_equal(code_map[codes], code_map[expected])
    if signed:
        assert np.array_equal(codes >> 7, float32_bits(x) >> 31), "the sign bit is x's"
        np.testing.assert_array_equal(q.encode_float_codes(-x, signed), codes ^ 0x80)
    else:
        assert np.all(codes[x < 0] == 0), "a negative value's nearest unsigned code is 0"
    np.testing.assert_array_equal(code_map[q.nearest_codes(x, code_map)], code_map[expected])


@pytest.mark.parametrize("signed", [True, False])
def test_closed_form_on_a_sweep_of_all_float32_in_range(signed):
    """Every 4099th float32 in [0, 1] (and its negative): the closed form equals the search."""
    bits = np.arange(0, 0x3F800001, 4099, dtype=np.uint32)
    x = bits.view(np.float32)
    x = np.concatenate([x, -x])
    code_map = q.code_map_of(signed)
    np.testing.assert_array_equal(code_map[q.encode_float_codes(x, signed)],
                                  code_map[q.nearest_codes(x, code_map)])


@pytest.mark.parametrize("signed", [True, False])
def test_ties_go_to_the_larger_magnitude(signed):
    code_map = q.code_map_of(signed)
    top = 127 if signed else 255
    lower, upper = code_map[1:top].astype(np.float64), code_map[2:top + 1].astype(np.float64)
    midpoints = ((lower + upper) / 2).astype(np.float32)
    np.testing.assert_array_equal(q.encode_float_codes(midpoints, signed), np.arange(2, top + 1))
    half_smallest = np.float32(code_map[1] / 2)
    assert q.encode_float_codes(half_smallest, signed) == 1
    assert q.encode_float_codes(np.nextafter(half_smallest, np.float32(0)), signed) == 0
    assert q.encode_float_codes(np.nextafter(np.float32(1), np.float32(2)), signed) == top, "v * (1 / s) > 1"
    if signed:
        np.testing.assert_array_equal(q.encode_float_codes(-midpoints, signed), np.arange(2, 128) | 0x80)


@pytest.mark.parametrize("code_map", [q.dynamic_code_map(True), q.dynamic_code_map(False),
                                      q.linear_code_map(True), q.float_code_map(True, 2),
                                      q.float_code_map(False, 4)], ids=["dyn-s", "dyn-u", "lin-s", "e5m2", "e4m4"])
def test_search_is_the_nearest_code_for_any_map(code_map):
    x = awkward_values(code_map, np.random.default_rng(1))
    codes = q.nearest_codes(x, code_map)
    np.testing.assert_array_equal(codes, brute_force_codes(x, code_map))


# ---------------------------------------------------------------------------------------------- blocks and scales
# ------------------------------------------------------------------------------------ stochastic rounding of codes
NOISE_LEVELS = 1 << 20  # the noise bits the encode uses (23 - M): every level, in the exact tests


def bracketing_values(x, code_map):
    """The map values just below and just above |x| (equal when |x| is one), as float64 magnitudes."""
    magnitudes = np.unique(np.abs(code_map.astype(np.float64)))
    x = np.abs(np.asarray(x, dtype=np.float32).astype(np.float64))
    low = magnitudes[np.searchsorted(magnitudes, x, side="right") - 1]
    high = magnitudes[np.minimum(np.searchsorted(magnitudes, x, side="left"), magnitudes.size - 1)]
    return low, high


@pytest.mark.parametrize("signed", [True, False])
def test_stochastic_codes_round_to_a_bracketing_value_and_keep_the_sign(signed):
    code_map = q.code_map_of(signed)
    rng = np.random.default_rng(4)
    x = awkward_values(code_map, rng)
    noise = rng.integers(0, 2 ** 32, x.size, dtype=np.uint32)
    codes = q.encode_float_codes(x, signed, noise=noise)
    decoded = code_map[codes].astype(np.float64)
    low, high = bracketing_values(x, code_map)
    positive = ~np.signbit(x)
    assert np.all((np.abs(decoded) == low) | (np.abs(decoded) == high) | (~positive & ~np.bool_(signed)))
    assert np.all(code_map[codes][np.abs(x) == high] == code_map[q.encode_float_codes(x, signed)][np.abs(x) == high])
    if signed:
        assert np.array_equal(codes >> 7, np.signbit(x).astype(np.uint8))
    else:
        assert np.all(codes[~positive] == 0)
    # Noise 0 rounds every magnitude down, the largest noise up (unless |x| is a map value, or below 2^-20 of the
    # smallest nonzero one: the resolution of the noise).
    down = q.encode_float_codes(x, signed, noise=np.zeros(x.size, np.uint32))
    up = q.encode_float_codes(x, signed, noise=np.full(x.size, 2 ** 32 - 1, np.uint32))
    resolved = positive & (np.abs(x) >= np.min(np.abs(code_map[code_map != 0])) / NOISE_LEVELS)
    assert np.array_equal(np.abs(code_map[down][positive]), low[positive].astype(np.float32))
    assert np.array_equal(np.abs(code_map[up][resolved]), high[resolved].astype(np.float32))
    assert np.all(up[positive & ~resolved] == 0)


@pytest.mark.parametrize("signed", [True, False])
def test_stochastic_codes_are_unbiased_over_every_noise_level(signed):
    """Over all 2^20 noise levels the mean decoded value is x: exactly (in float64) between two normal codes, to
    2^-20 of the smallest code below it."""
    code_map = q.code_map_of(signed)
    smallest = np.float64(np.min(np.abs(code_map[code_map != 0])))
    x = np.array([0.7, 0.3337, 1e-3, 5.1e-5, 0.999, smallest * 1.37, smallest * 0.4, smallest * 1e-3], np.float32)
    levels = (np.arange(NOISE_LEVELS, dtype=np.uint64) << 12).astype(np.uint32)  # the bits the encode reads
    for value in np.concatenate([x, -x]) if signed else x:
        codes = q.encode_float_codes(np.full(NOISE_LEVELS, value, np.float32), signed, noise=levels)
        mean = code_map[codes].astype(np.float64).mean()
        atol = smallest / NOISE_LEVELS if abs(value) < smallest else 0.0
        assert abs(mean - np.float64(value)) <= atol + 4 * np.finfo(np.float64).eps * abs(value), (value, mean)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("signed", [True, False])
def test_stochastic_quantize_keeps_the_scales_and_the_absmax_code(size, signed):
    values = states(size, signed, seed=size + 1)
    noise = np.random.default_rng(size).integers(0, 2 ** 32, size, dtype=np.uint32)
    codes, scales = q.quantize(values, signed, noise=noise)
    nearest_codes, nearest_scales = q.quantize(values, signed)
    assert np.array_equal(scales, nearest_scales) and codes.shape == (size,)
    decoded = q.dequantize(codes, scales, signed)
    top = np.abs(values) == np.repeat(scales, 256)[:size]
    assert np.array_equal(decoded[top], values[top])  # the absmax element is exact, as with rounding to nearest
    # Each value within one code spacing (1/8 relative above the smallest code) of its nearest rounding.
    assert np.all(np.abs(decoded - q.dequantize(nearest_codes, scales, signed))
                  <= np.abs(values) / 4 + np.repeat(scales, 256)[:size] * 2.0 ** (-15 if signed else -31))
    with pytest.raises(ValueError, match="format's map"):
        q.quantize(values, signed, code_map=q.dynamic_code_map(signed), noise=noise)


def states(size, signed, seed=0):
    """Heavy-tailed values spread over many decades, like optimizer moments."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(size) * np.exp(3 * rng.standard_normal(size))
    return (values if signed else values ** 2).astype(np.float32)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("signed", [True, False])
def test_quantize_blocks_against_a_block_by_block_brute_force(size, signed):
    values = states(size, signed, seed=size)
    codes, scales = q.quantize(values, signed)
    blocks = -(-size // 256)
    assert codes.dtype == np.uint8 and codes.shape == (size,)
    assert scales.dtype == np.float32 and scales.shape == (blocks,)
    code_map = q.code_map_of(signed)
    for block in range(blocks):
        part = values[block * 256:(block + 1) * 256]
        assert scales[block] == np.abs(part).max()
        x = part * (np.float32(1) / scales[block])  # float32 reciprocal, float32 product
        np.testing.assert_array_equal(code_map[codes[block * 256:(block + 1) * 256]],
                                      code_map[brute_force_codes(x, code_map)])


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("signed", [True, False])
def test_round_trip_error_bound_and_idempotence(size, signed):
    """|decoded - v| <= max(|v| / 16, scale * smallest / 2) (nearest code in a map with 8 codes per binade), plus a
    few float32 roundings; the absmax decodes exactly; decoding and encoding again changes nothing."""
    values = states(size, signed, seed=size + 1)
    codes, scales = q.quantize(values, signed)
    decoded = q.dequantize(codes, scales, signed)
    assert decoded.dtype == np.float32 and decoded.shape == (size,)
    scale = np.repeat(scales, 256)[:size].astype(np.float64)
    exact = values.astype(np.float64)
    smallest = float(q.code_map_of(signed)[1])
    bound = np.maximum(np.abs(exact) / 16, scale * smallest / 2) + 4 * EPS32 * np.abs(exact)
    assert np.all(np.abs(decoded - exact) <= bound)
    largest = np.abs(values) == scale
    np.testing.assert_array_equal(decoded[largest], values[largest])
    again_codes, again_scales = q.quantize(decoded, signed)
    np.testing.assert_array_equal(again_codes, codes)
    np.testing.assert_array_equal(float32_bits(again_scales), float32_bits(scales))
    assert q.round_trip(values.reshape(1, -1), signed).shape == (1, size)


def test_float64_values_are_rounded_to_float32_first():
    values = np.random.default_rng(2).standard_normal(700)
    for got, expected in zip(q.quantize(values, True), q.quantize(values.astype(np.float32), True)):
        np.testing.assert_array_equal(got, expected)


def test_zero_block_stays_zero():
    values = states(3 * 256, True)
    values[256:512] = 0.0
    codes, scales = q.quantize(values, True)
    assert scales[1] == 0 and np.all(codes[256:512] == 0)
    decoded = q.dequantize(codes, scales, True)
    assert np.all(decoded[256:512] == 0)
    np.testing.assert_array_equal(q.quantize(values[:256], True)[0], codes[:256])


def test_subnormal_absmax_is_a_zero_block():
    """An absmax below 2^-126 would overflow the reciprocal (1 / 2^-149 is infinite): the block is stored as zero."""
    values = np.zeros(600, np.float32)
    values[:256] = np.float32(2.0 ** -127) * np.linspace(-1, 1, 256, dtype=np.float32)  # subnormal
    values[256] = np.float32(2.0 ** -126)  # the smallest normal absmax: encoded
    values[513] = np.float32(1e-45)
    codes, scales = q.quantize(values, True)
    assert scales.tolist() == [0.0, 2.0 ** -126, 0.0] and np.all(codes[:256] == 0) and np.all(codes[512:] == 0)
    assert codes[256] == 127 and q.dequantize(codes, scales, True)[256] == np.float32(2.0 ** -126)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("signed", [True, False])
def test_nonfinite_value_marks_its_block_only(bad, signed):
    """The block's scale is stored as NaN and its codes as 0: every element of it decodes to NaN (never to a finite
    number); the other blocks are quantized as if it were not there."""
    values = states(2 * 256 + 100, signed)
    values[256 + 17] = bad
    codes, scales = q.quantize(values, signed)
    assert np.isnan(scales[1]) and np.all(codes[256:512] == 0)
    decoded = q.dequantize(codes, scales, signed)
    assert np.all(np.isnan(decoded[256:512]))
    for block in (0, 2):
        part = slice(block * 256, (block + 1) * 256)
        own_codes, own_scales = q.quantize(values[part], signed)
        np.testing.assert_array_equal(codes[part], own_codes)
        assert scales[block] == own_scales[0] and np.all(np.isfinite(decoded[part]))


def test_dequantize_refuses_bad_arrays():
    codes, scales = q.quantize(states(300, True), True)
    with pytest.raises(ValueError, match="need 2 scales"):
        q.dequantize(codes, scales[:1], True)
    with pytest.raises(TypeError, match="uint8"):
        q.dequantize(codes.astype(np.int16), scales, True)
    with pytest.raises(TypeError, match="float32"):
        q.dequantize(codes, scales.astype(np.float64), True)


# ------------------------------------------------------------------------------------- threshold and 8-bit update
def test_threshold():
    assert q.MIN_8BIT_SIZE == 4096 and not q.stores_8bit(4095) and q.stores_8bit(4096)
    small, large = q.compress(states(4095, True), True), q.compress(states(4096, True), True)
    assert isinstance(small, np.ndarray) and small.dtype == np.float32
    assert isinstance(large, q.QuantizedTensor) and large.nbytes == 4096 + 16 * 4
    tiny = q.compress(states(10, False), False, min_8bit_size=0)
    assert isinstance(tiny, q.QuantizedTensor) and tiny.scales.shape == (1,)
    empty = q.compress(np.zeros((0, 3), np.float32), True, min_8bit_size=0)
    assert empty.codes.shape == (0,) and empty.scales.shape == (0,) and empty.values().shape == (0, 3)
    assert isinstance(q.compress(states(10_000, True), None), np.ndarray), "a state that is not a moment stays float32"


def test_state_signedness_table():
    from fastopt import rules

    names = {name for cls in rules.OPTIMIZERS for name in cls.STATE_SLOTS}
    assert names <= set(q.STATE_SIGNED), f"states without a signedness: {names - set(q.STATE_SIGNED)}"
    assert q.STATE_SIGNED["exp_avg"] and not q.STATE_SIGNED["exp_avg_sq"] and q.STATE_SIGNED["z"] is None


def test_update_8bit_is_decode_update_encode():
    """One Adam step from 8-bit states: the param moves by the float32 math on the decoded states (here within
    float32 rounding of the float64 reference), and the states are stored as the round trip of their new values."""
    from fastopt import reference

    rng = np.random.default_rng(3)
    shape = (40, 130)  # 5200 elements: 8-bit, with a short last block
    param = rng.standard_normal(shape).astype(np.float32)
    grad = rng.standard_normal(shape).astype(np.float32)
    exp_avg = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    exp_avg_sq = (0.01 * rng.standard_normal(shape) ** 2).astype(np.float32)
    bias = rng.standard_normal(64).astype(np.float32)  # below the threshold: float32, updated in place
    stored = [q.compress(exp_avg, True), q.compress(exp_avg_sq, False), q.compress(bias, True)]
    start = {"exp_avg": stored[0].values(), "exp_avg_sq": stored[1].values()}
    f32 = np.float32
    expected_param, param_before = param.astype(np.float64), param.astype(np.float64)

    def adam_step(m, v, b):
        m *= f32(0.9)
        m += f32(0.1) * grad
        v *= f32(0.999)
        v += f32(0.001) * grad * grad
        param[...] -= f32(1e-2) * m / (np.sqrt(v) + f32(1e-8))
        b += f32(1)

    new = q.update_8bit(adam_step, stored)
    state = {"exp_avg": start["exp_avg"].astype(np.float64), "exp_avg_sq": start["exp_avg_sq"].astype(np.float64),
             "step": 10**6}  # bias corrections 1 to float64 precision
    reference.adam(expected_param, grad.astype(np.float64), state, lr=1e-2, eps=1e-8)
    # float32 math: a few roundings of the step (relative) and one of the param
    bound = 8 * EPS32 * (np.abs(expected_param - param_before) + np.abs(expected_param))
    assert np.all(np.abs(param - expected_param) <= bound), "param: the float32 math on the decoded states"
    for name, signed, item in (("exp_avg", True, new[0]), ("exp_avg_sq", False, new[1])):
        assert isinstance(item, q.QuantizedTensor) and item.shape == shape and item.signed == signed
        decoded = item.values().astype(np.float64)
        scale = np.repeat(item.scales, 256)[:item.codes.size].reshape(shape)
        bound = (np.maximum(np.abs(state[name]) / 16, scale * float(q.code_map_of(signed)[1]) / 2)
                 + 8 * EPS32 * np.abs(state[name]))
        assert np.all(np.abs(decoded - state[name]) <= bound), name
    assert new[2] is stored[2] and np.array_equal(new[2], bias + 1)


def test_update_8bit_that_changes_nothing_keeps_codes_and_scales():
    stored = [q.compress(states(5000, True), True), q.compress(states(5000, False), False)]
    new = q.update_8bit(lambda m, v: None, stored)
    for before, after in zip(stored, new):
        np.testing.assert_array_equal(after.codes, before.codes)
        np.testing.assert_array_equal(float32_bits(after.scales), float32_bits(before.scales))


def test_update_8bit_nan_marks_one_block():
    stored = [q.compress(states(5000, True), True)]

    def poison(m):
        m.reshape(-1)[1000] = np.nan  # block 3

    (new,) = q.update_8bit(poison, stored)
    assert np.flatnonzero(np.isnan(new.scales)).tolist() == [3]
    decoded = new.values()
    assert np.all(np.isnan(decoded[768:1024])) and np.count_nonzero(np.isnan(decoded)) == 256
