"""Lookup-table kernels (qcnn.kernels.lut) against dense convolution with the decoded weights.

Oracle: ``decode`` the codebooks and codes to dense weights and run ``convolve`` with them in
float64 (inputs, codebooks and weights are exactly representable). The LUT result is float32:
every table entry is a float32 dot product of ``subdim`` terms and every output a float32 sum of
``M * kh * kw`` entries (in any order: the kernels are compiled with fastmath), so the error of
an output is bounded by ``(subdim + M*kh*kw) * 2**-24`` times ``sum |w| |x|`` over its window
(the standard n*u bound, times a safety factor of 4); that sum comes from the same dense
convolution run on absolute values.

All kernels are covered (the frame kernel for convolutions and batched inner products with
K > 32; for inner products the byte-shuffle kernel (K <= 32, up to FC_SHUFFLE_MAX_BATCH samples,
where the CPU has it), the scalar pair kernel -- pair (K <= 32, the path of CPUs without byte
shuffles, forced here by setting ``lut.SHUFFLE_ISA`` to None) and single (K > 32, up to
FC_GATHER_MAX_BATCH samples) modes -- and the 8-sample pair kernel for batches with K <= 32,
including partial chunks of 8), serial and parallel, over shapes, subdim (C_s divisible by it or
not), K (1..256), stride, padding, dilation, groups (shared and per-group codebooks) and batch.
"""

import os
import platform
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcnn.kernels import lut
from qcnn.layers.conv import conv_output_size, convolve, pad_for_windows
from qcnn.quantization.pq import decode

pytestmark = pytest.mark.arm  # also run on aarch64 (.ci/arm64)

EPS32 = 2.0 ** -24


def make_case(rng, n, group, channels, c_group, kernel, subdim, k, per_group_books, hw):
    """Random input, codebooks and codes for a layer (C_s = channels per group)."""
    m = -(-channels // subdim)
    books = rng.standard_normal((group if per_group_books else 1, m, k, subdim)).astype(np.float32)
    codes = rng.integers(0, k, (group * c_group,) + tuple(kernel) + (m,)).astype(np.uint8)
    codes.flat[0] = k - 1  # the largest code occurs
    x = rng.standard_normal((n, group * channels) + tuple(hw)).astype(np.float32)
    return x, books, codes


def check_lut(x, books, codes, group, stride, pad, dilation, prepared=None):
    """lut_conv (serial and parallel) == float64 dense convolution of the decoded weights."""
    c_out, kh, kw, m = codes.shape
    channels = x.shape[1] // group
    subdim = books.shape[3]
    weight = decode(books, codes, channels).astype(np.float64)
    ref = convolve(x.astype(np.float64), weight, None, stride, pad, dilation, group)
    scale = convolve(np.abs(x).astype(np.float64), np.abs(weight), None, stride, pad, dilation, group)
    out_size = ref.shape[2:]
    padded = pad_for_windows(x, (kh, kw), stride, pad, dilation, out_size)
    prepared = lut.prepare_codes(codes, group) if prepared is None else prepared
    bound = 4 * EPS32 * (subdim + m * kh * kw) * scale + 1e-30
    one_position = padded.shape[2:] == (1, 1) and (kh, kw) == (1, 1)
    for isa in dict.fromkeys([lut.SHUFFLE_ISA, None] if one_position else [lut.SHUFFLE_ISA]):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(lut, "SHUFFLE_ISA", isa)
            for parallel in (False, True):
                out = lut.lut_conv(padded, books, prepared, group, stride, dilation, out_size, parallel=parallel)
                assert out.dtype == np.float32 and out.shape == ref.shape
                err = np.abs(out - ref)
                assert np.all(err <= bound), (isa, parallel, float(err.max()), float((err / bound).max()))


@st.composite
def conv_cases(draw):
    group = draw(st.integers(1, 3))
    channels = draw(st.integers(1, 12))
    c_group = draw(st.integers(1, 6))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pad = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    reach = [d * (kk - 1) + 1 - 2 * p for kk, d, p in zip(kernel, dilation, pad)]
    hw = tuple(max(1, r) + draw(st.integers(0, 9)) for r in reach)
    return dict(n=draw(st.integers(1, 3)), group=group, channels=channels, c_group=c_group,
                kernel=kernel, stride=stride, dilation=dilation, pad=pad, hw=hw,
                subdim=draw(st.integers(1, 5)), k=draw(st.sampled_from([1, 2, 3, 7, 16, 32, 33, 128, 256])),
                per_group_books=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)))


