"""The ``qcnn`` command line: convert, info, classify.

Every subcommand exits 0 on success and 1 with a one-line ``qcnn: error:``
message on bad input; ``--json`` gives machine-readable output on stdout.
"""

import argparse
import json
import os
import sys
import warnings

import numpy as np

from qcnn import __version__
from qcnn.errors import QcnnError
from qcnn import resources
from qcnn.io import caffe, image, modelfile
from qcnn.io.files import read_bytes
from qcnn.layers.quantized import set_kernel


def _floats(text):
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _read_labels(path):
    try:
        labels = [line.strip() for line in read_bytes(path).decode("utf-8").splitlines()]
    except UnicodeDecodeError:
        raise QcnnError(f"{path}: labels file is not UTF-8 text") from None
    while labels and not labels[-1]:
        labels.pop()
    if not labels:
        raise QcnnError(f"{path}: no labels in file")
    return labels


def _is_qcnn_file(path):
    try:
        with open(path, "rb") as f:
            return f.read(len(modelfile.MAGIC)) == modelfile.MAGIC
    except OSError:
        return False


def open_model(path, weights=None):
    """A qcnn model file, or a Caffe prototxt (+ optional caffemodel)."""
    if _is_qcnn_file(path) or weights is None and str(path).endswith(".qcnn"):
        return modelfile.load(path)
    return caffe.load_caffe(path, weights)


# ------------------------------------------------------------------ convert

def cmd_convert(args):
    if args.mean is not None and args.mean_file is not None:
        raise QcnnError("give --mean or --mean-file, not both")
    net = caffe.load_caffe(args.prototxt, args.caffemodel, fold_batchnorm=not args.no_fold)
    channels = next(iter(net.inputs.values()))[1]
    preprocess = {"channel_order": args.channel_order or ("GRAY" if channels == 1 else "BGR"),
                  "resize": args.resize, "scale": args.scale,
                  "mean": args.mean if args.mean is not None else [0.0]}
    if args.mean_file is not None:
        mean = caffe.read_mean_file(args.mean_file)
        if mean.shape[0] != channels:
            raise QcnnError(f"{args.mean_file}: mean has {mean.shape[0]} channels, the network "
                            f"input has {channels}")
        preprocess["mean"] = [float(m) for m in mean.reshape(channels, -1).mean(axis=1)]
    try:
        net.metadata["preprocess"] = image.check_preprocess(preprocess, channels)
    except QcnnError as e:
        raise QcnnError(f"bad preprocessing options: {e}") from None
    if args.labels:
        net.metadata["labels"] = _read_labels(args.labels)
    modelfile.save(net, args.output)
    if not args.quiet:
        print(f"wrote {args.output}: {len(net.layers)} layers, "
              f"{sum(b.size for layer in net.layers for b in layer.blobs):,} weights")
    return 0


# ------------------------------------------------------------------ quantize

