"""Lookup-table (LUT) kernels: the inner loops of Q-CNN inference.

With product-quantized weights every output is a sum of table entries

    T[t, oy, ox] = sum over m, ky, kx of LUT[m, code[t, ky, kx, m], oy*sh + ky*dh, ox*sw + kx*dw]

where ``LUT[m, c, y, x] = <input sub-vector m at (y, x), codeword c of subspace m>``. A naive
kernel does one scattered load and one add per term and loses to BLAS by ~7x on convolutions.
Two kernels here do better.

Convolutions: the frame kernel (:func:`_frame_conv`)
----------------------------------------------------
Lay each table row out over *positions*: ``lut[m, c, p]`` with ``p = y * Wq + x``. For a fixed
term (m, ky, kx) and code c, the outputs of a whole output row -- indeed of the whole "frame"
``f = oy * Wq + ox`` -- read ``lut[m, c, f + shift(ky, kx)]``: a contiguous run. So one term adds
a contiguous slice of a table row to a contiguous slice of accumulators: plain vector loads and
adds, no gathers, eight lookups per instruction. The frame has ``Wq - Wo`` junk columns per row
(computed, then dropped), about 15% extra work for AlexNet's conv3-5.

* Stride > 1: the padded input is split into stride phases, ``p = ((ry*sw + rx)*Hq + qy)*Wq + qx``
  for input position ``(qy*sh + ry, qx*sw + rx)``, which keeps every term's run contiguous.
* Register blocking: the accumulators of 32 consecutive frame lanes (four 8-lane vectors) stay in
  registers while all terms of a block of subspaces are added; Numba/LLVM would otherwise keep
  them in memory (aliasing) or vectorise the wrong loop, so the kernels hold them in the 8 x
  float32 vector type of :mod:`qcnn.kernels.simd` (``vload``, ``vadd``, ``vmuladd``, ...: plain
  LLVM vector IR, AVX registers on x86-64, split into narrower registers by LLVM elsewhere).
* Cache blocking: tables are built (by vectorised multiply-adds, inside the kernel, four codewords
  per pass over the input) for a block of subspaces at a time, sized to stay in L2
  (:data:`TABLE_BUDGET`), and all output channels are accumulated against that block before the
  next is built; the per-channel partial frames are reloaded once per block. Codes are stored
  block-major (:meth:`PreparedCodes.frames`) so that each block streams its codes contiguously.
* Batches: each sample is its own frame, except when a sample has few positions (inner products:
  one position): then consecutive samples share one frame, so an inner product over a batch of 8
  reads 8 contiguous table entries per term.
* Threads: work items are (block of samples, group, chunk of output channels); output channels
  are only split, at the cost of building the same tables twice, when there are fewer
  (samples x groups) than threads.

Inner products of one sample: byte shuffles (:func:`_fc_shuffle`)
------------------------------------------------------------------
With one sample there is no run of positions to vectorise over, so the lookups themselves must
be vectorised. For K <= 32 each subspace's table is stored as four byte planes (byte p of every
entry, :func:`qcnn.kernels.simd.store_planes`); one byte shuffle (AVX2 ``vpshufb``, two for
K > 16; NEON ``tbl`` on aarch64) looks up 32 codes in a plane, and two rounds of interleaves
rebuild the 32 float32 entries exactly (:func:`qcnn.kernels.simd.add_lookups`): about 26
instructions per 32 lookups, against ~3 per lookup below. The codes of 32 outputs x one subspace
are 32 contiguous bytes, stored (:meth:`PreparedCodes.shuffle`) in the order in which the
interleaves deliver the results, per block of SHUFFLE_BLOCK subspaces whose tables (16 KiB) stay
in L1 while all outputs stream their codes, prefetched SHUFFLE_PREFETCH bytes ahead. The sums
are the same float32 sums as the other kernels'. Up to FC_SHUFFLE_MAX_BATCH samples run one at a
time; larger batches go to the 8-sample pair kernel below.

Inner products of one sample without byte shuffles, or K > 32: the pair kernel (:func:`_fc_tables`)
---------------------------------------------------------------------------------------------------
Vector gathers (AVX2 ``vgatherdps``) are slower than scalar loads on the AMD EPYC (Zen 3) this was measured on
(0.45 vs 0.3-0.37 ns per lookup with the tables in L1) and LLVM does not emit them for it, so
the kernel is scalar and cuts the number of lookups instead: two subspaces m, m+1 with
K <= PAIR_WIDTH = 32 codewords are merged into one table of 32*32 entries
(``LUT2[c1*32 + c2] = LUT[m, c1] + LUT[m+1, c2]``, built on the fly, 4 KiB) addressed by one
16-bit code, halving the lookups (the code bytes stay the same). Codes are stored so that a
block of :data:`PAIR_BLOCK` pair tables (16 KiB, L1-resident) serves a stream of 8-output groups
(:func:`_pair_block`): eight 16-bit codes are read as four 32-bit words, the eight partial sums
are scalar registers, the table offsets are constants from one base register, index arithmetic
is unsigned (no negative-index checks), and the code stream is software-prefetched 2 KiB ahead
(it comes from DRAM: the dense layers before it flush the caches). A lookup then costs about
three instructions, ~1 cycle (larger blocks -- 8 tables, or tables kept in L2 while the outputs
are streamed in chunks -- measured slower: the tables, the 16 KiB output vector and the code
stream then contend for the 32 KiB L1). For K > 32 the same loop runs on single tables with
8-bit codes (:func:`_single_block`).

Inner products of batches: 8-sample pair tables (:func:`_fc_pairs8`)
--------------------------------------------------------------------
For K <= 32 and :data:`FC_PAIRS8_MIN_BATCH` or more samples, samples go in chunks of 8 and every
pair-table entry is the vector of the 8 samples' values (``32*32*8`` floats, 32 KiB per pair
table, a block of 4 in L2): one vector load-add per pair lookup serves 8 samples, and the codes
are read and decoded once per chunk (same code layout as the one-sample kernel). K > 32: the
scalar kernel per sample up to :data:`FC_GATHER_MAX_BATCH` samples, the frame kernel above.

Everything is compiled with ``cache=True`` in a serial and a parallel copy
(:func:`qcnn.kernels.jit.serial_and_parallel`); ``parallel`` selects the copy.
"""

