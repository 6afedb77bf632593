"""Numba kernels of k-means in many small subspaces (the inner loop of product quantization).

One call clusters M independent subspaces (``prange`` over subspaces in the
parallel variant). Per subspace, with n points of dimension d and K codewords:

1. **Few distinct points.** A small hash table counts the distinct points,
   giving up as soon as it has seen K + 1 (for ordinary data after K + 1
   points). With at most K distinct points the codebook is those points
   (later rows repeat the first) and the quantization is exact.
2. **Growth.** Otherwise each of ``n_init`` restarts grows the codebook one
   codeword at a time. Stage 1 is the mean of all points (the 1-means
   optimum). Stage k adds codeword k by greedy k-means++ (D^2) seeding: a few
   candidates are drawn with probability proportional to each point's squared
   distance to its current codeword, the one that lowers the distortion most
   is kept, and Lloyd iterations follow. Adding a codeword never raises the
   distortion and a Lloyd stage never accepts a step that does, so stage k's
   result (which *is* the answer for K = k) is never worse than stage k - 1's:
   the distortion is non-increasing in K by construction, not by chance.
   Random numbers are a counter-based hash of (seed, stage, draw), so a run
   for K passes through exactly the states of the runs for every smaller K.
3. **Lloyd** iterations stop when no point moves (and no cluster is empty),
   when the relative improvement is below ``tol``, or after ``max_iter``. An
   empty cluster is re-seeded with the point farthest from its codeword (one
   per iteration, taken from a cluster with at least two points); clusters
   still empty when a stage stops are repaired the same way afterwards, so all
   K codewords are used whenever there are more than K distinct points.

Speed. Distances are float32 ``sum_j (x_j - c_j)^2``, always accumulated in
the same order so every code path gets the same value for the same pair; no
fastmath (no contraction or reassociation), so the serial and parallel
variants give bit-identical results. The assignment step is incremental and
exact: only centres that moved are compared against all points, in a loop over
points that LLVM vectorises (points stored transposed, (d, n)); a point is
compared with all K centres (a loop over the codebook stored transposed,
(d, K), also vectorised) only when its own centre moved away from it. Cluster
sums are float64 and updated only for points that change cluster.
"""

import numpy as np
from numba import njit, prange

from qcnn.kernels.jit import serial_and_parallel

MAX_TRIALS = 8  # greedy k-means++ candidates per stage: 2 + floor(ln k) <= 7 for k <= 256

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
    """float64 sum of ``values[:n]`` (float32) in a fixed order (four interleaved partial sums)."""
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    i = 0
    while i + 4 <= n:
        s0 += values[i]
        s1 += values[i + 1]
        s2 += values[i + 2]
        s3 += values[i + 3]
        i += 4
    while i < n:
        s0 += values[i]
        i += 1
    return (s0 + s1) + (s2 + s3)


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
def _nearest_to_centre(xt, centres, c, assign, dist, scratch):
    """Move every point strictly closer to centre ``c`` than to its own centre to ``c``.

    Vectorised over points: ``xt`` is (d, n); ``scratch`` (n,) float32.
    """
    d, n = xt.shape
    for i in range(n):
        scratch[i] = 0.0
    for j in range(d):
        cj = centres[c, j]
        row = xt[j]
        for i in range(n):
            t = row[i] - cj
            scratch[i] += t * t
    for i in range(n):
        closer = scratch[i] < dist[i]
        dist[i] = scratch[i] if closer else dist[i]
        assign[i] = c if closer else assign[i]


@njit(cache=True, nogil=True)
def _full_scan(x, centres_t, k, buffer):
    """(index, squared distance) of the nearest of the first ``k`` centres to ``x`` (d,).

    Vectorised over centres: ``centres_t`` is (d, K); ties go to the lowest index.
    """
    d = x.shape[0]
    for c in range(k):
        buffer[c] = 0.0
    for j in range(d):
        xj = x[j]
        row = centres_t[j]
        for c in range(k):
            t = xj - row[c]
            buffer[c] += t * t
    best = 0
    best_dist = buffer[0]
    for c in range(1, k):
        if buffer[c] < best_dist:
            best_dist = buffer[c]
            best = c
    return best, best_dist


