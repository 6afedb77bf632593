"""Depthwise convolution: direct summation per (image, channel) plane.

A depthwise convolution (Caffe: ``group == C_in``, ``C_out = multiplier * C_in``; output
channel ``co`` reads input channel ``co // multiplier``) does only ``kh * kw`` multiply-adds
per output, so its cost is memory traffic and loop overhead, not arithmetic. The NumPy path
it replaces (one full-tensor multiply and add per kernel tap over a strided view) moved the
whole output several times per tap. Here each output plane is computed from one input plane
held in L1/L2, every output written once.

Frames
------
Each input plane is copied once into a buffer with a zero border (the padding), split into
*stride phases*: padded position ``(qy*sh + ry, qx*sw + rx)`` goes to
``(ry*sw + rx) * P + qy*Wq + qx``, with ``Hq, Wq`` the padded size over the stride rounded
up and ``P = Hq*Wq + 8`` the phase plane's size (8 floats of slack each). Output ``(oy, ox)``
is then frame lane ``f = oy * Wq + ox`` and tap ``(ky, kx)`` reads lane ``f + shift`` of the
buffer, ``shift = (ry*sw + rx) * P + qy*Wq + qx`` for ``(qy, ry) = divmod(ky*dh, sh)`` and
``(qx, rx) = divmod(kx*dw, sw)``: for every stride and dilation a tap is one contiguous run
of the buffer (plain vector loads, no gathers). A frame has ``Wq - Wo`` junk lanes per row
(computed, never stored); in exchange planes of 7x7 or 14x14, too narrow for vector loops
row by row, run as one loop of ``Ho * Wq`` lanes, rounded up to a multiple of 8.

Taps in registers
-----------------
:func:`_frame` keeps the accumulators of 32 consecutive lanes (four 8 x float32 vectors) in
registers while it adds all ``kh*kw`` taps (one broadcast weight, four loads and four
multiply-adds per tap), then stores them once; the frame's last one to three vectors go as a
pair and a single. The vectors are the 8 x float32 type of :mod:`qcnn.kernels.simd` (LLVM
``<8 x float>``, ``llvm.fmuladd``), shared with :mod:`qcnn.kernels.lut`: AVX registers on
x86-64, pairs of NEON registers on aarch64.

Copies in and out
-----------------
Loading a plane, row by row: stride 1 is a vector copy; stride 2 splits even and odd columns
with vector shuffles; other strides are scalar. A row's last partial vector is read with
``llvm.masked.load`` (lanes past the row read as zero, never read from memory) and stored
whole: the zeros land in the row's right padding, in later rows (which are written after it)
or in the slack after the phase plane, so the border stays zero with no per-plane clearing.
The frame's rows go to the output by whole vectors too: a store that runs past a row's end
writes junk into the next rows, which are stored after it; where a vector would run past the
end of the output plane a scalar loop takes over, so nothing outside the plane (possibly
another thread's) is touched.

Speed (``benchmarks/bench_depthwise.py``, one thread, 2-core AMD EPYC shared with other jobs):
the 16 depthwise layers of EfficientNet-Lite0 at batch 1 take ~10 ms, against ~165 ms for the
NumPy path and ~67 ms for OpenCV's dnn (which has a tuned kernel for 3x3 only); at batch 16
the time per image stays about the same (the layers are then bound by memory bandwidth).

Threads: ``prange`` over blocks of (image, input channel) planes; a plane's ``multiplier``
output channels share its buffer. Everything is compiled with ``cache=True`` in a serial and
a parallel copy (:func:`qcnn.kernels.jit.serial_and_parallel`).

Rounding: each output is the float32 sum of the bias and the ``kh*kw`` products in tap order
(``llvm.fmuladd`` fuses a multiply-add where the CPU has FMA, which only removes roundings;
no fastmath reassociation), so its error is that of any float32 sum of ``kh*kw + 1`` terms.
"""

import numba
import numpy as np
from numba import prange

from qcnn.kernels.jit import readonly, serial_and_parallel
from qcnn.kernels.simd import LANES, vload, vload_n, vmuladd, vphase, vsplat, vstore

BLOCK = 4 * LANES  # frame lanes whose accumulators stay in registers through all taps
SLACK = LANES  # floats after every phase plane and after the frame
PLANES_PER_THREAD = 4  # blocks of planes per thread (load balance on a busy machine)

_JIT = {"error_model": "numpy"}
_helper = numba.njit(cache=True, nogil=True, **_JIT)


# --- The kernel --------------------------------------------------------------------------------

