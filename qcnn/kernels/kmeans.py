"""Numba kernels of k-means in many small subspaces (the inner loop of product quantization).

One call clusters M independent subspaces (``prange`` over subspaces in the
parallel variant). Per subspace, with n points of dimension d and K codewords:

1. **Few distinct points.** A small hash table counts the distinct points,
   giving up as soon as it has seen K + 1 (for ordinary data: after K + 1
   points). With at most K distinct points the codebook is those points
   (later rows repeat the first) and the quantization is exact.
2. **Growth.** Otherwise each of ``n_init`` restarts grows the codebook one
   codeword at a time. Stage 1 is the mean of all points (the 1-means
   optimum). Stage k adds codeword k by greedy k-means++ (D^2) seeding: 2 +
   ln k candidates are drawn with probability proportional to each point's
   squared distance to its codeword, the one that lowers the distortion most
   is kept, and Lloyd iterations follow. Adding a codeword raises no point's
   distance; if rounding ever made a stage's Lloyd iterations end above the
   distortion they started from, the stage falls back to its starting point.
   So stage k's result (which *is* the answer for K = k) is never worse than
   stage k - 1's: the distortion is non-increasing in K by construction.
   Random numbers are a counter-based hash of (seed, stage, draw), so a run
   for K passes through exactly the states of the runs for every smaller K.
3. **Lloyd** iterations stop when no point moves (and no cluster is empty),
   when an iteration improves the distortion by less than ``tol`` times its
   value, or after ``max_iter``. An empty cluster is re-seeded with the point
   farthest from its codeword (one per iteration, from a cluster of at least
   two points); clusters still empty when a stage stops are repaired the same
   way afterwards, so all K codewords are used whenever there are more than K
   distinct points.

Cost and speed. Growing to K runs K Lloyd stages instead of one; each starts
from the previous optimum, so it mostly moves few points, but its tail of
small iterations is real Lloyd dynamics. That price buys the guarantee (and
about 1% lower distortion); ``monotone=False`` skips the Lloyd iterations of
the intermediate stages, which leaves plain greedy k-means++ seeding followed
by one Lloyd run.
What makes an iteration cheap is not looking at points that cannot move
(Elkan's bounds, kept per point and per centre, relative to how far each
centre drifted; see "Bounds" below): centres that moved much get exact
distances to all points in one vectorised pass, the others only loosen the
bounds, and only points whose bounds overlap are examined -- exact distance
to their centre, then to their runner-up (boundary points flip between the
two), and only then to all K centres (a loop over the codebook stored
transposed, (d, K), that LLVM vectorises). Passes over all points loop over
points stored transposed, (d, n), in cache-sized blocks, selects only, so
they vectorise too. Cluster sums, sums of squared norms and counts are
float64 and updated only for points that change cluster, so a Lloyd
iteration's distortion costs O(K d), not O(n d).

Determinism. Squared distances are float32 ``sum_j (x_j - c_j)^2``, always
accumulated in the same order, and no fastmath is used (no contraction or
reassociation), so every code path gets the same value for the same pair and
the serial and parallel variants give bit-identical results. Bounds compare
with a relative margin of 1e-5 so float32 rounding cannot make them wrong.
"""

import numpy as np
from numba import njit, prange

from qcnn.kernels.jit import serial_and_parallel

MAX_TRIALS = 8  # greedy k-means++ candidates per stage: 2 + floor(ln k) <= 7 for k <= 256
MARGIN = np.float32(1 - 1e-5)  # bounds are float32: compare with some room for rounding
EXACT_MOVES = 8  # per Lloyd iteration, exact distances to at most this many moved centres ...
EXACT_FRACTION = np.float32(0.25)  # ... that moved more than this fraction of the largest move
BLOCK = 512  # points per block when updating bounds
PENDING_MOVE = np.float32(0.01)  # moves are applied to the bounds once they add up to this
# times the rms distance; until then they only loosen every bound by their largest total

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


