"""Error correction: the objective never increases and ends no worse than k-means, the objective
helper against a dense oracle, exact recovery, the least-squares optimum when every channel can
own a codeword (with reseeding of unused codewords), grouped convolutions, degenerate inputs,
serial == parallel (whole solver and B-step kernels), the D step against a dense least-squares
fit, input validation; the weight prior: its penalised objective never increases, matches a dense
oracle, reaches the generalised ridge optimum, tends to the float weights as alpha grows, and
alpha = 0 is bit for bit the plain solver."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcnn.errors import QcnnError
from qcnn.quantization.ec import error_correct, objective
from qcnn.quantization.pq import decode, num_subspaces, quantize_weight

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
INPUT_KINDS = ["gauss", "relu", "zeros", "duplicated channels", "duplicated samples"]


def make_inputs(rng, kind, shape):
    """Patches (G, N, P, C_s) float32 of one of INPUT_KINDS."""
    g, n, p, c = shape
    if kind == "zeros":
        return np.zeros(shape, np.float32)
    if kind == "duplicated channels":  # rank 1 along channels
        return np.repeat(rng.normal(size=(g, n, p, 1)), c, axis=3).astype(np.float32)
    if kind == "duplicated samples":
        return np.repeat(rng.normal(size=(g, 1, p, c)), n, axis=1).astype(np.float32)
    values = rng.normal(size=shape).astype(np.float32)
    return np.maximum(values, 0) if kind == "relu" else values


def response(inputs, weight, group):
    """Dense oracle: targets (N, C_t) float64 of weights (C_t, C_s, kh, kw) on patches (G, N, P, C_s)."""
    _, n, p, c = inputs.shape
    per_group = weight.shape[0] // group
    flat = weight.astype(np.float64).transpose(0, 2, 3, 1).reshape(weight.shape[0], p * c)
    return np.concatenate([inputs[i].reshape(n, -1).astype(np.float64) @ flat[i * per_group:(i + 1) * per_group].T
                           for i in range(group)], axis=1)


def dense_objective(inputs, targets, codebooks, codes, group):
    weight = decode(codebooks, codes, inputs.shape[3])
    return float(((targets - response(inputs, weight, group)) ** 2).sum())


@st.composite
def problems(draw):
    """A random layer, calibration data and its k-means initialisation."""
    group = draw(st.integers(1, 2))
    c_out = group * draw(st.integers(1, 5))
    channels = draw(st.integers(1, 7))
    kh, kw = draw(st.sampled_from([(1, 1), (2, 2), (1, 3)]))
    subdim = draw(st.integers(1, 4))
    k = draw(st.integers(1, 8))
    n = draw(st.integers(1, 30))
    kind = draw(st.sampled_from(INPUT_KINDS))
    shared = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    weight = rng.normal(size=(c_out, channels, kh, kw)).astype(np.float32)
    inputs = make_inputs(rng, kind, (group, n, kh * kw, channels))
    noise = rng.normal(size=(n, c_out)) * draw(st.sampled_from([0.0, 0.1]))
    targets = (response(inputs, weight, group) + noise).astype(np.float32)
    codebooks, codes = quantize_weight(weight, group, subdim, k, shared, seed=0)
    return inputs, targets, codebooks, codes, group


@SETTINGS
@given(problems())
def test_objective_never_increases_and_beats_k_means(problem):
    inputs, targets, codebooks, codes, group = problem
    start = objective(inputs, targets, codebooks, codes, group)
    result = error_correct(inputs, targets, codebooks, codes, group, max_iter=8, tol=0)
    assert result.codebooks.shape == codebooks.shape and result.codebooks.dtype == np.float32
    assert result.codes.shape == codes.shape and result.codes.dtype == np.uint8
    assert (result.codes < codebooks.shape[2]).all() and np.isfinite(result.codebooks).all()
    values = np.array(result.objective)
    assert len(values) == result.iterations + 1 and np.isfinite(values).all()
    assert values[0] == start
    assert (np.diff(values) <= 0).all()
    # the tracked values are the objective of the result (up to float32 rounding)
    final = objective(inputs, targets, result.codebooks, result.codes, group)
    scale = (targets.astype(np.float64) ** 2).sum()
    assert final == pytest.approx(values[-1], rel=1e-4, abs=1e-5 * scale + 1e-6)
    assert final <= start * (1 + 1e-5) + 1e-6 * scale + 1e-9


@SETTINGS
@given(problems())
def test_objective_matches_dense_oracle(problem):
    inputs, targets, codebooks, codes, group = problem
    expected = dense_objective(inputs, targets, codebooks, codes, group)
    scale = (targets.astype(np.float64) ** 2).sum()
    assert objective(inputs, targets, codebooks, codes, group) == pytest.approx(
        expected, rel=1e-4, abs=1e-6 * scale + 1e-9)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_serial_and_parallel_agree(problem):
    inputs, targets, codebooks, codes, group = problem
    serial = error_correct(inputs, targets, codebooks, codes, group, max_iter=4, parallel=False)
    parallel = error_correct(inputs, targets, codebooks, codes, group, max_iter=4, parallel=True)
    np.testing.assert_array_equal(serial.codes, parallel.codes)
    np.testing.assert_array_equal(serial.codebooks, parallel.codebooks)
    assert serial.objective == parallel.objective


def test_representable_weights_are_recovered_from_a_perturbed_start():
    """T made by weights that are exactly D B: EC from a perturbed k-means start reaches ~0."""
    rng = np.random.default_rng(1)
    n, kh, channels, c_out, subdim, k = 400, 3, 8, 16, 4, 4
    m = num_subspaces(channels, subdim)
    true_books = rng.normal(size=(1, m, k, subdim)).astype(np.float32)
    true_codes = rng.integers(0, k, (c_out, kh, kh, m)).astype(np.uint8)
    weight = decode(true_books, true_codes, channels)
    inputs = rng.normal(size=(1, n, kh * kh, channels)).astype(np.float32)
    targets = response(inputs, weight, 1).astype(np.float32)
    noisy = weight + 0.3 * rng.normal(size=weight.shape).astype(np.float32)
    codebooks, codes = quantize_weight(noisy, 1, subdim, k)
    result = error_correct(inputs, targets, codebooks, codes, max_iter=30, tol=0)
    scale = (targets.astype(np.float64) ** 2).sum()
    assert result.objective[0] > 1e-3 * scale
    assert objective(inputs, targets, result.codebooks, result.codes) < 1e-8 * scale


@pytest.mark.parametrize("all_on_one", [False, True])
def test_reaches_least_squares_optimum_when_every_channel_can_own_a_codeword(all_on_one):
    """FC with C_t <= K: the best quantized layer is the float least-squares fit. Starting with
    every channel on codeword 0 (the other codewords unused) exercises the reseeding."""
    rng = np.random.default_rng(2)
    n, channels, c_out, subdim, k = 50, 6, 3, 2, 4
    inputs = rng.normal(size=(1, n, 1, channels)).astype(np.float32)
    targets = rng.normal(size=(n, c_out)).astype(np.float32)
    x = inputs[0, :, 0].astype(np.float64)
    optimum = ((targets - x @ np.linalg.lstsq(x, targets.astype(np.float64), rcond=None)[0]) ** 2).sum()
    weight = rng.normal(size=(c_out, channels)).astype(np.float32)
    codebooks, codes = quantize_weight(weight, 1, subdim, k)
    if all_on_one:
        codes[:] = 0
    result = error_correct(inputs, targets, codebooks, codes, max_iter=300, tol=1e-10)
    assert result.objective[-1] == pytest.approx(optimum, rel=1e-3)
    assert all(len(np.unique(result.codes[:, 0, 0, m])) == c_out for m in range(codes.shape[3]))


@pytest.mark.parametrize("shared", [True, False])
def test_grouped_convolution(shared):
    """AlexNet-like grouped conv (two groups, 3x3): EC clearly improves on k-means."""
    rng = np.random.default_rng(3)
    group, n, channels, c_out, subdim, k = 2, 300, 12, 16, 4, 8
    weight = rng.normal(size=(c_out, channels, 3, 3)).astype(np.float32)
    inputs = make_inputs(rng, "relu", (group, n, 9, channels))
    targets = response(inputs, weight, group).astype(np.float32)
    codebooks, codes = quantize_weight(weight, group, subdim, k, shared)
    result = error_correct(inputs, targets, codebooks, codes, group, max_iter=15)
    start = dense_objective(inputs, targets, codebooks, codes, group)
    final = dense_objective(inputs, targets, result.codebooks, result.codes, group)
    assert result.objective[0] == pytest.approx(start, rel=1e-4)
    assert final == pytest.approx(result.objective[-1], rel=1e-4)
    assert final < 0.8 * start


@pytest.mark.parametrize("kind", ["zeros", "duplicated channels", "duplicated samples", "few samples"])
def test_degenerate_inputs(kind):
    """Rank-deficient, all-zero, duplicated inputs and N < subdim: finite results, no increase."""
    rng = np.random.default_rng(4)
    n = 2 if kind == "few samples" else 40
    subdim, channels = 4, 10
    weight = rng.normal(size=(6, channels, 2, 2)).astype(np.float32)
    inputs = make_inputs(rng, "gauss" if kind == "few samples" else kind, (1, n, 4, channels))
    targets = (response(inputs, weight, 1) + rng.normal(size=(n, 6))).astype(np.float32)
    codebooks, codes = quantize_weight(weight, 1, subdim, 8)
    result = error_correct(inputs, targets, codebooks, codes, max_iter=10, tol=0)
    assert np.isfinite(result.codebooks).all() and np.isfinite(result.objective).all()
    assert (np.diff(result.objective) <= 0).all()
    final = dense_objective(inputs, targets, result.codebooks, result.codes, 1)
    assert final <= result.objective[0] * (1 + 1e-5)
    if kind == "zeros":  # nothing to fit: the layer is left as it was
        np.testing.assert_array_equal(result.codebooks, codebooks)
        np.testing.assert_array_equal(result.codes, codes)


def test_progress_and_stopping():
    rng = np.random.default_rng(5)
    inputs = rng.normal(size=(1, 60, 1, 8)).astype(np.float32)
    targets = rng.normal(size=(60, 5)).astype(np.float32)
    codebooks, codes = quantize_weight(rng.normal(size=(5, 8)), 1, 2, 2)
    calls = []
    result = error_correct(inputs, targets, codebooks, codes, max_iter=3, tol=0,
                           progress=lambda i, value: calls.append((i, value)))
    assert calls == list(enumerate(result.objective)) and result.iterations == 3
    untouched = error_correct(inputs, targets, codebooks, codes, max_iter=0)
    assert untouched.iterations == 0 and len(untouched.objective) == 1
    np.testing.assert_array_equal(untouched.codebooks, codebooks)
    np.testing.assert_array_equal(untouched.codes, codes)


def float_weight(problem, seed=0):
    """Float weights (C_t, C_s, kh, kw) for a problem (the codes' shape), not those that made T."""
    inputs, _, _, codes, _ = problem
    c_t, kh, kw, _ = codes.shape
    return np.random.default_rng(seed).normal(size=(c_t, inputs.shape[3], kh, kw)).astype(np.float32)


def dense_penalised(inputs, targets, codebooks, codes, group, alpha, weight):
    """Dense oracle of the penalised objective ||T - S W_q||^2 + sum_g mu_g ||W_g - W_q,g||^2."""
    _, _, p, c = inputs.shape
    m, subdim = codebooks.shape[1], codebooks.shape[3]
    mu = alpha * (inputs.astype(np.float64) ** 2).sum(axis=(1, 2, 3)) / (m * subdim * p)
    error = (decode(codebooks, codes, c).astype(np.float64) - weight) ** 2
    per_group = weight.shape[0] // group
    penalty = sum(mu[g] * error[g * per_group:(g + 1) * per_group].sum() for g in range(group))
    return dense_objective(inputs, targets, codebooks, codes, group) + penalty


@SETTINGS
@given(problems(), st.sampled_from([1e-3, 0.1, 1.0, 100.0]))
def test_prior_objective_never_increases_and_matches_oracle(problem, alpha):
    inputs, targets, codebooks, codes, group = problem
    weight = float_weight(problem)
    start = objective(inputs, targets, codebooks, codes, group, prior=alpha, weight=weight)
    scale = (targets.astype(np.float64) ** 2).sum() + start
    assert start == pytest.approx(dense_penalised(inputs, targets, codebooks, codes, group, alpha, weight),
                                  rel=1e-4, abs=1e-6 * scale + 1e-9)
    result = error_correct(inputs, targets, codebooks, codes, group, max_iter=8, tol=0,
                           prior=alpha, weight=weight)
    values = np.array(result.objective)
    assert values[0] == start and np.isfinite(values).all()
    assert (np.diff(values) <= 0).all()
    final = objective(inputs, targets, result.codebooks, result.codes, group, prior=alpha, weight=weight)
    assert final == pytest.approx(values[-1], rel=1e-4, abs=1e-5 * scale + 1e-6)
    assert final <= start * (1 + 1e-5) + 1e-6 * scale + 1e-9


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_prior_zero_is_the_plain_solver_bit_for_bit(problem):
    inputs, targets, codebooks, codes, group = problem
    plain = error_correct(inputs, targets, codebooks, codes, group, max_iter=4)
    zero = error_correct(inputs, targets, codebooks, codes, group, max_iter=4, prior=0.0,
                         weight=float_weight(problem))
    np.testing.assert_array_equal(plain.codes, zero.codes)
    np.testing.assert_array_equal(plain.codebooks, zero.codebooks)
    assert plain.objective == zero.objective and plain.iterations == zero.iterations
    assert objective(inputs, targets, codebooks, codes, group) == \
        objective(inputs, targets, codebooks, codes, group, prior=0.0, weight=float_weight(problem))


@pytest.mark.parametrize("alpha", [0.01, 0.3, 10.0])
def test_prior_reaches_generalised_ridge_optimum(alpha):
    """FC with C_t <= K: every sub-vector is free, so the best quantized layer is the generalised
    ridge solution W* = (S^T S + mu I)^-1 (S^T T + mu W), which EC must reach."""
    rng = np.random.default_rng(9)
    n, channels, c_out, subdim, k = 40, 6, 3, 2, 4
    inputs = rng.normal(size=(1, n, 1, channels)).astype(np.float32)
    targets = rng.normal(size=(n, c_out)).astype(np.float32)
    weight = rng.normal(size=(c_out, channels)).astype(np.float32)
    x, t, w = inputs[0, :, 0].astype(np.float64), targets.astype(np.float64), weight.astype(np.float64)
    mu = alpha * (x ** 2).sum() / channels
    best = np.linalg.solve(x.T @ x + mu * np.eye(channels), x.T @ t + mu * w.T)  # (C_s, C_t)
    optimum = ((t - x @ best) ** 2).sum() + mu * ((w.T - best) ** 2).sum()
    codebooks, codes = quantize_weight(weight, 1, subdim, k)
    result = error_correct(inputs, targets, codebooks, codes, max_iter=300, tol=1e-12,
                           prior=alpha, weight=weight)
    assert result.objective[-1] == pytest.approx(optimum, rel=1e-3)
    np.testing.assert_allclose(decode(result.codebooks, result.codes, channels)[:, :, 0, 0], best.T,
                               rtol=0, atol=2e-2 * np.abs(best).max())


def test_large_prior_tends_to_the_weight_space_optimum():
    """As alpha grows the response no longer matters: with C_t <= K the quantized weights approach
    the float weights W themselves (zero weight error), however poor W's response is; and a conv
    layer's weight error ends no worse than k-means' (the weight-space objective it started from)."""
    rng = np.random.default_rng(10)
    n, channels, c_out, subdim, k = 60, 8, 4, 2, 4
    inputs = rng.normal(size=(1, n, 1, channels)).astype(np.float32)
    targets = rng.normal(size=(n, c_out)).astype(np.float32) * 5
    weight = rng.normal(size=(c_out, channels)).astype(np.float32)
    start_weight = weight + rng.normal(size=weight.shape).astype(np.float32)
    codebooks, codes = quantize_weight(start_weight, 1, subdim, k)
    errors = []
    for alpha in (0.1, 10.0, 1e4):
        result = error_correct(inputs, targets, codebooks, codes, max_iter=100, tol=1e-12,
                               prior=alpha, weight=weight)
        decoded = decode(result.codebooks, result.codes, channels)[:, :, 0, 0]
        errors.append(np.linalg.norm(decoded - weight) / np.linalg.norm(weight))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-3

    conv = rng.normal(size=(16, 8, 3, 3)).astype(np.float32)
    patches = make_inputs(rng, "relu", (1, 200, 9, 8))
    conv_targets = (response(patches, conv, 1) + rng.normal(size=(200, 16)) * 3).astype(np.float32)
    books, conv_codes = quantize_weight(conv, 1, 4, 8)
    start = np.linalg.norm(decode(books, conv_codes, 8) - conv)
    plain = error_correct(patches, conv_targets, books, conv_codes, max_iter=10)
    strong = error_correct(patches, conv_targets, books, conv_codes, max_iter=10, prior=1e6, weight=conv)
    assert np.linalg.norm(decode(plain.codebooks, plain.codes, 8) - conv) > 1.05 * start
    assert np.linalg.norm(decode(strong.codebooks, strong.codes, 8) - conv) <= start * (1 + 1e-3)


def test_invalid_arguments():
    rng = np.random.default_rng(6)
    inputs = rng.normal(size=(1, 10, 1, 8)).astype(np.float32)
    targets = rng.normal(size=(10, 4)).astype(np.float32)
    codebooks, codes = quantize_weight(rng.normal(size=(4, 8)), 1, 2, 4)
    bad_codes = codes.copy()
    bad_codes[0, 0, 0, 0] = 4
    nan_inputs = inputs.copy()
    nan_inputs[0, 0, 0, 0] = np.nan
    cases = [
        (dict(inputs=inputs[0]), "inputs must be real numbers"),
        (dict(inputs=inputs.astype(complex)), "inputs must be real numbers"),
        (dict(inputs=nan_inputs), "NaN or infinity"),
        (dict(targets=targets[:5]), "differ in N"),
        (dict(targets=targets[:, :3]), "differ in C_t"),
        (dict(group=2), "groups"),
        (dict(codes=codes.astype(np.float32)), "codes must be integers"),
        (dict(codes=bad_codes), "codes must be in 0..3"),
        (dict(codes=codes.reshape(4, 1, 1, 4)[:, :, :, :3]), "M = ceil"),
        (dict(codebooks=codebooks[:, :3]), "M = ceil"),
        (dict(max_iter=-1), "max_iter"),
        (dict(ridge=0.0), "ridge"),
        (dict(tol=float("nan")), "tol"),
        (dict(progress=3), "progress"),
        (dict(prior=-1.0), "prior"),
        (dict(prior=float("inf")), "prior"),
        (dict(prior=1.0), "needs the float weights"),
        (dict(prior=1.0, weight=np.zeros((4, 7))), "weight"),
        (dict(prior=1.0, weight=np.zeros((4, 8, 2, 2))), "weight"),
    ]
    for change, message in cases:
        arguments = dict(inputs=inputs, targets=targets, codebooks=codebooks, codes=codes)
        arguments.update(change)
        with pytest.raises(QcnnError, match=message):
            error_correct(**arguments)


def test_assign_kernels_serial_and_parallel_agree():
    """The B-step kernels on a block of several tiles of channels; a code only changes if
    the new codeword is strictly better."""
    from qcnn.kernels.ec import assign_codes_parallel, assign_codes_serial

    rng = np.random.default_rng(7)
    ng, positions, subdim, channels, k = 2, 3, 2, 700, 9
    x = rng.normal(size=(ng, 50, positions * subdim))
    gram = (np.swapaxes(x, 1, 2) @ x).reshape(ng, positions, subdim, positions, subdim)
    target = rng.normal(size=(ng, positions, subdim, channels)) * 10
    book = rng.normal(size=(k, subdim))
    diagonal = np.einsum("gpipj->gpij", gram)
    quad = np.einsum("ki,gpij,kj->gpk", book, diagonal, book)
    codes = rng.integers(0, k, (ng, positions, channels))
    results = []
    for kernel in (assign_codes_serial, assign_codes_parallel):
        new_codes = codes.copy()
        vectors = np.ascontiguousarray(np.swapaxes(book[codes], -1, -2))
        kernel(target, gram, book, quad, new_codes, vectors)
        np.testing.assert_array_equal(vectors, np.swapaxes(book[new_codes], -1, -2))
        results.append(new_codes)
    np.testing.assert_array_equal(results[0], results[1])
    assert (results[0] != codes).any()


@pytest.mark.parametrize("positions", [1, 4])
def test_codebook_step_is_the_least_squares_solution(positions):
    """The D step against a dense least-squares fit of the codebook over the N samples, with the
    codebook shared by the positions and by two groups."""
    from qcnn.quantization.ec import _solve_codebook

    rng = np.random.default_rng(8)
    ng, n, subdim, channels, k = 2, 40, 3, 6, 5
    x = rng.normal(size=(ng, n, positions, subdim))
    residual = rng.normal(size=(ng, n, channels))
    codes = rng.integers(0, k, (ng, positions, channels))
    codes[0, 0, :k] = np.arange(k)  # every codeword used
    target = np.einsum("gnpi,gnc->gpic", x, residual)
    gram = np.einsum("gnpi,gnqj->gpiqj", x, x)
    book = _solve_codebook(rng.normal(size=(k, subdim)), codes, target, gram, ridge=1e-12)
    design = np.zeros((ng, n, channels, k, subdim))
    for g, p, c in np.ndindex(ng, positions, channels):
        design[g, :, c, codes[g, p, c]] += x[g, :, p]
    expected = np.linalg.lstsq(design.reshape(-1, k * subdim), residual.ravel(), rcond=None)[0]
    np.testing.assert_allclose(book.ravel(), expected, rtol=1e-5, atol=1e-6)
