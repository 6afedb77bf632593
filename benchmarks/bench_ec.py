"""Error correction (EC): time per iteration on AlexNet-sized layers.

What is measured
----------------
:func:`qcnn.quantization.ec.error_correct` on two layers with the paper's settings:

* ``fc7``:   weights 4096 x 4096, C'_s = 4 (M = 1024), K = 32, N = 5,000 samples;
* ``conv3``: weights 384 x 256 x 3 x 3, C'_s = 8 (M = 32), K = 128, N = 4,000 sampled
  output positions (P = 9 kernel positions per sample).

The data are synthetic (real AlexNet weights and activations are not available offline):
weights Gaussian (std 0.005 for fc7, 0.01 for conv3, Caffe's AlexNet initialisation),
inputs ReLU'd standard Gaussians, targets ``T = S W^T``. The initial codebooks and codes come
from :func:`qcnn.quantization.pq.quantize_weight` (k-means, timed separately). EC runs a
fixed number of iterations (``--iterations``, ``tol=0``).

Reported per layer and thread count: the k-means time, the set-up time (statistics S^T S,
S^T T over the samples and the initial objective), the seconds of every iteration, the
total, and the relative response error ``sqrt(objective / ||T||^2)`` of k-means and after
EC. Threads: ``threadpoolctl.threadpool_limits`` for BLAS (when installed) and
``numba.set_num_threads`` for the kernels; the BLAS variables are also set before NumPy is
imported (to the largest count).

Output: a table on stdout and ``benchmarks/results/ec.json`` (``--output``).

Running
-------
    python benchmarks/bench_ec.py [--quick] [--layers fc7,conv3] [--threads 2] [--iterations 5]
"""

import argparse
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = {
    # name: (weight shape, samples N, subdim C'_s, K, std of the random weights)
    "fc7": ((4096, 4096), 5000, 4, 32, 0.005),
    "conv3": ((384, 256, 3, 3), 4000, 8, 128, 0.01),
}
QUICK = {  # --quick: the same settings on layers 1/8 the width
    "fc7": ((512, 512), 1000, 4, 32, 0.005),
    "conv3": ((48, 32, 3, 3), 500, 8, 128, 0.01),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="small layers (a smoke test)")
    parser.add_argument("--layers", default="fc7,conv3", help="comma-separated subset of fc7,conv3")
    parser.add_argument("--threads", default="2", help="comma-separated thread counts; default 2")
    parser.add_argument("--iterations", type=int, default=5, help="EC iterations; default 5")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of k-means")
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results", "ec.json"),
                        help="JSON results file")
    args = parser.parse_args(argv)
    args.threads = [int(t) for t in args.threads.split(",") if t]
    args.layers = [name for name in args.layers.split(",") if name]
    if set(args.layers) - set(LAYERS):
        parser.error(f"unknown layer(s) {sorted(set(args.layers) - set(LAYERS))}; choose from {sorted(LAYERS)}")
    if not args.threads or min(args.threads) < 1 or args.iterations < 1:
        parser.error("--threads and --iterations must be >= 1")
    return args


def make_problem(name, quick, seed):
    """(inputs (1, N, P, C_s), targets (N, C_t), weight, subdim, K) float32."""
    import numpy as np

    shape, n, subdim, k, std = (QUICK if quick else LAYERS)[name]
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
    weight4 = weight.reshape(shape[0], shape[1], *(shape[2:] or (1, 1)))
    c_out, channels, kh, kw = weight4.shape
    inputs = np.maximum(rng.standard_normal((1, n, kh * kw, channels), dtype=np.float32), 0)
    targets = inputs[0].reshape(n, -1) @ weight4.transpose(0, 2, 3, 1).reshape(c_out, -1).T
    return inputs, targets, weight, subdim, k


def thread_limits(count):
    """Context manager limiting BLAS threads (a no-op without threadpoolctl)."""
    import contextlib

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(count)


def measure(name, threads, args):
    import numba
    import numpy as np

    from qcnn.quantization.ec import error_correct, objective
    from qcnn.quantization.pq import quantize_weight

    inputs, targets, weight, subdim, k = make_problem(name, args.quick, args.seed)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    with thread_limits(threads):
        start = time.perf_counter()
        codebooks, codes = quantize_weight(weight, 1, subdim, k, seed=args.seed)
        kmeans_s = time.perf_counter() - start
        stamps = []
        start = time.perf_counter()
        result = error_correct(inputs, targets, codebooks, codes, max_iter=args.iterations, tol=0,
                               progress=lambda i, value: stamps.append(time.perf_counter()))
        total_s = time.perf_counter() - start
        final = objective(inputs, targets, result.codebooks, result.codes)
    scale = float((targets.astype(np.float64) ** 2).sum())
    per_iteration = np.diff(stamps).tolist()
    return {
        "layer": name, "threads": threads, "weight_shape": list(weight.shape), "samples": inputs.shape[1],
        "positions": inputs.shape[2], "subdim": subdim, "K": k, "iterations": result.iterations,
        "kmeans_s": kmeans_s, "setup_s": stamps[0] - start, "iteration_s": per_iteration, "total_s": total_s,
        "objective": result.objective, "objective_check": final,
        "relative_error_kmeans": (result.objective[0] / scale) ** 0.5,
        "relative_error_ec": (final / scale) ** 0.5,
    }


def print_table(rows):
    header = (f"{'layer':6} {'thr':>3} {'N':>6} {'k-means s':>9} {'setup s':>8} {'s/iter':>7} "
              f"{'iters':>5} {'EC total s':>10} {'rel.err k-means':>15} {'rel.err EC':>10} {'obj. change':>11}")
    print(header)
    print("-" * len(header))
    for r in rows:
        mean = sum(r["iteration_s"]) / len(r["iteration_s"])
        reduction = 1 - r["objective"][-1] / r["objective"][0]
        print(f"{r['layer']:6} {r['threads']:>3} {r['samples']:>6} {r['kmeans_s']:>9.1f} {r['setup_s']:>8.1f} "
              f"{mean:>7.2f} {r['iterations']:>5} {r['total_s']:>10.1f} {r['relative_error_kmeans']:>15.4f} "
              f"{r['relative_error_ec']:>10.4f} {-reduction:>+11.1%}")


def main(argv=None):
    args = parse_args(argv)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(max(args.threads))
    sys.path.insert(0, ROOT)
    rows = [measure(name, threads, args) for name in args.layers for threads in args.threads]
    print_table(rows)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"quick": args.quick, "machine": platform.processor() or platform.machine(),
                   "cpus": os.cpu_count(), "runs": rows}, f, indent=1)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
