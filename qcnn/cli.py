"""The ``qcnn`` command line: convert, info, classify.

Every subcommand exits 0 on success and 1 with a one-line ``qcnn: error:``
message on bad input; ``--json`` gives machine-readable output on stdout.
"""

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np

from qcnn import __version__
from qcnn.errors import QcnnError
from qcnn import resources
from qcnn.io import caffe, image, modelfile
from qcnn.io.files import atomic_write, read_bytes
from qcnn.evaluate import agreement, accuracy, predict, probabilities
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

def _settings(text):
    if text == "float":
        return None
    try:
        subdim, k = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SUBDIM,K or float, got {text!r}") from None
    return subdim, k


def _layer_override(text):
    name, _, value = text.partition("=")
    if not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=SUBDIM,K or NAME=float, got {text!r}")
    return name, _settings(value)


class _Progress:
    """Per-layer progress on stderr: an in-place bar on a terminal, one line per layer otherwise."""

    def __init__(self, stream, enabled):
        self.stream, self.enabled = stream, enabled
        self.live = enabled and stream.isatty()
        self.prefix = ""

    def __call__(self, event, info):
        if not self.enabled:
            return
        if event == "layer":
            self.prefix = f"[{info['position']}/{info['count']}] {info['name']}"
            self._show(f"{self.prefix}  k-means ...")
        elif event == "iteration":
            total = info["max_iter"] or 1
            filled = min(20, round(20 * info["iteration"] / total))
            self._show(f"{self.prefix}  EC |{'#' * filled}{'.' * (20 - filled)}| "
                       f"iteration {info['iteration']}/{total}  objective {info['objective']:.4g}")
        elif event == "done":
            r = info
            text = f"{self.prefix}  subdim {r['subdim']} K {r['num_codewords']}  weight error {r['weight_error']:.3f}"
            if "response_error" in r:
                text += (f"  response error {r['response_error_kmeans']:.4f} -> {r['response_error']:.4f}"
                         f" ({r['iterations']} iterations, {r['samples']} samples)")
            self._show(f"{text}  {r['seconds']:.1f} s", end="\n")

    def _show(self, text, end=""):
        if self.live:
            self.stream.write("\r\033[K" + text + end)
        elif end:
            self.stream.write(text + end)
        self.stream.flush()


def _check_settings(args):
    for name, value in (("--conv-k", args.conv_k), ("--fc-k", args.fc_k)):
        if not 1 <= value <= 256:
            raise QcnnError(f"{name} must be between 1 and 256, got {value}")
    for name, value in (("--conv-subdim", args.conv_subdim), ("--fc-subdim", args.fc_subdim),
                        ("--calib-size", args.calib_size), ("--calib-crops", args.calib_crops),
                        ("--samples", args.samples),
                        ("--ec-iter", args.ec_iter)):
        if value < 1:
            raise QcnnError(f"{name} must be at least 1, got {value}")
    if not (args.ec_prior >= 0 and args.ec_prior != float("inf")):
        raise QcnnError(f"--ec-prior must be a finite number >= 0, got {args.ec_prior}")


def cmd_quantize(args):
    from qcnn.compress import quantize_net

    if args.calib is None and not args.no_ec:
        raise QcnnError("error correction needs unlabeled calibration images: give --calib DIR "
                        "(or an array file), or --no-ec for k-means on the weights alone")
    _check_settings(args)
    net = open_model(args.model)
    calibration = None
    if args.calib is not None:
        data = _dataset_for(net, args.calib).sample(args.calib_size, args.seed)
        calibration = (data.crops(args.calib_crops, args.seed) if args.calib_crops > 1 else data).array()
    overrides = dict(args.layer or [])
    for name in args.skip or []:
        overrides[name] = None
    quantized, report = quantize_net(
        net, (args.conv_subdim, args.conv_k), (args.fc_subdim, args.fc_k), overrides,
        shared_codebook=not args.per_group_codebooks, seed=args.seed, kernel=args.kernel,
        depthwise=(args.conv_subdim, args.conv_k) if args.depthwise == "conv" else args.depthwise,
        codebook_dtype="float16" if args.half_codebooks else "float32",
        calibration=calibration, error_correction=not args.no_ec, max_samples=args.samples,
        ec_options={"max_iter": args.ec_iter, "prior": args.ec_prior}, channel_scales=args.channel_scales,
        monotone=not args.fast_kmeans,
        progress=_Progress(sys.stderr, not (args.json or args.quiet)))
    if not report:
        raise QcnnError(f"{args.model}: no layer to quantize")
    totals = _totals(quantized.summary())
    result = {"model": str(args.model), "output": str(args.output),
              "calibration": None if calibration is None else
              {"source": str(args.calib), "images": len(data), "crops_per_image": args.calib_crops,
               "inputs": len(calibration), "seed": args.seed},
              "error_correction": calibration is not None and not args.no_ec,
              "layers": report, "total": totals}
    modelfile.save(quantized, args.output)
    if args.report:
        with atomic_write(args.report, "w") as f:
            json.dump(result, f, indent=1)
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        print()
    elif not args.quiet:
        _print_report(report)
        print(f"wrote {args.output}: {_fmt_bytes(totals['dense_bytes'])} -> {_fmt_bytes(totals['bytes'])} "
              f"({totals['compression']:.1f}x), {totals['dense_macs'] / 1e6:.1f}M -> "
              f"{totals['macs'] / 1e6:.1f}M MACs ({totals['speedup']:.2f}x)")
    return 0


