"""k-means in many subspaces: exactness, monotonicity in K, the reported distortion, empty
clusters, serial == parallel, reproducibility, input validation, and scikit-learn as a yardstick."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcnn.errors import QcnnError
from qcnn.quantization.kmeans import kmeans

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def sse(points, codebooks, codes):
    """Sum of squared errors per subspace in float64 (the oracle)."""
    chosen = np.take_along_axis(codebooks, codes[..., None].astype(np.intp), axis=1)
    return ((points.astype(np.float32).astype(np.float64) - chosen) ** 2).sum(axis=(1, 2))


def distinct(points):
    """Number of distinct points in each subspace."""
    return np.array([len(np.unique(p, axis=0)) for p in points])


@st.composite
def problems(draw, max_m=3, max_n=60, max_d=8, max_k=20, grid=8):
    """(points (M, n, d) float32 on a coarse grid, so duplicates are common, K, seed)."""
    m = draw(st.integers(1, max_m))
    n = draw(st.integers(1, max_n))
    d = draw(st.integers(1, max_d))
    k = draw(st.integers(1, max_k))
    seed = draw(st.integers(0, 2**32 - 1))
    values = draw(st.integers(1, grid))  # how many distinct values per coordinate
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    points = rng.integers(0, values, size=(m, n, d)).astype(np.float32) * np.float32(0.25) - 1
    return points, k, seed


@SETTINGS
@given(problems(), st.booleans())
def test_distortion_is_the_sum_of_squared_errors(problem, monotone):
    points, k, seed = problem
    result = kmeans(points, k, seed=seed, monotone=monotone)
    m, n, d = points.shape
    assert result.codebooks.shape == (m, k, d) and result.codebooks.dtype == np.float32
    assert result.codes.shape == (m, n) and result.codes.dtype == np.uint8
    assert result.distortion.shape == (m,) and result.distortion.dtype == np.float64
    assert result.iterations.shape == (m,)
    assert (result.codes < k).all()
    np.testing.assert_allclose(result.distortion, sse(points, result.codebooks, result.codes),
                               rtol=1e-5, atol=1e-9)


@SETTINGS
@given(problems(), st.booleans())
def test_exact_with_at_most_k_distinct_points(problem, monotone):
    points, k, seed = problem
    few = distinct(points) <= k
    result = kmeans(points, k, seed=seed, monotone=monotone)
    assert (result.distortion[few] == 0).all()
    assert (sse(points, result.codebooks, result.codes)[few] == 0).all()


def test_exact_when_points_repeat():
    rng = np.random.default_rng(3)
    values = rng.standard_normal((7, 4)).astype(np.float32)
    points = values[rng.integers(0, 7, size=500)]
    for k in (7, 8, 50, 256):
        result = kmeans(points, k)
        assert result.distortion == 0.0 and result.iterations == 0
        np.testing.assert_array_equal(result.codebooks[result.codes], points)
    assert kmeans(points, 6).distortion > 0


def test_fewer_points_than_codewords():
    points = np.array([[0.0, 1.0], [2.0, 3.0], [0.0, 1.0]], np.float32)
    result = kmeans(points, 10)
    assert result.codebooks.shape == (10, 2) and result.distortion == 0.0
    assert (result.codes < 10).all()
    np.testing.assert_array_equal(result.codebooks[result.codes], points)


@SETTINGS
@given(problems(max_k=24), st.integers(1, 24))
def test_distortion_never_grows_with_k(problem, other_k):
    points, k, seed = problem
    small, large = sorted((k, other_k))
    a = kmeans(points, small, seed=seed)
    b = kmeans(points, large, seed=seed)
    assert (b.distortion <= a.distortion).all()


def test_distortion_never_grows_with_k_on_gaussian_data():
    points = np.random.default_rng(5).standard_normal((3, 400, 4)).astype(np.float32)
    previous = np.full(3, np.inf)
    for k in range(1, 41):
        distortion = kmeans(points, k, seed=11).distortion
        assert (distortion <= previous).all()
        previous = distortion
    for n_init in (2, 3):  # with restarts too
        assert (kmeans(points, 9, n_init=n_init).distortion
                <= kmeans(points, 8, n_init=n_init).distortion).all()


@SETTINGS
@given(problems(), st.integers(1, 3))
def test_all_codewords_used_when_enough_distinct_points(problem, max_iter):
    points, k, seed = problem
    # max_iter 1 stops stages early, so clusters left empty are repaired after a stage
    for result in (kmeans(points, k, seed=seed), kmeans(points, k, seed=seed, max_iter=max_iter),
                   kmeans(points, k, seed=seed, max_iter=max_iter, monotone=False)):
        for m in np.flatnonzero(distinct(points) >= k):
            assert len(np.unique(result.codes[m])) == k


def test_empty_clusters_are_reseeded():
    # a tight blob and far outliers: with few iterations, codewords pulled into the blob
    # lose their points; every one must still end up with points
    rng = np.random.default_rng(0)
    blob = rng.normal(0, 0.01, size=(300, 2))
    outliers = rng.normal(0, 100, size=(12, 2))
    points = np.concatenate([blob, outliers]).astype(np.float32)
    for max_iter in (1, 2, 100):
        result = kmeans(points, 16, max_iter=max_iter)
        assert len(np.unique(result.codes)) == 16
        np.testing.assert_allclose(result.distortion, sse(points[None], result.codebooks[None],
                                                          result.codes[None])[0], rtol=1e-5)


@SETTINGS
@given(problems(max_m=4, max_n=120, max_k=40, grid=64), st.integers(1, 2), st.booleans())
def test_parallel_equals_serial(problem, n_init, monotone):
    points, k, seed = problem
    serial = kmeans(points, k, seed=seed, n_init=n_init, parallel=False, monotone=monotone)
    parallel = kmeans(points, k, seed=seed, n_init=n_init, parallel=True, monotone=monotone)
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("monotone", [True, False])
def test_parallel_equals_serial_on_many_subspaces(monotone):
    points = np.random.default_rng(2).standard_normal((16, 300, 4)).astype(np.float32)
    serial = kmeans(points, 32, parallel=False, monotone=monotone)
    parallel = kmeans(points, 32, parallel=True, monotone=monotone)
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("monotone", [True, False])
def test_reproducible(monotone):
    points = np.random.default_rng(4).standard_normal((3, 500, 6))
    a = kmeans(points, 24, seed=7, n_init=2, monotone=monotone)
    b = kmeans(points.copy(), 24, seed=7, n_init=2, monotone=monotone)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    c = kmeans(points, 24, seed=8, n_init=2, monotone=monotone)
    assert not np.array_equal(a.codes, c.codes)


def test_more_restarts_are_no_worse():
    points = np.random.default_rng(6).standard_normal((4, 300, 4)).astype(np.float32)
    one = kmeans(points, 16, n_init=1).distortion
    three = kmeans(points, 16, n_init=3).distortion
    assert (three <= one).all()


def test_two_dimensional_input_has_no_subspace_axis():
    points = np.random.default_rng(1).standard_normal((200, 3))
    result = kmeans(points, 8)
    assert result.codebooks.shape == (8, 3) and result.codes.shape == (200,)
    assert isinstance(result.distortion, float) and isinstance(result.iterations, int)
    whole = kmeans(points[None], 8)
    np.testing.assert_array_equal(whole.codebooks[0], result.codebooks)
    np.testing.assert_array_equal(whole.codes[0], result.codes)
    assert whole.distortion[0] == result.distortion


def test_input_types_and_empty_batch():
    ints = np.arange(40).reshape(20, 2)
    np.testing.assert_allclose(kmeans(ints, 20).distortion, 0.0)
    result = kmeans(np.zeros((0, 5, 2), np.float32), 4)
    assert result.codebooks.shape == (0, 4, 2) and result.codes.shape == (0, 5)


def test_max_iter_bounds_the_iterations():
    points = np.random.default_rng(8).standard_normal((2, 500, 4)).astype(np.float32)
    assert (kmeans(points, 16, max_iter=3).iterations <= 3).all()
    assert (kmeans(points, 16, max_iter=3).distortion >= kmeans(points, 16).distortion * 0.97).all()


@pytest.mark.parametrize("points, k, options, message", [
    (np.zeros((4, 2)), 0, {}, "K"),
    (np.zeros((4, 2)), 257, {}, "K"),
    (np.zeros((4, 2)), 2.0, {}, "integer"),
    (np.zeros((4, 2)), True, {}, "integer"),
    (np.zeros(4), 2, {}, "shape"),
    (np.zeros((1, 2, 4, 2)), 2, {}, "shape"),
    (np.zeros((0, 2)), 2, {}, "no points"),
    (np.zeros((2, 0, 3)), 2, {}, "no points"),
    (np.zeros((4, 0)), 2, {}, "dimension 0"),
    (np.array([[0.0, np.nan], [1.0, 2.0]]), 2, {}, "NaN"),
    (np.array([[0.0, np.inf], [1.0, 2.0]]), 2, {}, "infinity"),
    (np.array([[0.0, 1e20], [1.0, 2.0]]), 2, {}, "magnitude"),
    (np.array([["a", "b"]]), 2, {}, "dtype"),
    (np.zeros((4, 2)), 2, {"n_init": 0}, "n_init"),
    (np.zeros((4, 2)), 2, {"max_iter": 0}, "max_iter"),
    (np.zeros((4, 2)), 2, {"tol": -1.0}, "tol"),
    (np.zeros((4, 2)), 2, {"tol": "x"}, "tol"),
    (np.zeros((4, 2)), 2, {"seed": "x"}, "seed"),
])
def test_bad_input_gives_one_line_errors(points, k, options, message):
    with pytest.raises(QcnnError) as error:
        kmeans(points, k, **options)
    text = str(error.value)
    assert message in text and "\n" not in text


@pytest.mark.parametrize("monotone, margin", [(True, 1.02), (False, 1.03)])
def test_no_worse_than_scikit_learn(monotone, margin):
    """On random problems our distortion is at most scikit-learn's KMeans (n_init=1,
    k-means++; averaged over three random states, since single runs scatter by a few
    per cent) plus a small margin; the monotone (default) mode is also lower over all
    problems together."""
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(9)
    problems = [
        (rng.standard_normal((2000, 4)), 32),                       # fc-like: C'_s = 4, K = 32
        (rng.standard_normal((1500, 8)), 64),                       # conv-like: C'_s = 8
        (rng.uniform(-1, 1, (1000, 3)), 16),
        (np.concatenate([rng.normal(c, 0.3, (150, 6)) for c in rng.normal(0, 3, (10, 6))]), 10),
        (rng.laplace(size=(1200, 4)) * 0.01, 24),                   # heavy tails, weight scale
    ]
    ratios = []
    for points, k in problems:
        points = points.astype(np.float32)
        ours = kmeans(points, k, seed=0, monotone=monotone).distortion
        theirs = np.mean([KMeans(k, n_init=1, init="k-means++", random_state=s).fit(points).inertia_
                          for s in range(3)])
        assert ours <= theirs * margin, (points.shape, k, ours, theirs)
        ratios.append(ours / theirs)
    if monotone:
        assert np.mean(ratios) <= 1.0
