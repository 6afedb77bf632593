"""The depthwise convolution kernel (qcnn.kernels.depthwise) against a float64 direct sum.

Oracle: the float64 sum over kernel taps of an einsum over the zero-padded input
(:func:`reference`). The kernel sums ``kh*kw`` float32 products and the bias in float32, in
some order, with multiply-adds possibly fused: each output's error is at most about
``(kh*kw + 1) * 2**-24`` times ``|b| + sum |w| |x|`` over its window (the standard n*u bound;
a safety factor of 2 is allowed), and that sum comes from the same reference on absolute
values. A wrong tap, phase, padding or channel changes an output by O(1) of that sum.

Both compiled copies (serial and parallel) are checked on every case, over batch 1..3,
channels, multiplier 1..2, kernel 1..5 (non-square), stride 1..3, pad 0..3 and dilation
1..2 per axis, and plane sizes from one row or column to frames of several vector blocks.
"""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qcnn.kernels import depthwise
from qcnn.layers.conv import convolve

pytestmark = pytest.mark.arm  # also run on aarch64 (.ci/arm64)

EPS32 = 2.0 ** -24


def reference(x, weight, bias, stride, pad, dilation, multiplier):
    """Float64 depthwise convolution: einsum per kernel tap over the padded input."""
    x = np.asarray(x, np.float64)
    weight = np.asarray(weight, np.float64)
    n, c, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, pad, dilation
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    wm = weight[:, 0].reshape(c, multiplier, kh, kw)  # output channel c*multiplier + m
    out = np.zeros((n, c, multiplier, ho, wo))
    for i in range(kh):
        for j in range(kw):
            window = xp[:, :, i * dh:i * dh + (ho - 1) * sh + 1:sh, j * dw:j * dw + (wo - 1) * sw + 1:sw]
            out += np.einsum("ncyx,cm->ncmyx", window, wm[:, :, i, j])
    out = out.reshape(n, c_out, ho, wo)
    return out if bias is None else out + np.asarray(bias, np.float64).reshape(1, -1, 1, 1)


def check(x, weight, bias, stride, pad, dilation, multiplier):
    """Both copies of the kernel == the float64 reference, to float32 round-off."""
    ref = reference(x, weight, bias, stride, pad, dilation, multiplier)
    scale = reference(np.abs(x), np.abs(weight), None if bias is None else np.abs(bias),
                      stride, pad, dilation, multiplier)
    kh, kw = weight.shape[2:]
    bound = 2 * (kh * kw + 1) * EPS32 * scale + 1e-30
    for parallel in (False, True):
        out = depthwise.depthwise_conv(x, weight, bias, stride, pad, dilation, multiplier, parallel=parallel)
        assert out.dtype == np.float32 and out.shape == ref.shape, (out.dtype, out.shape, ref.shape)
        err = np.abs(out - ref)
        assert np.all(err <= bound), (parallel, float(err.max()), float((err / bound).max()),
                                      np.unravel_index(np.argmax(err / bound), err.shape))


def random_case(seed, n, c, multiplier, hw, kernel, bias=True):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c) + tuple(hw)).astype(np.float32)
    weight = rng.standard_normal((c * multiplier, 1) + tuple(kernel)).astype(np.float32)
    b = rng.standard_normal(c * multiplier).astype(np.float32) if bias else None
    return x, weight, b


def make_case(n, c, multiplier, hw, kernel, stride, pad, dilation, bias, seed):
    return {"n": n, "c": c, "multiplier": multiplier, "hw": hw, "kernel": kernel, "stride": stride,
            "pad": pad, "dilation": dilation, "bias": bias, "seed": seed}


@st.composite
def cases(draw):
    def pair(lo, hi):
        return draw(st.integers(lo, hi)), draw(st.integers(lo, hi))

    kernel, stride, pad, dilation = pair(1, 5), pair(1, 3), pair(0, 3), pair(1, 2)
    # Input sizes where the kernel fits: from a single output row/column to ~45 lanes per row.
    hw = tuple(max(1, d * (k - 1) + 1 - 2 * p) + draw(st.integers(0, 40))
               for k, p, d in zip(kernel, pad, dilation))
    return make_case(draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 2)), hw, kernel, stride,
                     pad, dilation, draw(st.booleans()), draw(st.integers(0, 2**32 - 1)))


