"""Tolerances for float32 results of two separately compiled programs.

Two XLA programs computing the same float32 quantity may split, order and fuse its sums differently
(a CPU with AVX-512 takes other code paths than one without, and the thread count changes how a
reduction is split), so they agree to a few units in the last place of the *terms* summed, not of
the result. An element that is a sum of terms of size S carries an absolute error of order
eps * S however close to zero the sum lands; a quantity divided by a small number (a standardised
advantage, by its group's standard deviation) carries its inputs' error divided by it.
"""

import numpy as np

FLOAT32_EPS = float(np.finfo(np.float32).eps)  # 1.2e-7


def assert_close_at_scale(got, want, rtol: float, err_msg: str = "") -> None:
    """Element-wise agreement to `rtol`, with an absolute floor of `rtol` times the array's largest
    magnitude: a gradient's near-zero entries are sums of terms of the gradient's scale."""
    want = np.asarray(want)
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, err_msg=err_msg)


def standardised_tolerance(inputs_tolerance: float, spread: float) -> float:
    """The error of (x - mean) / spread when each x carries `inputs_tolerance`: twice it (x and the
    mean), divided by the spread."""
    return 2 * inputs_tolerance / spread
