"""Product quantization of convolution and inner-product weights (Q-CNN, section 1).

A weight tensor ``W`` of shape (C_t, C_s, kh, kw) (an inner product is the
1x1 case) is cut along the input-channel axis C_s into ``M = ceil(C_s /
subdim)`` subspaces of ``subdim`` (C'_s) channels; the last subspace is
zero-padded when ``subdim`` does not divide C_s (the matching input channels
are zero too, so results are unchanged). In subspace m every sub-vector
``W[t, m*subdim:(m+1)*subdim, y, x]`` is replaced by the nearest of ``K``
codewords ``D^(m)_k``; the codebook is shared by all kernel positions and
output channels (and, optionally, by the groups of a grouped convolution).

Shapes used throughout:

``codebooks``  float32 (G_cb, M, K, subdim): G_cb = 1 when shared, else ``group``
``codes``      uint8 (C_t, kh, kw, M): the codeword index of each sub-vector
"""

import math

import numpy as np

from qcnn.errors import QcnnError


def num_subspaces(channels, subdim):
    """``M = ceil(channels / subdim)``."""
    return -(-int(channels) // int(subdim))


def code_bits(num_codewords):
    """Bits per stored code: ``ceil(log2 K)`` (at least 1)."""
    return max(1, math.ceil(math.log2(num_codewords)))


def storage_bytes(weight_shape, group, subdim, num_codewords, shared=True, codebook_bytes=4):
    """Bytes of the codebooks plus codes at ``code_bits(K)`` bits (biases not included).

    The paper's accounting: 4 * C_s * K (per codebook, float32) + C_t * kh * kw * M * log2(K) / 8;
    ``codebook_bytes=2`` for float16 codebooks.
    """
    c_out, channels, kh, kw = weight_shape
    m = num_subspaces(channels, subdim)
    books = 1 if shared else group
    return codebook_bytes * books * m * num_codewords * subdim + \
        -(-c_out * kh * kw * m * code_bits(num_codewords) // 8)


def subvectors(weight, group, subdim, shared=True):
    """The sub-vectors k-means clusters, per codebook and subspace.

    Parameters
    ----------
    weight : ndarray (C_t, C_s, kh, kw)
        C_s is the number of input channels per group.
    group : int
    subdim : int
    shared : bool
        One codebook for all groups (the authors' choice) or one per group.

    Returns
    -------
    ndarray float32 (G_cb, M, n, subdim)
        ``n = C_t * kh * kw`` when shared, else ``C_t / group * kh * kw``.
    """
    c_out, c_s, kh, kw = weight.shape
    m = num_subspaces(c_s, subdim)
    padded = np.zeros((c_out, m * subdim, kh, kw), np.float32)
    padded[:, :c_s] = weight
    # (G, C_t/G, M, subdim, kh, kw) -> (G, M, C_t/G, kh, kw, subdim)
    vectors = padded.reshape(group, c_out // group, m, subdim, kh, kw).transpose(0, 2, 1, 4, 5, 3)
    vectors = vectors.reshape(group, m, -1, subdim)
    if shared and group > 1:
        vectors = vectors.transpose(1, 0, 2, 3).reshape(1, m, -1, subdim)
    return np.ascontiguousarray(vectors)


def quantize_weight(weight, group=1, subdim=8, num_codewords=128, shared=True, seed=0, **kmeans_options):
    """Learn codebooks and codes for ``weight`` by k-means in each subspace.

    Parameters
    ----------
    weight : ndarray (C_t, C_s, kh, kw), or (C_t, C_s) for an inner product
    group, subdim, num_codewords, shared, seed
        See :func:`subvectors`; ``num_codewords`` is K (1..256).
    **kmeans_options
        Passed to :func:`qcnn.quantization.kmeans.kmeans`.

    Returns
    -------
    codebooks : float32 (G_cb, M, K, subdim)
    codes : uint8 (C_t, kh, kw, M)
    """
    weight = np.asarray(weight, np.float32)
    if weight.ndim == 2:
        weight = weight[:, :, None, None]
    c_out, c_s, kh, kw = weight.shape
    if subdim < 1 or not 1 <= num_codewords <= 256:
        raise QcnnError(f"subdim must be >= 1 and K in 1..256, got subdim {subdim}, K {num_codewords}")
    if c_out % group:
        raise QcnnError(f"{c_out} output channels are not divisible by group {group}")
    # Imported here: k-means needs Numba (0.3 s to import), running a quantized model does not.
    from qcnn.quantization.kmeans import kmeans

    vectors = subvectors(weight, group, subdim, shared)
    g_cb, m, n, _ = vectors.shape
    result = kmeans(vectors.reshape(g_cb * m, n, subdim), num_codewords, seed=seed, **kmeans_options)
    codebooks = result.codebooks.reshape(g_cb, m, num_codewords, subdim)
    # codes back from (G_cb, M, [G,] C_t/G, kh, kw) to (C_t, kh, kw, M)
    codes = result.codes.reshape(g_cb, m, -1)
    codes = codes.reshape(m, group, c_out // group, kh, kw) if g_cb == 1 and group > 1 else \
        codes.reshape(g_cb, m, c_out // group, kh, kw).transpose(1, 0, 2, 3, 4)
    codes = codes.transpose(1, 2, 3, 4, 0).reshape(c_out, kh, kw, m)
    return codebooks.astype(np.float32), np.ascontiguousarray(codes, np.uint8)


def decode(codebooks, codes, channels):
    """Rebuild the dense weights ``W_q = D B`` from codebooks and codes.

    Parameters
    ----------
    codebooks : float32 (G_cb, M, K, subdim)
    codes : uint8 (C_t, kh, kw, M)
    channels : int
        C_s, input channels per group (the padding of the last subspace is cut off).

    Returns
    -------
    float32 (C_t, C_s, kh, kw)
    """
    g_cb, m, k, subdim = codebooks.shape
    c_out = codes.shape[0]
    book = (np.arange(c_out, dtype=np.intp) * g_cb // c_out)[:, None, None, None]  # codebook of each output
    # Index of each sub-vector's codeword among all G_cb * M * K codewords.
    rows = (book * m + np.arange(m, dtype=np.intp)) * k + codes
    # Each codeword as one opaque subdim*4-byte element: a 1-D take copies whole codewords.
    words = np.ascontiguousarray(codebooks, np.float32).view(np.dtype((np.void, 4 * subdim))).ravel()
    vectors = np.take(words, rows).view(np.float32)  # (C_t, kh, kw, M * subdim)
    weight = vectors[..., :channels]
    return np.ascontiguousarray(weight.transpose(0, 3, 1, 2))


def pack_codes(codes, bits):
    """Bit-pack integer codes, ``bits`` per value, little-endian bit order.

    Returns uint8 array of ``ceil(codes.size * bits / 8)`` bytes.
    """
    flat = np.asarray(codes, np.uint16).ravel()
    planes = ((flat[:, None] >> np.arange(bits, dtype=np.uint16)) & 1).astype(np.uint8)
    return np.packbits(planes.ravel(), bitorder="little")


def unpack_codes(packed, bits, shape):
    """Inverse of :func:`pack_codes`: uint8 codes of ``shape``."""
    count = int(np.prod(shape))
    planes = np.unpackbits(np.asarray(packed, np.uint8), count=count * bits, bitorder="little")
    weights = (1 << np.arange(bits, dtype=np.uint16))
    return (planes.reshape(count, bits).astype(np.uint16) @ weights).astype(np.uint8).reshape(shape)
