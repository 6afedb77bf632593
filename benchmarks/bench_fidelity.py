"""Compression versus fidelity of a quantized ImageNet-style model, on held-out photo crops.

A float model is quantized at several settings, calibrated (error correction)
on crops of one set of photos (benchmarks/photo_crops.py), and compared with
the float model on crops of a disjoint set: top-1 / top-5 agreement, mean KL
divergence, mean change of the float top class's probability; also whether
each whole reference photo keeps its float top-1 label. Prints a table, writes
JSON and, with matplotlib installed, a PNG plot of compression against
top-1 agreement.

    python benchmarks/bench_fidelity.py MODEL.qcnn --name efficientnet \\
        --settings "conv=8,128 fc=4,32 depthwise=float" "conv=4,64 fc=4,32" [--no-ec-too]

A setting is space-separated KIND=SUBDIM,K (or KIND=float) for KIND in conv, fc,
depthwise; unspecified kinds take qcnn's defaults (conv 8,128; fc 4,32;
depthwise as conv). Any other key is a layer name or a shell-style pattern of
layer names (``head=2,64``, ``block1*/dwise=float``, ``'block[0-3]/*=1,256'``):
per-layer overrides, later ones winning. The token ``half`` stores float16
codebooks (``codebook_dtype="float16"``), ``scales`` quantizes each output
channel's weights divided by their largest magnitude (``channel_scales=True``).
With ``--ec-prior A [B ...]`` each setting is run with error correction at each
weight-prior strength alpha. ``--models Q.qcnn ...`` adds rows for quantized models
made elsewhere (e.g. the bundled default: ``--settings --models
weights/imagenet/efficientnet_lite0_pq.qcnn``). ``--replot RESULTS.json`` redraws the
plot of an earlier run.
"""

import argparse
import fnmatch
import json
import os
import sys
import time

import numpy as np

import qcnn
from qcnn.compress import quantize_net
from qcnn.evaluate import agreement, predict, top_k
from qcnn.io.dataset import Dataset
from qcnn.io.image import load_images