import numba
import numpy as np
from numba import prange

from qcnn.kernels.jit import readonly, serial_and_parallel
from qcnn.kernels.simd import (
    LANES,
    SHUFFLE_ISA,
    SHUFFLE_OUTPUTS,
    SHUFFLE_POSITION,
    TABLE_ENTRIES,
    add_lookups,
    prefetch,
    store_planes,
    table_bytes,
    vadd,
    vload,
    vmuladd,
    vsplat,
    vstore,
    vzero,
)

# frames are padded to a multiple of LANES (float32 lanes per vector, from qcnn.kernels.simd)
SLACK = 64  # zeroed floats after every table block and input copy: vector reads may run past a row
TABLE_BUDGET = 256 * 1024  # bytes of tables built per block (kept in L2 while accumulating)
FRAME_SAMPLE_POSITIONS = 64  # samples with fewer positions than this share a frame
MIN_TABLE_ROW = 32  # table blocks are sized for rows of at least this many positions (batches)
PAIR_BLOCK = 4  # pair tables per block in the one-sample inner-product kernel (4 x 4 KiB for K=32)
PAIR_WIDTH = 32  # pair subspaces when K <= this; pair tables have PAIR_WIDTH**2 entries
PAIR_SIZE = PAIR_WIDTH * PAIR_WIDTH
FC_PREFETCH = 512  # the inner-product kernel prefetches its code stream this many 32-bit words ahead
FC_GATHER_MAX_BATCH = 4  # K > PAIR_WIDTH: inner products of at most this many samples use the
# scalar single-table kernel (per sample), larger batches the frame kernel
FC_PAIRS8_MIN_BATCH = 3  # K <= PAIR_WIDTH: from this batch on, pair tables of 8-sample vectors
FC_SHUFFLE_MAX_BATCH = 3  # K <= TABLE_ENTRIES, SHUFFLE_ISA: inner products of up to this many samples
# use the byte-shuffle kernel (per sample; the 8-sample pair tables win from 4 samples on)
SHUFFLE_PREFETCH = 2048  # the byte-shuffle kernel prefetches its code stream this many bytes ahead
WIDE_TABLE, NARROW_TABLE = table_bytes(True), table_bytes(False)  # bytes per byte-plane table
SHUFFLE_BLOCK = 16384 // WIDE_TABLE  # subspaces per table block of the byte-shuffle kernel: 16 KiB (L1)

_JIT = {"fastmath": True, "error_model": "numpy"}


# --- Convolution (and batched inner product): the frame kernel -----------------------------------

@numba.njit(cache=True, nogil=True, **_JIT)
def _build_tables(src, src_start, src_row, books, gb, m0, mb, row_len, row_stride, lut):
    """Tables of subspaces ``m0 .. m0+mb-1``: ``lut[(i*K + c)*row_stride + p]`` = <codeword c
    of subspace m0+i, input sub-vector at position p>, for ``p < row_len`` rounded up to LANES
    (<= row_stride). Four codewords at a time share the loads of the input."""
    n_words, subdim = books.shape[2], books.shape[3]
    for i in range(mb):
        m = m0 + i
        words = books[gb, m]
        s0 = src_start + m * subdim * src_row
        c = 0
        while c < n_words:
            four = c + 4 <= n_words
            w0 = words[c]
            w1 = words[c + 1] if four else w0
            w2 = words[c + 2] if four else w0
            w3 = words[c + 3] if four else w0
            dst = (i * n_words + c) * row_stride
            for p in range(0, row_len, LANES):
                v0 = vzero()
                v1 = vzero()
                v2 = vzero()
                v3 = vzero()
                for j in range(subdim):
                    x = vload(src, s0 + j * src_row + p)
                    v0 = vmuladd(v0, w0[j], x)
                    v1 = vmuladd(v1, w1[j], x)
                    v2 = vmuladd(v2, w2[j], x)
                    v3 = vmuladd(v3, w3[j], x)
                vstore(lut, dst + p, v0)
                if four:
                    vstore(lut, dst + row_stride + p, v1)
                    vstore(lut, dst + 2 * row_stride + p, v2)
                    vstore(lut, dst + 3 * row_stride + p, v3)
            c += 4 if four else 1


@numba.njit(cache=True, nogil=True, **_JIT)
def _accumulate(lut, offsets, n_terms, acc, start, length, first):
    """``acc[start + f] (+)= sum_k lut[offsets[k] + f]`` for ``f < length`` (a multiple of
    LANES), 32 lanes at a time in registers (``first``: ``=``, else ``+=``)."""
    f = 0
    while f + 4 * LANES <= length:
        s = start + f
        if first:
            a0 = vzero()
            a1 = vzero()
            a2 = vzero()
            a3 = vzero()
        else:
            a0 = vload(acc, s)
            a1 = vload(acc, s + LANES)
            a2 = vload(acc, s + 2 * LANES)
            a3 = vload(acc, s + 3 * LANES)
        for k in range(n_terms):
            o = offsets[k] + f
            a0 = vadd(a0, vload(lut, o))
            a1 = vadd(a1, vload(lut, o + LANES))
            a2 = vadd(a2, vload(lut, o + 2 * LANES))
            a3 = vadd(a3, vload(lut, o + 3 * LANES))
        vstore(acc, s, a0)
        vstore(acc, s + LANES, a1)
        vstore(acc, s + 2 * LANES, a2)
        vstore(acc, s + 3 * LANES, a3)
        f += 4 * LANES
    while f < length:  # the last < 32 lanes, 8 at a time: four partial sums hide the add latency
        a0 = vzero() if first else vload(acc, start + f)
        a1 = vzero()
        a2 = vzero()
        a3 = vzero()
        k = 0
        while k + 4 <= n_terms:
            a0 = vadd(a0, vload(lut, offsets[k] + f))
            a1 = vadd(a1, vload(lut, offsets[k + 1] + f))
            a2 = vadd(a2, vload(lut, offsets[k + 2] + f))
            a3 = vadd(a3, vload(lut, offsets[k + 3] + f))
            k += 4
        while k < n_terms:
            a0 = vadd(a0, vload(lut, offsets[k] + f))
            k += 1
        vstore(acc, start + f, vadd(vadd(a0, a1), vadd(a2, a3)))
        f += LANES


