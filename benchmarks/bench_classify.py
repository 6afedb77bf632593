"""Classification speed of models side by side: batch-1 latency and images/s at a larger batch.

Each model runs interleaved with the others in one process (repetition r runs
every model once, the order rotating), on the same preprocessed photos, with
BLAS and Numba pinned to ``--threads``. Image decoding and preprocessing are
timed once per image, separately. Numba compilation and the first call happen
in untimed warm-up runs and are reported on their own.

    python benchmarks/bench_classify.py FLOAT.qcnn QUANTIZED.qcnn [--threads 1] [--batch 16]

Prints a table and writes benchmarks/results/classify.json.
"""

import argparse
import gc
import json
import os
import sys
import time

import numpy as np


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "classify.json"))
    args = parser.parse_args(argv)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(args.threads)

    import qcnn
    from qcnn.io.image import load_images

    sys.path.insert(0, os.path.dirname(__file__))
    from photo_crops import CALIBRATION, HELDOUT, photo_path

    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads)
    except ImportError:
        pass
    paths = [photo_path(n) for n in CALIBRATION + HELDOUT]
    nets = [qcnn.load(m) for m in args.models]
    results = {}
    for path, net in zip(args.models, nets):
        shape = next(iter(net.inputs.values()))[1:]
        start = time.perf_counter()
        batch = load_images((paths * args.batch)[:args.batch], shape, net.metadata.get("preprocess"))
        preprocess_ms = 1e3 * (time.perf_counter() - start) / args.batch
        start = time.perf_counter()
        net.forward(batch[:1])
        first = time.perf_counter() - start
        net.forward(batch)
        results[path] = {"net": net, "batch": batch, "preprocess_ms_per_image": preprocess_ms,
                         "first_call_s": first, "batch1": [], "batchN": []}
    gc.disable()
    for r in range(args.repeat):
        order = args.models[r % len(args.models):] + args.models[:r % len(args.models)]
        for path in order:
            entry = results[path]
            for key, x in (("batch1", entry["batch"][:1]), ("batchN", entry["batch"])):
                start = time.perf_counter()
                entry["net"].forward(x)
                entry[key].append(time.perf_counter() - start)
    gc.enable()

    rows = []
    print(f"threads {args.threads}, batch {args.batch}, {args.repeat} interleaved repetitions (medians)")
    print(f"{'model':<40} {'MiB':>6} {'batch-1 ms':>11} {'img/s @' + str(args.batch):>10} "
          f"{'preproc ms/img':>15} {'first call s':>13}")
    for path in args.models:
        e = results[path]
        mib = sum(r["bytes"] for r in e["net"].summary()) / 2**20
        row = {"model": path, "MiB": mib, "batch1_ms": 1e3 * float(np.median(e["batch1"])),
               "batch1_min_ms": 1e3 * float(np.min(e["batch1"])),
               "images_per_s": args.batch / float(np.median(e["batchN"])),
               "preprocess_ms_per_image": e["preprocess_ms_per_image"], "first_call_s": e["first_call_s"]}
        rows.append(row)
        print(f"{path[-40:]:<40} {mib:6.2f} {row['batch1_ms']:11.1f} {row['images_per_s']:10.1f} "
              f"{row['preprocess_ms_per_image']:15.1f} {row['first_call_s']:13.2f}")
    for row in rows[1:]:
        print(f"{row['model'][-40:]}: batch-1 latency {row['batch1_ms'] / rows[0]['batch1_ms']:.2f}x "
              f"of {rows[0]['model'][-30:]}, throughput {row['images_per_s'] / rows[0]['images_per_s']:.2f}x")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"threads": args.threads, "batch": args.batch, "repeat": args.repeat, "rows": rows}, f, indent=1)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
