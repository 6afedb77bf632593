#!/usr/bin/env python
"""k-means in many subspaces: qcnn against scikit-learn and faiss on AlexNet-shaped sub-vectors.

What is measured
----------------
Product quantization clusters the sub-vectors of a layer's weights in every
subspace. Two layers of AlexNet, with the paper's settings:

* ``fc6``:   weights 4096 x 9216, C'_s = 4  -> M = 2304 subspaces of n = 4096 points, K = 32;
* ``conv3``: weights 384 x 256 x 3 x 3, C'_s = 8 -> M = 32 subspaces of n = 384*9 = 3456
  points, K = 128 (one codebook per subspace, shared by the 9 kernel positions).

The weights are **random Gaussian** (seeded; std 0.005 for fc6 and 0.01 for conv3, Caffe's
AlexNet initialisation): real AlexNet weights are not available offline. Sub-vectors are cut
as :func:`qcnn.quantization.pq.subvectors` cuts them.

Methods, on the same sub-vectors:

* ``qcnn``:    ``qcnn.quantization.kmeans.kmeans(points, K, seed, max_iter, tol)`` -- one call
  for a chunk of subspaces, spread over Numba's threads (prange over subspaces); the default
  mode, whose distortion provably never grows with K (Lloyd after every added codeword);
* ``qcnn-fast``: the same with ``monotone=False`` (greedy k-means++ seeding of all K codewords,
  then one Lloyd run: no guarantee in K);
* ``sklearn``: ``sklearn.cluster.KMeans(K, n_init=1, init="k-means++", max_iter, tol=1e-4
  (its default; its tol is a centre shift, not comparable to ours), random_state)``,
  one fit per subspace;
* ``faiss``:   ``faiss.Kmeans(d, K, niter=max_iter, seed)`` (random initialisation, a fixed
  number of iterations (``--faiss-niter``; faiss's own default is 25), no subsampling of the
  points), one train per subspace, then the
  codes by nearest-centroid search. Skipped with a message if faiss is not installed
  (``pip install faiss-cpu``).

Distortion is recomputed for every method the same way: the sum over all points of the
squared distance (float64) to the codeword its code names, summed over subspaces.

Method
------
* All methods run in this one process, side by side: the subspaces are cut into chunks
  (``--chunk``) and each chunk is run by every method in turn, rotating the order, so drift
  in machine load hits all alike. The garbage collector is off while timing.
* Threads (``--threads``, default ``1,2``): ``threadpoolctl.threadpool_limits`` pins BLAS and
  OpenMP (scikit-learn's and faiss's), ``numba.set_num_threads`` qcnn's prange and
  ``faiss.omp_set_num_threads`` faiss's pool; the BLAS/OpenMP variables are also set before
  NumPy is imported (to the largest count).
* fc6's 2304 subspaces through scikit-learn take minutes, so by default an evenly spaced
  sample of ``--fc6-subspaces`` (128) of them is used by *every* method (``all`` for all).
* Numba compilation is kept out of the timings (a warm-up call first) and reported
  separately: a fresh Python process compiles the kernels into an empty cache
  (``NUMBA_CACHE_DIR`` in a temporary folder) and times its first calls; a second fresh
  process then times the same calls with that cache (the normal start-up cost).

Output: a table on stdout and ``benchmarks/results/kmeans.json`` (``--output``).

Running
-------
    python benchmarks/bench_kmeans.py [--threads 1,2] [--layers fc6,conv3] [--fc6-subspaces 128]
        [--chunk 16] [--max-iter 100] [--tol 1e-6] [--faiss-niter N] [--seed 0] [--no-jit-timing]
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = {
    # name: (weight shape, subdim C'_s, K, std of the random weights)
    "fc6": ((4096, 9216), 4, 32, 0.005),
    "conv3": ((384, 256, 3, 3), 8, 128, 0.01),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts; default 1,2")
    parser.add_argument("--layers", default="fc6,conv3", help="comma-separated subset of fc6,conv3")
    parser.add_argument("--fc6-subspaces", default="128",
                        help="how many of fc6's 2304 subspaces (evenly spaced) every method runs, "
                             "or 'all'; default 128")
    parser.add_argument("--chunk", type=int, default=16, help="subspaces per interleaved chunk")
    parser.add_argument("--max-iter", type=int, default=100, help="max_iter (faiss: niter)")
    parser.add_argument("--tol", type=float, default=1e-6, help="qcnn's tol")
    parser.add_argument("--faiss-niter", type=int, default=None,
                        help="faiss's niter (it always runs them all); default --max-iter")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and of k-means")
    parser.add_argument("--no-jit-timing", action="store_true",
                        help="skip the fresh-process compile and start-up timings")
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results", "kmeans.json"),
                        help="JSON results file")
    args = parser.parse_args(argv)
    args.threads = [int(t) for t in args.threads.split(",") if t]
    if args.faiss_niter is None:
        args.faiss_niter = args.max_iter
    args.layers = [name for name in args.layers.split(",") if name]
    unknown = set(args.layers) - set(LAYERS)
    if unknown:
        parser.error(f"unknown layer(s) {sorted(unknown)}; choose from {sorted(LAYERS)}")
    if not args.threads or min(args.threads) < 1 or args.chunk < 1 or args.max_iter < 1:
        parser.error("--threads, --chunk and --max-iter must be >= 1")
    if args.fc6_subspaces != "all" and int(args.fc6_subspaces) < 1:
        parser.error("--fc6-subspaces must be >= 1 or 'all'")
    return args


def pin_threads_env(threads):
    """Set the BLAS/OpenMP thread variables; must run before NumPy is imported."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)


