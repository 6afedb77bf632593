"""Numba kernel of error correction: the code (B) update of one block by enumeration.

A block is one subspace m of one codebook. For every output channel c (of each
group sharing the codebook) and kernel position p, the code b_p(c) is chosen
among the K codewords to minimise the block objective with everything else
fixed. With H = S^T R (the inputs' correlation with the residual that excludes
this block) and Gram blocks G_pq = S_p^T S_q, the cost of codeword k at (c, p) is

    cost_k = D_k^T G_pp D_k - 2 D_k . (H_p(c) - sum_{q != p} G_pq w_q(c))

where w_q(c) is the current sub-vector at position q: no pass over the N samples.
Positions of one channel are coupled through G_pq, so they are visited in order
(Gauss-Seidel); channels are independent. Arrays keep channels last so the
inner loops run over contiguous channels (vectorised); the parallel variant
spreads tiles of channels over threads and gives the same result as the serial one.
"""

import numpy as np
from numba import prange

from qcnn.kernels.jit import serial_and_parallel

TILE = 256  # channels per unit of work


def _assign_codes(target, gram, book, quad, codes, vectors):
    """Best code at each (position, channel), keeping the old one unless strictly better.

    Parameters
    ----------
    target : float64 (ng, P, d, C)
        H: ``S_p^T R`` for group g, position p, channel c.
    gram : float64 (ng, P, d, P, d)
        Gram blocks ``G_pq = S_p^T S_q`` of each group.
    book : float64 (K, d)
        The codebook D.
    quad : float64 (ng, P, K)
        ``D_k^T G_pp D_k``.
    codes : int64 (ng, P, C)
        Codes, updated in place.
    vectors : float64 (ng, P, d, C)
        The chosen codewords ``book[codes]`` (channels last), updated in place.
    """
    ng, positions, d, channels = target.shape
    tiles = (channels + TILE - 1) // TILE
    for i in prange(ng * tiles):
        g = i // tiles
        lo = (i % tiles) * TILE
        n = min(channels, lo + TILE) - lo
        h = np.empty((d, n))
        cost = np.empty(n)
        best_cost = np.empty(n)
        for p in range(positions):
            # h = H_p - sum_{q != p} G_pq w_q
            for a in range(d):
                for c in range(n):
                    h[a, c] = target[g, p, a, lo + c]
                for q in range(positions):
                    if q != p:
                        for b in range(d):
                            weight = gram[g, p, a, q, b]
                            for c in range(n):
                                h[a, c] -= weight * vectors[g, q, b, lo + c]
            for c in range(n):
                old = codes[g, p, lo + c]
                s = quad[g, p, old]
                for a in range(d):
                    s -= 2.0 * book[old, a] * h[a, c]
                best_cost[c] = s
            for k in range(book.shape[0]):
                cost[:] = quad[g, p, k]
                for a in range(d):
                    twice = 2.0 * book[k, a]
                    for c in range(n):
                        cost[c] -= twice * h[a, c]
                for c in range(n):
                    if cost[c] < best_cost[c]:
                        best_cost[c] = cost[c]
                        codes[g, p, lo + c] = k
            for a in range(d):
                for c in range(n):
                    vectors[g, p, a, lo + c] = book[codes[g, p, lo + c], a]


assign_codes_serial, assign_codes_parallel = serial_and_parallel(_assign_codes)
