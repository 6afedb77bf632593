"""Accuracy of Q-CNN with and without error correction on Fashion-MNIST (the paper's MNIST table).

The bundled Fashion-MNIST CNN (weights/fashion_mnist.qcnn, 91.83% float) is
quantized at several (subdim, K) settings, all conv and FC layers alike as the
paper's MNIST experiment, by plain k-means ("no EC") and with error correction
calibrated on unlabeled training images ("EC"); each is evaluated on the full
10,000-image test split. Prints a table and writes benchmarks/results/fashion_mnist.json.

Needs the idx files of Debian's dataset-fashion-mnist package:

    python benchmarks/bench_fashion_mnist.py [--calib 8192] [--settings 4,32 8,32 ...]
    python benchmarks/bench_fashion_mnist.py --export DIR   # calib.npz / test.npz for the CLI

With ``--export``, the same measurement runs from the command line:

    qcnn quantize weights/fashion_mnist.qcnn --calib DIR/calib.npz --calib-size 8192 \\
        --conv-subdim 4 --conv-k 32 --fc-subdim 4 --fc-k 32 -o q.qcnn
    qcnn evaluate q.qcnn DIR/test.npz --reference weights/fashion_mnist.qcnn
"""

import argparse
import gzip
import json
import os
import sys
import time

import numpy as np

import qcnn
from qcnn.compress import quantize_net
from qcnn.evaluate import accuracy, agreement, predict
from qcnn.io.dataset import Dataset
from qcnn.resources import FASHION_MNIST_MODEL

DATA_DIR = "/usr/share/datasets/fashion-mnist"
RESULTS = os.path.join(os.path.dirname(__file__), "results", "fashion_mnist.json")


def read_idx(path):
    with gzip.open(path, "rb") as f:
        raw = f.read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_split(data_dir, prefix):
    images = read_idx(os.path.join(data_dir, f"{prefix}-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(data_dir, f"{prefix}-labels-idx1-ubyte.gz")).astype(np.int64)
    return images, labels


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DATA_DIR)
    parser.add_argument("--model", default=str(FASHION_MNIST_MODEL))
    parser.add_argument("--calib", type=int, default=8192, help="unlabeled training images for EC")
    parser.add_argument("--settings", nargs="+", default=["4,32", "4,64", "8,32", "8,64", "8,128", "16,256"],
                        help="SUBDIM,K applied to every conv and FC layer")
    parser.add_argument("--ec-iter", type=int, default=20)
    parser.add_argument("--ec-prior", type=float, default=0.0,
                        help="weight prior alpha of error correction (qcnn quantize --ec-prior)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--export", metavar="DIR", help="write calib.npz and test.npz there and stop")
    parser.add_argument("--json", default=RESULTS)
    args = parser.parse_args(argv)

    train_x, _ = load_split(args.data, "train")
    test_x, test_y = load_split(args.data, "t10k")
    calib_x = train_x[np.sort(np.random.default_rng(args.seed).permutation(len(train_x))[:args.calib])]
    if args.export:
        os.makedirs(args.export, exist_ok=True)
        np.savez(os.path.join(args.export, "calib.npz"), data=calib_x)
        np.savez(os.path.join(args.export, "test.npz"), data=test_x, labels=test_y)
        print(f"wrote {args.export}/calib.npz ({len(calib_x)} images), test.npz ({len(test_x)} images)")
        return 0

    net = qcnn.load(args.model)
    shape = next(iter(net.inputs.values()))[1:]
    preprocess = net.metadata.get("preprocess")
    test = Dataset("test", test_x, shape, preprocess, test_y)
    calibration = Dataset("calib", calib_x, shape, preprocess).array()
    float_probs = predict(net, (x for x, _ in test.batches(500)))
    float_acc = accuracy(float_probs, test_y)["top1_accuracy"]
    dense_bytes = sum(r["dense_bytes"] for r in net.summary())
    print(f"float: {float_acc:.2%} on {len(test_y)} test images, {dense_bytes / 1024:.1f} KiB")

    rows = []
    for setting in args.settings:
        subdim, k = (int(v) for v in setting.split(","))
        for ec in (False, True):
            start = time.perf_counter()
            quantized, report = quantize_net(net, (subdim, k), (subdim, k), seed=args.seed,
                                             calibration=calibration, error_correction=ec,
                                             ec_options={"max_iter": args.ec_iter, "prior": args.ec_prior})
            seconds = time.perf_counter() - start
            probs = predict(quantized, (x for x, _ in test.batches(500)))
            total_bytes = sum(r["bytes"] for r in quantized.summary())
            row = {"subdim": subdim, "num_codewords": k, "error_correction": ec, "ec_prior": args.ec_prior,
                   "compression": dense_bytes / total_bytes, "bytes": total_bytes,
                   "accuracy": accuracy(probs, test_y)["top1_accuracy"],
                   "quantize_seconds": seconds, **agreement(float_probs, probs),
                   "layers": report}
            row["accuracy_loss"] = float_acc - row["accuracy"]
            rows.append(row)
            print(f"subdim {subdim:>2} K {k:>3} {'EC   ' if ec else 'no EC'}  "
                  f"compression {row['compression']:5.1f}x  accuracy {row['accuracy']:.2%} "
                  f"(loss {100 * row['accuracy_loss']:+.2f} points)  top-1 agreement "
                  f"{row['top1_agreement']:.2%}  {seconds:.1f} s", flush=True)

    print(f"\n| subdim | K | compression | no EC | EC | EC - no EC |\n|---|---|---|---|---|---|")
    print(f"| float | | 1.0x | {float_acc:.2%} | | |")
    for plain, corrected in zip(rows[::2], rows[1::2]):
        print(f"| {plain['subdim']} | {plain['num_codewords']} | {plain['compression']:.1f}x | "
              f"{plain['accuracy']:.2%} | {corrected['accuracy']:.2%} | "
              f"{100 * (corrected['accuracy'] - plain['accuracy']):+.2f} |")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"float_accuracy": float_acc, "test_images": len(test_y), "calibration_images": len(calib_x),
                   "dense_bytes": dense_bytes, "rows": rows}, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