# ---------------------------------------------------------------- data

def layer_subvectors(name, seed, fc6_subspaces):
    """``(points float32 (M, n, subdim), K, subspace indices, total M)`` of a layer's
    random weights, cut like qcnn.quantization.pq.subvectors (no groups)."""
    import numpy as np

    shape, subdim, k, std = LAYERS[name]
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal(shape, dtype=np.float32) * np.float32(std))
    if weight.ndim == 2:
        weight = weight[:, :, None, None]
    c_out, c_s, kh, kw = weight.shape
    m = c_s // subdim
    # (C_t, M, subdim, kh, kw) -> (M, C_t, kh, kw, subdim) -> (M, C_t*kh*kw, subdim)
    points = weight.reshape(c_out, m, subdim, kh, kw).transpose(1, 0, 3, 4, 2).reshape(m, -1, subdim)
    chosen = np.arange(m)
    if name == "fc6" and fc6_subspaces != "all" and int(fc6_subspaces) < m:
        chosen = np.unique(np.linspace(0, m - 1, int(fc6_subspaces)).round().astype(int))
    return np.ascontiguousarray(points[chosen]), k, chosen, m


def sse(points, codebooks, codes):
    """Squared error (float64) per subspace from codebooks (M, K, d) and codes (M, n)."""
    import numpy as np

    chosen = np.take_along_axis(codebooks.astype(np.float64), codes[..., None].astype(np.intp), axis=1)
    return ((points.astype(np.float64) - chosen) ** 2).sum(axis=(1, 2))


# ---------------------------------------------------------------- methods

def run_qcnn(points, k, first, args, monotone=True):
    from qcnn.quantization.kmeans import kmeans

    result = kmeans(points, k, seed=args.seed + first, max_iter=args.max_iter, tol=args.tol,
                    monotone=monotone)
    return result.codebooks, result.codes, {"iterations_last_stage": result.iterations.tolist()}


def run_qcnn_fast(points, k, first, args):
    return run_qcnn(points, k, first, args, monotone=False)


def run_sklearn(points, k, first, args):
    import numpy as np
    from sklearn.cluster import KMeans

    m, _, d = points.shape
    codebooks = np.empty((m, k, d), np.float32)
    codes = np.empty(points.shape[:2], np.int64)
    iterations = []
    for i in range(m):
        model = KMeans(k, n_init=1, init="k-means++", max_iter=args.max_iter,
                       random_state=args.seed + first + i).fit(points[i])
        codebooks[i] = model.cluster_centers_
        codes[i] = model.labels_
        iterations.append(int(model.n_iter_))
    return codebooks, codes, {"iterations": iterations}


def run_faiss(points, k, first, args):
    import faiss
    import numpy as np

    m, n, d = points.shape
    codebooks = np.empty((m, k, d), np.float32)
    codes = np.empty((m, n), np.int64)
    for i in range(m):
        model = faiss.Kmeans(d, k, niter=args.faiss_niter, seed=args.seed + first + i, verbose=False,
                             max_points_per_centroid=n, min_points_per_centroid=1)
        model.train(points[i])
        _, nearest = model.index.search(points[i], 1)
        codebooks[i] = model.centroids
        codes[i] = nearest[:, 0]
    return codebooks, codes, {"iterations": args.faiss_niter}


