#!/usr/bin/env python
"""Agreement of qcnn's float engine with OpenCV's ``cv2.dnn`` Caffe importer, per model.

For every layer of each network (BatchNorm/Scale unfolded, so layers correspond one to
one, and OpenCV's fusion off) the maximum absolute difference between the two engines'
outputs and that difference relative to the layer output's largest magnitude; then the
same for the final probabilities of the folded network qcnn uses by default.

Models: the real open_nsfw ResNet-50-1by2 (``nsfw`` package) on the photos shipped with
scikit-image and scikit-learn (resize 256, centre crop 224, BGR, mean 104/117/123); the
AlexNet (V2 prototxt) and CaffeNet (V1 prototxt, V1 caffemodel) of ``weights/caffe`` with
seeded random weights on a seeded random batch.

    python benchmarks/agreement_opencv.py [--output benchmarks/results/agreement.json]
"""

import argparse
import importlib.util
import json
import os
import tempfile
from pathlib import Path

import cv2
import numpy as np

import qcnn
from qcnn.io import image
from qcnn.io.caffe import save_caffemodel

REPO = Path(__file__).resolve().parent.parent


def package_dir(name):
    return Path(next(iter(importlib.util.find_spec(name).submodule_search_locations)))


def photos():
    skimage_data, sklearn_images = package_dir("skimage") / "data", package_dir("sklearn") / "datasets" / "images"
    return ([skimage_data / f for f in ("astronaut.png", "chelsea.png", "coffee.png",
                                        "motorcycle_left.png", "rocket.jpg")]
            + [sklearn_images / "china.jpg", sklearn_images / "flower.jpg"])


def compare(prototxt, caffemodel, batch):
    """Worst per-layer (abs, rel) difference and the final probabilities' max abs difference."""
    net = qcnn.load_caffe(prototxt, caffemodel, fold_batchnorm=False)
    folded = qcnn.load_caffe(prototxt, caffemodel)
    cv_net = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    cv_net.enableFusion(False)
    names = list(cv_net.getLayerNames())
    worst_abs = worst_rel = 0.0
    worst_layer = None
    for x in batch:
        cv_net.setInput(x[None])
        reference = dict(zip(names, cv_net.forward(names)))
        for layer, _, outputs in net.trace(x[None]):
            ref = reference[layer.name]
            diff = float(np.abs(outputs[0] - ref).max())
            rel = diff / max(float(np.abs(ref).max()), 1e-30)
            worst_abs = max(worst_abs, diff)
            if rel > worst_rel:
                worst_rel, worst_layer = rel, layer.name
    cv_net.setInput(batch)
    probs_ref = cv_net.forward(net.outputs[0])
    probs = folded.forward(batch)[folded.outputs[0]]
    return {"layers": len(net.layers), "images": len(batch), "max_abs_diff_any_layer": worst_abs,
            "max_rel_diff_any_layer": worst_rel, "worst_layer": worst_layer,
            "max_abs_diff_probabilities_folded": float(np.abs(probs - probs_ref).max()),
            "max_rel_diff_probabilities_folded": float((np.abs(probs - probs_ref) /
                                                        np.maximum(np.abs(probs_ref), 1e-30)).max())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "agreement.json"))
    args = parser.parse_args()
    results = {}
    nsfw = package_dir("nsfw")
    batch = image.load_images(photos(), (3, 224, 224),
                              {"channel_order": "BGR", "mean": [104, 117, 123], "resize": 256})
    results["nsfw ResNet-50-1by2"] = compare(nsfw / "deploy.prototxt",
                                             nsfw / "resnet_50_1by2_nsfw.caffemodel", batch)
    random_batch = np.random.default_rng(0).normal(0, 0.2, (4, 3, 227, 227)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        for name, v1 in (("alexnet", False), ("caffenet", True)):
            prototxt = REPO / "weights" / "caffe" / f"{name}.prototxt"
            caffemodel = Path(tmp) / f"{name}.caffemodel"
            save_caffemodel(qcnn.load_caffe(prototxt, seed=0), caffemodel, v1=v1)
            results[f"{name} (random weights{', V1 files' if v1 else ''})"] = compare(
                prototxt, caffemodel, random_batch)
    print(f"{'model':<36} {'layers':>6} {'inputs':>6} {'max abs':>10} {'max rel':>10} "
          f"{'worst layer':<24} {'prob abs':>10}")
    for name, r in results.items():
        print(f"{name:<36} {r['layers']:>6} {r['images']:>6} {r['max_abs_diff_any_layer']:>10.3g} "
              f"{r['max_rel_diff_any_layer']:>10.3g} {r['worst_layer']:<24} "
              f"{r['max_abs_diff_probabilities_folded']:>10.3g}")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
