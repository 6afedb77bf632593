"""Error correction (EC): codebooks and codes fitted to a layer's response (Q-CNN, section 1).

k-means (:func:`qcnn.quantization.pq.quantize_weight`) minimises the error of the
weights; EC minimises the error of what the layer computes on calibration
data, starting from the k-means solution:

    min_{D, B}  sum_n sum_{c_t} ( T_n(c_t) - sum_{p, m} < D^(m)_{b_{p,m}(c_t)}, S^(g(c_t))_{n,p}^(m) > )^2

with T the original float layer's response (bias removed), S the input patches
of group g, p the kernel positions, m the subspaces and b the codes. An
inner-product layer is the case of one group and one position.

Weight prior (optional, ``prior = alpha > 0`` with the float weights W): the
objective gains ``mu ||W - W_q||^2`` per group, ``mu = alpha trace(S^T S) / L``
(the mean diagonal of the Gram matrix, L = M * P * subdim rows of the weights in
the solver's layout, padding included). With few calibration inputs the plain
objective over-fits them; the prior keeps W_q near the weights that k-means
approximates (alpha -> infinity: k-means on the weights, with codes shared by
the kernel positions' codebook as usual). In the statistics below this is
exactly ``Sigma += mu I`` and ``S^T T += mu W`` (plus the constant
``mu ||W||^2``), so the solver, its steps' safety checks and the reported
objective are all of the penalised objective.

Solver: block coordinate descent. A block is one subspace m of one codebook
(shared by all kernel positions, and by all groups when the codebook is).
Within a block, three steps, each a minimisation of the objective with the
rest fixed (the "residual" of the paper is that rest):

1. *reseed*: codewords no code uses are set to the best sub-vector of the
   (channel, position) that fits worst; unused, they do not change the objective;
2. *B step*: every code by enumeration of the K codewords (positions of one
   channel in turn, see :mod:`qcnn.kernels.ec`);
3. *D step*: the codebook by exact linear least squares (normal equations).

The objective of a block is a quadratic form in the block's weights, so it is
evaluated exactly from small matrices; a step that would raise it (rounding)
is undone. The objective therefore never increases.

Everything is computed from the sufficient statistics ``Sigma = S^T S`` (per
group, (L, L) with L = M * P * subdim) and ``S^T T`` (L, C_t / G), accumulated
once over the N samples in chunks, in float64 (see :func:`_statistics`). The
correlation of the inputs with the residual that a block needs,
``H = S^T R = S^T T - Sigma W``, is recomputed from the current weights W for a
batch of subspaces at a time (one matrix product of about ``BATCH_ROWS`` rows)
and corrected inside the batch from its Gram blocks as subspaces change. A
sweep therefore costs about ``2 L^2 C_t`` flops whatever N, instead of the
``4 N L C_t`` of updating an (N, C_t) residual: less whenever N > L / 2, the
usual case (the paper uses thousands of samples per layer).

Memory (float64): ``Sigma`` G * L^2, ``S^T T`` and W L * C_t each, H and the
weight changes of one batch 2 * ``BATCH_ROWS`` * C_t, a chunk of samples
(about ``CHUNK_VALUES`` values), and per block (K * subdim)^2 for the normal
equations. Nothing of size N * C_t or N * C_t * K: the inputs and targets are
read in chunks, never copied whole (unless they must be converted to
float32). AlexNet fc7 (L = C_t = 4096): about 450 MiB.
"""

from typing import NamedTuple

import numpy as np
import scipy.linalg
import scipy.sparse
from scipy.linalg.blas import dgemm

from qcnn.errors import QcnnError
from qcnn.kernels.ec import assign_codes_parallel, assign_codes_serial
from qcnn.quantization.pq import num_subspaces

CHUNK_VALUES = 1 << 22  # samples are read in chunks of about this many patch values
BATCH_ROWS = 128  # rows of H per matrix product in a sweep (whole subspaces; more cost more
# to correct inside the batch, fewer make the product less efficient)
PARALLEL_WORK = 1 << 22  # multiply-adds of a B step below which threads cost more than they gain


