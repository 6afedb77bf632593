"""k-means in many small subspaces: the codebook learning of product quantization.

:func:`kmeans` clusters each of M subspaces independently (K codewords per
subspace) with the Numba kernels of :mod:`qcnn.kernels.kmeans`.

Guarantees (per subspace; the data is taken as float32, the codebook precision):

* **Exact when possible.** With at most K distinct points the codebook holds
  them all and the distortion is exactly 0.
* **Monotone in K** (with ``monotone=True``, the default). For the same data,
  seed and options, the distortion for K + 1 codewords is never larger than
  for K. The codebook is grown one
  codeword at a time (stage k adds a codeword by greedy k-means++ seeding and
  runs Lloyd iterations, neither of which can raise the distortion), and the
  run for K passes through exactly the result for every smaller K.
* **All codewords used** whenever there are more than K distinct points
  (empty clusters are re-seeded with the point farthest from its codeword).
* **Reproducible**: the result depends only on the input array, K, ``seed``,
  ``n_init``, ``max_iter`` and ``tol``; ``parallel`` and the thread count
  change the speed, not one bit of the result.

The monotone guarantee costs time: growing to K runs K Lloyd stages instead
of one. Each starts from the previous optimum and the kernels only examine
points whose bounds say they might move, but it remains 4-6 times the work
of one k-means run; ``monotone=False`` gives that single run (greedy
k-means++ seeding of all K codewords, then Lloyd) when speed matters more.
See ``benchmarks/README.md`` for times against scikit-learn and faiss.
"""

from typing import NamedTuple

import numpy as np

from qcnn.errors import QcnnError
from qcnn.kernels.kmeans import kmeans_batch_parallel, kmeans_batch_serial

MAX_CODEWORDS = 256
MAX_ABS_VALUE = 1e15  # squared distances must not overflow float32


class KMeansResult(NamedTuple):
    """Result of :func:`kmeans`.

    Attributes
    ----------
    codebooks : float32 (M, K, d)
        Codeword k of subspace m is ``codebooks[m, k]``.
    codes : uint8 (M, n)
        Index of the codeword of each point, < K.
    distortion : float64 (M,)
        Sum over the n points of the squared distance to their codeword
        (each point's in float32, the sum in float64).
    iterations : int64 (M,)
        Lloyd iterations of the last growth stage (0 when the subspace was
        quantized exactly without iterating).

    For 2-D input the M axis is absent: (K, d), (n,), a float and an int.
    """

    codebooks: np.ndarray
    codes: np.ndarray
    distortion: np.ndarray
    iterations: np.ndarray