def _print_report(report):
    print(f"{'layer':<20} {'subdim':>6} {'K':>4} {'bytes before':>12} {'bytes after':>12} {'ratio':>6} "
          f"{'MACs before':>13} {'MACs after':>13} {'resp. err k-means':>17} {'resp. err EC':>12}")
    for r in report:
        before = f"{r['response_error_kmeans']:.4f}" if "response_error_kmeans" in r else "-"
        after = f"{r['response_error']:.4f}" if "response_error" in r else "-"
        print(f"{r['name'][:20]:<20} {r['subdim']:>6} {r['num_codewords']:>4} {_fmt_bytes(r['bytes_before']):>12} "
              f"{_fmt_bytes(r['bytes_after']):>12} {r['compression']:>5.1f}x {r['macs_before']:>13,} "
              f"{r['macs_after']:>13,} {before:>17} {after:>12}")


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

def _image_paths(arguments):
    """Image files of the command line: files as given, folders expanded to the images below them."""
    from qcnn.io.dataset import image_files

    paths = []
    for argument in arguments:
        if os.path.isdir(argument):
            found = image_files(argument)
            if not found:
                raise QcnnError(f"{argument}: no image files in folder")
            paths += found
        else:
            paths.append(argument)
    return paths


def cmd_classify(args):
    model_path = args.model or resources.DEFAULT_MODEL
    images = _image_paths(args.images) if args.images else [str(resources.SAMPLE_IMAGE)]
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
    start_time = time.perf_counter()
    for start in range(0, len(images), args.batch_size):
        paths = images[start:start + args.batch_size]
        batch = image.load_images(paths, input_shape, preprocess)
        try:
            probs = probabilities(net, net.forward(batch, [output])[output], output)
        except QcnnError as e:
            raise QcnnError(f"{model_path}: {e}") from None
        if labels is not None and len(labels) != probs.shape[1]:
            raise QcnnError(f"{args.labels or model_path}: {len(labels)} labels for "
                            f"{probs.shape[1]} classes")
        for path, p in zip(paths, probs):
            top = np.argsort(-p, kind="stable")[:args.top]
            results.append({"image": str(path), "top": [
                {"index": int(i), "label": labels[i] if labels else str(i), "probability": float(p[i])}
                for i in top]})
    seconds = time.perf_counter() - start_time
    if args.json:
        json.dump({"model": str(model_path), "results": results}, sys.stdout, indent=1)
        print()
    else:
        _print_classes(results)
        print(f"{len(results)} image{'s' * (len(results) != 1)} in {seconds:.2f} s "
              f"(batches of {args.batch_size}; model {model_path})")
    return 0


def _print_classes(results):
    """One row per (image, rank): the image's name on its first row only."""
    width = max([5] + [len(r["image"]) for r in results])
    print(f"{'image':<{width}}  {'rank':>4}  {'probability':>11}  class")
    for r in results:
        for rank, t in enumerate(r["top"], 1):
            name = r["image"] if rank == 1 else ""
            print(f"{name:<{width}}  {rank:>4}  {t['probability']:>11.2%}  {t['label']} ({t['index']})")