class ECResult(NamedTuple):
    """Result of :func:`error_correct`.

    Attributes
    ----------
    codebooks : float32 (G_cb, M, K, subdim)
    codes : uint8 (C_t, kh, kw, M)
    objective : list of float
        The objective before EC, then after each iteration (non-increasing).
        The first value is computed from the samples; the next ones by
        subtracting each step's exact decrease, so they match
        :func:`objective` of the result up to float32 rounding.
    iterations : int
        Iterations (sweeps over all blocks) run.
    """

    codebooks: np.ndarray
    codes: np.ndarray
    objective: list
    iterations: int


def error_correct(inputs, targets, codebooks, codes, group=1, *, max_iter=20, tol=1e-4, ridge=1e-6,
                  prior=0.0, weight=None, progress=None, parallel=True):
    """Refine product-quantization codebooks and codes to preserve a layer's response.

    Parameters
    ----------
    inputs : float32 (G, N, P, C_s)
        The input patches S: G groups (``group``), N samples (images times
        sampled output positions), P = kh * kw kernel positions (row-major,
        as in the codes' (kh, kw)), C_s input channels per group. An inner
        product is G = P = 1.
    targets : float32 (N, C_t)
        T: the original float layer's response, bias removed. Output channel
        c_t belongs to group ``c_t // (C_t / G)``.
    codebooks : float32 (G_cb, M, K, subdim)
        D, initial codebooks (k-means); G_cb is 1 (shared by the groups) or G.
    codes : uint8 (C_t, kh, kw, M)
        B, initial codes.
    group : int
        G, the number of convolution groups.
    max_iter : int
        Most iterations (sweeps over all blocks).
    tol : float
        Stop when an iteration lowers the objective by at most ``tol`` times its value.
    ridge : float
        Regularisation of the D step relative to the mean diagonal of its
        normal equations, pulling toward the current codebook (so it stays a
        descent step and unused codewords stay put). > 0.
    progress : callable or None
        ``progress(iteration, objective)``, called with 0 and the initial
        objective, then after every iteration.
    parallel : bool
        Spread the B step of large blocks over Numba's threads (same result either way).

    Returns
    -------
    ECResult
        ``codebooks`` float32 (G_cb, M, K, subdim), ``codes`` uint8
        (C_t, kh, kw, M), ``objective`` list of floats (of the penalised
        objective when ``prior > 0``), ``iterations``.

    Raises
    ------
    QcnnError
        On inconsistent shapes, non-numeric or non-finite values, codes >= K,
        or bad options.

    Notes
    -----
    Time: one pass over the samples (``N L (L + C_t)`` flops, L = M P subdim)
    to accumulate statistics and one more for the initial objective, then per
    iteration about ``2 L^2 C_t`` flops for H plus, per block, the B step
    (``C_t P (P subdim^2 + K subdim)``) and a (K subdim)-sized linear solve.
    Memory: see the module notes; about ``8 (G L^2 + 2 L C_t)`` bytes.
    """
    layer = _validate(inputs, targets, codebooks, codes, group)
    max_iter = _check_int("max_iter", max_iter, 0)
    tol = _check_float("tol", tol, lambda v: v >= 0, ">= 0")
    ridge = _check_float("ridge", ridge, lambda v: v > 0, "> 0")
    penalty = _prior(layer, prior, weight)
    if progress is not None and not callable(progress):
        raise QcnnError(f"error correction: progress must be callable, got {progress!r}")
    codebooks = layer.codebooks.copy()
    work_codes = np.ascontiguousarray(layer.codes, dtype=np.int64)
    decoded = _layer_weights(codebooks, work_codes)
    value = _penalised_sum(layer, decoded, penalty)
    sigma, cross = _statistics(layer)
    if penalty is not None:
        mu, float_weights = penalty
        diagonal = np.arange(sigma.shape[1])
        for g in range(len(sigma)):
            sigma[g, diagonal, diagonal] += mu[g]
            cross[g] += mu[g] * float_weights[g]
    history = [value]
    if progress is not None:
        progress(0, value)
    weights = [w.astype(np.float64) for w in decoded]
    descent = _Descent(sigma, cross, weights, codebooks, work_codes, ridge, parallel)
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        value = max(0.0, history[-1] + descent.sweep())
        history.append(value)
        if progress is not None:
            progress(iterations, value)
        if history[-2] - value <= tol * history[-2]:
            break
    codes_out = work_codes.transpose(0, 3, 2, 1).reshape(layer.codes_shape).astype(np.uint8)
    return ECResult(codebooks, codes_out, history, iterations)


