"""Compile every Numba kernel once (``qcnn warmup``), so that later processes start fast.

Numba compiles a kernel the first time it runs and caches the machine code on
disk (``cache=True``; the directory is chosen by :mod:`qcnn.kernels.jit`,
``QCNN_CACHE_DIR``). On x86 the first run of the LUT kernels and of k-means
costs tens of seconds, on a Raspberry Pi-class board minutes; after
:func:`warmup` every later process loads them in well under a second each.

:func:`warmup` runs tiny problems through the public functions
(:func:`qcnn.kernels.lut.lut_conv` on each of its paths, convolutions and
inner products of several batch sizes and codebook sizes;
:func:`qcnn.quantization.kmeans.kmeans`; :func:`qcnn.quantization.ec.error_correct`),
each in its serial and parallel variant, and reports which kernels each step
compiled or loaded from the cache.
The kernels are discovered by importing every module of :mod:`qcnn.kernels`
and collecting its Numba dispatchers; one that no step reached is reported
(``unused``), so a new kernel without a warm-up step here is noticed (the
tests run the warm-up on an empty cache and require every kernel compiled).
A kernel called only from inside another one is not loaded by itself when
its caller comes from the cache: in a warm run it shows as ``inside``; one
declared ``inline="always"`` is never compiled by itself (``inlined``).

The tiny problems pass their weights read-only, as a model loaded from a file
(memory-mapped) has them: Numba compiles a kernel separately for read-only and
writable arrays, and inference runs on loaded models. ``only`` (``qcnn warmup
--inference``) limits the warm-up to the kernels that inference may need.
"""

import importlib
import pkgutil
import time

import numpy as np


def kernel_modules():
    """Every module of :mod:`qcnn.kernels`, imported (``jit`` first, as the package does)."""
    import qcnn.kernels

    modules = []
    for info in sorted(pkgutil.iter_modules(qcnn.kernels.__path__), key=lambda i: i.name):
        modules.append(importlib.import_module(f"qcnn.kernels.{info.name}"))
    return modules


def dispatchers():
    """``{"module.function": dispatcher}`` of every Numba kernel defined in :mod:`qcnn.kernels`."""
    from numba.core.dispatcher import Dispatcher

    found = {}
    for module in kernel_modules():
        for name, obj in vars(module).items():
            if isinstance(obj, Dispatcher) and obj.py_func.__module__ == module.__name__:
                found[f"{module.__name__}.{name}"] = obj
    return dict(sorted(found.items()))


def _counts(dispatcher):
    stats = dispatcher.stats
    return sum(stats.cache_misses.values()), sum(stats.cache_hits.values())


def _weights(array):
    """Read-only, as the weights of a model loaded from a file (memory-mapped): Numba compiles
    read-only and writable arrays separately, and inference runs on loaded models."""
    array.flags.writeable = False
    return array


