#!/usr/bin/env python
"""Lookup-table (LUT) kernels against the dense float32 path, layer by layer (AlexNet shapes).

What is measured
----------------
Wall-clock time (``time.perf_counter``) of one layer's forward computation, bias excluded, for

* dense: ``qcnn.layers.conv.convolve(x, W)`` for convolutions (im2col + BLAS, padding included)
  and ``x @ W.T`` for inner products, W the float32 weights decoded from the codebooks and codes
  beforehand (the time to decode them, which the layer's own "dense" kernel pays on every call,
  is measured separately: ``decode_ms``);
* LUT: ``pad_for_windows`` + ``qcnn.kernels.lut.lut_conv`` with the layer's prepared codes
  (``prepare_codes`` runs once, outside the timing, as the layer caches it),

on the same random codebooks, codes and input, for AlexNet's

* conv2 96->256 5x5 pad 2 group 2 on 27x27, conv3 256->384 3x3 pad 1 on 13x13, conv4
  384->384 3x3 pad 1 group 2, conv5 384->256 3x3 pad 1 group 2: subdim 8, K 128, one
  codebook shared by the groups (the authors' settings);
* fc6 9216->4096, fc7 4096->4096, fc8 4096->1000: subdim 4, K 32; and ``fc8-authors``:
  fc8 at the authors' subdim 1, K 16.

Method
------
* Threads (``--threads``, default 1,2): ``threadpoolctl.threadpool_limits`` for BLAS and
  ``numba.set_num_threads`` for the kernels; with 1 thread the serial kernels run
  (``parallel=False``), with more the parallel ones.
* For each (layer, batch, threads): ``--warmup`` untimed calls of each path, then ``--repeat``
  repetitions, each timing both paths once, alternating which goes first; the median (and min)
  of each, and the speed-up = dense median / LUT median (> 1: the LUT is faster). Process CPU
  time is recorded too. The garbage collector is off while timing.
* Agreement: max |LUT - dense| / max |dense| (float32 round-off, ~1e-6).
* JIT: the first-call compile time of every kernel is measured in a fresh process with an
  empty Numba cache (``NUMBA_CACHE_DIR`` pointed at a new folder), then the start-up time in a
  second fresh process that loads them from that cache (import + first calls). Neither is
  included in the layer timings.
* Cost model: per layer, the dense path's time per multiply-add, and the LUT path's time per
  lookup-add expressed in those units (after subtracting its table multiply-adds at the same
  rate), i.e. the ``LOOKUP_COST`` of ``qcnn.layers.quantized.choose_kernel``; and the decode
  time per weight value in the same units (``DECODE_COST``).

The machine may be shared: the 1-minute load average is printed before and after; medians
over interleaved repetitions are robust to slow drift but not to a busy machine.

Running
-------
    python benchmarks/bench_lut.py [--threads 1,2] [--batch 1,8,32] [--layers all]
        [--repeat 9] [--warmup 2] [--no-jit] [--output benchmarks/results/lut.json]

Output: a table on stdout and JSON in ``--output``: ``config``, ``environment``, ``jit``,
``results`` (every timing) and ``cost_model``.
"""

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name: (input channels, output channels, input size, kernel, pad, group, subdim, K)
LAYERS = {
    "conv2": (96, 256, 27, 5, 2, 2, 8, 128),
    "conv3": (256, 384, 13, 3, 1, 1, 8, 128),
    "conv4": (384, 384, 13, 3, 1, 2, 8, 128),
    "conv5": (384, 256, 13, 3, 1, 2, 8, 128),
    "fc6": (9216, 4096, 1, 1, 0, 1, 4, 32),
    "fc7": (4096, 4096, 1, 1, 0, 1, 4, 32),
    "fc8": (4096, 1000, 1, 1, 0, 1, 4, 32),
    "fc8-authors": (4096, 1000, 1, 1, 0, 1, 1, 16),
}

JIT_SCRIPT = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from qcnn.kernels import lut
t_import = time.perf_counter() - t0
rng = np.random.default_rng(0)
calls = {}
def first_call(name, x, books, codes, group, parallel):
    prepared = lut.prepare_codes(codes, group)
    t = time.perf_counter()
    lut.lut_conv(x, books, prepared, group, (1, 1), (1, 1), (x.shape[2] - codes.shape[1] + 1,
                 x.shape[3] - codes.shape[2] + 1), parallel=parallel)
    calls[name] = time.perf_counter() - t
conv = (rng.standard_normal((1, 8, 6, 6)).astype(np.float32),
        rng.standard_normal((1, 2, 16, 4)).astype(np.float32),
        rng.integers(0, 16, (4, 3, 3, 2)).astype(np.uint8), 1)
fc = (rng.standard_normal((1, 8, 1, 1)).astype(np.float32),
      rng.standard_normal((1, 2, 16, 4)).astype(np.float32),
      rng.integers(0, 16, (4, 1, 1, 2)).astype(np.uint8), 1)