METHODS = {"qcnn": run_qcnn, "qcnn-fast": run_qcnn_fast, "sklearn": run_sklearn, "faiss": run_faiss}


# ---------------------------------------------------------------- measurement

def measure_layer(name, methods, threads, args):
    """Run every method on the layer's subspaces, chunk by chunk, rotating the order."""
    import gc
    import time

    import numpy as np

    points, k, chosen, total = layer_subvectors(name, args.seed, args.fc6_subspaces)
    m = points.shape[0]
    results = {method: {"wall_s": 0.0, "cpu_s": 0.0, "distortion": np.zeros(m), "extra": []}
               for method in methods}
    chunks = [(start, min(start + args.chunk, m)) for start in range(0, m, args.chunk)]
    gc.collect()
    gc.disable()
    try:
        for c, (start, stop) in enumerate(chunks):
            order = methods[c % len(methods):] + methods[:c % len(methods)]
            for method in order:
                wall, cpu = time.perf_counter(), time.process_time()
                codebooks, codes, extra = METHODS[method](points[start:stop], k, start, args)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                entry = results[method]
                entry["wall_s"] += wall
                entry["cpu_s"] += cpu
                entry["distortion"][start:stop] = sse(points[start:stop], codebooks, codes)
                entry["extra"].append(extra)
    finally:
        gc.enable()
    summary = {"layer": name, "threads": threads, "K": k, "subdim": points.shape[2],
               "points_per_subspace": points.shape[1], "subspaces_run": m, "subspaces_total": total,
               "methods": {}}
    ours = results["qcnn"]
    fast = results.get("qcnn-fast")
    for method in methods:
        entry = results[method]
        if fast is not None:
            fast_ratios = {
                "distortion_ratio_fast_over": float(fast["distortion"].sum() / entry["distortion"].sum()),
                "time_ratio_fast_over": fast["wall_s"] / entry["wall_s"]}
        else:
            fast_ratios = {}
        summary["methods"][method] = {
            "wall_s": entry["wall_s"], "cpu_s": entry["cpu_s"],
            "ms_per_subspace": entry["wall_s"] / m * 1e3,
            "distortion_total": float(entry["distortion"].sum()),
            "distortion_per_subspace": entry["distortion"].tolist(),
            "distortion_ratio_qcnn_over": float(ours["distortion"].sum() / entry["distortion"].sum()),
            "time_ratio_qcnn_over": ours["wall_s"] / entry["wall_s"],
            "subspaces_qcnn_lower": int((ours["distortion"] < entry["distortion"]).sum()),
            **fast_ratios,
            "extra": entry["extra"],
        }
    return summary


def warm_up(methods):
    """First calls (compilation or cache loading) outside the timings; returns qcnn's seconds."""
    import time

    import numpy as np

    from qcnn.quantization.kmeans import kmeans

    points = np.random.default_rng(0).standard_normal((2, 300, 4)).astype(np.float32)
    start = time.perf_counter()
    kmeans(points, 8, parallel=False)
    kmeans(points, 8, parallel=True)
    seconds = time.perf_counter() - start
    args = argparse.Namespace(seed=0, max_iter=5, tol=1e-6, faiss_niter=5)
    for method in methods:
        METHODS[method](points, 8, 0, args)
    return seconds


JIT_SCRIPT = r"""
import json, time
start = time.perf_counter()
import numpy as np
from qcnn.quantization.kmeans import kmeans
imported = time.perf_counter()
points = np.random.default_rng(0).standard_normal((2, 300, 4)).astype(np.float32)
kmeans(points, 8, parallel=False)
serial = time.perf_counter()
kmeans(points, 8, parallel=True)
parallel = time.perf_counter()
print(json.dumps({"import_s": imported - start, "first_call_serial_s": serial - imported,
                  "first_call_parallel_s": parallel - serial}))
"""