def _lut_case(rng, n, channels, c_out, kernel, hw, subdim, k):
    from qcnn.kernels import lut

    m = -(-channels // subdim)
    books = _weights(rng.standard_normal((1, m, k, subdim)).astype(np.float32))
    codes = rng.integers(0, k, (c_out,) + kernel + (m,)).astype(np.uint8)
    padded = rng.standard_normal((n, channels) + hw).astype(np.float32)
    out_size = (hw[0] - kernel[0] + 1, hw[1] - kernel[1] + 1)
    prepared = lut.prepare_codes(codes, 1)

    def run(parallel):
        lut.lut_conv(padded, books, prepared, 1, (1, 1), (1, 1), out_size, parallel=parallel)
    return run


def _depthwise_case(rng):
    from qcnn.kernels import depthwise

    x = rng.standard_normal((2, 8, 9, 9)).astype(np.float32)
    weight = _weights(rng.standard_normal((8, 1, 3, 3)).astype(np.float32))
    bias = _weights(rng.standard_normal(8).astype(np.float32))

    def run(parallel):
        depthwise.depthwise_conv(x, weight, bias, (2, 2), (1, 1), (1, 1), 1, parallel=parallel)
    return run


def _kmeans_case(rng):
    from qcnn.quantization.kmeans import kmeans

    points = rng.standard_normal((2, 60, 4)).astype(np.float32)

    def run(parallel):
        kmeans(points, 8, seed=0, parallel=parallel)
    return run


def _ec_case(rng):
    from qcnn.quantization import ec

    inputs = rng.standard_normal((1, 40, 9, 8)).astype(np.float32)
    targets = rng.standard_normal((40, 6)).astype(np.float32)
    books = rng.standard_normal((1, 2, 4, 4)).astype(np.float32)
    codes = rng.integers(0, 4, (6, 3, 3, 2)).astype(np.uint8)

    def run(parallel):
        # below PARALLEL_WORK multiply-adds the B step runs serially: lower it for this tiny problem
        saved = getattr(ec, "PARALLEL_WORK", None)
        ec.PARALLEL_WORK = 0
        try:
            ec.error_correct(inputs, targets, books, codes, 1, max_iter=1, parallel=parallel)
        finally:
            if saved is None:
                del ec.PARALLEL_WORK
            else:
                ec.PARALLEL_WORK = saved
    return run


GROUPS = {"lut": "inference: product-quantized layers (lookup tables)",
          "depthwise": "inference: float depthwise convolutions",
          "kmeans": "quantize: k-means", "ec": "quantize: error correction"}
INFERENCE = ("lut", "depthwise")  # what `qcnn classify` and `evaluate` may need


def steps():
    """``[(group, label, run(parallel))]``: one tiny problem per kernel path; the group is the
    kernel module (:data:`GROUPS`)."""
    rng = np.random.default_rng(0)
    return [
        ("lut", "LUT convolution 3x3", _lut_case(rng, 2, 16, 8, (3, 3), (6, 6), 8, 16)),
        ("lut", "LUT inner product, batch 1, K 16", _lut_case(rng, 1, 32, 24, (1, 1), (1, 1), 4, 16)),
        ("lut", "LUT inner product, batch 1, K 64", _lut_case(rng, 1, 32, 24, (1, 1), (1, 1), 4, 64)),
        ("lut", "LUT inner product, batch 8, K 16", _lut_case(rng, 8, 32, 24, (1, 1), (1, 1), 4, 16)),
        ("lut", "LUT inner product, batch 8, K 64", _lut_case(rng, 8, 32, 24, (1, 1), (1, 1), 4, 64)),
        ("lut", "LUT inner product, batch 16, K 16", _lut_case(rng, 16, 32, 24, (1, 1), (1, 1), 4, 16)),
        ("depthwise", "depthwise convolution 3x3", _depthwise_case(rng)),
        ("kmeans", "k-means", _kmeans_case(rng)),
        ("ec", "error correction", _ec_case(rng)),
    ]


def warmup(progress=None, only=None):
    """Run every step serially and in parallel; returns a report (a dict, see ``qcnn warmup --json``).

    ``only``: the groups (kernel modules, :data:`GROUPS`) to warm up, default all; the kernels
    of the others are reported ``skipped``. ``progress(row)`` is called after each step with
    ``{"step", "variant", "seconds", "compiled", "loaded"}`` (kernel names).
    """
    if only is not None and set(only) - set(GROUPS):
        raise ValueError(f"unknown kernel groups {sorted(set(only) - set(GROUPS))}; "
                         f"known: {', '.join(GROUPS)}")
    from qcnn.kernels import jit

    start = time.perf_counter()
    kernels = dispatchers()
    import_seconds = time.perf_counter() - start
    before = {name: _counts(d) for name, d in kernels.items()}
    rows = []
    for group, label, run in steps():
        if only is not None and group not in only:
            continue
        for parallel in (False, True):
            t0 = time.perf_counter()
            run(parallel)
            seconds = time.perf_counter() - t0
            after = {name: _counts(d) for name, d in kernels.items()}
            row = {"step": label, "variant": "parallel" if parallel else "serial", "seconds": seconds,
                   "compiled": [n for n in kernels if after[n][0] > before[n][0]],
                   "loaded": [n for n in kernels if after[n][1] > before[n][1]]}
            before = after
            rows.append(row)
            if progress is not None:
                progress(row)
    status = {}
    for name, d in kernels.items():
        misses, hits = _counts(d)
        skipped = only is not None and name.split(".")[2] not in only
        inlined = d.targetoptions.get("inline") == "always"  # inlined into its callers' IR
        status[name] = "compiled" if misses else "loaded" if hits else "inlined" if inlined \
            else "skipped" if skipped else "unused"
    if any(s == "loaded" for s in status.values()):
        # a kernel called only inside another is not loaded by itself when its caller is cached
        status = {name: "inside" if s == "unused" else s for name, s in status.items()}
    return {"cache_dir": jit.CACHE_DIR, "cache_reason": jit.CACHE_REASON, "threads": _threads(),
            "groups": sorted(GROUPS if only is None else only),
            "import_seconds": import_seconds, "steps": rows, "kernels": status,
            "seconds": time.perf_counter() - start}


def _threads():
    import numba

    return numba.get_num_threads()