def _layer_override(text):
    name, _, value = text.partition("=")
    if not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=SUBDIM,K or NAME=float, got {text!r}")
    if value == "float":
        return name, None
    try:
        subdim, k = (int(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=SUBDIM,K or NAME=float, got {text!r}") from None
    return name, (subdim, k)


def cmd_quantize(args):
    from qcnn.compress import quantize_net

    if not args.no_ec:
        raise QcnnError("error correction from calibration data is not available yet; pass --no-ec "
                        "to quantize by k-means on the weights alone")
    net = open_model(args.model)
    for name, value in (("--conv-k", args.conv_k), ("--fc-k", args.fc_k)):
        if not 1 <= value <= 256:
            raise QcnnError(f"{name} must be between 1 and 256, got {value}")
    for name, value in (("--conv-subdim", args.conv_subdim), ("--fc-subdim", args.fc_subdim)):
        if value < 1:
            raise QcnnError(f"{name} must be at least 1, got {value}")
    overrides = dict(args.layer or [])
    for name in args.skip or []:
        overrides[name] = None
    show = not (args.json or args.quiet)

    def progress(row):
        if show:
            print(f"  {row['name']:<20} subdim {row['subdim']:>2}  K {row['num_codewords']:>3}  "
                  f"weight error {row['weight_error']:.3f}  {row['seconds']:.1f} s", file=sys.stderr)

    quantized, report = quantize_net(net, (args.conv_subdim, args.conv_k), (args.fc_subdim, args.fc_k),
                                     overrides, shared_codebook=not args.per_group_codebooks,
                                     seed=args.seed, kernel=args.kernel, progress=progress,
                                     monotone=not args.fast_kmeans)
    if not report:
        raise QcnnError(f"{args.model}: no layer to quantize")
    modelfile.save(quantized, args.output)
    totals = _totals(quantized.summary())
    if args.json:
        json.dump({"model": str(args.model), "output": str(args.output), "layers": report,
                   "total": totals}, sys.stdout, indent=1)
        print()
    elif not args.quiet:
        print(f"wrote {args.output}: {_fmt_bytes(totals['dense_bytes'])} -> {_fmt_bytes(totals['bytes'])} "
              f"({totals['compression']:.1f}x), {totals['dense_macs'] / 1e6:.1f}M -> "
              f"{totals['macs'] / 1e6:.1f}M MACs ({totals['speedup']:.2f}x)")
    return 0


def _totals(rows):
    total = {k: sum(r[k] for r in rows) for k in ("params", "bytes", "macs", "dense_bytes", "dense_macs")}
    total["compression"] = total["dense_bytes"] / max(total["bytes"], 1)
    total["speedup"] = total["dense_macs"] / max(total["macs"], 1)
    return total


# ------------------------------------------------------------------ info

def _fmt_bytes(n):
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB" if n >= 2**10 else f"{n} B"


def cmd_info(args):
    net = open_model(args.model, args.weights)
    rows = net.summary()
    total = _totals(rows)
    if args.json:
        json.dump({"model": str(args.model), "name": net.name, "inputs": net.inputs,
                   "outputs": net.outputs, "layers": rows, "total": total,
                   "metadata": net.metadata}, sys.stdout, indent=1)
        print()
        return 0
    print(f"model {args.model}: {net.name}, inputs "
          + ", ".join(f"{k} {tuple(v)}" for k, v in net.inputs.items())
          + f", outputs {', '.join(net.outputs)}")
    print(f"{'layer':<22} {'type':<21} {'output shape':<14} {'params':>10} {'MACs before':>13} "
          f"{'MACs after':>13} {'bytes before':>12} {'bytes after':>12} {'ratio':>6}")

    def line(name, kind, shape, r):
        ratio = f"{r['dense_bytes'] / r['bytes']:.1f}x" if r["bytes"] else ""
        print(f"{name[:22]:<22} {kind:<21} {shape:<14} {r['params']:>10,} {r['dense_macs']:>13,} "
              f"{r['macs']:>13,} {_fmt_bytes(r['dense_bytes']):>12} {_fmt_bytes(r['bytes']):>12} {ratio:>6}")

    for r in rows:
        line(r["name"], r["type"], "x".join(map(str, r["output_shapes"][0][1:])), r)
    line("total", "", "", total)
    print(f"compression {total['compression']:.2f}x, theoretical speed-up {total['speedup']:.2f}x "
          f"(multiply-adds, batch 1)")
    return 0


# ------------------------------------------------------------------ classify

def _probabilities(net, scores, output):
    producer = [layer for layer in net.layers if output in layer.tops][-1:]
    scores = scores.reshape(len(scores), -1).astype(np.float64)
    if producer and producer[0].type == "Softmax":
        return scores
    e = np.exp(scores - scores.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def cmd_classify(args):
    model_path = args.model or resources.DEFAULT_MODEL
    images = args.images or [str(resources.SAMPLE_IMAGE)]
    net = open_model(model_path)
    if args.kernel:
        set_kernel(net.layers, args.kernel)
    if len(net.inputs) != 1:
        raise QcnnError(f"{model_path}: classify needs a network with one input, it has {list(net.inputs)}")
    if args.top < 1:
        raise QcnnError("--top must be at least 1")
    if args.batch_size < 1:
        raise QcnnError("--batch-size must be at least 1")
    output = args.output_blob or net.outputs[0]
    labels = _read_labels(args.labels) if args.labels else net.metadata.get("labels")
    input_shape = next(iter(net.inputs.values()))[1:]
    preprocess = net.metadata.get("preprocess")
    results = []
    for start in range(0, len(images), args.batch_size):
        paths = images[start:start + args.batch_size]
        batch = image.load_images(paths, input_shape, preprocess)
        probs = _probabilities(net, net.forward(batch, [output])[output], output)
        if not np.isfinite(probs).all():
            raise QcnnError(f"{model_path}: the model produced NaN or infinite outputs")
        if labels is not None and len(labels) != probs.shape[1]:
            raise QcnnError(f"{args.labels or model_path}: {len(labels)} labels for "
                            f"{probs.shape[1]} classes")
        for path, p in zip(paths, probs):
            top = np.argsort(-p, kind="stable")[:args.top]
            results.append({"image": str(path), "top": [
                {"index": int(i), "label": labels[i] if labels else str(i), "probability": float(p[i])}
                for i in top]})
    if args.json:
        json.dump({"model": str(model_path), "results": results}, sys.stdout, indent=1)
        print()
    else:
        for r in results:
            print(r["image"])
            for rank, t in enumerate(r["top"], 1):
                print(f"  {rank:>2}. {t['probability']:7.2%}  {t['label']}  ({t['index']})")
    return 0


# ------------------------------------------------------------------ main

def build_parser():
    parser = argparse.ArgumentParser(prog="qcnn", description="Quantized CNNs in NumPy: "
                                     "convert Caffe models, inspect them, classify images.")
    parser.add_argument("--version", action="version", version=f"qcnn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("convert", help="convert a Caffe prototxt + caffemodel to a .qcnn model")
    p.add_argument("prototxt")
    p.add_argument("caffemodel")
    p.add_argument("-o", "--output", required=True, help="output .qcnn file (written atomically)")
    p.add_argument("--mean", type=_floats, help="per-channel mean in network channel order, e.g. 104,117,123")
    p.add_argument("--mean-file", help="Caffe mean .binaryproto (averaged per channel)")
    p.add_argument("--scale", type=float, default=1.0, help="multiplier after mean subtraction")
    p.add_argument("--channel-order", choices=["BGR", "RGB", "GRAY"], help="default BGR (Caffe)")
    p.add_argument("--resize", type=int, help="resize the shorter side to this, then centre-crop "
                   "(default: resize straight to the input size)")
    p.add_argument("--labels", help="class names, one per line")
    p.add_argument("--no-fold", action="store_true", help="keep BatchNorm/Scale as separate layers")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("quantize", help="product-quantize the conv and FC layers of a model")
    p.add_argument("model", help=".qcnn model (or Caffe prototxt)")
    p.add_argument("-o", "--output", required=True, help="output .qcnn file (written atomically)")
    p.add_argument("--no-ec", action="store_true",
                   help="k-means on the weights only, no error correction (needs no data)")
    p.add_argument("--conv-subdim", type=int, default=8, help="C'_s of conv layers (default 8)")
    p.add_argument("--conv-k", type=int, default=128, help="codewords per conv subspace (default 128)")
    p.add_argument("--fc-subdim", type=int, default=4, help="C'_s of inner products (default 4)")
    p.add_argument("--fc-k", type=int, default=32, help="codewords per FC subspace (default 32)")
    p.add_argument("--layer", action="append", type=_layer_override, metavar="NAME=SUBDIM,K",
                   help="settings of one layer (repeatable); NAME=float leaves it unquantized")
    p.add_argument("--skip", action="append", metavar="NAME", help="leave this layer float (repeatable)")
    p.add_argument("--per-group-codebooks", action="store_true",
                   help="one codebook per group of a grouped conv (default: shared, as the authors)")
    p.add_argument("--kernel", choices=["auto", "lut", "dense"], default="auto",
                   help="how quantized layers run: lookup tables, decoded dense, or the faster")
    p.add_argument("--fast-kmeans", action="store_true",
                   help="plain k-means++ and Lloyd (about 5x faster) instead of growing each codebook "
                        "one codeword at a time (lower distortion, never worse for larger K)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("info", help="layers, shapes, parameters, MACs and bytes of a model")
    p.add_argument("model", help=".qcnn file or Caffe prototxt")
    p.add_argument("--weights", help="caffemodel for a prototxt (default: random weights)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("classify", help="top-k classes of images")
    p.add_argument("images", nargs="*", help="image files (default: a bundled sample)")
    p.add_argument("--model", help="model file (default: the bundled model)")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--labels", help="class names, one per line (default: the model's)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--output-blob", help="blob holding class scores (default: the first output)")
    p.add_argument("--kernel", choices=["auto", "lut", "dense"],
                   help="force how quantized layers run (default: as stored in the model)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_classify)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)

    def show_warning(message, category, filename, lineno, file=None, line=None):
        print(f"qcnn: warning: {message}", file=sys.stderr)

    warnings.showwarning = show_warning
    try:
        return args.func(args)
    except QcnnError as e:
        print(f"qcnn: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a bug, not bad input: say so briefly unless debugging
        if os.environ.get("QCNN_DEBUG"):
            raise
        print(f"qcnn: internal error: {type(e).__name__}: {e} (set QCNN_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
