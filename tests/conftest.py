import numpy as np
import pytest

from fastopt.kernels.cpu.layout import CHUNK

# pytest-xdist's loadgroup schedules one group per worker: each test file is a group of its own (its module-scoped
# fixtures, compiled shims and CUDA compiles, are built once), except that tests which compile the same CPU kernels as
# another file join that file's group (``pytest.mark.xdist_group``), so that each kernel compiles once: most of the
# suite's time is compiling Numba kernels, 5-40 s each, while a kernel in a worker's memory or in Numba's disk cache
# costs milliseconds. The groups: tests/test_optimizers.py's (float32 and float64 kernels), test_mixed_precision.py's
# (16-bit storage, master weights) and test_state_8bit.py's (8-bit states).
PLAIN_KERNELS, MIXED_PRECISION_KERNELS, KERNELS_8BIT = "plain kernels", "mixed-precision kernels", "8-bit kernels"


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups off the marks
def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.path.name))


# Awkward sizes: empty, one element, an odd prime, and more than one kernel chunk.
SIZES = (0, 1, 13, 2 * CHUNK + 7)


def tolerance(dtype, steps):
    """rtol for a float computation against the float64 reference: each step rounds every quantity a few
    times in ``dtype``, and the rounding errors of a param add up over the steps."""
    return 4 * np.finfo(dtype).eps * max(steps, 1)


def sign_flips(cls, size, largest_step):
    """How far Lion's params may stray from the float64 reference: its update is a sign, and where float rounding
    puts the sign's argument on the other side of zero than the reference does (an argument within rounding of zero:
    about one element in 10^6 per step), the param moves by ``2 * lr * lr_scale`` the other way, and stays that far
    off (the momentum does not depend on the param). (count, distance): at most 1 + size / 10^4 such elements, each
    within ``2 * largest_step`` (the largest ``lr * lr_scale`` of the run) of the reference. None for other rules."""
    return (1 + size // 10_000, 2 * largest_step) if cls.__name__ == "Lion" else None


def assert_close(actual, expected, rtol, what, *, flips=None):
    """|actual - expected| <= atol + rtol |expected| elementwise, with atol = rtol * max|expected|: quantities
    formed by cancellation (moments of gradients that change sign) carry an absolute error of the size of
    their inputs, not of themselves. ``flips``: :func:`sign_flips`'s allowance, or None."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.array_equal(np.isnan(actual), np.isnan(expected)), f"{what}: NaNs in different places"
    if expected.size == 0:
        return
    finite = np.abs(expected[np.isfinite(expected)])
    atol = rtol * float(finite.max()) if finite.size else 0.0
    with np.errstate(invalid="ignore"):
        error = np.abs(actual - expected)
    bound = atol + rtol * np.abs(expected)
    ok = (actual == expected) | (error <= bound) | np.isnan(expected)
    if flips is not None and np.count_nonzero(~ok) <= flips[0]:
        ok |= error <= bound + flips[1]
    if not ok.all():
        worst = int(np.argmax(np.where(ok, -np.inf, error - bound)))
        raise AssertionError(f"{what}: element {worst} is {actual.flat[worst]!r}, reference {expected.flat[worst]!r}"
                             f" (error {error.flat[worst]:.3g} > bound {bound.flat[worst]:.3g}, rtol {rtol:.3g})")


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