def objective(inputs, targets, codebooks, codes, group=1, *, prior=0.0, weight=None):
    """The EC objective ``sum_n ||T_n - (W_q S)_n||^2`` of a quantized layer (float).

    Arguments as in :func:`error_correct`. ``sqrt(objective / ||T||^2)`` is the
    relative response error. Computed in chunks of samples (float32 products,
    float64 sum). With ``prior`` alpha > 0 and the float ``weight`` W, the
    penalised objective that :func:`error_correct` then minimises:
    ``+ sum_g mu_g ||W_g - W_q,g||^2``, ``mu_g = alpha trace(S_g^T S_g) / L``.
    """
    layer = _validate(inputs, targets, codebooks, codes, group)
    return _penalised_sum(layer, _layer_weights(layer.codebooks, layer.codes), _prior(layer, prior, weight))


class _Layer(NamedTuple):
    inputs: np.ndarray  # float32 (G, N, P, C_s)
    targets: np.ndarray  # float32 (N, C_t)
    codebooks: np.ndarray  # float32 (G_cb, M, K, subdim)
    codes: np.ndarray  # (G, M, P, C_t / G) view of the caller's codes
    codes_shape: tuple  # (C_t, kh, kw, M)


def _validate(inputs, targets, codebooks, codes, group):
    group = _check_int("group", group, 1)
    inputs = _real_array("inputs", inputs, 4, "(G, N, P, C_s)")
    targets = _real_array("targets", targets, 2, "(N, C_t)")
    codebooks = _real_array("codebooks", codebooks, 4, "(G_cb, M, K, subdim)")
    codes_in = np.asarray(codes)
    if codes_in.dtype.kind not in "iu" or codes_in.ndim != 4:
        raise QcnnError(f"error correction: codes must be integers (C_t, kh, kw, M), got dtype "
                        f"{codes_in.dtype} shape {codes_in.shape}")
    g, n, positions, channels = inputs.shape
    c_t, kh, kw, m = codes_in.shape
    g_cb, m_books, k, subdim = codebooks.shape
    checks = [
        (g == group, f"inputs have {g} groups, expected group = {group}"),
        (n > 0 and channels > 0, f"inputs {inputs.shape} have no samples or no channels"),
        (targets.shape[0] == n, f"targets {targets.shape} and inputs {inputs.shape} differ in N"),
        (c_t == targets.shape[1], f"codes {codes_in.shape} and targets {targets.shape} differ in C_t"),
        (c_t % group == 0, f"{c_t} output channels are not divisible by group {group}"),
        (kh * kw == positions, f"codes {codes_in.shape} have {kh * kw} kernel positions, inputs {positions}"),
        (g_cb in (1, group), f"codebooks {codebooks.shape}: G_cb must be 1 or group = {group}"),
        (1 <= k <= 256 and subdim >= 1, f"codebooks {codebooks.shape}: need 1 <= K <= 256, subdim >= 1"),
        (m == m_books == num_subspaces(channels, subdim),
         f"codes {codes_in.shape} and codebooks {codebooks.shape} must have M = ceil({channels} / {subdim})"),
    ]
    for ok, message in checks:
        if not ok:
            raise QcnnError(f"error correction: {message}")
    if codes_in.size and (codes_in.min() < 0 or codes_in.max() >= k):
        raise QcnnError(f"error correction: codes must be in 0..{k - 1}")
    layer_codes = codes_in.reshape(group, c_t // group, positions, m).transpose(0, 3, 2, 1)
    return _Layer(inputs, targets, codebooks, layer_codes, codes_in.shape)


def _real_array(name, value, ndim, shape):
    array = np.asarray(value)
    if array.dtype.kind not in "biuf" or array.ndim != ndim:
        raise QcnnError(f"error correction: {name} must be real numbers {shape}, got dtype "
                        f"{array.dtype} shape {array.shape}")
    array = np.asarray(array, np.float32)
    if not np.isfinite(array).all():
        raise QcnnError(f"error correction: {name} contain NaN or infinity (in float32)")
    return array


def _check_int(name, value, low):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < low:
        raise QcnnError(f"error correction: {name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _check_float(name, value, ok, bounds):
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise QcnnError(f"error correction: {name} must be a number, got {value!r}") from None
    if not (np.isfinite(value) and ok(value)):
        raise QcnnError(f"error correction: {name} must be finite and {bounds}, got {value}")
    return value


def _patch_rows(patches, subdim, m):
    """Patches (n, P, C_s) as rows (n, L) float32, columns ordered (subspace, position, j).

    The channels are zero-padded to M * subdim, matching the codebooks' padding.
    """
    n, positions, channels = patches.shape
    padded = np.zeros((n, positions, m * subdim), np.float32)
    padded[:, :, :channels] = patches
    return padded.reshape(n, positions, m, subdim).transpose(0, 2, 1, 3).reshape(n, -1)


def _layer_weights(codebooks, codes):
    """Weights of each group, (L, C) float32, rows ordered like :func:`_patch_rows`' columns.

    ``codebooks`` (G_cb, M, K, subdim), ``codes`` (G, M, P, C).
    """
    return [_gather(codebooks[g if len(codebooks) > 1 else 0], codes[g]).reshape(-1, codes.shape[-1])
            for g in range(len(codes))]


def _gather(book, codes):
    """Codewords ``book[..., codes, :]`` with the channels last: (..., P, subdim, C).

    ``book`` (K, subdim) or (M, K, subdim) with ``codes`` (..., P, C) or (M, P, C).
    """
    if book.ndim == 3:
        vectors = book[np.arange(book.shape[0])[:, None, None], codes]
    else:
        vectors = book[codes]
    return np.ascontiguousarray(np.swapaxes(vectors, -1, -2))


def _chunks(layer):
    """(group, patch rows (n, L) float32, targets (n, C_t / G)) for each chunk of samples and group."""
    group, n, positions, _ = layer.inputs.shape
    _, m, _, subdim = layer.codebooks.shape
    per_group = layer.targets.shape[1] // group
    step = max(1, CHUNK_VALUES // (m * positions * subdim))
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        for g in range(group):
            columns = slice(g * per_group, (g + 1) * per_group)
            yield g, _patch_rows(layer.inputs[g, rows], subdim, m), layer.targets[rows, columns]


def _statistics(layer):
    """``Sigma = S^T S`` (G, L, L) and ``S^T T`` (G, L, C_t / G), float64, over all samples.

    float64 because the solver takes differences of them (H = S^T T - Sigma W is
    small once the fit is good) and relies on their exact null spaces when the
    inputs are rank-deficient: with float32 statistics the steps' computed
    decreases drift measurably from the true ones.
    """
    group, _, positions, _ = layer.inputs.shape
    _, m, _, subdim = layer.codebooks.shape
    size = m * positions * subdim
    sigma = np.zeros((group, size, size))
    cross = np.zeros((group, size, layer.targets.shape[1] // group))
    for g, x, t in _chunks(layer):
        x = x.astype(np.float64)
        # In place (beta = 1) on the transposes, which are Fortran-ordered as BLAS wants:
        # Sigma^T += x^T x and (S^T T)^T += t^T x.
        dgemm(1.0, x.T, x.T, beta=1.0, c=sigma[g].T, trans_b=True, overwrite_c=True)
        dgemm(1.0, t.astype(np.float64).T, x.T, beta=1.0, c=cross[g].T, trans_b=True, overwrite_c=True)
    return sigma, cross


def _residual_sum(layer, weights):
    """``sum_n ||T_n - W S_n||^2`` (float) for stacked weights (one (L, C) array per group)."""
    total = 0.0
    for g, x, t in _chunks(layer):
        residual = t - x @ weights[g]
        total += float(np.einsum("ij,ij->", residual, residual, dtype=np.float64))
    return total


def _prior(layer, prior, weight):
    """``(mu (G,) float64, W per group (L, C_t / G) float64)`` of the weight prior, or None if alpha = 0."""
    alpha = _check_float("prior", prior, lambda v: v >= 0, ">= 0")
    if alpha == 0:
        return None
    if weight is None:
        raise QcnnError("error correction: prior > 0 needs the float weights (weight=)")
    group, _, positions, channels = layer.inputs.shape
    c_t, kh, kw, m = layer.codes_shape
    w = _real_array("weight", weight, 2 if np.ndim(weight) == 2 else 4, "(C_t, C_s, kh, kw) or (C_t, C_s)")
    if w.ndim == 2:
        w = w[:, :, None, None]
    if w.shape != (c_t, channels, kh, kw):
        raise QcnnError(f"error correction: weight {np.shape(weight)} must be (C_t, C_s, kh, kw) = "
                        f"{(c_t, channels, kh, kw)}")
    subdim = layer.codebooks.shape[3]
    size = m * positions * subdim
    per_group = c_t // group
    # (C_t, C_s, kh, kw) -> rows (C_t, L) ordered like _patch_rows' columns -> per group (L, C_t / G)
    rows = _patch_rows(w.transpose(0, 2, 3, 1).reshape(c_t, positions, channels), subdim, m)
    weights = [rows[g * per_group:(g + 1) * per_group].T.astype(np.float64) for g in range(group)]
    energy = np.zeros(group)
    step = max(1, CHUNK_VALUES // (positions * channels))
    for g in range(group):
        for start in range(0, layer.inputs.shape[1], step):
            x = layer.inputs[g, start:start + step].reshape(-1)
            energy[g] += float(np.dot(x.astype(np.float64), x.astype(np.float64)))
    return alpha * energy / size, weights


def _penalised_sum(layer, weights, penalty):
    """:func:`_residual_sum` plus ``sum_g mu_g ||W_g - W_q,g||^2`` when ``penalty`` is not None."""
    total = _residual_sum(layer, weights)
    if penalty is not None:
        for mu, w, q in zip(*penalty, weights):
            total += float(mu * np.sum(np.square(w - q)))
    return total


class _Descent:
    """Block coordinate descent on the statistics; updates codebooks, codes and weights in place.

    ``sigma`` (G, L, L), ``cross`` (G, L, C) and ``weights`` (G of (L, C)) float64,
    ``codebooks`` float32 (G_cb, M, K, subdim), ``codes`` int64 (G, M, P, C).
    """

    def __init__(self, sigma, cross, weights, codebooks, codes, ridge, parallel):
        self.sigma, self.cross, self.weights = sigma, cross, weights
        self.codebooks, self.codes = codebooks, codes
        self.ridge, self.parallel = ridge, parallel

    def sweep(self):
        """Every block once, in batches of subspaces; returns the objective change (<= 0)."""
        group, m, positions, _ = self.codes.shape
        width = positions * self.codebooks.shape[3]  # rows of one subspace
        per_batch = max(1, BATCH_ROWS // width)
        change = 0.0
        for first in range(0, m, per_batch):
            rows = slice(first * width, min(m, first + per_batch) * width)
            # H = S^T R = S^T T - Sigma W for the batch's rows, from the weights at its start
            base = [self.cross[g, rows] - self.sigma[g, rows] @ self.weights[g] for g in range(group)]
            gram = [_symmetric(self.sigma[g, rows, rows]) for g in range(group)]
            delta = [np.empty_like(b) for b in base]  # the batch's weight changes so far
            for sub in range(first, min(m, first + per_batch)):
                local = slice((sub - first) * width, (sub - first + 1) * width)
                for book in range(self.codebooks.shape[0]):
                    members = np.arange(group) if self.codebooks.shape[0] == 1 else np.array([book])
                    change += self._block(sub, book, members, base, gram, delta, local)
        return change

    def _block(self, sub, book, members, base, gram, delta, local):
        """Update subspace ``sub`` of codebook ``book`` (used by groups ``members``).

        Per group, ``base`` holds H of the batch's rows at its start, ``gram``
        their Gram matrix and ``delta`` the weight changes of the batch's earlier
        subspaces; ``local`` selects this subspace's rows. Records its own change.
        """
        _, _, positions, channels = self.codes.shape
        subdim = self.codebooks.shape[3]
        width = positions * subdim
        rows = slice(sub * width, (sub + 1) * width)
        done = slice(0, local.start)
        old = np.stack([self.weights[g][rows] for g in members])  # (ng, width, C)
        grams = np.stack([gram[g][local, local] for g in members])
        # H now, without this subspace's contribution: base - Sigma (changes so far) + Sigma_mm W_m
        own = np.stack([base[g][local] - gram[g][local, done] @ delta[g][done] for g in members])
        own += grams @ old
        shape = (len(members), positions, subdim)
        book_new, codes_new, new, change = _update_block(
            self.codebooks[book, sub].astype(np.float64), self.codes[members, sub],
            old.reshape(*shape, channels), own.reshape(*shape, channels), grams.reshape(*shape, *shape[1:]),
            self.ridge, self.parallel)
        self.codebooks[book, sub] = book_new
        self.codes[members, sub] = codes_new
        new = new.reshape(old.shape)
        for i, g in enumerate(members):
            delta[g][local] = new[i] - old[i]
            self.weights[g][rows] = new[i]
        return change


def _symmetric(block):
    """``(block + block^T) / 2``: BLAS products are symmetric only up to rounding."""
    return (block + block.T) / 2


def _update_block(book, codes, vectors, target, gram, ridge, parallel):
    """Reseed, B step, D step on one block; a step that raises the objective is undone.

    Parameters
    ----------
    book : float64 (K, subdim)
        Codebook D^(m) (float32 values).
    codes : int64 (ng, P, C)
        Codes of the groups sharing the codebook.
    vectors : float64 (ng, P, subdim, C)
        Their codewords (channels last).
    target : float64 (ng, P, subdim, C)
        H: ``S_p^T R`` with R the residual without this block.
    gram : float64 (ng, P, subdim, P, subdim)
        Gram blocks ``S_p^T S_q``.
    ridge : float
    parallel : bool

    Returns
    -------
    book : float64 (K, subdim), float32 values
    codes : int64 (ng, P, C)
    vectors : float64 (ng, P, subdim, C)
    change : float
        Change of the objective, <= 0.
    """
    start = current = _block_objective(vectors, target, gram)
    book = _reseed_empty(book, codes, vectors, target, gram)
    trial, trial_vectors = codes.copy(), vectors.copy()
    diagonal = np.einsum("gpipj->gpij", gram)
    work = codes.size * (diagonal[0, 0].size + book.size)
    assign = assign_codes_parallel if parallel and work >= PARALLEL_WORK else assign_codes_serial
    assign(target, gram, book, np.einsum("ki,gpij,kj->gpk", book, diagonal, book), trial, trial_vectors)
    value = _block_objective(trial_vectors, target, gram)
    if value <= current:
        codes, vectors, current = trial, trial_vectors, value
    trial_book = _solve_codebook(book, codes, target, gram, ridge)
    trial_vectors = _gather(trial_book, codes)
    value = _block_objective(trial_vectors, target, gram)
    if value <= current:
        book, vectors, current = trial_book, trial_vectors, value
    return book, codes, vectors, current - start


def _block_objective(vectors, target, gram):
    """Block objective minus its constant: ``<W, G W> - 2 <W, H>`` for vectors (ng, P, subdim, C)."""
    ng, positions, subdim, channels = vectors.shape
    flat = vectors.reshape(ng, positions * subdim, channels)
    square = gram.reshape(ng, positions * subdim, -1) @ flat
    return float(np.sum((square - 2 * target.reshape(flat.shape)) * flat))


def _position_cost(vectors, own, diagonal):
    """Cost of sub-vectors (ng, P, subdim, C) alone at their position: ``v^T G_pp v - 2 v . h``."""
    return np.einsum("gpic,gpij,gpjc->gpc", vectors, diagonal, vectors) - 2 * np.sum(vectors * own, 2)


def _reseed_empty(book, codes, vectors, target, gram):
    """Unused codewords set to the best sub-vectors of the (position, channel)s that fit worst.

    For each (position, channel), with the other positions fixed, the best
    sub-vector solves ``G_pp v = h`` (h: H minus the other positions' share);
    the gain is how much it beats the current codeword. The unused codewords
    take the best sub-vectors of the largest positive gains, for the next B
    step to pick up. Unused, they leave the objective unchanged.
    """
    k, subdim = book.shape
    empty = np.flatnonzero(np.bincount(codes.ravel(), minlength=k) == 0)
    if empty.size == 0:
        return book
    ng, positions, _, channels = vectors.shape
    diagonal = np.einsum("gpipj->gpij", gram)
    coupled = gram.reshape(ng, positions * subdim, -1) @ vectors.reshape(ng, -1, channels)
    own = target - coupled.reshape(vectors.shape) + np.einsum("gpij,gpjc->gpic", diagonal, vectors)
    best = np.einsum("gpij,gpjc->gpic", np.linalg.pinv(diagonal, hermitian=True), own)
    gain = (_position_cost(vectors, own, diagonal) - _position_cost(best, own, diagonal)).ravel()
    order = np.argsort(-gain, kind="stable")[:empty.size]
    order = order[gain[order] > 0]
    book = book.copy()
    book[empty[:order.size]] = np.swapaxes(best, 2, 3).reshape(-1, subdim)[order].astype(np.float32)
    return book


def _solve_codebook(book, codes, target, gram, ridge):
    """The D step: the codebook minimising the block objective for fixed codes.

    The normal equations ``A vec(D) = r`` (see :func:`_normal_matrix`), with
    ``r_k = sum H_p`` over the (group, channel, p) with ``b_p = k``, are solved
    exactly: their size K * subdim does not grow with N, C_t or P, and an
    exact solve makes the step a true minimisation (an iterative solver such as
    LSQR would need many passes over the data and stop short). The ridge
    ``lambda ||D - D_current||^2`` (lambda = ``ridge`` times the mean diagonal
    of A) makes A positive definite when it is rank-deficient (unused
    codewords, degenerate inputs); being centred on the current D, the step
    still cannot raise the objective, and unused codewords stay where they
    are. Should the solve fail, the current D is kept.
    """
    k, subdim = book.shape
    normal = _normal_matrix(codes, gram, k)
    index = codes[:, :, None, :] * subdim + np.arange(subdim)[:, None]  # like target (ng, P, subdim, C)
    rhs = np.bincount(index.ravel(), weights=target.ravel(), minlength=k * subdim).reshape(normal.shape[:2])
    scale = ridge * np.einsum("bii->", normal) / (k * subdim)
    if not scale > 0:
        return book  # no signal in this subspace: nothing to fit
    diagonal = np.arange(normal.shape[1])
    normal[:, diagonal, diagonal] += scale
    solution = _solve(normal, rhs + scale * book.reshape(rhs.shape))
    if solution is None or not np.isfinite(solution).all():
        return book
    return solution.reshape(k, subdim).astype(np.float32).astype(np.float64)


def _normal_matrix(codes, gram, k):
    """A of the D step as (blocks, n, n): K blocks of subdim when P = 1, else one of K * subdim.

    The codebook is shared by all positions (and groups), so positions couple:
    the (k, l) block of A is the sum of ``G_pq`` over the (group, channel, p, q)
    with ``b_p = k`` and ``b_q = l``, assembled as a sparse count matrix times
    the (G P^2, subdim^2) Gram blocks. With one position per channel codeword k
    only meets itself: K independent systems ``(sum_g n_gk G_g) D_k = r_k``.
    """
    ng, positions, channels = codes.shape
    subdim = gram.shape[-1]
    if positions == 1:
        counts = np.stack([np.bincount(c.ravel(), minlength=k) for c in codes]).astype(np.float64)
        return np.einsum("gk,gij->kij", counts, gram[:, 0, :, 0, :])
    pairs = (codes[:, :, None, :] * k + codes[:, None, :, :]).ravel()  # (g, p, q, c): b_p(c) K + b_q(c)
    blocks = np.broadcast_to(np.arange(ng * positions * positions).reshape(ng, positions, positions, 1),
                             (ng, positions, positions, channels)).ravel()
    counts = scipy.sparse.csr_matrix((np.ones(pairs.size), (pairs, blocks)),
                                     shape=(k * k, ng * positions * positions))
    grams = gram.transpose(0, 1, 3, 2, 4).reshape(-1, subdim * subdim)  # (g, p, q) -> G_pq
    normal = (counts @ grams).reshape(k, k, subdim, subdim).transpose(0, 2, 1, 3)
    return normal.reshape(1, k * subdim, k * subdim)


def _solve(a, b):
    """Solve the stacked positive definite systems ``a x = b`` (a (B, n, n), b (B, n)).

    Cholesky for one system (half the work of LU, and it is large), batched LU
    for many small ones; the pseudo-inverse if they prove singular; None if all fails.
    """
    try:
        if len(a) == 1:
            factor = scipy.linalg.cho_factor(a[0], check_finite=False)
            return scipy.linalg.cho_solve(factor, b[0], check_finite=False)[None]
        return np.linalg.solve(a, b[..., None])[..., 0]
    except np.linalg.LinAlgError:
        pass
    try:
        return (np.linalg.pinv(a, hermitian=True) @ b[..., None])[..., 0]
    except np.linalg.LinAlgError:
        return None