@settings(max_examples=60, deadline=None)
@given(case=conv_cases())
def test_conv_matches_dense(case):
    rng = np.random.default_rng(case["seed"])
    x, books, codes = make_case(rng, case["n"], case["group"], case["channels"], case["c_group"],
                                case["kernel"], case["subdim"], case["k"], case["per_group_books"],
                                case["hw"])
    check_lut(x, books, codes, case["group"], case["stride"], case["pad"], case["dilation"])


@st.composite
def inner_product_cases(draw):
    gather = lut.FC_GATHER_MAX_BATCH  # the largest batch of the scalar kernel for K > 32
    pairs8 = lut.FC_PAIRS8_MIN_BATCH  # the smallest batch of the 8-sample kernel for K <= 32
    shuffle = lut.FC_SHUFFLE_MAX_BATCH  # the largest batch of the byte-shuffle kernel
    batches = {1, 2, pairs8 - 1, pairs8, gather, gather + 1, shuffle, shuffle + 1, 9}
    return dict(n=draw(st.sampled_from(sorted(batches))), channels=draw(st.integers(1, 80)),
                c_out=draw(st.integers(1, 40)), subdim=draw(st.integers(1, 5)),
                k=draw(st.sampled_from([1, 2, 5, 16, 31, 32, 33, 64, 256])),
                seed=draw(st.integers(0, 2**32 - 1)))


@settings(max_examples=60, deadline=None)
@given(case=inner_product_cases())
def test_inner_product_matches_dense(case):
    """The 1x1 case (N, C_s, 1, 1), kernel 1x1, group 1: every inner-product path by K and batch."""
    rng = np.random.default_rng(case["seed"])
    x, books, codes = make_case(rng, case["n"], 1, case["channels"], case["c_out"], (1, 1),
                                case["subdim"], case["k"], False, (1, 1))
    check_lut(x, books, codes, 1, (1, 1), (0, 0), (1, 1))


def test_prepared_codes_are_reused_across_batches_and_kernels():
    """One prepare_codes result serves both inner-product kernels and repeated calls."""
    rng = np.random.default_rng(0)
    x, books, codes = make_case(rng, 9, 1, 70, 21, (1, 1), 4, 32, False, (1, 1))
    prepared = lut.prepare_codes(codes, 1)
    for n in (1, lut.FC_PAIRS8_MIN_BATCH, lut.FC_GATHER_MAX_BATCH, 9, 1):
        check_lut(x[:n], books, codes, 1, (1, 1), (0, 0), (1, 1), prepared)


@pytest.mark.parametrize("shape", [
    # n, group, C_s, C_t/group, kernel, stride, pad, dilation, subdim, K, per-group books, H, W
    (1, 2, 16, 8, (5, 5), (1, 1), (2, 2), (1, 1), 8, 128, False, 27, 27),  # conv2-like: many frame segments
    (2, 1, 3, 6, (11, 11), (4, 4), (0, 0), (1, 1), 3, 128, False, 43, 43),  # conv1-like: stride phases
    (1, 1, 40, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1, 256, False, 9, 9),  # many subspaces: table blocks
    (3, 3, 7, 4, (3, 2), (2, 3), (2, 1), (2, 3), 3, 5, True, 12, 17),  # everything at once
    (1, 1, 5, 3, (1, 1), (1, 1), (0, 0), (1, 1), 2, 4, False, 1, 40),  # one-row frames
])
def test_conv_shapes(shape):
    n, group, channels, c_group, kernel, stride, pad, dilation, subdim, k, per_group, h, w = shape
    rng = np.random.default_rng(1)
    x, books, codes = make_case(rng, n, group, channels, c_group, kernel, subdim, k, per_group, (h, w))
    check_lut(x, books, codes, group, stride, pad, dilation)