@settings(max_examples=60, deadline=None)
@given(case=cases())
@example(case=make_case(1, 1, 1, (1, 1), (1, 1), (1, 1), (0, 0), (1, 1), False, 0))  # one pixel
@example(case=make_case(2, 3, 2, (9, 40), (3, 5), (2, 2), (1, 3), (1, 2), True, 1))  # stride-2 split, odd pad
@example(case=make_case(1, 2, 1, (1, 37), (1, 3), (1, 3), (0, 0), (1, 1), True, 2))  # one row, stride 3
def test_kernel_matches_float64_reference(case):
    x, weight, bias = random_case(case["seed"], case["n"], case["c"], case["multiplier"], case["hw"],
                                  case["kernel"], case["bias"])
    check(x, weight, bias, case["stride"], case["pad"], case["dilation"], case["multiplier"])


@pytest.mark.parametrize("shape", [
    # n, C, H/W, kernel, stride, pad: EfficientNet-Lite0-like (stride 2 as (k+1)-kernels, as converted)
    (1, 4, 112, 3, 1, 1),
    (2, 3, 56, 4, 2, 1),
    (1, 3, 28, 6, 2, 2),
    (3, 5, 7, 5, 1, 2),
    (1, 2, 14, 5, 1, 2),
])
def test_network_shapes(shape):
    n, c, size, k, s, p = shape
    x, weight, bias = random_case(sum(shape), n, c, 1, (size, size), (k, k))
    check(x, weight, bias, (s, s), (p, p), (1, 1), 1)


@pytest.mark.parametrize("blocks", [2, 3, 7])
def test_blocks_of_planes(blocks):
    """Splitting the planes into blocks (threads) changes nothing, whatever the thread count."""
    x, weight, bias = random_case(5, 3, 4, 2, (10, 9), (3, 3))
    args = (x, weight, bias, (2, 1), (1, 1), (1, 1), 2)
    one = depthwise.depthwise_conv(*args, parallel=False, blocks=1)
    for parallel in (False, True):
        np.testing.assert_array_equal(depthwise.depthwise_conv(*args, parallel=parallel, blocks=blocks), one)
    check(*args)


def test_input_conversion_and_empty_batch():
    """Non-contiguous and float64 inputs are converted; an empty batch gives an empty output."""
    x, weight, bias = random_case(3, 2, 4, 1, (9, 8), (3, 3))
    xt = np.ascontiguousarray(x.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)  # same values, F-ordered planes
    out = depthwise.depthwise_conv(xt.astype(np.float64), weight, bias, (1, 1), (1, 1), (1, 1), 1)
    np.testing.assert_array_equal(out, depthwise.depthwise_conv(x, weight, bias, (1, 1), (1, 1), (1, 1), 1))
    empty = depthwise.depthwise_conv(x[:0], weight, bias, (1, 1), (1, 1), (1, 1), 1)
    assert empty.shape == (0, 4, 9, 8) and empty.dtype == np.float32
    with pytest.raises(ValueError, match="not depthwise"):
        depthwise.depthwise_conv(x, weight[:3], bias, (1, 1), (1, 1), (1, 1), 1)


def test_convolve_uses_the_kernel_for_float32_weights():
    """``convolve``'s depthwise branch: float32 weights -> the kernel (bit for bit), float64 weights
    -> the NumPy reference path in float64; both agree to round-off."""
    x, weight, bias = random_case(4, 2, 3, 2, (11, 10), (3, 5))
    args = ((2, 1), (1, 2), (1, 2), 3)
    fast = convolve(x, weight, bias, *args)
    np.testing.assert_array_equal(fast, depthwise.depthwise_conv(x, weight, bias, *args[:3], 2))
    exact = convolve(x, weight.astype(np.float64), bias, *args)
    assert fast.dtype == np.float32 and exact.dtype == np.float64
    np.testing.assert_allclose(exact, reference(x, weight, bias, *args[:3], 2), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(fast, exact, rtol=1e-5, atol=1e-5)