sys.path.insert(0, os.path.dirname(__file__))
from photo_crops import CALIBRATION, HELDOUT, crops, photo_path  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def parse_setting(text, layer_names=()):
    """``{"conv", "fc", "depthwise": (subdim, K) or None, "overrides": {name: ...},
    "half", "scales": bool}``."""
    kinds = {"conv": (8, 128), "fc": (4, 32), "overrides": {}, "half": False, "scales": False}
    for part in text.split():
        if part in ("half", "scales"):
            kinds[part] = True
            continue
        key, _, value = part.partition("=")
        if not value:
            raise SystemExit(f"expected KEY=SUBDIM,K or KEY=float, got {part!r} in setting {text!r}")
        settings = None if value == "float" else tuple(int(v) for v in value.split(","))
        if key in ("conv", "fc", "depthwise"):
            kinds[key] = settings
            continue
        names = fnmatch.filter(layer_names, key)
        if not names:
            raise SystemExit(f"no layer matches {key!r} in setting {text!r}")
        kinds["overrides"].update(dict.fromkeys(names, settings))
    kinds.setdefault("depthwise", kinds["conv"])
    return kinds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="float .qcnn model")
    parser.add_argument("--replot", metavar="RESULTS.json",
                        help="only redraw the plot of an earlier run's JSON (written beside it, .png)")
    parser.add_argument("--name", default="model", help="names the JSON and PNG files")
    parser.add_argument("--settings", nargs="*", default=["conv=8,128 fc=4,32"])
    parser.add_argument("--models", nargs="+", metavar="QUANTIZED", help="also compare these quantized models")
    parser.add_argument("--no-ec-too", action="store_true", help="also quantize without error correction")
    parser.add_argument("--no-ec", action="store_true", help="only quantize without error correction")
    parser.add_argument("--fast-kmeans", action="store_true", help="plain k-means++/Lloyd (qcnn quantize --fast-kmeans)")
    parser.add_argument("--calib-per-photo", type=int, default=16)
    parser.add_argument("--heldout-per-photo", type=int, default=20)
    parser.add_argument("--samples", type=int, default=8192, help="rows per layer for error correction")
    parser.add_argument("--ec-iter", type=int, default=20)
    parser.add_argument("--ec-ridge", type=float, default=1e-6,
                        help="proximal ridge of the codebook step, relative to the mean Gram diagonal")
    parser.add_argument("--ec-prior", type=float, nargs="+", default=[0.0],
                        help="weight-prior strengths alpha of error correction (one row each)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--save", metavar="DIR", help="keep the quantized models here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            _plot(json.load(f)["rows"], args.name, os.path.splitext(args.replot)[0] + ".png")
        return 0
    if args.model is None:
        parser.error("a float model is needed (or --replot)")

    net = qcnn.load(args.model)
    shape = next(iter(net.inputs.values()))[1:]
    calibration = Dataset("calib", crops(CALIBRATION, args.calib_per_photo, seed=args.seed),
                          shape, net.metadata.get("preprocess")).array()
    fidelity = Fidelity(net, args.heldout_per_photo, args.seed + 1, args.batch_size)
    dense_bytes = sum(r["dense_bytes"] for r in net.summary())
    print(f"{args.model}: {dense_bytes / 2**20:.2f} MiB float; calibration {len(calibration)} crops of "
          f"{len(CALIBRATION)} photos, held out {len(fidelity.heldout)} crops of {len(HELDOUT)} photos",
          flush=True)

    rows = []
    names = [layer.name for layer in net.layers]
    runs = [(False, 0.0)] if args.no_ec else [(True, a) for a in args.ec_prior]
    if args.no_ec_too and not args.no_ec:
        runs.insert(0, (False, 0.0))
    for text in args.settings:
        kinds = parse_setting(text, names)
        for ec, prior in runs:
            start = time.perf_counter()
            quantized, report = quantize_net(net, kinds["conv"], kinds["fc"], kinds["overrides"],
                                             depthwise=kinds["depthwise"],
                                             codebook_dtype="float16" if kinds["half"] else "float32",
                                             channel_scales=kinds["scales"],
                                             seed=args.seed, calibration=calibration, error_correction=ec,
                                             max_samples=args.samples, monotone=not args.fast_kmeans,
                                             ec_options={"max_iter": args.ec_iter, "ridge": args.ec_ridge,
                                                         "prior": prior})
            seconds = time.perf_counter() - start
            total = sum(r["bytes"] for r in quantized.summary())
            row = {"setting": text, "error_correction": ec, "ec_prior": prior if ec else None,
                   "compression": dense_bytes / total, "bytes": total, **fidelity.compare(quantized),
                   "quantize_seconds": seconds, "layers": report}
            rows.append(row)
            if args.save:
                os.makedirs(args.save, exist_ok=True)
                qcnn.save(quantized, os.path.join(args.save, f"{args.name}-{len(rows)}.qcnn"))
            _print_row(row)
    for path in args.models or []:
        model = qcnn.load(path)
        total = sum(r["bytes"] for r in model.summary())
        rows.append({"setting": path, "error_correction": None, "compression": dense_bytes / total,
                     "bytes": total, **fidelity.compare(model)})
        _print_row(rows[-1])

    print("\n| # | setting | EC | size | compression | top-1 agr. | top-5 agr. | mean KL | photo labels kept |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(rows, 1):
        print(f"| {i} | {r['setting']} | {_ec_label(r)} | {r['bytes'] / 2**20:.2f} MiB | "
              f"{r['compression']:.1f}x | {r['top1_agreement']:.2%} | {r['top5_agreement']:.2%} | "
              f"{r['mean_kl']:.4f} | {r['photos_label_kept']}/{r['photos']} |")
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"fidelity_{args.name}.json")
    with open(path, "w") as f:
        json.dump({"model": args.model, "float_bytes": dense_bytes, "calibration_crops": len(calibration),
                   "heldout_crops": len(fidelity.heldout), "rows": rows}, f, indent=1)
    print(f"wrote {path}")
    _plot(rows, args.name)
    return 0


class Fidelity:
    """A float model's predictions on held-out photo crops and on whole photos, to compare
    quantized copies with.

    Parameters
    ----------
    net : Net
        The float model.
    per_photo : int
        Held-out crops per photo of ``HELDOUT`` (:func:`photo_crops.crops`, seeded by ``seed``).
    """

    def __init__(self, net, per_photo=20, seed=1, batch_size=16):
        shape = next(iter(net.inputs.values()))[1:]
        preprocess = net.metadata.get("preprocess")
        self.batch_size = batch_size
        self.heldout = Dataset("heldout", crops(HELDOUT, per_photo, seed=seed), shape, preprocess)
        self.photo_names = CALIBRATION + HELDOUT
        self.photos = load_images([photo_path(n) for n in self.photo_names], shape, preprocess)
        self.float_probs, float_photos = self._run(net)
        self.float_labels = top_k(float_photos, 1)[:, 0]

    def _run(self, model):
        """Probabilities (N, classes) on the held-out crops and on the whole photos."""
        photos = self.photos
        return (predict(model, (x for x, _ in self.heldout.batches(self.batch_size))),
                predict(model, [photos[i:i + self.batch_size] for i in range(0, len(photos), self.batch_size)]))

    def compare(self, model):
        """:func:`qcnn.evaluate.agreement` with the float model on the held-out crops, and which
        whole photos keep their float top-1 label (``photos_label_kept``, ``photos_changed``)."""
        probs, photo_probs = self._run(model)
        kept = top_k(photo_probs, 1)[:, 0] == self.float_labels
        return {**agreement(self.float_probs, probs), "photos_label_kept": int(kept.sum()),
                "photos": len(kept), "photos_changed": [n for n, k in zip(self.photo_names, kept) if not k]}


def _print_row(row):
    print(f"{row['setting']:<40} {_ec_label(row):<8} {row['compression']:5.1f}x  top-1 "
          f"{row['top1_agreement']:.2%}  top-5 {row['top5_agreement']:.2%}  KL {row['mean_kl']:.4f}  "
          f"photos kept {row['photos_label_kept']}/{row['photos']}", flush=True)


def _ec_label(row):
    if row["error_correction"] is None:
        return "given"
    if not row["error_correction"]:
        return "no EC"
    return f"EC a={row['ec_prior']:g}" if row["ec_prior"] else "EC"


def _plot(rows, name, path=None):
    """Top-1 agreement and mean KL divergence against compression, one numbered point per row
    (the numbers are the rows of the printed table), written to ``path`` (a PNG)."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib, or qcnn[plot])")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    metrics = (("top1_agreement", 100, "top-1 agreement with the float model (%)", "linear"),
               ("mean_kl", 1, "mean KL divergence from the float model", "log"))
    for ax, (key, factor, label, scale) in zip(axes, metrics):
        for ec, marker, kind in ((True, "o", "with EC"), (False, "x", "without EC"), (None, "s", "given models")):
            chosen = [(i, r) for i, r in enumerate(rows, 1) if r["error_correction"] is ec]
            if chosen:
                ax.scatter([r["compression"] for _, r in chosen], [factor * r[key] for _, r in chosen],
                           marker=marker, label=kind)
            for i, r in chosen:
                ax.annotate(str(i), (r["compression"], factor * r[key]), xytext=(4, 3),
                            textcoords="offset points", fontsize=8)
        ax.set_xlabel("compression (float bytes / quantized bytes)")
        ax.set_ylabel(label)
        ax.set_yscale(scale)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{name}: quantized vs float on held-out crops (points numbered as the table's rows)")
    fig.tight_layout()
    path = path or os.path.join(RESULTS, f"fidelity_{name}.png")
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