@njit(cache=True, nogil=True)
def _uniform(seed, stage, trial):
    """A float64 in [0, 1) from a SplitMix64 hash of (seed, stage, trial)."""
    z = np.uint64(seed) + np.uint64(stage * MAX_TRIALS + trial + 1) * _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    z = z ^ (z >> np.uint64(31))
    return np.float64(z >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@njit(cache=True, nogil=True)
def _sum(values, n):
    """float64 sum of ``values[:n]`` (float32) in a fixed order: eight interleaved
    partial sums (independent lanes, so LLVM vectorises without reassociating)."""
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    i = 0
    while i + 8 <= n:
        s0 += values[i]
        s1 += values[i + 1]
        s2 += values[i + 2]
        s3 += values[i + 3]
        s4 += values[i + 4]
        s5 += values[i + 5]
        s6 += values[i + 6]
        s7 += values[i + 7]
        i += 8
    while i < n:
        s0 += values[i]
        i += 1
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@njit(cache=True, nogil=True)
def _distance(x, c):
    """Squared distance, float32, accumulated over j in order (the reference formula)."""
    acc = np.float32(0.0)
    for j in range(x.shape[0]):
        t = x[j] - c[j]
        acc += t * t
    return acc


@njit(cache=True, nogil=True)
def _distinct(x, bits, k, codes, representatives):
    """Number of distinct points of ``x`` (n, d), or -1 when there are more than ``k``.

    On success ``codes[i]`` is the index of point i's distinct value and
    ``representatives[:count]`` the index of a point holding each value.
    ``bits`` is ``x`` viewed as uint32 (hashed; -0.0 counts as 0.0).
    """
    n, d = x.shape
    size = 16
    while size < 4 * (k + 1):
        size *= 2
    table = np.full(size, -1, np.int64)  # distinct index stored in each slot
    mask = np.uint64(size - 1)
    count = 0
    for i in range(n):
        h = _FNV_OFFSET
        for j in range(d):
            b = bits[i, j]
            if b == np.uint32(0x80000000):
                b = np.uint32(0)
            h = (h ^ np.uint64(b)) * _FNV_PRIME
        h = h ^ (h >> np.uint64(29))
        slot = h & mask
        while True:
            entry = table[slot]
            if entry < 0:
                if count == k:
                    return -1
                table[slot] = count
                representatives[count] = i
                codes[i] = count
                count += 1
                break
            r = representatives[entry]
            same = True
            for j in range(d):
                if x[r, j] != x[i, j]:
                    same = False
                    break
            if same:
                codes[i] = entry
                break
            slot = (slot + np.uint64(1)) & mask
    return count


@njit(cache=True, nogil=True)
def _set_centre(centres, centres_t, c, values):
    for j in range(centres.shape[1]):
        centres[c, j] = values[j]
        centres_t[j, c] = values[j]


@njit(cache=True, nogil=True)
def _distances_to(xt, centre, out):
    """Squared distances (n,) float32 of all points ``xt`` (d, n) to ``centre`` (d,).
    Vectorised over points."""
    d, n = xt.shape
    for i in range(n):
        out[i] = 0.0
    for j in range(d):
        cj = centre[j]
        row = xt[j]
        for i in range(n):
            t = row[i] - cj
            out[i] += t * t


@njit(cache=True, nogil=True)
def _own_distances(x, centres, assign, out):
    """Squared distance (n,) float32 of every point to its own centre."""
    for i in range(x.shape[0]):
        out[i] = _distance(x[i], centres[assign[i]])


@njit(cache=True, nogil=True)
def _top3(x, centres_t, k, buffer):
    """The two nearest of the first ``k`` centres to ``x`` (d,) and the third distance:
    (c1, d1, c2, d2, d3), squared distances (inf where there are fewer centres);
    ties go to the lower index. Vectorised over centres: ``centres_t`` is (d, K)."""
    d = x.shape[0]
    for c in range(k):
        buffer[c] = 0.0
    for j in range(d):
        xj = x[j]
        row = centres_t[j]
        for c in range(k):
            t = xj - row[c]
            buffer[c] += t * t
    inf = np.float32(np.inf)
    c1 = 0
    d1 = buffer[0]
    c2 = -1
    d2 = inf
    d3 = inf
    for c in range(1, k):
        v = buffer[c]
        if v < d2:
            if v < d1:
                d3 = d2
                d2 = d1
                c2 = c1
                d1 = v
                c1 = c
            else:
                d3 = d2
                d2 = v
                c2 = c
        elif v < d3:
            d3 = v
    return c1, d1, c2, d2, d3


@njit(cache=True, nogil=True)
def _move(x, norms, i, old, new, sums, squares, counts, changed):
    """Point ``i`` leaves cluster ``old`` for ``new``: update the cluster statistics."""
    counts[old] -= 1
    counts[new] += 1
    squares[old] -= norms[i]
    squares[new] += norms[i]
    changed[old] = True
    changed[new] = True
    for j in range(x.shape[1]):
        v = np.float64(x[i, j])
        sums[old, j] -= v
        sums[new, j] += v


@njit(cache=True, nogil=True)
def _rebuild(x, norms, k, assign, sums, squares, counts):
    """Cluster statistics from scratch."""
    sums[:k] = 0.0
    squares[:k] = 0.0
    counts[:k] = 0
    for i in range(x.shape[0]):
        a = assign[i]
        counts[a] += 1
        squares[a] += norms[i]
        for j in range(x.shape[1]):
            sums[a, j] += np.float64(x[i, j])


@njit(cache=True, nogil=True)
def _statistics_distortion(centres, k, sums, squares, counts):
    """Sum of squared errors from the cluster statistics:
    sum_c (sum |x|^2 - 2 c . sum x + count |c|^2), float64, O(k d)."""
    total = 0.0
    for c in range(k):
        if counts[c] > 0:
            dot = 0.0
            norm = 0.0
            for j in range(centres.shape[1]):
                v = np.float64(centres[c, j])
                dot += v * sums[c, j]
                norm += v * v
            total += squares[c] - 2.0 * dot + counts[c] * norm
    return total


@njit(cache=True, nogil=True)
def _farthest(dist, assign, counts):
    """Point with the largest positive distance whose cluster has >= 2 points, or -1."""
    best = -1
    best_dist = np.float32(0.0)
    for i in range(dist.shape[0]):
        if dist[i] > best_dist and counts[assign[i]] >= 2:
            best_dist = dist[i]
            best = i
    return best


@njit(cache=True, nogil=True)
def _first_empty(counts, k):
    for c in range(k):
        if counts[c] == 0:
            return c
    return -1


# Bounds. Every point i keeps its centre assign[i], a second centre runner[i]
# (its runner-up when last computed) and Euclidean bounds: upper[i] >= its
# distance to its centre, runner_low[i] <= its distance to the runner,
# others_low[i] <= its distance to every other centre, and for every centre c,
# lower[c, i] - drift[c] <= its distance to c (drift: how far c moved since the
# stage began; lower is (K, n) so a centre's row is contiguous). The point is
# certainly at its nearest centre while upper <= min(runner_low, others_low).
# When centre c moves by m, a pass over the points either refreshes all this
# from the exact distances to c (large moves) or adds m to the upper bounds of
# c's members, takes m off the runner bounds of the points whose runner c is,
# and lowers everyone else's others bound to lower[c] - drift[c] where smaller.


@njit(cache=True, nogil=True)
def _offer(distances, c, assign, runner, dist, upper, runner_low, others_low, lower):
    """Offer centre ``c`` at squared ``distances`` (n,) to every point, between stages
    (``dist`` exact, ``upper`` = sqrt(dist), drift 0). A point strictly nearer to
    ``c`` than to its centre moves to ``c``."""
    for i in range(dist.shape[0]):
        v = distances[i]
        e = np.sqrt(v)
        lower[c, i] = e
        a = assign[i]
        b = runner[i]
        if a == c:
            dist[i] = v
            upper[i] = e
        elif b == c:
            runner_low[i] = e
            if v < dist[i]:
                assign[i] = c
                runner[i] = a
                runner_low[i] = upper[i]
                upper[i] = e
                dist[i] = v
        elif v < dist[i]:
            others_low[i] = min(others_low[i], runner_low[i])
            runner[i] = a
            runner_low[i] = upper[i]
            lower[a, i] = upper[i]
            assign[i] = c
            upper[i] = e
            dist[i] = v
        elif e < runner_low[i]:
            others_low[i] = min(others_low[i], runner_low[i])
            runner[i] = c
            runner_low[i] = e
        else:
            others_low[i] = min(others_low[i], e)


@njit(cache=True, nogil=True)
def _scan(x, i, centres_t, k, assign, runner, upper, runner_low, others_low, lower, drift, buffer):
    """Exact distances from point ``i`` to all ``k`` centres: the two nearest become its
    centre and runner, every bound is refreshed. Returns the previous centre."""
    c1, d1, c2, d2, d3 = _top3(x[i], centres_t, k, buffer)
    for c in range(k):
        lower[c, i] = np.sqrt(buffer[c]) + drift[c]
    previous = assign[i]
    assign[i] = c1
    runner[i] = c2
    upper[i] = np.sqrt(d1)
    runner_low[i] = np.sqrt(d2)
    others_low[i] = np.sqrt(d3)
    return previous


@njit(cache=True, nogil=True)
def _repair(x, xt, norms, centres, centres_t, k, assign, runner, dist, upper, runner_low,
            others_low, lower, sums, squares, counts, changed, previous, scratch):
    """Between stages: re-seed empty clusters with the farthest points until none is
    left or none can be. ``dist`` must be exact on entry and stays exact."""
    for _ in range(x.shape[0]):
        empty = _first_empty(counts, k)
        if empty < 0:
            return
        far = _farthest(dist, assign, counts)
        if far < 0:
            return
        _set_centre(centres, centres_t, empty, x[far])
        _distances_to(xt, centres[empty], scratch)
        scratch[far] = 0.0
        previous[:] = assign
        # the old position of ``empty`` bounded nothing any more: offer the new one
        _offer(scratch, empty, assign, runner, dist, upper, runner_low, others_low, lower)
        for i in range(x.shape[0]):
            if assign[i] != previous[i]:
                _move(x, norms, i, previous[i], assign[i], sums, squares, counts, changed)


@njit(cache=True, nogil=True)
def _update_bounds(xt, centres, moved, n_moved, exact, move, drift, slack, assign, runner, upper,
                   runner_low, others_low, lower, scratch, candidates):
    """Account for the moved centres in every point's bounds and list the points whose
    bounds overlap; returns how many.

    ``moved[:n_moved]`` are the centres whose moves are applied now: those
    flagged in ``exact`` refresh the bounds from exact distances, the others
    loosen them by ``move`` (``drift`` already includes it). Moves not applied
    yet are covered by ``slack``, the largest such total of any centre. Points
    are processed in blocks that stay in L1 cache; every inner loop runs over
    the points of a block from index 0 (no negative-index checks) with selects
    only, so LLVM vectorises it.
    """
    d, n = xt.shape
    inf = np.float32(np.inf)
    zero = np.float32(0.0)
    n_candidates = 0
    for start in range(0, n, BLOCK):
        stop = min(start + BLOCK, n)
        size = stop - start
        a_b = assign[start:stop]
        r_b = runner[start:stop]
        u_b = upper[start:stop]
        rl_b = runner_low[start:stop]
        o_b = others_low[start:stop]
        s_b = scratch[start:stop]
        for t in range(n_moved):
            c = moved[t]
            c32 = np.int32(c)
            row = lower[c, start:stop]
            drift_c = drift[c]
            if exact[t]:
                for i in range(size):
                    s_b[i] = 0.0
                for j in range(d):
                    cj = centres[c, j]
                    points = xt[j, start:stop]
                    for i in range(size):
                        diff = points[i] - cj
                        s_b[i] += diff * diff
                for i in range(size):
                    e = np.sqrt(s_b[i])
                    row[i] = e + drift_c
                    own = a_b[i] == c32
                    run = r_b[i] == c32
                    u_b[i] = e if own else u_b[i]
                    rl_b[i] = e if run else rl_b[i]
                    low = inf if (own | run) else e
                    o = o_b[i]
                    o_b[i] = low if low < o else o
            else:
                m = move[c]
                for i in range(size):
                    own = a_b[i] == c32
                    run = r_b[i] == c32
                    low = row[i] - drift_c
                    low = inf if (own | run) else low
                    u_b[i] += m if own else zero
                    rl_b[i] -= m if run else zero
                    o = o_b[i]
                    o_b[i] = low if low < o else o
        for i in range(size):
            low = min(rl_b[i], o_b[i]) - slack
            candidates[n_candidates] = start + i
            n_candidates += 1 if u_b[i] + slack > low * MARGIN else 0
    return n_candidates


@njit(cache=True, nogil=True)
def _lloyd(x, xt, norms, centres, centres_t, k, assign, runner, upper, runner_low, others_low,
           lower, dist, sums, squares, counts, changed, max_iter, tol, move, drift, pending,
           moved_list, exact, candidates, scratch, buffer):
    """Lloyd iterations on the first ``k`` centres; returns (iterations, slack).

    On entry every point is at its nearest centre with valid bounds, drift is 0
    and ``changed`` flags clusters whose members changed since their centre was
    computed. ``dist`` is scratch. Small moves are not applied to the bounds at
    once: they add up in ``pending`` until a centre's total exceeds a threshold,
    and meanwhile every bound is taken to be loose by the largest pending total
    (``slack``). On return the bounds are valid up to that slack.
    """
    n, d = x.shape
    distortion = _statistics_distortion(centres, k, sums, squares, counts)
    threshold = np.float32(np.sqrt(max(distortion, 0.0) / n)) * PENDING_MOVE
    drift[:k] = 0.0
    pending[:k] = 0.0
    slack = np.float32(0.0)
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        # update step: centres of changed clusters to their means; how far each moved
        for c in range(k):
            move[c] = 0.0
            if changed[c] and counts[c] > 0:
                shift = np.float32(0.0)
                for j in range(d):
                    v = np.float32(sums[c, j] / counts[c])
                    t = v - centres[c, j]
                    shift += t * t
                    centres[c, j] = v
                    centres_t[j, c] = v
                move[c] = np.sqrt(shift)
            changed[c] = False
        # one empty cluster: re-seed it with the point farthest from its codeword
        empty = _first_empty(counts, k)
        far = -1
        if empty >= 0:
            _own_distances(x, centres, assign, dist)
            far = _farthest(dist, assign, counts)
            if far >= 0:
                move[empty] = np.sqrt(_distance(x[far], centres[empty]))
                _set_centre(centres, centres_t, empty, x[far])
        # bounds: exact distances to the centres that moved most, a shift for the others
        largest = np.float32(0.0)
        for c in range(k):
            largest = max(largest, move[c])
        n_moved = 0
        n_exact = 0
        slack = np.float32(0.0)
        for c in range(k):
            if move[c] <= 0.0:
                slack = max(slack, pending[c])
                continue
            drift[c] += move[c]
            pending[c] += move[c]
            is_exact = (move[c] > largest * EXACT_FRACTION and n_exact < EXACT_MOVES
                        and move[c] > threshold)
            if is_exact or pending[c] > threshold:
                moved_list[n_moved] = c
                exact[n_moved] = is_exact
                move[c] = pending[c]
                pending[c] = 0.0
                n_exact += 1 if is_exact else 0
                n_moved += 1
            else:
                slack = max(slack, pending[c])
        if far >= 0:
            a = assign[far]
            _move(x, norms, far, a, empty, sums, squares, counts, changed)
            e = np.sqrt(dist[far])
            lower[a, far] = e + drift[a]
            lower[empty, far] = drift[empty]
            if runner[far] != empty:
                others_low[far] = min(others_low[far], runner_low[far])
            assign[far] = empty
            runner[far] = a
            upper[far] = 0.0
            runner_low[far] = e
        # (the points whose bounds overlap)
        n_candidates = _update_bounds(xt, centres, moved_list, n_moved, exact, move, drift, slack,
                                      assign, runner, upper, runner_low, others_low, lower, scratch,
                                      candidates)
        # assignment step for them: own centre, then runner, then all
        moved = 0
        for t in range(n_candidates):
            i = candidates[t]
            a = assign[i]
            b = runner[i]
            dist_a = _distance(x[i], centres[a])
            u = np.sqrt(dist_a)
            upper[i] = u
            lower[a, i] = u + drift[a]
            others = others_low[i] - slack
            if u <= min(runner_low[i] - slack, others) * MARGIN:
                continue
            dist_b = _distance(x[i], centres[b])
            r = np.sqrt(dist_b)
            runner_low[i] = r
            lower[b, i] = r + drift[b]
            if min(u, r) <= others * MARGIN:
                if dist_b < dist_a:  # the runner is nearer: swap
                    _move(x, norms, i, a, b, sums, squares, counts, changed)
                    assign[i] = b
                    runner[i] = a
                    upper[i] = r
                    runner_low[i] = u
                    moved += 1
                continue
            if _scan(x, i, centres_t, k, assign, runner, upper, runner_low, others_low, lower,
                     drift, buffer) != assign[i]:
                _move(x, norms, i, a, assign[i], sums, squares, counts, changed)
                moved += 1
        new_distortion = _statistics_distortion(centres, k, sums, squares, counts)
        improvement = distortion - new_distortion
        distortion = new_distortion
        if _first_empty(counts, k) >= 0:
            continue
        if moved == 0 or improvement <= tol * (distortion + improvement):
            break
    return iterations, slack


@njit(cache=True, nogil=True)
def _grow(x, xt, norms, num_codewords, max_iter, tol, seed, monotone, centres, assign):
    """One restart: grow from 1 to ``num_codewords`` centres.

    With ``monotone`` every stage runs Lloyd iterations; without, only the last
    (plain greedy k-means++ seeding, then Lloyd). Fills ``centres`` (K, d)
    float32 and ``assign`` (n,) int32; returns (distortion, Lloyd iterations of
    the last stage).
    """
    n, d = x.shape
    k_max = num_codewords
    centres_t = np.zeros((d, k_max), np.float32)
    sums = np.zeros((k_max, d), np.float64)
    squares = np.zeros(k_max, np.float64)
    counts = np.zeros(k_max, np.int64)
    changed = np.zeros(k_max, np.bool_)
    move = np.zeros(k_max, np.float32)
    drift = np.zeros(k_max, np.float32)
    pending = np.zeros(k_max, np.float32)
    moved_list = np.empty(k_max, np.int64)
    exact = np.zeros(k_max, np.bool_)
    buffer = np.empty(k_max, np.float32)
    saved_centres = np.empty((k_max, d), np.float32)
    dist = np.empty(n, np.float32)
    runner = np.full(n, -1, np.int32)
    upper = np.empty(n, np.float32)
    runner_low = np.full(n, np.inf, np.float32)
    others_low = np.full(n, np.inf, np.float32)
    lower = np.zeros((k_max, n), np.float32)
    previous = np.empty(n, np.int32)
    candidates = np.empty(n, np.int64)
    scratch = np.empty(n, np.float32)
    trial_dist = np.empty(n, np.float32)
    best_dist = np.empty(n, np.float32)
    cumulative = np.empty(n, np.float64)

    # stage 1: the mean
    assign[:] = 0
    _rebuild(x, norms, 1, assign, sums, squares, counts)
    for j in range(d):
        v = np.float32(sums[0, j] / n)
        centres[0, j] = v
        centres_t[j, 0] = v
    _own_distances(x, centres, assign, dist)
    for i in range(n):
        upper[i] = np.sqrt(dist[i])
        lower[0, i] = upper[i]
    distortion = _sum(dist, n)
    iterations = 1

    for k in range(1, k_max):
        # greedy k-means++: candidates drawn with probability dist / sum(dist)
        total = 0.0
        for i in range(n):
            total += np.float64(dist[i])
            cumulative[i] = total
        chosen = -1
        if total > 0.0:
            trials = 2 + int(np.log(k + 1.0))
            best_potential = np.inf
            for trial in range(trials):
                target = _uniform(seed, k, trial) * total
                lo = 0
                hi = n
                while lo < hi:  # first i with cumulative[i] > target
                    mid = (lo + hi) // 2
                    if cumulative[mid] > target:
                        hi = mid
                    else:
                        lo = mid + 1
                candidate = lo
                if candidate >= n:
                    candidate = n - 1
                    while dist[candidate] <= 0.0:
                        candidate -= 1
                _distances_to(xt, x[candidate], trial_dist)
                for i in range(n):
                    scratch[i] = min(trial_dist[i], dist[i])
                potential = _sum(scratch, n)
                if potential < best_potential:
                    best_potential = potential
                    chosen = candidate
                    trial_dist, best_dist = best_dist, trial_dist
        else:
            # every distance rounded to 0 (sub-normal differences): any point off its centre
            for i in range(n):
                for j in range(d):
                    if x[i, j] != centres[assign[i], j]:
                        chosen = i
                        break
                if chosen >= 0:
                    break
            if chosen >= 0:
                _distances_to(xt, x[chosen], best_dist)
        if chosen < 0:
            # nothing left to separate: repeat the first codeword (bounds stay valid at 0)
            _set_centre(centres, centres_t, k, centres[0])
            lower[k] = 0.0
            others_low[:] = 0.0
            continue
        # add the codeword and move the points nearer to it
        _set_centre(centres, centres_t, k, x[chosen])
        best_dist[chosen] = 0.0
        if dist[chosen] <= 0.0:  # its distance rounded to 0: make it move anyway
            dist[chosen] = np.float32(np.inf)
        previous[:] = assign
        _offer(best_dist, k, assign, runner, dist, upper, runner_low, others_low, lower)
        for i in range(n):
            if assign[i] != previous[i]:
                _move(x, norms, i, previous[i], assign[i], sums, squares, counts, changed)
        k_now = k + 1
        if not monotone and k_now < k_max:
            continue  # seeding only: distances and bounds are exact after _offer
        start = _sum(dist, n)
        saved_centres[:k_now] = centres[:k_now]
        iterations, slack = _lloyd(x, xt, norms, centres, centres_t, k_now, assign, runner, upper,
                                   runner_low, others_low, lower, dist, sums, squares, counts,
                                   changed, max_iter, tol, move, drift, pending, moved_list, exact,
                                   candidates, scratch, buffer)
        # back to exact distances and plain bounds
        _own_distances(x, centres, assign, dist)
        for i in range(n):
            upper[i] = np.sqrt(dist[i])
            runner_low[i] -= slack
            others_low[i] -= slack
        for c in range(k_now):
            if drift[c] != 0.0:
                row = lower[c]
                shift = drift[c]
                for i in range(n):
                    row[i] -= shift
                drift[c] = 0.0
        distortion = _sum(dist, n)
        if distortion > start:
            # rounding left the stage worse than it started: go back to its start
            # (and every point to its nearest centre, which can only lower it further)
            for c in range(k_now):
                _set_centre(centres, centres_t, c, saved_centres[c])
            for i in range(n):
                _scan(x, i, centres_t, k_now, assign, runner, upper, runner_low, others_low, lower,
                      drift, buffer)
            _rebuild(x, norms, k_now, assign, sums, squares, counts)
            changed[:k_now] = True
            _own_distances(x, centres, assign, dist)
        _repair(x, xt, norms, centres, centres_t, k_now, assign, runner, dist, upper, runner_low,
                others_low, lower, sums, squares, counts, changed, previous, scratch)
        distortion = _sum(dist, n)
    return distortion, iterations


@njit(cache=True, nogil=True)
def _kmeans_subspace(x, bits, num_codewords, n_init, max_iter, tol, monotone, seeds, codebook, codes):
    """k-means of one subspace ``x`` (n, d) float32. Writes ``codebook`` (K, d) float32 and
    ``codes`` (n,) uint8; returns (distortion, iterations)."""
    n, d = x.shape
    k = num_codewords
    labels = np.empty(n, np.int32)
    representatives = np.empty(k, np.int64)
    count = _distinct(x, bits, k, labels, representatives)
    if count >= 0:
        for c in range(k):
            r = representatives[c if c < count else 0]
            for j in range(d):
                codebook[c, j] = x[r, j]
        for i in range(n):
            codes[i] = labels[i]
        return 0.0, 0
    xt = np.ascontiguousarray(x.T)
    norms = np.empty(n, np.float64)
    for i in range(n):
        s = 0.0
        for j in range(d):
            v = np.float64(x[i, j])
            s += v * v
        norms[i] = s
    centres = np.empty((k, d), np.float32)
    best = np.inf
    best_iterations = 0
    for restart in range(n_init):
        distortion, iterations = _grow(x, xt, norms, k, max_iter, tol, seeds[restart], monotone,
                                       centres, labels)
        if distortion < best:
            best = distortion
            best_iterations = iterations
            codebook[:, :] = centres
            for i in range(n):
                codes[i] = labels[i]
    return best, best_iterations


def _kmeans_batch(x, bits, num_codewords, n_init, max_iter, tol, monotone, seeds, codebooks, codes,
                  distortion, iterations):
    """k-means in each of M subspaces.

    Parameters
    ----------
    x : float32 (M, n, d), C-contiguous, finite
    bits : uint32 (M, n, d)
        ``x`` viewed as uint32.
    num_codewords : int
        K, 1..256.
    n_init, max_iter : int
    tol : float
    monotone : bool
        Lloyd iterations after every added codeword (distortion non-increasing in
        K) or only after the last.
    seeds : uint64 (M, n_init)
        One random stream per subspace and restart.
    codebooks : float32 (M, K, d)
    codes : uint8 (M, n)
    distortion : float64 (M,)
    iterations : int64 (M,)
        Outputs, overwritten.
    """
    for m in prange(x.shape[0]):
        dist, its = _kmeans_subspace(x[m], bits[m], num_codewords, n_init, max_iter, tol, monotone,
                                     seeds[m], codebooks[m], codes[m])
        distortion[m] = dist
        iterations[m] = its


kmeans_batch_serial, kmeans_batch_parallel = serial_and_parallel(_kmeans_batch)
