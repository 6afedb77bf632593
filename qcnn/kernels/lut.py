"""Lookup-table accumulation, the inner loop of Q-CNN inference.

Given per-position lookup tables ``LUT[m, y, x, k] = <S^(m)_(y,x), D^(m)_k>``
(input sub-vector times codeword, built with BLAS by the caller), every
output is a sum of table entries chosen by the codes:

    T[t, oy, ox] = sum over m, ky, kx of LUT[m, oy*sh + ky*dh, ox*sw + kx*dw, code[m, ky, kx, t]]

An inner product is the case of a 1x1 input and kernel. The loop over output
channels t is innermost: its codes are contiguous and the K-entry table row
is reused from L1 cache, so the loop is a gather-add that LLVM vectorises.
"""

import numpy as np
from numba import prange

from qcnn.kernels.jit import serial_and_parallel

BLOCK = 256  # output channels per work item: accumulators stay in L1


def _lut_accumulate(lut, codes, stride_h, stride_w, dilation_h, dilation_w, out):
    """Accumulate table entries into ``out``.

    Parameters
    ----------
    lut : float32 (N, G, M, Hp, Wp, K)
        Tables for every (padded) input position, per group and subspace.
    codes : uint8 (G, M, kh, kw, C_t/G)
    stride_h, stride_w, dilation_h, dilation_w : int
    out : float32 (N, G, C_t/G, Ho, Wo)
        Overwritten with the sums.
    """
    n_batch, n_group, n_sub = lut.shape[0], lut.shape[1], lut.shape[2]
    kh, kw, c_group = codes.shape[2], codes.shape[3], codes.shape[4]
    ho, wo = out.shape[3], out.shape[4]
    n_blocks = (c_group + BLOCK - 1) // BLOCK
    for job in prange(n_batch * n_group * ho * n_blocks):
        block = job % n_blocks
        oy = (job // n_blocks) % ho
        g = (job // (n_blocks * ho)) % n_group
        n = job // (n_blocks * ho * n_group)
        t0 = block * BLOCK
        t1 = min(c_group, t0 + BLOCK)
        acc = np.empty(t1 - t0, np.float32)
        for ox in range(wo):
            acc[:] = 0.0
            for m in range(n_sub):
                for ky in range(kh):
                    iy = oy * stride_h + ky * dilation_h
                    for kx in range(kw):
                        row = lut[n, g, m, iy, ox * stride_w + kx * dilation_w]
                        index = codes[g, m, ky, kx]
                        for t in range(t1 - t0):
                            acc[t] += row[index[t0 + t]]
            out[n, g, t0:t1, oy, ox] = acc


lut_accumulate_serial, lut_accumulate_parallel = serial_and_parallel(_lut_accumulate)


def prepare_codes(codes, group):
    """Codes (C_t, kh, kw, M) uint8 rearranged for :func:`lut_conv`: (G, M, kh, kw, C_t/G)."""
    c_out, kh, kw, m = codes.shape
    return np.ascontiguousarray(codes.reshape(group, c_out // group, kh, kw, m).transpose(0, 4, 2, 3, 1))


def lut_conv(padded, codebooks, kernel_codes, group, stride, dilation, out_size, parallel=True):
    """Product-quantized convolution by lookup tables.

    Parameters
    ----------
    padded : float32 (N, C, Hp, Wp)
        Input, already padded (C = group * C_s).
    codebooks : float32 (G_cb, M, K, subdim)
        G_cb is 1 (shared by all groups) or ``group``.
    kernel_codes
        :func:`prepare_codes` of the layer's codes.
    group : int
    stride, dilation, out_size : (int, int)
    parallel : bool
        Use the multi-threaded kernel.

    Returns
    -------
    float32 (N, C_t, Ho, Wo)
    """
    n, c, hp, wp = padded.shape
    books, m, k, subdim = codebooks.shape
    channels = c // group
    # Input sub-vectors (N, G, M, Hp*Wp, subdim), zero past the last channel; tables by BLAS.
    sub = np.zeros((n, group, m * subdim, hp * wp), np.float32)
    sub[:, :, :channels] = padded.reshape(n, group, channels, hp * wp)
    sub = sub.reshape(n, group, m, subdim, hp * wp).transpose(0, 1, 2, 4, 3)
    if books == 1:
        codebooks = np.broadcast_to(codebooks, (group,) + codebooks.shape[1:])
    lut = np.matmul(sub, codebooks.transpose(0, 1, 3, 2)).reshape(n, group, m, hp, wp, k)
    c_group = kernel_codes.shape[-1]
    out = np.empty((n, group, c_group) + tuple(out_size), np.float32)
    accumulate = lut_accumulate_parallel if parallel else lut_accumulate_serial
    accumulate(lut, kernel_codes, stride[0], stride[1], dilation[0], dilation[1], out)
    return out.reshape(n, group * c_group, *out_size)