# ------------------------------------------------------------------ evaluate

def _dataset_for(net, path, indices=None):
    from qcnn.io.dataset import open_dataset

    if len(net.inputs) != 1:
        raise QcnnError(f"network '{net.name}' has inputs {list(net.inputs)}; one input is needed here")
    input_shape = next(iter(net.inputs.values()))[1:]
    data = open_dataset(path, input_shape, net.metadata.get("preprocess"), net.metadata.get("labels"))
    return data if indices is None else data.subset(indices)


def _predict(net, path, data, args):
    try:
        return predict(net, (x for x, _ in data.batches(args.batch_size)), args.output_blob)
    except QcnnError as e:
        raise QcnnError(f"{path}: {e}") from None


def cmd_evaluate(args):
    if args.batch_size < 1:
        raise QcnnError("--batch-size must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise QcnnError("--limit must be at least 1")
    net = open_model(args.model)
    data = _dataset_for(net, args.data)
    indices = None
    if args.limit is not None:
        indices = np.sort(np.random.default_rng(args.seed).permutation(len(data))[:args.limit])
        data = data.subset(indices)
    if data.labels is None and args.reference is None:
        raise QcnnError(f"{args.data}: no labels in the data; give --reference MODEL to measure agreement")
    models = [(args.model, net)] + ([(args.reference, open_model(args.reference))] if args.reference else [])
    results = {"model": str(args.model), "data": str(args.data), "samples": len(data)}
    probs = []
    for path, model in models:
        if args.kernel:
            set_kernel(model.layers, args.kernel)
        model_data = data if model is net else _dataset_for(model, args.data, indices)
        probs.append(_predict(model, path, model_data, args))
        if data.labels is not None:
            prefix = "" if model is net else "reference_"
            results.update({prefix + k: v for k, v in accuracy(probs[-1], data.labels).items()})
    if args.reference:
        results["reference"] = str(args.reference)
        try:
            results.update(agreement(probs[1], probs[0]))
        except QcnnError as e:
            raise QcnnError(f"{args.reference}: {e}") from None
    if args.json:
        json.dump(results, sys.stdout, indent=1)
        print()
    else:
        print(f"{args.model} on {args.data}: {len(data)} samples")
        for key, value in results.items():
            if isinstance(value, float):
                shown = f"{value:.4f}" if "kl" in key or "change" in key else f"{value:.2%}"
                print(f"  {key.replace('_', ' '):<28} {shown}")
    return 0


# ------------------------------------------------------------------ warmup

def cmd_warmup(args):
    from qcnn.warmup import warmup

    def short(names):
        return ", ".join(n.removeprefix("qcnn.kernels.") for n in names)

    def progress(row):
        if not (args.json or args.quiet):
            done = "; ".join(f"{what} {short(row[what])}" for what in ("compiled", "loaded") if row[what])
            print(f"  {row['step'] + ', ' + row['variant']:<44} {row['seconds']:7.2f} s  {done}", flush=True)

    if not (args.json or args.quiet):
        from qcnn.kernels import jit

        print(f"Numba cache: {jit.CACHE_DIR} ({jit.CACHE_REASON})", flush=True)
    from qcnn.warmup import INFERENCE

    only = sorted(set(args.only or []) | (set(INFERENCE) if args.inference else set())) or None
    report = warmup(progress, only=only)
    kernels = report["kernels"]
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
    elif not args.quiet:
        counts = {s: sum(v == s for v in kernels.values())
                  for s in ("compiled", "loaded", "inside", "inlined", "skipped")}
        skipped = f", {counts['skipped']} skipped" if counts["skipped"] else ""
        print(f"{len(kernels)} kernels: {counts['compiled']} compiled, {counts['loaded']} loaded from the "
              f"cache, {counts['inside'] + counts['inlined']} inside others{skipped}; "
              f"{report['seconds']:.1f} s")
    unused = [name for name, s in kernels.items() if s == "unused"]
    if unused:
        warnings.warn(f"no warm-up step reaches {short(unused)}: they compile on first use", stacklevel=1)
    return 0


# ------------------------------------------------------------------ main

def _add_run_options(p, batch_size):
    """Options of the commands that run a model on inputs."""
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--output-blob", help="blob holding class scores (default: the first output)")
    p.add_argument("--kernel", choices=["auto", "lut", "dense"],
                   help="force how quantized layers run (default: as stored in the model)")
    p.add_argument("--json", action="store_true")


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
    p.add_argument("--calib", metavar="DATA",
                   help="unlabeled calibration inputs for error correction: a folder of images "
                        "(any size) or a .npy/.npz array")
    p.add_argument("--calib-size", type=int, default=256,
                   help="images drawn (seeded) from --calib (default 256)")
    p.add_argument("--calib-crops", type=int, default=1, metavar="N",
                   help="N > 1: calibrate on N square crops of each image instead (its centre, and N-1 "
                        "seeded random ones of 0.35-1 times its shorter side, half of them mirrored): "
                        "more varied inputs from a few photos (default 1: the images as they are)")
    p.add_argument("--samples", type=int, default=8192,
                   help="sampled output positions (conv) or inputs (FC) per layer (default 8192)")
    p.add_argument("--ec-iter", type=int, default=20, help="error-correction iterations at most (default 20)")
    p.add_argument("--ec-prior", type=float, default=0.0, metavar="ALPHA",
                   help="weight prior of error correction: also penalise mu ||W - W_q||^2, mu = ALPHA times "
                        "the mean diagonal of S^T S, so that layers do not over-fit few calibration images "
                        "(default 0, the paper's objective; 0.3 was best calibrating EfficientNet-Lite0 on "
                        "crops of 10 photos, and cost 0.1 point on Fashion-MNIST with 4096 images)")
    p.add_argument("--channel-scales", action="store_true",
                   help="quantize each output channel's weights divided by their largest magnitude, the "
                        "scales kept in a float Scale layer after the layer (4 bytes per output channel)")
    p.add_argument("--no-ec", action="store_true",
                   help="k-means on the weights only, no error correction (needs no data; with "
                        "--calib the response error is still measured)")
    p.add_argument("--report", help="also write the report as JSON to this file")
    p.add_argument("--conv-subdim", type=int, default=8, help="C'_s of conv layers (default 8)")
    p.add_argument("--conv-k", type=int, default=128, help="codewords per conv subspace (default 128)")
    p.add_argument("--fc-subdim", type=int, default=4, help="C'_s of inner products (default 4)")
    p.add_argument("--fc-k", type=int, default=32, help="codewords per FC subspace (default 32)")
    p.add_argument("--depthwise", type=lambda t: t if t == "conv" else _settings(t), default="conv",
                   metavar="SUBDIM,K|float", help="depthwise convs (one input channel per group): "
                   "scalar codebooks by default, with --conv-k codewords; 'float' leaves them float")
    p.add_argument("--layer", action="append", type=_layer_override, metavar="NAME=SUBDIM,K",
                   help="settings of one layer (repeatable); NAME=float leaves it unquantized")
    p.add_argument("--skip", action="append", metavar="NAME", help="leave this layer float (repeatable)")
    p.add_argument("--half-codebooks", action="store_true",
                   help="store codebooks as float16 (half their bytes)")
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
    p.add_argument("images", nargs="*", help="image files or folders of them (default: a bundled sample photo)")
    p.add_argument("--model", help="model file (default: the bundled model)")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--labels", help="class names, one per line (default: the model's)")
    _add_run_options(p, batch_size=16)
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("evaluate", help="accuracy on labelled data, agreement with a reference model")
    p.add_argument("model", help="model file")
    p.add_argument("data", help="a folder of images (class sub-folders give labels) or a .npy/.npz array "
                   "(labels under 'labels')")
    p.add_argument("--reference", metavar="MODEL",
                   help="compare with this model: top-1/top-5 agreement, mean KL divergence")
    p.add_argument("--limit", type=int, help="evaluate a seeded random subset of this many samples")
    p.add_argument("--seed", type=int, default=0)
    _add_run_options(p, batch_size=32)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("warmup", help="compile every Numba kernel once, so that later runs start fast")
    p.add_argument("--inference", action="store_true",
                   help="only the kernels that classify and evaluate may need (lut, depthwise), not "
                        "those of quantize (kmeans, ec)")
    p.add_argument("--only", action="append", choices=["lut", "depthwise", "kmeans", "ec"],
                   metavar="MODULE", help="only the kernels of this module (repeatable): lut, depthwise, "
                   "kmeans, ec")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_warmup)
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
