#!/usr/bin/env python
"""Depthwise convolution: the Numba kernel against the old NumPy path and OpenCV.

What is measured
----------------
One depthwise convolution (``group == C``, multiplier 1, bias) on the depthwise layer
shapes of EfficientNet-Lite0 at 224x224 (as ``scripts/convert_efficientnet_lite0.py``
writes them: TensorFlow "SAME" padding of a stride-2 3x3 / 5x5 kernel becomes a 4x4 / 6x6
kernel with a zero first row and column and a symmetric pad), plus a few plain shapes, by

* ``numpy``:   the previous NumPy path of ``qcnn.layers.conv.convolve`` (a strided view of
  the padded input, one full-tensor multiply-add per kernel tap; copied here);
* ``serial``:  ``qcnn.kernels.depthwise.depthwise_conv(..., parallel=False)``;
* ``numba``:   the same with ``parallel=True`` (what ``convolve`` runs; Numba's thread
  count is ``--threads``);
* ``opencv``:  ``cv2.dnn`` running a one-layer Caffe net (Input + Convolution) with the
  same weights (OpenCV backend, CPU target; it has a hand-vectorised kernel for depthwise
  3x3 with stride 1 or 2);
* ``filter2D``: ``cv2.filter2D`` per channel (zero border, bias as ``delta``), stride 1
  only: a reference point for a tuned single-plane filter.

Method
------
``NUMBA_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS``
are set to ``--threads`` (default 1) before NumPy and Numba are imported; threadpoolctl
(when installed) limits every BLAS library, and ``cv2.setNumThreads`` OpenCV's pool. Every
engine runs ``--warmup`` untimed calls per case; then ``--repeat`` rounds, each calling
every engine once in a rotating order, garbage collector off. Per engine and case: median
and min wall time and median process CPU time (on a shared machine wall time includes
waiting for a core; with one thread CPU time is the steadier measure). The Lite0 total is
the sum over its 16 depthwise layers (shapes that occur several times counted so) of the
per-shape medians. The 1-minute load average before and after is printed. Every engine's
output is compared with the ``numba`` one (max |difference| / max |value|).

``--compile`` also times, in fresh subprocesses, importing the kernel module and the
first calls of both copies with an empty Numba cache directory (cold: compilation) and
then again with that directory filled (cached start).

Running
-------
    python benchmarks/bench_depthwise.py [--threads 1] [--batch 1,16] [--repeat 9]
        [--warmup 2] [--cases lite0,extra] [--compile] [--output benchmarks/results/depthwise.json]
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def shape_table(text):
    """Rows ``name  channels size kernel stride pad count`` (the name may hold spaces) ->
    ``[(name, channels, input size, kernel, stride, pad, occurrences in EfficientNet-Lite0)]``."""
    rows = []
    for line in text.strip().splitlines():
        name, *numbers = line.strip().rsplit(None, 6)
        rows.append((name, *map(int, numbers)))
    return rows


# name, channels, input size, kernel, stride, pad, occurrences in EfficientNet-Lite0
LITE0 = shape_table("""
    b0       32  112 3  1  1  1
    b1 s2    96  112 4  2  1  1
    b2      144   56 3  1  1  1
    b3 s2   144   56 6  2  2  1
    b4      240   28 5  1  2  1
    b5 s2   240   28 4  2  1  1
    b6-7    480   14 3  1  1  2
    b8      480   14 5  1  2  1
    b9-10   672   14 5  1  2  2
    b11 s2  672   14 6  2  2  1
    b12-14 1152    7 5  1  2  3
    b15    1152    7 3  1  1  1
""")
EXTRA = shape_table("""
    3x3 s2   96  112 3  2  1  0
    5x5 s1  144   56 5  1  2  0
    5x5 s2  240   28 5  2  2  0