def jit_timings():
    """Compile into an empty Numba cache in a fresh process, then start again from it."""
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache,
                   PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        runs = []
        for _ in range(2):
            done = subprocess.run([sys.executable, "-c", JIT_SCRIPT], env=env, capture_output=True,
                                  text=True, check=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {"cold_compile": runs[0], "cached_start": runs[1]}


def environment(methods):
    import platform

    import numba
    import numpy as np

    import qcnn

    env = {"python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__,
           "qcnn": qcnn.__version__, "cpu": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "load_average": list(os.getloadavg())}
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if "sklearn" in methods:
        import sklearn
        env["scikit-learn"] = sklearn.__version__
    if "faiss" in methods:
        import faiss
        env["faiss"] = faiss.__version__
    return env


# ---------------------------------------------------------------- report

def print_table(summaries):
    header = (f"{'layer':6} {'thr':>3} {'method':9} {'subspaces':>9} {'distortion':>12} "
              f"{'qcnn/x D':>9} {'lower in':>9} {'wall s':>8} {'ms/sub':>8} {'qcnn/x time':>11} "
              f"{'fast/x D':>9} {'fast/x time':>11}")
    print(header)
    print("-" * len(header))
    for s in summaries:
        for method, r in s["methods"].items():
            fast = (f"{r['distortion_ratio_fast_over']:9.4f} {r['time_ratio_fast_over']:11.3f}"
                    if "time_ratio_fast_over" in r else "")
            print(f"{s['layer']:6} {s['threads']:>3} {method:9} "
                  f"{str(s['subspaces_run']) + '/' + str(s['subspaces_total']):>9} "
                  f"{r['distortion_total']:12.6g} {r['distortion_ratio_qcnn_over']:9.4f} "
                  f"{r['subspaces_qcnn_lower']:>4}/{s['subspaces_run']:<4} {r['wall_s']:8.2f} "
                  f"{r['ms_per_subspace']:8.2f} {r['time_ratio_qcnn_over']:11.3f} {fast}")
    print("qcnn/x D: qcnn's total distortion over the method's (< 1: qcnn lower); lower in: subspaces "
          "where qcnn's is lower; qcnn/x time: qcnn's wall time over the method's (< 1: qcnn faster); "
          "fast/x: the same for qcnn-fast (monotone=False).")


def main(argv=None):
    args = parse_args(argv)
    pin_threads_env(max(args.threads))
    sys.path.insert(0, ROOT)
    import json

    import numba
    from threadpoolctl import threadpool_limits

    methods = ["qcnn", "qcnn-fast", "sklearn"]
    try:
        import faiss
        methods.append("faiss")
    except ImportError:
        faiss = None
        print("bench_kmeans: faiss is not installed (pip install faiss-cpu): skipping faiss")

    print("Weights are random Gaussian (seeded): real AlexNet weights are not available offline.")
    if "fc6" in args.layers and args.fc6_subspaces != "all":
        print(f"fc6: every method runs the same evenly spaced {args.fc6_subspaces} of its 2304 "
              f"subspaces (--fc6-subspaces all for all of them).")
    jit = None if args.no_jit_timing else jit_timings()
    first_call = warm_up(methods)
    env = environment(methods)
    summaries = []
    for threads in args.threads:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        if faiss is not None:
            faiss.omp_set_num_threads(threads)
        with threadpool_limits(limits=threads):
            for name in args.layers:
                summaries.append(measure_layer(name, methods, threads, args))
    env["load_average_after"] = list(os.getloadavg())

    print()
    print_table(summaries)
    print()
    print(f"qcnn first calls in this process (serial + parallel kernels, from Numba's cache "
          f"if it is warm): {first_call:.2f} s")
    if jit is not None:
        cold, warm = jit["cold_compile"], jit["cached_start"]
        print(f"Numba JIT, fresh process, empty cache: import {cold['import_s']:.2f} s, first call "
              f"serial {cold['first_call_serial_s']:.2f} s, parallel {cold['first_call_parallel_s']:.2f} s")
        print(f"Numba JIT, fresh process, cached:      import {warm['import_s']:.2f} s, first call "
              f"serial {warm['first_call_serial_s']:.2f} s, parallel {warm['first_call_parallel_s']:.2f} s")
    print(f"load average before {env['load_average'][0]:.2f}, after {env['load_average_after'][0]:.2f} "
          f"({env['cpus']} CPUs)")

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k != "output"}
    with open(args.output, "w") as f:
        json.dump({"config": config, "environment": env, "jit": jit,
                   "first_call_in_process_s": first_call,
                   "weights": "random Gaussian (real AlexNet weights are not available offline)",
                   "results": summaries}, f, indent=1)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