def _check_int(name, value, low, high=None):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise QcnnError(f"k-means: {name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f"{low}..{high}" if high is not None else f">= {low}"
        raise QcnnError(f"k-means: {name} must be {bounds}, got {value}")
    return int(value)


def kmeans(subvectors, num_codewords, *, seed=0, n_init=1, max_iter=100, tol=1e-6, parallel=True,
           monotone=True):
    """Independent k-means in each of M subspaces.

    Parameters
    ----------
    subvectors : array_like, float (M, n, d) or (n, d)
        M subspaces of n points of dimension d; (n, d) means M = 1 and the
        result has no M axis. Converted to float32; values must be finite and
        below 1e15 in magnitude.
    num_codewords : int
        K, the codewords per subspace, 1..256.
    seed : int or numpy.random.SeedSequence or numpy.random.Generator
        Seeds ``numpy.random.default_rng``, which draws one random stream per
        subspace and restart.
    n_init : int
        Restarts (different k-means++ draws); the lowest distortion is kept. The
        first restarts are the same for any ``n_init``, so more are never worse.
    max_iter : int
        Most Lloyd iterations per growth stage (one stage per codeword).
    tol : float
        A stage stops when an iteration lowers the distortion by less than
        ``tol`` times its previous value (or when no point moves).
    parallel : bool
        Spread the subspaces over Numba's threads (``numba.set_num_threads``).
        The result is bit-identical either way.
    monotone : bool
        True (the default): Lloyd iterations after every added codeword, so the
        distortion never grows with K (see the module notes). False: plain
        greedy k-means++ seeding of all K codewords, then one Lloyd run -- 4-6
        times faster, distortion about 1% higher (like scikit-learn's), and no
        guarantee in K. Exactness, empty-cluster repair and reproducibility
        hold either way.

    Returns
    -------
    KMeansResult
        ``codebooks`` float32 (M, K, d), ``codes`` uint8 (M, n),
        ``distortion`` float64 (M,), ``iterations`` int64 (M,).

    Raises
    ------
    QcnnError
        On a wrong number of dimensions, no points, d = 0, non-numeric or
        non-finite values, K outside 1..256, or bad options.

    Notes
    -----
    Each restart grows the codebook from the mean of all points (K = 1) to K
    codewords, adding one at a time by greedy k-means++ seeding (2 + ln k
    candidates drawn with probability proportional to the squared distance to
    the current codewords; the one that lowers the distortion most wins),
    each addition followed by Lloyd iterations (with ``monotone``). The
    result for K is the last stage, so it is never worse than the result for
    any smaller K.
    """
    k = _check_int("num_codewords (K)", num_codewords, 1, MAX_CODEWORDS)
    n_init = _check_int("n_init", n_init, 1)
    max_iter = _check_int("max_iter", max_iter, 1)
    try:
        tol = float(tol)
    except (TypeError, ValueError):
        raise QcnnError(f"k-means: tol must be a number, got {tol!r}") from None
    if not np.isfinite(tol) or tol < 0:
        raise QcnnError(f"k-means: tol must be finite and >= 0, got {tol}")

    array = np.asarray(subvectors)
    if array.dtype.kind not in "biuf":
        raise QcnnError(f"k-means: subvectors must be real numbers, got dtype {array.dtype}")
    if array.ndim not in (2, 3):
        raise QcnnError(f"k-means: subvectors must be (M, n, d) or (n, d), got shape {array.shape}")
    squeeze = array.ndim == 2
    if squeeze:
        array = array[None]
    m, n, d = array.shape
    if n == 0:
        raise QcnnError(f"k-means: no points to cluster (shape {array.shape})")
    if d == 0:
        raise QcnnError(f"k-means: points have dimension 0 (shape {array.shape})")
    x = np.ascontiguousarray(array, dtype=np.float32)
    if x.size:
        if not np.isfinite(x).all():
            raise QcnnError("k-means: subvectors contain NaN or infinity")
        if np.abs(x).max() >= MAX_ABS_VALUE:
            raise QcnnError(f"k-means: subvector values must be below {MAX_ABS_VALUE:g} in magnitude")

    try:
        rng = np.random.default_rng(seed)
    except (TypeError, ValueError):
        raise QcnnError(f"k-means: seed must be an integer, a SeedSequence or a Generator, "
                        f"got {seed!r}") from None
    # restart r of every subspace draws from the r-th block of M: more restarts keep the
    # earlier ones, so the result with n_init + 1 is never worse than with n_init
    seeds = rng.integers(0, np.iinfo(np.int64).max, size=(n_init, m), dtype=np.int64)
    seeds = np.ascontiguousarray(seeds.T).view(np.uint64)
    codebooks = np.zeros((m, k, d), np.float32)
    codes = np.zeros((m, n), np.uint8)
    distortion = np.zeros(m, np.float64)
    iterations = np.zeros(m, np.int64)
    if m:
        batch = kmeans_batch_parallel if parallel else kmeans_batch_serial
        batch(x, x.view(np.uint32), k, n_init, max_iter, tol, bool(monotone), seeds, codebooks, codes,
              distortion, iterations)
    if squeeze:
        return KMeansResult(codebooks[0], codes[0], float(distortion[0]), int(iterations[0]))
    return KMeansResult(codebooks, codes, distortion, iterations)