@njit(cache=True, nogil=True)
def _bookkeep(x, assign, previous, sums, counts, changed):
    """Update cluster sums and counts for points whose cluster changed; returns how many."""
    n, d = x.shape
    moved = 0
    for i in range(n):
        new = assign[i]
        old = previous[i]
        if new != old:
            moved += 1
            counts[old] -= 1
            counts[new] += 1
            changed[old] = True
            changed[new] = True
            for j in range(d):
                v = np.float64(x[i, j])
                sums[old, j] -= v
                sums[new, j] += v
    return moved


@njit(cache=True, nogil=True)
def _rebuild(x, centres, k, assign, dist, sums, counts):
    """Recompute distances, sums and counts from scratch (after a rejected step)."""
    n, d = x.shape
    sums[:k] = 0.0
    counts[:k] = 0
    for i in range(n):
        a = assign[i]
        dist[i] = _distance(x[i], centres[a])
        counts[a] += 1
        for j in range(d):
            sums[a, j] += np.float64(x[i, j])


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


@njit(cache=True, nogil=True)
def _repair_after(x, xt, centres, centres_t, k, assign, dist, sums, counts, changed, previous,
                  scratch):
    """Re-seed empty clusters (after a stage stopped) until none is left or none can be."""
    n = x.shape[0]
    for _ in range(n):
        empty = _first_empty(counts, k)
        if empty < 0:
            return
        far = _farthest(dist, assign, counts)
        if far < 0:
            return
        _set_centre(centres, centres_t, empty, x[far])
        previous[:] = assign
        assign[far] = empty
        dist[far] = 0.0
        _nearest_to_centre(xt, centres, empty, assign, dist, scratch)
        _bookkeep(x, assign, previous, sums, counts, changed)


@njit(cache=True, nogil=True)
def _lloyd(x, xt, centres, centres_t, k, assign, dist, sums, counts, changed, distortion,
           max_iter, tol, previous, saved, moved_centre, delta, full, scratch, buffer):
    """Lloyd iterations on the first ``k`` centres from a state where every point is at its
    nearest centre. Returns (distortion, iterations)."""
    n, d = x.shape
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        saved[:k] = centres[:k]
        previous[:] = assign
        # update step: changed clusters' centres to their means
        n_delta = 0
        for c in range(k):
            if changed[c] and counts[c] > 0:
                shifted = False
                for j in range(d):
                    v = np.float32(sums[c, j] / counts[c])
                    if v != centres[c, j]:
                        shifted = True
                    centres[c, j] = v
                    centres_t[j, c] = v
                if shifted:
                    moved_centre[c] = True
                    delta[n_delta] = c
                    n_delta += 1
            changed[c] = False
        # one empty cluster: re-seed it with the point farthest from its codeword
        empty = _first_empty(counts, k)
        if empty >= 0:
            far = _farthest(dist, assign, counts)
            if far >= 0:
                # sums and counts follow in the bookkeeping below, like any other move
                _set_centre(centres, centres_t, empty, x[far])
                assign[far] = empty
                dist[far] = 0.0
                if not moved_centre[empty]:
                    moved_centre[empty] = True
                    delta[n_delta] = empty
                    n_delta += 1
        # assignment step, incremental: a point's nearest centre is its own or one that moved
        n_full = 0
        for i in range(n):
            own = assign[i]
            if moved_centre[own]:
                new_dist = _distance(x[i], centres[own])
                if new_dist > dist[i]:
                    full[n_full] = i
                    n_full += 1
                dist[i] = new_dist
        for t in range(n_delta):
            _nearest_to_centre(xt, centres, delta[t], assign, dist, scratch)
        for t in range(n_full):
            i = full[t]
            best, best_dist = _full_scan(x[i], centres_t, k, buffer)
            assign[i] = best
            dist[i] = best_dist
        for t in range(n_delta):
            moved_centre[delta[t]] = False
        moved = _bookkeep(x, assign, previous, sums, counts, changed)
        new_distortion = _sum(dist, n)
        if new_distortion > distortion:
            # rounding made the step worse: undo it and stop
            for c in range(k):
                _set_centre(centres, centres_t, c, saved[c])
            for i in range(n):
                assign[i] = previous[i]
            _rebuild(x, centres, k, assign, dist, sums, counts)
            for c in range(k):
                changed[c] = True
            distortion = _sum(dist, n)
            break
        improvement = distortion - new_distortion
        distortion = new_distortion
        if _first_empty(counts, k) >= 0:
            continue
        if moved == 0 or improvement <= tol * (distortion + improvement):
            break
    return distortion, iterations