""")
CASES = {"lite0": LITE0, "extra": EXTRA}
ENGINES = ("numpy", "serial", "numba", "opencv", "filter2D")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--threads", type=int, default=1, help="threads for every engine; default 1")
    parser.add_argument("--batch", default="1,16", help="comma-separated batch sizes; default 1,16")
    parser.add_argument("--repeat", type=int, default=9, help="timed rounds per case")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per engine and case")
    parser.add_argument("--cases", default="lite0,extra", help="comma-separated subset of lite0,extra")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"subset of {','.join(ENGINES)}")
    parser.add_argument("--compile", action="store_true", help="also time cold and cached compilation")
    parser.add_argument("--output", default=os.path.join("benchmarks", "results", "depthwise.json"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.batch = [int(b) for b in args.batch.split(",") if b]
    args.cases = [c for c in args.cases.split(",") if c]
    args.engines = [e for e in args.engines.split(",") if e]
    if set(args.cases) - set(CASES) or set(args.engines) - set(ENGINES) or "numba" not in args.engines:
        parser.error(f"--cases from {sorted(CASES)}; --engines from {ENGINES}, including numba")
    if args.threads < 1 or args.repeat < 1 or args.warmup < 0 or not args.batch or min(args.batch) < 1:
        parser.error("--threads, --repeat and --batch must be >= 1, --warmup >= 0")
    return args


def pin_threads_env(threads):
    """Set the thread variables of Numba, BLAS and OpenMP; must run before they are imported."""
    for var in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)


# ---------------------------------------------------------------- engines

def numpy_depthwise(x, weight, bias, stride, pad, dilation):
    """The previous NumPy path of ``convolve`` for depthwise layers (multiplier 1)."""
    import numpy as np

    from qcnn.layers.conv import conv_output_size, patches

    x = np.asarray(x, np.float32)
    n, c, h, w = x.shape
    _, _, kh, kw = weight.shape
    ho, wo = (conv_output_size(s, k, st, p, d) for s, k, st, p, d in
              zip((h, w), (kh, kw), stride, pad, dilation))
    view = patches(x, (kh, kw), stride, pad, dilation, (ho, wo))
    out = np.zeros((n, c, ho, wo), np.float32)
    for i in range(kh):
        for j in range(kw):
            out += weight[:, 0, i, j].reshape(1, -1, 1, 1) * view[:, :, i, j]
    out += bias.reshape(1, -1, 1, 1)
    return out


def opencv_net(x_shape, kernel, stride, pad, seed, tmpdir):
    """``(weight, bias, cv2.dnn net)``: a one-layer depthwise Caffe net with seeded weights."""
    import cv2

    import qcnn
    from qcnn.io.caffe import save_caffemodel

    n, c, h, w = x_shape
    text = (f'name: "dw"\nlayer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ '
            f'dim: {n} dim: {c} dim: {h} dim: {w} }} }} }}\n'
            f'layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param {{ '
            f'num_output: {c} group: {c} kernel_size: {kernel} stride: {stride} pad: {pad} }} }}\n')
    proto, model = os.path.join(tmpdir, "dw.prototxt"), os.path.join(tmpdir, "dw.caffemodel")
    with open(proto, "w") as f:
        f.write(text)
    net = qcnn.load_caffe(proto, seed=seed)
    save_caffemodel(net, model)
    cvnet = cv2.dnn.readNetFromCaffe(proto, model)
    cvnet.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    cvnet.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    weight, bias = net.layer("conv").blobs
    return weight, bias, cvnet


def engines_for(x, weight, bias, kernel, stride, pad, cvnet, wanted):
    import cv2
    import numpy as np

    from qcnn.kernels.depthwise import depthwise_conv

    st, pd, dl = (stride, stride), (pad, pad), (1, 1)
    fns = {"numpy": lambda: numpy_depthwise(x, weight, bias, st, pd, dl),
           "serial": lambda: depthwise_conv(x, weight, bias, st, pd, dl, 1, parallel=False),
           "numba": lambda: depthwise_conv(x, weight, bias, st, pd, dl, 1, parallel=True)}

    def opencv():
        cvnet.setInput(x)
        return cvnet.forward()
    fns["opencv"] = opencv
    if stride == 1 and kernel % 2 == 1 and pad == kernel // 2:
        kernels = [np.ascontiguousarray(weight[c, 0]) for c in range(x.shape[1])]
        deltas = [float(b) for b in bias]

        def filter2d():
            out = np.empty_like(x)
            for i in range(x.shape[0]):
                for c in range(x.shape[1]):
                    out[i, c] = cv2.filter2D(x[i, c], -1, kernels[c], delta=deltas[c],
                                             borderType=cv2.BORDER_CONSTANT)
            return out
        fns["filter2D"] = filter2d
    return {name: fn for name, fn in fns.items() if name in wanted}


def timed(fn):
    import time
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3


def run_case(fns, repeat, warmup):
    import gc

    import numpy as np

    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    samples = {name: [] for name in names}
    gc.collect()
    gc.disable()
    try:
        for r in range(repeat):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                samples[name].append(timed(fns[name]))
    finally:
        gc.enable()
    result = {}
    for name, s in samples.items():
        wall, cpu = (np.array(v) for v in zip(*s))
        result[name] = {"median_ms": float(np.median(wall)), "min_ms": float(wall.min()),
                        "cpu_median_ms": float(np.median(cpu)),
                        "times_ms": [round(float(t), 4) for t in wall]}
    return result


# ---------------------------------------------------------------- compile time

COMPILE_SNIPPET = """
import time
t0 = time.perf_counter()
import numpy as np
from qcnn.kernels import depthwise
t1 = time.perf_counter()
x = np.ones((1, 2, 5, 5), np.float32)
w = np.ones((2, 1, 3, 3), np.float32)
depthwise.depthwise_conv(x, w, None, (1, 1), (1, 1), (1, 1), 1, parallel=False)
t2 = time.perf_counter()
depthwise.depthwise_conv(x, w, None, (1, 1), (1, 1), (1, 1), 1, parallel=True)
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2)
"""


def compile_times(threads):
    """``{"cold": ..., "cached": ...}``: seconds to import, first serial call, first parallel call."""
    import subprocess
    import tempfile

    results = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, NUMBA_NUM_THREADS=str(threads),
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        for label in ("cold", "cached"):
            out = subprocess.run([sys.executable, "-c", COMPILE_SNIPPET], env=env, check=True,
                                 capture_output=True, text=True).stdout.split()
            results[label] = dict(zip(("import_s", "first_serial_s", "first_parallel_s"), map(float, out)))
    return results


# ---------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    pin_threads_env(args.threads)
    sys.path.insert(0, ROOT)
    import json
    import platform
    import tempfile

    import cv2
    import numba
    import numpy as np

    cv2.setNumThreads(args.threads)
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
        threadpool_limits(args.threads)
        blas = [{k: info.get(k) for k in ("internal_api", "version", "num_threads", "filepath")}
                for info in threadpool_info()]
    except ImportError:
        blas = "threadpoolctl not installed"
    load_before = os.getloadavg()[0]
    print(f"depthwise convolution, {args.threads} thread(s); numba {numba.__version__} "
          f"({numba.get_num_threads()} threads), OpenCV {cv2.__version__}, NumPy {np.__version__}; "
          f"{os.cpu_count()} CPUs, load average {load_before:.2f}")
    compiled = None
    if args.compile:
        compiled = compile_times(args.threads)
        for label, t in compiled.items():
            print(f"{label:>6}: import {t['import_s']:.2f} s, first serial call {t['first_serial_s']:.2f} s, "
                  f"first parallel call {t['first_parallel_s']:.2f} s")
    cases = [case for name in args.cases for case in CASES[name]]
    rows = []
    with tempfile.TemporaryDirectory() as tmpdir:
        for batch in args.batch:
            header = f"{'batch ' + str(batch):<9}{'layer':<8}{'shape':>16}{'k/s/p':>8}" + "".join(
                f"{e:>10}" for e in args.engines) + f"{'numpy/nb':>10}{'cv/nb':>8}{'max rel':>9}"
            print("\nmedian wall ms (CPU-time medians in the JSON)\n" + header)
            for name, c, size, k, s, p, count in cases:
                shape = (batch, c, size, size)
                rng = np.random.default_rng(args.seed)
                x = rng.standard_normal(shape).astype(np.float32)
                weight, bias, cvnet = opencv_net(shape, k, s, p, args.seed, tmpdir)
                fns = engines_for(x, weight, bias, k, s, p, cvnet, args.engines)
                ref = fns["numba"]()
                scale = float(np.abs(ref).max())
                agree = {e: float(np.abs(fn() - ref).max()) / scale for e, fn in fns.items()}
                timing = run_case(fns, args.repeat, args.warmup)
                med = {e: t["median_ms"] for e, t in timing.items()}
                ratio_np = med["numpy"] / med["numba"] if "numpy" in med else float("nan")
                ratio_cv = med["opencv"] / med["numba"] if "opencv" in med else float("nan")
                print(f"{'':<9}{name:<8}{shape[1:]!s:>16}{f'{k}/{s}/{p}':>8}" + "".join(
                    f"{med[e]:>10.3f}" if e in med else f"{'-':>10}" for e in args.engines)
                    + f"{ratio_np:>10.1f}{ratio_cv:>8.2f}{max(agree.values()):>9.1e}")
                rows.append({"batch": batch, "layer": name, "shape": list(shape), "kernel": k, "stride": s,
                             "pad": p, "lite0_count": count, "timing": timing, "max_rel_diff": agree})
            lite = [r for r in rows if r["batch"] == batch and r["lite0_count"]]
            if lite:
                totals = {e: sum(r["lite0_count"] * r["timing"][e]["median_ms"] for r in lite)
                          for e in args.engines if all(e in r["timing"] for r in lite)}
                print(f"{'':<9}{'Lite0 total (16 layers)':<32}" + "".join(
                    f"{totals[e]:>10.2f}" if e in totals else f"{'-':>10}" for e in args.engines))
    load_after = os.getloadavg()[0]
    print(f"\nload average before {load_before:.2f}, after {load_after:.2f} ({os.cpu_count()} CPUs)")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump({"threads": args.threads, "repeat": args.repeat, "warmup": args.warmup,
                       "load_average": [load_before, load_after], "cpu_count": os.cpu_count(),
                       "machine": platform.machine(), "processor": platform.processor(),
                       "versions": {"numba": numba.__version__, "numpy": np.__version__,
                                    "opencv": cv2.__version__, "python": platform.python_version()},
                       "blas": blas,
                       "compile": compiled, "cases": rows}, f, indent=1)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