@_helper
def _load_plane(x, start, h, w, buf, sh, sw, ph, pw, hq, wq):
    """Copy the plane ``x[start:start + h*w]`` (rows of ``w``) into the phase-split buffer
    (module notes; the border stays zero). Flat arrays and offsets: a row view per row would
    cost two reference-count calls."""
    phase = hq * wq + SLACK  # floats per phase plane
    qy, ry = ph // sh, ph % sh  # padded row y + ph = qy * sh + ry, updated without dividing
    # Stride 2: row[2k] -> phase pw % 2 at column pw // 2 + k; row[2k + 1] -> the other phase.
    even = (pw % 2) * phase + pw // 2
    odd = ((pw + 1) % 2) * phase + (pw + 1) // 2
    for y in range(h):
        row = start + y * w
        base = ry * sw * phase + qy * wq  # phase (ry, 0), row qy
        if sw == 1:
            dst = base + pw
            k = 0
            while k + LANES <= w:
                vstore(buf, dst + k, vload(x, row + k))
                k += LANES
            if k < w:
                vstore(buf, dst + k, vload_n(x, row + k, w - k))
        elif sw == 2:
            e, o = base + even, base + odd
            k = 0
            while 2 * (k + LANES) <= w:
                lo, hi = vload(x, row + 2 * k), vload(x, row + 2 * k + LANES)
                vstore(buf, e + k, vphase(lo, hi, 0))
                vstore(buf, o + k, vphase(lo, hi, 1))
                k += LANES
            if 2 * k < w:
                lo = vload_n(x, row + 2 * k, w - 2 * k)
                hi = vload_n(x, row + 2 * k + LANES, w - 2 * k - LANES)
                vstore(buf, e + k, vphase(lo, hi, 0))
                vstore(buf, o + k, vphase(lo, hi, 1))
        else:
            for col in range(w):
                px = col + pw
                buf[base + (px % sw) * phase + px // sw] = x[row + col]
        ry += 1
        if ry == sh:
            ry = 0
            qy += 1


@_helper
def _frame(buf, shifts, w, w0, b, acc, length):
    """``acc[f] = b + sum over taps t of w[w0 + t] * buf[f + shifts[t]]`` for ``f < length``
    rounded up to a multiple of 8 (``acc`` and ``buf`` have the slack for that)."""
    n_taps = shifts.shape[0]
    bias = vsplat(b)
    f = 0
    while f + BLOCK <= length + LANES - 1:  # blocks of four vectors (the last may be partly junk) ...
        a0, a1, a2, a3 = bias, bias, bias, bias
        for t in range(n_taps):
            wt = vsplat(w[w0 + t])
            i = f + shifts[t]
            a0 = vmuladd(a0, wt, vload(buf, i))
            a1 = vmuladd(a1, wt, vload(buf, i + LANES))
            a2 = vmuladd(a2, wt, vload(buf, i + 2 * LANES))
            a3 = vmuladd(a3, wt, vload(buf, i + 3 * LANES))
        vstore(acc, f, a0)
        vstore(acc, f + LANES, a1)
        vstore(acc, f + 2 * LANES, a2)
        vstore(acc, f + 3 * LANES, a3)
        f += BLOCK
    if f + LANES < length:  # ... then two vectors ...
        a0, a1 = bias, bias
        for t in range(n_taps):
            wt = vsplat(w[w0 + t])
            i = f + shifts[t]
            a0 = vmuladd(a0, wt, vload(buf, i))
            a1 = vmuladd(a1, wt, vload(buf, i + LANES))
        vstore(acc, f, a0)
        vstore(acc, f + LANES, a1)
        f += 2 * LANES
    if f < length:  # ... and one
        a0 = bias
        for t in range(n_taps):
            a0 = vmuladd(a0, vsplat(w[w0 + t]), vload(buf, f + shifts[t]))
        vstore(acc, f, a0)


@_helper
def _planes(x, h, w, weights, bias, shifts, sh, sw, ph, pw, hq, wq, multiplier, first, stop, out, ho, wo):
    """Input planes ``first .. stop - 1`` of the flat ``x`` (planes of ``h * w``) -> their output
    planes in the flat ``out`` (planes of ``ho * wo``), with their own buffers."""
    frame = (ho - 1) * wq + wo
    plane_out = ho * wo
    c_out = bias.shape[0]
    buf = np.zeros(sh * sw * (hq * wq + SLACK), np.float32)  # the border stays zero
    acc = np.empty(frame + SLACK, np.float32)
    for plane in range(first, stop):
        _load_plane(x, plane * h * w, h, w, buf, sh, sw, ph, pw, hq, wq)
        for m in range(multiplier):
            co = plane * multiplier + m  # = image * C_out + channel * multiplier + m
            channel = co % c_out
            _frame(buf, shifts, weights, channel * shifts.shape[0], bias[channel], acc, frame)
            end = (co + 1) * plane_out
            for oy in range(ho):
                src, dst = oy * wq, co * plane_out + oy * wo
                k = 0
                while k < wo and dst + k + LANES <= end:  # whole vectors inside the plane
                    vstore(out, dst + k, vload(acc, src + k))
                    k += LANES
                while k < wo:
                    out[dst + k] = acc[src + k]
                    k += 1


def _depthwise(x, planes, h, w, weights, bias, shifts, sh, sw, ph, pw, hq, wq, multiplier, blocks, out,
               ho, wo):
    """All ``planes`` (N * C) planes, in ``blocks`` blocks (``prange``); see the module notes.
    ``x`` (N*C*H*W,) and ``out`` (N*C_out*Ho*Wo,) flat; ``weights`` (C_out * kh*kw,) and
    ``shifts`` (kh*kw,) in tap order; ``bias`` (C_out,) (zeros when the layer has none)."""
    for block in prange(blocks):
        _planes(x, h, w, weights, bias, shifts, sh, sw, ph, pw, hq, wq, multiplier,
                block * planes // blocks, (block + 1) * planes // blocks, out, ho, wo)


depthwise_serial, depthwise_parallel = serial_and_parallel(_depthwise, **_JIT)


def _threads(parallel):
    return numba.get_num_threads() if parallel else 1


def depthwise_conv(x, weight, bias, stride, pad, dilation, multiplier, parallel=True, blocks=None):
    """Caffe depthwise convolution (``group == C_in``) by the direct kernel.

    Parameters
    ----------
    x : float32 (N, C, H, W)
        Other dtypes and layouts are converted.
    weight : float32 (C * multiplier, 1, kh, kw)
        Output channel ``co`` reads input channel ``co // multiplier``.
    bias : float32 (C * multiplier,) or None
    stride, pad, dilation : (int, int)
        Per axis (height, width); output size by Caffe's floor rounding.
    multiplier : int
    parallel : bool
        Use the multi-threaded copy (``prange`` over blocks of planes, Numba's thread count).
    blocks : int, optional
        How many blocks of (image, channel) planes the work is split into; by default
        :data:`PLANES_PER_THREAD` per thread, one with a single thread. The result does not
        depend on it.

    Returns
    -------
    float32 (N, C * multiplier, Ho, Wo)
    """
    x = np.ascontiguousarray(x, np.float32)
    n, c, h, w = x.shape
    c_out, c_group, kh, kw = weight.shape
    if c_group != 1 or c_out != c * multiplier:
        raise ValueError(f"weight {weight.shape} is not depthwise for {c} channels x {multiplier}")
    (sh, sw), (ph, pw), (dh, dw) = stride, pad, dilation
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"kernel ({kh}, {kw}) does not fit input ({h}, {w}) with pad {tuple(pad)}")
    out = np.empty((n, c_out, ho, wo), np.float32)
    if out.size == 0:
        return out
    hq, wq = -(-(h + 2 * ph) // sh), -(-(w + 2 * pw) // sw)
    phase = hq * wq + SLACK
    shifts = np.empty(kh * kw, np.int64)
    for ky in range(kh):
        qy, ry = divmod(ky * dh, sh)
        for kx in range(kw):
            qx, rx = divmod(kx * dw, sw)
            shifts[ky * kw + kx] = (ry * sw + rx) * phase + qy * wq + qx
    # read-only, as a loaded model's: one compiled signature for every caller
    weights = readonly(np.ascontiguousarray(weight, np.float32).reshape(-1))
    bias = readonly(np.zeros(c_out, np.float32) if bias is None else
                    np.ascontiguousarray(bias, np.float32).reshape(c_out))
    planes = n * c
    threads = _threads(parallel)
    if blocks is None:
        blocks = threads * PLANES_PER_THREAD if threads > 1 else 1
    blocks = max(1, min(planes, int(blocks)))
    kernel = depthwise_parallel if parallel else depthwise_serial
    kernel(x.reshape(-1), planes, h, w, weights, bias, shifts, sh, sw, ph, pw, hq, wq, multiplier, blocks,
           out.reshape(-1), ho, wo)
    return out