def test_inner_product_large_and_padded():
    """fc-like sizes: odd M (a padding subspace in the last pair), C_t not a multiple of 8,
    several pair-table blocks and byte-shuffle blocks (the last one partial); byte-shuffle
    narrow (K=16) and wide (K=32), pair (K=32) and single (K=64) modes; batch 1, 11 (a partial
    chunk of 8 samples) and 16."""
    rng = np.random.default_rng(2)
    assert 4 * 37 * 4 // 4 > lut.SHUFFLE_BLOCK
    for k in (16, 32, 64):
        x, books, codes = make_case(rng, 16, 1, 4 * 37 * 4 + 2, 37, (1, 1), 4, k, False, (1, 1))
        prepared = lut.prepare_codes(codes, 1)
        for n in (1, 11, 16):
            check_lut(x[:n], books, codes, 1, (1, 1), (0, 0), (1, 1), prepared)


def test_empty_batch():
    rng = np.random.default_rng(4)
    for hw, kernel in (((1, 1), (1, 1)), ((5, 5), (3, 3))):
        x, books, codes = make_case(rng, 0, 1, 6, 3, kernel, 4, 16, False, hw)
        out_size = (hw[0] - kernel[0] + 1, hw[1] - kernel[1] + 1)
        prepared = lut.prepare_codes(codes, 1)
        for parallel in (False, True):
            out = lut.lut_conv(x, books, prepared, 1, (1, 1), (1, 1), out_size, parallel=parallel)
            assert out.shape == (0, 3) + out_size and out.dtype == np.float32


def test_output_sizes_smaller_than_the_padded_input():
    """Windows that do not reach the bottom/right edge (floor rounding) and a 1x1 output."""
    rng = np.random.default_rng(3)
    for hw, kernel, stride in (((8, 9), (3, 3), (3, 2)), ((4, 4), (4, 4), (1, 1))):
        x, books, codes = make_case(rng, 2, 1, 6, 3, kernel, 4, 16, False, hw)
        check_lut(x, books, codes, 1, stride, (0, 0), (1, 1))
        out_size = tuple(conv_output_size(s, kk, st_, 0, 1) for s, kk, st_ in zip(hw, kernel, stride))
        assert out_size[0] >= 1 and out_size[1] >= 1


def test_byte_shuffles_are_used_where_the_cpu_has_them():
    """x86-64 with AVX2 and every aarch64 take the byte-shuffle path (else it would go untested)."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        assert lut.SHUFFLE_ISA == "neon"
    elif machine in ("x86_64", "amd64"):
        if numba.config.CPU_NAME and numba.config.CPU_NAME != "host":  # compiling for another CPU
            avx2 = "+avx2" in (numba.config.CPU_FEATURES or "").split(",")
        else:
            flags = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")]
            avx2 = bool(flags) and "avx2" in flags[0].split()
        assert lut.SHUFFLE_ISA == ("avx2" if avx2 else None)


def test_no_byte_shuffles_when_numba_compiles_for_a_generic_cpu(tmp_path):
    """NUMBA_CPU_NAME=generic (x86-64 without AVX2): the pair kernel, and still correct results."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return  # aarch64 always has NEON
    code = (
        "import numpy as np\n"
        "from qcnn.kernels import lut\n"
        "rng = np.random.default_rng(0)\n"
        "books = rng.standard_normal((1, 9, 32, 4)).astype(np.float32)\n"
        "codes = rng.integers(0, 32, (5, 1, 1, 9)).astype(np.uint8)\n"
        "x = rng.standard_normal((1, 36)).astype(np.float32)\n"
        "out = lut._inner_product(x, books, lut.prepare_codes(codes, 1), False)\n"
        "w = books[0][np.arange(9)[None, :], codes[:, 0, 0]].reshape(5, 36)\n"
        "assert lut.SHUFFLE_ISA is None, lut.SHUFFLE_ISA\n"
        "assert np.allclose(out, x @ w.T, rtol=1e-5, atol=1e-5)\n"
    )
    env = {**os.environ, "NUMBA_CPU_NAME": "generic", "NUMBA_CACHE_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