@njit(cache=True, nogil=True)
def _grow(x, xt, num_codewords, max_iter, tol, seed, centres, assign):
    """One restart: grow from 1 to ``num_codewords`` centres; fills ``centres`` (K, d)
    float32 and ``assign`` (n,) int32. Returns (distortion, iterations of the last stage)."""
    n, d = x.shape
    k_max = num_codewords
    centres_t = np.zeros((d, k_max), np.float32)
    sums = np.zeros((k_max, d), np.float64)
    counts = np.zeros(k_max, np.int64)
    changed = np.zeros(k_max, np.bool_)
    moved_centre = np.zeros(k_max, np.bool_)
    delta = np.empty(k_max, np.int64)
    saved = np.empty((k_max, d), np.float32)
    dist = np.empty(n, np.float32)
    previous = np.empty(n, np.int32)
    full = np.empty(n, np.int64)
    scratch = np.empty(n, np.float32)
    trial_dist = np.empty(n, np.float32)
    best_dist = np.empty(n, np.float32)
    cumulative = np.empty(n, np.float64)
    buffer = np.empty(k_max, np.float32)

    # stage 1: the mean
    for i in range(n):
        assign[i] = 0
        for j in range(d):
            sums[0, j] += np.float64(x[i, j])
    counts[0] = n
    for j in range(d):
        v = np.float32(sums[0, j] / n)
        centres[0, j] = v
        centres_t[j, 0] = v
    for i in range(n):
        dist[i] = _distance(x[i], centres[0])
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
                for i in range(n):
                    trial_dist[i] = 0.0
                for j in range(d):
                    cj = x[candidate, j]
                    row = xt[j]
                    for i in range(n):
                        t = row[i] - cj
                        trial_dist[i] += t * t
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
                for i in range(n):
                    best_dist[i] = _distance(x[i], x[chosen])
        if chosen < 0:
            # nothing left to separate: repeat the first codeword
            _set_centre(centres, centres_t, k, centres[0])
            continue
        _set_centre(centres, centres_t, k, x[chosen])
        previous[:] = assign
        for i in range(n):
            closer = best_dist[i] < dist[i]
            dist[i] = best_dist[i] if closer else dist[i]
            assign[i] = k if closer else assign[i]
        if assign[chosen] != k:  # only when its distance rounded to 0
            assign[chosen] = k
            dist[chosen] = 0.0
        _bookkeep(x, assign, previous, sums, counts, changed)
        distortion = _sum(dist, n)
        distortion, iterations = _lloyd(x, xt, centres, centres_t, k + 1, assign, dist, sums, counts,
                                        changed, distortion, max_iter, tol, previous, saved,
                                        moved_centre, delta, full, scratch, buffer)
        _repair_after(x, xt, centres, centres_t, k + 1, assign, dist, sums, counts, changed, previous,
                      scratch)
        distortion = _sum(dist, n)
    return distortion, iterations


@njit(cache=True, nogil=True)
def _kmeans_subspace(x, bits, num_codewords, n_init, max_iter, tol, seeds, codebook, codes):
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
    centres = np.empty((k, d), np.float32)
    best = np.inf
    best_iterations = 0
    for restart in range(n_init):
        distortion, iterations = _grow(x, xt, k, max_iter, tol, seeds[restart], centres, labels)
        if distortion < best:
            best = distortion
            best_iterations = iterations
            codebook[:, :] = centres
            for i in range(n):
                codes[i] = labels[i]
    return best, best_iterations


def _kmeans_batch(x, bits, num_codewords, n_init, max_iter, tol, seeds, codebooks, codes,
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
    seeds : uint64 (M, n_init)
        One random stream per subspace and restart.
    codebooks : float32 (M, K, d)
    codes : uint8 (M, n)
    distortion : float64 (M,)
    iterations : int64 (M,)
        Outputs, overwritten.
    """
    for m in prange(x.shape[0]):
        dist, its = _kmeans_subspace(x[m], bits[m], num_codewords, n_init, max_iter, tol, seeds[m],
                                     codebooks[m], codes[m])
        distortion[m] = dist
        iterations[m] = its


kmeans_batch_serial, kmeans_batch_parallel = serial_and_parallel(_kmeans_batch)