def _frame_conv(src, books, codes, shifts, positions, wq, batch_block, sub_block, t_chunks, out):
    """The frame kernel (see the module docstring).

    Parameters
    ----------
    src : float32, flat
        Input (G, M*subdim, N*positions): channels zero-padded to whole subspaces, positions
        stride-phase-split, then SLACK zeros.
    books : float32 (G_cb, M, K, subdim)
    codes : uint8 (G, ceil(M / sub_block), C_t/G, sub_block * kh*kw)
        :meth:`PreparedCodes.frames`: per table block, each output channel's codes (subspace-major).
    shifts : int64 (kh*kw,)
        Position offset of each kernel tap in a table row.
    positions, wq : int
        Positions per sample (all phases) and the frame's row length.
    batch_block, sub_block, t_chunks : int
        Samples per frame, subspaces per table block, output-channel chunks per (frame, group).
    out : float32 (N, C_t, Ho, Wo)
    """
    n_batch, _, ho, wo = out.shape
    n_group, c_group = codes.shape[0], codes.shape[2]
    n_books, n_sub, n_words, subdim = books.shape
    n_taps = shifts.shape[0]
    src_row = n_batch * positions
    frame_one = (ho - 1) * wq + wo
    n_frames = (n_batch + batch_block - 1) // batch_block
    t_size = (c_group + t_chunks - 1) // t_chunks
    for job in prange(n_frames * n_group * t_chunks):
        chunk = job % t_chunks
        g = (job // t_chunks) % n_group
        n0 = (job // (t_chunks * n_group)) * batch_block
        nb = min(batch_block, n_batch - n0)
        t0 = chunk * t_size
        nt = min(c_group, t0 + t_size) - t0
        gb = g * n_books // n_group
        row_len = nb * positions  # table row: all positions of the frame's samples
        row_stride = (row_len + LANES - 1) // LANES * LANES
        frame = (frame_one + (nb - 1) * positions + LANES - 1) // LANES * LANES
        lut = np.zeros(sub_block * n_words * row_stride + SLACK, np.float32)
        acc = np.empty(max(nt, 0) * frame, np.float32)
        # term k = (i, tap): table row i*K + code, shifted by the tap
        term_base = np.empty(sub_block * n_taps, np.int32)
        for k in range(sub_block * n_taps):
            term_base[k] = (k // n_taps) * n_words * row_stride + shifts[k % n_taps]
        offsets = np.empty(sub_block * n_taps, np.int32)
        stride = np.int32(row_stride)
        src_start = g * n_sub * subdim * src_row + n0 * positions
        for m0 in range(0, n_sub, sub_block):
            mb = min(sub_block, n_sub - m0)
            n_terms = mb * n_taps
            _build_tables(src, src_start, src_row, books, gb, m0, mb, row_len, row_stride, lut)
            for t in range(nt):
                code = codes[g, m0 // sub_block, t0 + t]
                for k in range(n_terms):
                    offsets[k] = term_base[k] + np.int32(code[k]) * stride
                _accumulate(lut, offsets, n_terms, acc, t * frame, frame, m0 == 0)
        for t in range(nt):
            for s in range(nb):
                for oy in range(ho):
                    f = t * frame + s * positions + oy * wq
                    for ox in range(wo):
                        out[n0 + s, g * c_group + t0 + t, oy, ox] = acc[f + ox]


frame_conv_serial, frame_conv_parallel = serial_and_parallel(_frame_conv, **_JIT)


# --- Inner product of one sample: pair tables and scalar lookups ---------------------------------

@numba.njit(cache=True, nogil=True, **_JIT)
def _subspace_table(books, x, m, out):
    """``out[c] = <codeword c of subspace m, x sub-vector m>`` for c < K (zero when m is padding)."""
    n_sub, n_words, subdim = books.shape[1], books.shape[2], books.shape[3]
    if m >= n_sub:
        out[:n_words] = 0.0
        return
    if subdim == 4:  # the paper's inner-product setting: unrolled, LLVM vectorises over c
        w = books[0, m].reshape(-1)
        x0, x1, x2, x3 = x[4 * m], x[4 * m + 1], x[4 * m + 2], x[4 * m + 3]
        for c in range(n_words):
            out[c] = w[4 * c] * x0 + w[4 * c + 1] * x1 + w[4 * c + 2] * x2 + w[4 * c + 3] * x3
        return
    words = books[0, m]
    xs = x[m * subdim:(m + 1) * subdim]
    for c in range(n_words):
        word = words[c]
        s = np.float32(0.0)
        for j in range(subdim):
            s += word[j] * xs[j]
        out[c] = s


_U8, _U16 = np.uint32(0xFF), np.uint32(0xFFFF)


@numba.njit(cache=True, nogil=True, **_JIT)
def _add_pairs(table, base, w0, w1, w2, w3, s0, s1, s2, s3, s4, s5, s6, s7):
    """Add the entries ``table[base + code]`` of eight 16-bit codes packed in four 32-bit words."""
    s0 += table[base + (w0 & _U16)]
    s1 += table[base + (w0 >> np.uint32(16))]
    s2 += table[base + (w1 & _U16)]
    s3 += table[base + (w1 >> np.uint32(16))]
    s4 += table[base + (w2 & _U16)]
    s5 += table[base + (w2 >> np.uint32(16))]
    s6 += table[base + (w3 & _U16)]
    s7 += table[base + (w3 >> np.uint32(16))]
    return s0, s1, s2, s3, s4, s5, s6, s7


@numba.njit(cache=True, nogil=True, **_JIT)
def _add_singles(table, base, w0, w1, s0, s1, s2, s3, s4, s5, s6, s7):
    """Add the entries ``table[base + code]`` of eight 8-bit codes packed in two 32-bit words."""
    s0 += table[base + (w0 & _U8)]
    s1 += table[base + ((w0 >> np.uint32(8)) & _U8)]
    s2 += table[base + ((w0 >> np.uint32(16)) & _U8)]
    s3 += table[base + (w0 >> np.uint32(24))]
    s4 += table[base + (w1 & _U8)]
    s5 += table[base + ((w1 >> np.uint32(8)) & _U8)]
    s6 += table[base + ((w1 >> np.uint32(16)) & _U8)]
    s7 += table[base + (w1 >> np.uint32(24))]
    return s0, s1, s2, s3, s4, s5, s6, s7


@numba.njit(cache=True, nogil=True, inline="always", **_JIT)
def _job_groups(job, t_chunks, n_groups8):
    """Sample ``n`` and output groups ``q0 .. q1-1`` of parallel job ``job`` (``t_chunks`` jobs
    per sample split its ``n_groups8`` groups of 8 outputs evenly)."""
    g_size = (n_groups8 + t_chunks - 1) // t_chunks
    q0 = (job % t_chunks) * g_size
    return job // t_chunks, q0, min(n_groups8, q0 + g_size)


@numba.njit(cache=True, nogil=True, inline="always", **_JIT)
def _load8(acc, o):
    """The 8 running sums of one output group, as scalars (kept in registers)."""
    u1 = np.uint64(1)
    return (acc[o], acc[o + u1], acc[o + np.uint64(2)], acc[o + np.uint64(3)], acc[o + np.uint64(4)],
            acc[o + np.uint64(5)], acc[o + np.uint64(6)], acc[o + np.uint64(7)])


@numba.njit(cache=True, nogil=True, inline="always", **_JIT)
def _store8(acc, o, s0, s1, s2, s3, s4, s5, s6, s7):
    u1 = np.uint64(1)
    acc[o], acc[o + u1], acc[o + np.uint64(2)], acc[o + np.uint64(3)] = s0, s1, s2, s3
    acc[o + np.uint64(4)], acc[o + np.uint64(5)], acc[o + np.uint64(6)], acc[o + np.uint64(7)] = s4, s5, s6, s7


@numba.njit(cache=True, nogil=True, **_JIT)
def _pair_block(tables, codes, w, acc, q0, q1):
    """One block of PAIR_BLOCK (= 4) pair tables of PAIR_SIZE entries into the sums of output
    groups ``q0 .. q1-1``, reading their code words from ``w`` on (16 per group). The table
    offsets are constants (one base register, no spills); the code stream is prefetched
    :data:`FC_PREFETCH` words ahead."""
    u1 = np.uint64(1)
    w = np.uint64(w)
    for q in range(q0, q1):
        o = np.uint64(q * 8)
        s0, s1, s2, s3, s4, s5, s6, s7 = _load8(acc, o)
        prefetch(codes, w + np.uint64(FC_PREFETCH))
        s0, s1, s2, s3, s4, s5, s6, s7 = _add_pairs(
            tables, np.uint32(0), codes[w], codes[w + u1], codes[w + np.uint64(2)], codes[w + np.uint64(3)],
            s0, s1, s2, s3, s4, s5, s6, s7)
        s0, s1, s2, s3, s4, s5, s6, s7 = _add_pairs(
            tables, np.uint32(PAIR_SIZE), codes[w + np.uint64(4)], codes[w + np.uint64(5)],
            codes[w + np.uint64(6)], codes[w + np.uint64(7)], s0, s1, s2, s3, s4, s5, s6, s7)
        s0, s1, s2, s3, s4, s5, s6, s7 = _add_pairs(
            tables, np.uint32(2 * PAIR_SIZE), codes[w + np.uint64(8)], codes[w + np.uint64(9)],
            codes[w + np.uint64(10)], codes[w + np.uint64(11)], s0, s1, s2, s3, s4, s5, s6, s7)
        s0, s1, s2, s3, s4, s5, s6, s7 = _add_pairs(
            tables, np.uint32(3 * PAIR_SIZE), codes[w + np.uint64(12)], codes[w + np.uint64(13)],
            codes[w + np.uint64(14)], codes[w + np.uint64(15)], s0, s1, s2, s3, s4, s5, s6, s7)
        w += np.uint64(16)
        _store8(acc, o, s0, s1, s2, s3, s4, s5, s6, s7)


@numba.njit(cache=True, nogil=True, **_JIT)
def _single_block(tables, size, codes, w, acc, q0, q1):
    """:func:`_pair_block` for single tables of ``size`` entries and 8-bit codes (8 words per group)."""
    u1 = np.uint64(1)
    w = np.uint64(w)
    for q in range(q0, q1):
        o = np.uint64(q * 8)
        s0, s1, s2, s3, s4, s5, s6, s7 = _load8(acc, o)
        prefetch(codes, w + np.uint64(FC_PREFETCH))
        for i in range(PAIR_BLOCK):
            s0, s1, s2, s3, s4, s5, s6, s7 = _add_singles(
                tables, np.uint32(i * size), codes[w], codes[w + u1], s0, s1, s2, s3, s4, s5, s6, s7)
            w += np.uint64(2)
        _store8(acc, o, s0, s1, s2, s3, s4, s5, s6, s7)


def _fc_tables(x, books, codes, pairs, width, t_chunks, out):
    """``out[n, t] = sum over table rows r of table_r[code[t, r]]`` for one-position samples.

    x : float32 (N, rows*subdim), zero-padded (rows = subspaces incl. padding);
    books : float32 (1, M, K, subdim);
    codes : uint32, flat: per (block of PAIR_BLOCK tables, group of 8 outputs, table) the eight
        codes of the group, as four words of two 16-bit pair codes ``c1*PAIR_WIDTH + c2``
        (``pairs``: K <= PAIR_WIDTH) or two words of four 8-bit codes;
    width : single-table row width (``width`` >= K; unused for pairs, whose tables always have
        PAIR_SIZE = PAIR_WIDTH**2 entries, so that the kernel's table offsets are constants);
    out : float32 (N, C8), C8 = C_t rounded up to 8.

    Index arithmetic is unsigned so that Numba emits no negative-index wraparound.
    """
    n_batch, c8 = out.shape
    n_groups8 = c8 // 8
    words_per_group = 4 if pairs else 2
    n_blocks = codes.shape[0] // (n_groups8 * PAIR_BLOCK * words_per_group)
    n_words = books.shape[2]
    size = PAIR_SIZE if pairs else width
    for job in prange(n_batch * t_chunks):
        n, q0, q1 = _job_groups(job, t_chunks, n_groups8)
        xn = x[n]
        acc = out[n]
        tables = np.zeros(PAIR_BLOCK * size + SLACK, np.float32)
        first = np.zeros(PAIR_WIDTH, np.float32)
        second = np.zeros(PAIR_WIDTH, np.float32)
        acc[q0 * 8:q1 * 8] = 0.0
        for rb in range(n_blocks):
            for i in range(PAIR_BLOCK):
                if pairs:
                    m = 2 * (rb * PAIR_BLOCK + i)
                    _subspace_table(books, xn, m, first)
                    _subspace_table(books, xn, m + 1, second)
                    for a in range(n_words):
                        splat = vsplat(first[a])
                        row = i * PAIR_SIZE + a * PAIR_WIDTH
                        for b in range(0, PAIR_WIDTH, LANES):
                            vstore(tables, row + b, vadd(splat, vload(second, b)))
                else:
                    _subspace_table(books, xn, rb * PAIR_BLOCK + i, tables[i * size:(i + 1) * size])
            w = (rb * n_groups8 + q0) * PAIR_BLOCK * words_per_group
            if pairs:
                _pair_block(tables, codes, w, acc, q0, q1)
            else:
                _single_block(tables, size, codes, w, acc, q0, q1)


fc_tables_serial, fc_tables_parallel = serial_and_parallel(_fc_tables, **_JIT)


# --- Inner products of batches: pair tables of 8-sample vectors ----------------------------------

@numba.njit(cache=True, nogil=True, **_JIT)
def _subspace_table8(books, xt, m, out):
    """``out[c*8 + s] = <codeword c of subspace m, sub-vector m of sample s>`` for c < K, s < 8
    (``xt``: the 8 samples' inputs, sample-minor: ``xt[j*8 + s]``; zero when m is padding)."""
    n_sub, n_words, subdim = books.shape[1], books.shape[2], books.shape[3]
    if m >= n_sub:
        for c in range(n_words):
            vstore(out, c * LANES, vzero())
        return
    for c in range(n_words):
        v = vzero()
        for j in range(subdim):
            v = vmuladd(v, books[0, m, c, j], vload(xt, (m * subdim + j) * LANES))
        vstore(out, c * LANES, v)


@numba.njit(cache=True, nogil=True, **_JIT)
def _pair_block8(tables, codes, w, acc, q0, q1):
    """:func:`_pair_block` for 8 samples: table entries and sums are 8-sample vectors
    (``tables[(i*PAIR_SIZE + code)*8 + s]``, ``acc[(t*8 + s)]``), one vector add per lookup."""
    u1, mask, shift, lanes = np.uint64(1), np.uint64(0xFFFF), np.uint64(16), np.uint64(LANES)
    w = np.uint64(w)
    for q in range(q0, q1):
        o = np.uint64(q * 8 * LANES)
        a0, a1 = vload(acc, o), vload(acc, o + lanes)
        a2, a3 = vload(acc, o + np.uint64(2 * LANES)), vload(acc, o + np.uint64(3 * LANES))
        a4, a5 = vload(acc, o + np.uint64(4 * LANES)), vload(acc, o + np.uint64(5 * LANES))
        a6, a7 = vload(acc, o + np.uint64(6 * LANES)), vload(acc, o + np.uint64(7 * LANES))
        prefetch(codes, w + np.uint64(FC_PREFETCH))
        for i in range(PAIR_BLOCK):
            base = np.uint64(i * PAIR_SIZE * LANES)
            c = np.uint64(codes[w])
            a0 = vadd(a0, vload(tables, base + (c & mask) * lanes))
            a1 = vadd(a1, vload(tables, base + (c >> shift) * lanes))
            c = np.uint64(codes[w + u1])
            a2 = vadd(a2, vload(tables, base + (c & mask) * lanes))
            a3 = vadd(a3, vload(tables, base + (c >> shift) * lanes))
            c = np.uint64(codes[w + np.uint64(2)])
            a4 = vadd(a4, vload(tables, base + (c & mask) * lanes))
            a5 = vadd(a5, vload(tables, base + (c >> shift) * lanes))
            c = np.uint64(codes[w + np.uint64(3)])
            a6 = vadd(a6, vload(tables, base + (c & mask) * lanes))
            a7 = vadd(a7, vload(tables, base + (c >> shift) * lanes))
            w += np.uint64(4)
        vstore(acc, o, a0)
        vstore(acc, o + lanes, a1)
        vstore(acc, o + np.uint64(2 * LANES), a2)
        vstore(acc, o + np.uint64(3 * LANES), a3)
        vstore(acc, o + np.uint64(4 * LANES), a4)
        vstore(acc, o + np.uint64(5 * LANES), a5)
        vstore(acc, o + np.uint64(6 * LANES), a6)
        vstore(acc, o + np.uint64(7 * LANES), a7)


def _fc_pairs8(xt, books, codes, t_chunks, out):
    """Inner products of samples in chunks of 8 with the pair codes of :func:`_fc_tables`.

    xt : float32 (chunks, rows*2*subdim*8 + SLACK): each chunk's 8 inputs, sample-minor
        (zero-padded: missing samples, padding subspaces);
    books : float32 (1, M, K, subdim), K <= PAIR_WIDTH;
    codes : the pair code words of :meth:`PreparedCodes.fc`;
    out : float32 (chunks, C8*8): ``out[chunk, t*8 + s]``.

    A block's PAIR_BLOCK pair tables of 8-sample vectors take 128 KiB (L2); every lookup adds
    one 8-sample vector, so the codes are read and decoded once per 8 samples.
    """
    n_chunks = out.shape[0]
    n_groups8 = out.shape[1] // (8 * LANES)
    n_blocks = codes.shape[0] // (n_groups8 * PAIR_BLOCK * 4)
    n_words = books.shape[2]
    for job in prange(n_chunks * t_chunks):
        n, q0, q1 = _job_groups(job, t_chunks, n_groups8)
        xn = xt[n]
        acc = out[n]
        tables = np.zeros(PAIR_BLOCK * PAIR_SIZE * LANES + SLACK, np.float32)
        first = np.zeros(PAIR_WIDTH * LANES, np.float32)
        second = np.zeros(PAIR_WIDTH * LANES, np.float32)
        acc[q0 * 8 * LANES:q1 * 8 * LANES] = 0.0
        for rb in range(n_blocks):
            for i in range(PAIR_BLOCK):
                m = 2 * (rb * PAIR_BLOCK + i)
                _subspace_table8(books, xn, m, first)
                _subspace_table8(books, xn, m + 1, second)
                for a in range(n_words):
                    fa = vload(first, a * LANES)
                    row = (i * PAIR_SIZE + a * PAIR_WIDTH) * LANES
                    for b in range(PAIR_WIDTH):
                        vstore(tables, row + b * LANES, vadd(fa, vload(second, b * LANES)))
            _pair_block8(tables, codes, (rb * n_groups8 + q0) * PAIR_BLOCK * 4, acc, q0, q1)


fc_pairs8_serial, fc_pairs8_parallel = serial_and_parallel(_fc_pairs8, **_JIT)


# --- Inner products of one sample: byte-shuffle lookups ------------------------------------------

@numba.njit(cache=True, nogil=True, **_JIT)
def _shuffle_block(tables, codes, w, acc, q0, q1, mb, wide):
    """Add ``mb`` byte-plane tables into the sums of output chunks ``q0 .. q1-1`` (32 outputs
    each), reading 32 codes per table and chunk from ``w`` on."""
    for q in range(q0, q1):
        o = q * SHUFFLE_OUTPUTS
        a = (vload(acc, o), vload(acc, o + LANES), vload(acc, o + 2 * LANES), vload(acc, o + 3 * LANES))
        for i in range(mb):
            prefetch(codes, w + SHUFFLE_PREFETCH)
            if wide:
                a = add_lookups(tables, i * WIDE_TABLE, codes, w, a, True)
            else:
                a = add_lookups(tables, i * NARROW_TABLE, codes, w, a, False)
            w += SHUFFLE_OUTPUTS
        vstore(acc, o, a[0])
        vstore(acc, o + LANES, a[1])
        vstore(acc, o + 2 * LANES, a[2])
        vstore(acc, o + 3 * LANES, a[3])


def _fc_shuffle(x, books, codes, wide, t_chunks, out):
    """``out[n, t] = sum over subspaces m of LUT_n[m, code[t, m]]`` by byte shuffles
    (:func:`qcnn.kernels.simd.add_lookups`), one sample at a time.

    x : float32 (N, M*subdim);
    books : float32 (1, M, K, subdim), K <= TABLE_ENTRIES (``wide``: K > 16);
    codes : uint8, flat, :meth:`PreparedCodes.shuffle`: per block of SHUFFLE_BLOCK subspaces, per
        chunk of 32 outputs, per subspace, the chunk's 32 codes in SHUFFLE_POSITION order;
    out : float32 (N, C32), C32 = C_t rounded up to 32.

    Each block's tables (128 bytes per subspace, 64 when narrow) are built once per sample and
    stay in L1 while every output chunk streams its codes through them.
    """
    n_batch, c32 = out.shape
    n_chunks = c32 // SHUFFLE_OUTPUTS
    n_sub = books.shape[1]
    for job in prange(n_batch * t_chunks):
        n, q0, q1 = _job_groups(job, t_chunks, n_chunks)
        xn = x[n]
        acc = out[n]
        tables = np.zeros(SHUFFLE_BLOCK * WIDE_TABLE, np.uint8)
        lut = np.zeros(TABLE_ENTRIES, np.float32)  # entries K.. stay zero: no code selects them
        acc[q0 * SHUFFLE_OUTPUTS:q1 * SHUFFLE_OUTPUTS] = 0.0
        for m0 in range(0, n_sub, SHUFFLE_BLOCK):
            mb = min(SHUFFLE_BLOCK, n_sub - m0)
            for i in range(mb):
                _subspace_table(books, xn, m0 + i, lut)
                if wide:
                    store_planes(tables, i * WIDE_TABLE, lut, True)
                else:
                    store_planes(tables, i * NARROW_TABLE, lut, False)
            _shuffle_block(tables, codes, (m0 * n_chunks + q0 * mb) * SHUFFLE_OUTPUTS, acc, q0, q1, mb, wide)


if SHUFFLE_ISA:
    fc_shuffle_serial, fc_shuffle_parallel = serial_and_parallel(_fc_shuffle, **_JIT)


# --- Code layouts and the public entry points -----------------------------------------------------

class PreparedCodes:
    """A layer's codes in the layouts the kernels read, each built on first use.

    ``frames(sub_block)``: uint8 (G, blocks, C_t/G, sub_block*kh*kw) for :func:`_frame_conv`;
    ``fc(K)``: the 32-bit code words of :func:`_fc_tables` and :func:`_fc_pairs8` (inner products);
    ``shuffle()``: the code bytes of :func:`_fc_shuffle` (inner products of one or two samples).
    """

    __slots__ = ("codes", "group", "_frames", "_fc", "_shuffle")

    def __init__(self, codes, group):
        self.codes = np.asarray(codes, np.uint8)
        self.group = int(group)
        self._frames = {}
        self._fc = None
        self._shuffle = None

    @property
    def kernel(self):
        return self.codes.shape[1:3]

    def frames(self, sub_block):
        """Codes of :func:`_frame_conv` for tables built ``sub_block`` subspaces at a time:
        uint8 (G, blocks, C_t/G, sub_block * kh*kw), so that the codes one block reads for all
        output channels are contiguous (a strided walk through a large layer's codes, one short
        run per channel, would be bound by memory latency)."""
        if sub_block not in self._frames:
            c_out, kh, kw, m = self.codes.shape
            g = self.group
            blocks = -(-m // sub_block)
            codes = np.zeros((g, c_out // g, blocks * sub_block, kh * kw), np.uint8)
            codes[:, :, :m] = self.codes.reshape(g, c_out // g, kh * kw, m).transpose(0, 1, 3, 2)
            codes = codes.reshape(g, c_out // g, blocks, sub_block * kh * kw).transpose(0, 2, 1, 3)
            self._frames = {sub_block: np.ascontiguousarray(codes)}  # keep one layout only
        return self._frames[sub_block]

    def fc(self, n_words):
        """``(pairs, width, rows, words)`` for :func:`_fc_tables` with K = ``n_words`` (inner
        products: group 1, 1x1 kernel): pair or single tables, their row width, the number of
        subspaces incl. padding to whole blocks of tables, and the code words."""
        if self._fc is None or self._fc[0] != n_words:
            c_out, m = self.codes.shape[0], self.codes.shape[3]
            c8 = -(-c_out // 8) * 8
            pairs = n_words <= PAIR_WIDTH
            width = PAIR_WIDTH if pairs else n_words
            per_table = 2 if pairs else 1
            rows = -(-m // (per_table * PAIR_BLOCK)) * PAIR_BLOCK  # tables, whole blocks
            codes = np.zeros((c8, rows * per_table), np.uint16)
            codes[:c_out, :m] = self.codes.reshape(c_out, m)
            if pairs:
                codes = codes[:, 0::2] * np.uint16(width) + codes[:, 1::2]
            else:
                codes = codes.astype(np.uint8)
            # (C8/8, 8, R/B, B) -> (R/B, C8/8, B, 8): the codes of 8 outputs x B tables contiguous
            codes = codes.reshape(c8 // 8, 8, rows // PAIR_BLOCK, PAIR_BLOCK).transpose(2, 0, 3, 1)
            words = np.ascontiguousarray(codes).reshape(-1).view(np.uint32)
            self._fc = (n_words, (pairs, width, rows, words))
        return self._fc[1]

    def shuffle(self):
        """Codes of :func:`_fc_shuffle` (group 1, 1x1 kernel): uint8, flat, per block of
        SHUFFLE_BLOCK subspaces (the last one shorter), per chunk of 32 outputs (C_t padded with
        code 0 to a multiple of 32), per subspace, the chunk's 32 codes in SHUFFLE_POSITION order:
        every block streams its codes contiguously."""
        if self._shuffle is None:
            c_out, m = self.codes.shape[0], self.codes.shape[3]
            c32 = -(-c_out // SHUFFLE_OUTPUTS) * SHUFFLE_OUTPUTS
            codes = np.zeros((c32, m), np.uint8)
            codes[:c_out] = self.codes.reshape(c_out, m)
            chunks = codes.reshape(c32 // SHUFFLE_OUTPUTS, SHUFFLE_OUTPUTS, m)[:, list(SHUFFLE_POSITION)]
            self._shuffle = np.concatenate([chunks[:, :, m0:m0 + SHUFFLE_BLOCK].transpose(0, 2, 1).reshape(-1)
                                            for m0 in range(0, m, SHUFFLE_BLOCK)])
        return self._shuffle

    @property
    def nbytes(self):
        return sum(a.nbytes for a in self._frames.values()) + (self._fc[1][3].nbytes if self._fc else 0) \
            + (self._shuffle.nbytes if self._shuffle is not None else 0)


def prepare_codes(codes, group):
    """Codes (C_t, kh, kw, M) uint8 in the kernels' layouts (a :class:`PreparedCodes`)."""
    return PreparedCodes(codes, group)


def _threads(parallel):
    return numba.get_num_threads() if parallel else 1


def lut_conv(padded, codebooks, kernel_codes, group, stride, dilation, out_size, parallel=True):
    """Product-quantized convolution by lookup tables.

    Parameters
    ----------
    padded : float32 (N, C, Hp, Wp)
        Input, already padded (C = group * C_s).
    codebooks : float32 (G_cb, M, K, subdim)
        G_cb is 1 (shared by all groups) or ``group``.
    kernel_codes : PreparedCodes
        :func:`prepare_codes` of the layer's codes (C_t, kh, kw, M).
    group : int
    stride, dilation, out_size : (int, int)
    parallel : bool
        Use the multi-threaded kernels.

    Returns
    -------
    float32 (N, C_t, Ho, Wo)
    """
    if not isinstance(kernel_codes, PreparedCodes):
        kernel_codes = prepare_codes(kernel_codes, group)
    padded = np.ascontiguousarray(padded, np.float32)
    codebooks = readonly(np.ascontiguousarray(codebooks, np.float32))  # one signature, as loaded models'
    n, c, hp, wp = padded.shape
    (kh, kw), c_out = kernel_codes.kernel, kernel_codes.codes.shape[0]
    ho, wo = out_size
    if n * c_out * ho * wo == 0:
        return np.empty((n, c_out, ho, wo), np.float32)
    if (hp, wp, kh, kw, group, codebooks.shape[0]) == (1, 1, 1, 1, 1, 1) and \
            (n <= FC_GATHER_MAX_BATCH or codebooks.shape[2] <= PAIR_WIDTH):
        return _inner_product(padded.reshape(n, c), codebooks, kernel_codes, parallel) \
            .reshape(n, c_out, 1, 1)
    _, m, k, subdim = codebooks.shape
    (sh, sw), (dh, dw) = stride, dilation
    # Stride phases: position (qy*sh + ry, qx*sw + rx) -> ((ry*sw + rx)*Hq + qy)*Wq + qx.
    hq, wq = -(-hp // sh), -(-wp // sw)
    positions = sh * sw * hq * wq
    channels = c // group
    src = np.zeros(group * m * subdim * n * positions + SLACK, np.float32)
    phased = src[:-SLACK].reshape(group, m * subdim, n, sh, sw, hq, wq)
    inner = padded.reshape(n, group, channels, hp, wp).transpose(1, 2, 0, 3, 4)
    if sh == sw == 1:
        phased[:, :channels, :, 0, 0] = inner
    else:
        full = np.zeros((group, channels, n, hq * sh, wq * sw), np.float32)
        full[..., :hp, :wp] = inner
        phased[:, :channels] = full.reshape(group, channels, n, hq, sh, wq, sw).transpose(0, 1, 2, 4, 6, 3, 5)
    shifts = np.empty(kh * kw, np.int64)
    for ky in range(kh):
        for kx in range(kw):
            ry, qy = divmod(ky * dh, sh)[::-1]
            rx, qx = divmod(kx * dw, sw)[::-1]
            shifts[ky * kw + kx] = ((ry * sw + rx) * hq + qy) * wq + qx
    batch_block = max(1, min(n, FRAME_SAMPLE_POSITIONS // positions))
    # Subspaces per table block: independent of the batch, so one code layout serves all batches.
    sub_block = max(1, min(m, TABLE_BUDGET // (4 * k * max(positions, MIN_TABLE_ROW))))
    if k * sub_block * (positions * batch_block + LANES) >= 2 ** 31:
        raise ValueError(f"input of {hp}x{wp} positions is too large for the LUT kernel")
    threads = _threads(parallel)
    items = -(-n // batch_block) * group
    t_chunks = max(1, min(c_out // group, -(-threads // items))) if threads > 1 else 1
    out = np.empty((n, c_out, ho, wo), np.float32)
    kernel = frame_conv_parallel if parallel else frame_conv_serial
    kernel(src, codebooks, kernel_codes.frames(sub_block), shifts, positions, wq, batch_block, sub_block,
           t_chunks, out)
    return out


def _inner_product(x, codebooks, kernel_codes, parallel):
    """One-position samples (N, C) with a 1x1 kernel and group 1 -> (N, C_t). K <= 32: byte-shuffle
    lookups for N <= FC_SHUFFLE_MAX_BATCH where the CPU has them (SHUFFLE_ISA), else pair tables
    of 8-sample vectors for N >= FC_PAIRS8_MIN_BATCH or scalar pair tables per sample; larger K:
    scalar tables per sample."""
    n, c = x.shape
    _, m, k, subdim = codebooks.shape
    c_out = kernel_codes.codes.shape[0]
    threads = _threads(parallel)
    if SHUFFLE_ISA is not None and k <= TABLE_ENTRIES and n <= FC_SHUFFLE_MAX_BATCH:
        c32 = -(-c_out // SHUFFLE_OUTPUTS) * SHUFFLE_OUTPUTS
        xs = np.zeros((n, m * subdim), np.float32)
        xs[:, :c] = x
        out = np.empty((n, c32), np.float32)
        t_chunks = max(1, min(c32 // SHUFFLE_OUTPUTS, -(-threads // n))) if threads > 1 else 1
        kernel = fc_shuffle_parallel if parallel else fc_shuffle_serial
        kernel(xs, codebooks, kernel_codes.shuffle(), k > TABLE_ENTRIES // 2, t_chunks, out)
        return out[:, :c_out]
    pairs, width, rows, words = kernel_codes.fc(k)
    c8 = -(-c_out // 8) * 8
    if pairs and n >= FC_PAIRS8_MIN_BATCH:
        chunks = -(-n // LANES)
        length = rows * 2 * subdim * LANES
        xt = np.zeros((chunks, length + SLACK), np.float32)
        padded = np.zeros((chunks * LANES, c), np.float32)
        padded[:n] = x
        xt[:, :c * LANES] = padded.reshape(chunks, LANES, c).transpose(0, 2, 1).reshape(chunks, -1)
        out = np.empty((chunks, c8 * LANES), np.float32)
        t_chunks = max(1, min(c8 // 8, -(-threads // chunks))) if threads > 1 else 1
        kernel = fc_pairs8_parallel if parallel else fc_pairs8_serial
        kernel(xt, codebooks, words, t_chunks, out)
        return out.reshape(chunks, c8, LANES).transpose(0, 2, 1).reshape(chunks * LANES, c8)[:n, :c_out]
    xs = np.zeros((n, rows * (2 if pairs else 1) * subdim), np.float32)
    xs[:, :c] = x
    out = np.empty((n, c8), np.float32)
    t_chunks = max(1, min(out.shape[1] // 8, -(-threads // n))) if threads > 1 else 1
    kernel = fc_tables_parallel if parallel else fc_tables_serial
    kernel(xs, codebooks, words, pairs, width, t_chunks, out)
    return out[:, :c_out]