fc64 = (fc[0], rng.standard_normal((1, 2, 64, 4)).astype(np.float32), fc[2], 1)  # K > 32: single tables
for parallel in (False, True):
    suffix = "parallel" if parallel else "serial"
    first_call("frame_conv_" + suffix, *conv, parallel)
    first_call(("fc_shuffle_" if lut.SHUFFLE_ISA else "fc_tables_pairs_") + suffix, *fc, parallel)
    first_call("fc_tables_" + suffix, *fc64, parallel)
    pairs8 = max(lut.FC_PAIRS8_MIN_BATCH, lut.FC_SHUFFLE_MAX_BATCH + 1 if lut.SHUFFLE_ISA else 0)
    first_call("fc_pairs8_" + suffix, np.repeat(fc[0], pairs8, axis=0), *fc[1:], parallel)
print(json.dumps({"import_s": t_import, "first_calls_s": calls,
                  "total_s": time.perf_counter() - t0}))
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts; default 1,2")
    parser.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes; default 1,8,32")
    parser.add_argument("--layers", default="all", help=f"comma-separated subset of {','.join(LAYERS)}")
    parser.add_argument("--repeat", type=int, default=9, help="timed repetitions per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls of each path first")
    parser.add_argument("--no-jit", action="store_true", help="skip the compile / cached start-up runs")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "lut.json"))
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def jit_times():
    """Compile time (empty Numba cache) and cached start-up, each in a fresh process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with tempfile.TemporaryDirectory() as cache:
        env["NUMBA_CACHE_DIR"] = cache
        runs = {}
        for name in ("compile", "cached"):
            proc = subprocess.run([sys.executable, "-c", JIT_SCRIPT], env=env, capture_output=True,
                                  text=True, check=True)
            runs[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return runs


def make_layer(name, batch, rng):
    import numpy as np

    from qcnn.layers.conv import conv_output_size
    from qcnn.quantization.pq import decode
    c_in, c_out, size, k, pad, group, subdim, words = LAYERS[name]
    channels = c_in // group
    m = -(-channels // subdim)
    books = rng.standard_normal((1, m, words, subdim)).astype(np.float32)
    codes = rng.integers(0, words, (c_out, k, k, m)).astype(np.uint8)
    x = rng.standard_normal((batch, c_in, size, size)).astype(np.float32)
    out = conv_output_size(size, k, 1, pad, 1)
    t = time.perf_counter()
    weight = decode(books, codes, channels)
    decode_s = time.perf_counter() - t
    ops = {"dense_macs": batch * out * out * c_out * channels * k * k,
           "lut_build_macs": batch * group * m * subdim * words * (size + 2 * pad) ** 2,
           "lookups": batch * out * out * k * k * m * c_out,
           "decode_values": c_out * k * k * m * subdim}
    return dict(x=x, books=books, codes=codes, weight=weight, decode_s=decode_s, group=group,
                kernel=(k, k), pad=(pad, pad), out=(out, out), ops=ops)


def paths(layer, parallel):
    import numpy as np

    from qcnn.kernels import lut
    from qcnn.layers.conv import convolve, pad_for_windows
    x, weight, group, kernel, pad, out = (layer[k] for k in ("x", "weight", "group", "kernel", "pad", "out"))
    if x.shape[2:] == (1, 1) and kernel == (1, 1):
        flat = np.ascontiguousarray(weight.reshape(weight.shape[0], -1))
        x2 = x.reshape(x.shape[0], -1)

        def dense():
            return x2 @ flat.T
    else:
        def dense():
            return convolve(x, weight, None, (1, 1), pad, (1, 1), group)
    prepared = lut.prepare_codes(layer["codes"], group)
    books = layer["books"]

    def table():
        padded = pad_for_windows(x, kernel, (1, 1), pad, (1, 1), out)
        return lut.lut_conv(padded, books, prepared, group, (1, 1), (1, 1), out, parallel=parallel)
    return dense, table


def time_pair(dense, table, repeat, warmup):
    import numpy as np
    for _ in range(warmup):
        dense()
        table()
    runs = {"dense": [], "lut": []}
    cpu = {"dense": [], "lut": []}
    gc.disable()
    try:
        for i in range(repeat):
            order = [("dense", dense), ("lut", table)][::1 if i % 2 == 0 else -1]
            for name, fn in order:
                c, t = time.process_time(), time.perf_counter()
                fn()
                runs[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
    finally:
        gc.enable()
    return {name: {"wall_ms": [v * 1e3 for v in runs[name]], "cpu_ms": [v * 1e3 for v in cpu[name]],
                   "median_ms": float(np.median(runs[name]) * 1e3), "min_ms": float(np.min(runs[name]) * 1e3),
                   "cpu_median_ms": float(np.median(cpu[name]) * 1e3)} for name in runs}


def environment():
    import numba
    import numpy as np
    env = {"python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__,
           "machine": platform.machine(), "cpu": _cpu_name(), "cpus": os.cpu_count()}
    try:
        import llvmlite.binding as llvm
        env["llvm_cpu"] = llvm.get_host_cpu_name()
    except Exception:  # pragma: no cover - informational only
        pass
    try:
        from threadpoolctl import threadpool_info
        env["blas"] = [{k: info.get(k) for k in ("internal_api", "version", "num_threads", "filepath")}
                       for info in threadpool_info()]
    except ImportError:
        env["blas"] = "threadpoolctl not installed"
    return env


def _cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def cost_model(results):
    """Per (layer, batch, threads): dense seconds per MAC, LUT lookup and decode costs in MACs."""
    rows = []
    for r in results:
        ops = r["ops"]
        mac_s = r["dense"]["median_ms"] / 1e3 / ops["dense_macs"]
        lookup_s = (r["lut"]["median_ms"] / 1e3 - ops["lut_build_macs"] * mac_s) / ops["lookups"]
        rows.append({"layer": r["layer"], "batch": r["batch"], "threads": r["threads"],
                     "dense_ns_per_mac": mac_s * 1e9, "lut_ns_per_lookup": lookup_s * 1e9,
                     "lookup_cost_macs": lookup_s / mac_s,
                     "decode_cost_macs": r["decode_ms"] / 1e3 / ops["decode_values"] / mac_s})
    return rows


def main(argv=None):
    args = parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    layers = list(LAYERS) if args.layers == "all" else args.layers.split(",")
    unknown = [name for name in layers if name not in LAYERS]
    if unknown:
        raise SystemExit(f"unknown layers: {', '.join(unknown)}")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(max(threads)))
    sys.path.insert(0, str(ROOT))
    import numba
    import numpy as np
    from threadpoolctl import threadpool_limits

    import qcnn.kernels.jit  # noqa: F401 -- its OpenMP wait policy must be set before set_num_threads starts OpenMP

    load_before = os.getloadavg()[0]
    jit = None if args.no_jit else jit_times()
    if jit:
        print(f"JIT: compile (empty cache): import {jit['compile']['import_s']:.2f} s + first calls "
              + ", ".join(f"{k} {v:.2f} s" for k, v in jit["compile"]["first_calls_s"].items()))
        print(f"     cached start-up (fresh process): total {jit['cached']['total_s']:.2f} s "
              f"(import {jit['cached']['import_s']:.2f} s)")
    results = []
    rng = np.random.default_rng(args.seed)
    header = (f"{'layer':<12} {'N':>3} {'thr':>3} {'dense ms':>9} {'LUT ms':>8} {'speed-up':>8} "
              f"{'(min)':>6} {'decode ms':>9} {'rel.err':>8}")
    print(header)
    print("-" * len(header))
    for name in layers:
        for batch in batches:
            layer = make_layer(name, batch, rng)
            for n_threads in threads:
                numba.set_num_threads(min(n_threads, numba.config.NUMBA_NUM_THREADS))
                with threadpool_limits(n_threads):
                    dense, table = paths(layer, parallel=n_threads > 1)
                    ref, got = dense().reshape(batch, -1), table().reshape(batch, -1)
                    err = float(np.abs(got - ref).max() / np.abs(ref).max())
                    timing = time_pair(dense, table, args.repeat, args.warmup)
                speedup = timing["dense"]["median_ms"] / timing["lut"]["median_ms"]
                speedup_min = timing["dense"]["min_ms"] / timing["lut"]["min_ms"]
                results.append({"layer": name, "batch": batch, "threads": n_threads, "ops": layer["ops"],
                                "decode_ms": layer["decode_s"] * 1e3, "rel_err": err, "speedup": speedup,
                                "speedup_min": speedup_min, **timing})
                print(f"{name:<12} {batch:>3} {n_threads:>3} {timing['dense']['median_ms']:>9.2f} "
                      f"{timing['lut']['median_ms']:>8.2f} {speedup:>7.2f}x {speedup_min:>5.2f}x "
                      f"{layer['decode_s'] * 1e3:>9.1f} {err:>8.1e}", flush=True)
    costs = cost_model(results)
    print("\nCost model (units: one dense multiply-add of the same layer/batch/threads):")
    print(f"{'layer':<12} {'N':>3} {'thr':>3} {'dense ns/MAC':>12} {'LUT ns/lookup':>13} "
          f"{'LOOKUP_COST':>11} {'DECODE_COST':>11}")
    for c in costs:
        print(f"{c['layer']:<12} {c['batch']:>3} {c['threads']:>3} {c['dense_ns_per_mac']:>12.4f} "
              f"{c['lut_ns_per_lookup']:>13.4f} {c['lookup_cost_macs']:>11.2f} "
              f"{c['decode_cost_macs']:>11.1f}")
    load_after = os.getloadavg()[0]
    print(f"\nload average (1 min): {load_before:.2f} before, {load_after:.2f} after, {os.cpu_count()} CPUs")
    document = {"config": vars(args), "environment": {**environment(), "load_before": load_before,
                                                       "load_after": load_after},
                "jit": jit, "results": results, "cost_model": costs}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
