#!/usr/bin/env python3
"""Train a small Caffe-style CNN on Fashion-MNIST (PyTorch, CPU) and export it.

This is a development script, not part of the ``qcnn`` package. It produces a
real trained model that ``qcnn`` can load, in Caffe's own terms:

    data    Input          1x1x28x28, pixels scaled to [0, 1] (x / 255, no mean)
    conv1   Convolution    1 -> 32, 5x5, pad 2, stride 1   -> relu1 (in place)
    pool1   Pooling MAX    2x2, stride 2                   -> 32x14x14
    conv2   Convolution    32 -> 64, 5x5, pad 2, stride 1  -> relu2 (in place)
    pool2   Pooling MAX    2x2, stride 2                   -> 64x7x7 = 3136
    fc1     InnerProduct   3136 -> 512 (NCHW flatten)      -> relu3, drop1 (in place)
    fc2     InnerProduct   512 -> 10
    prob    Softmax

The pool windows divide their inputs evenly, so Caffe's ceil rounding of the
output size gives the same shapes as PyTorch's floor rounding.

Outputs, under ``--out`` (default ``weights``):

    fashion_mnist/deploy.prototxt   Caffe deploy net (``layer {}`` format)
    fashion_mnist/weights.npz       ``<layer>/0`` weight, ``<layer>/1`` bias, float32,
                                    Caffe layouts: conv (Cout, Cin, kh, kw),
                                    InnerProduct (N_out, K)
    fashion_mnist/labels.txt        the 10 class names, one per line
    fashion_mnist/TRAINING.md       how the weights were made, and their test accuracy
    samples/fashion_<class>.png     a few 28x28 greyscale test images that the
                                    trained model classifies correctly and confidently
    fashion_mnist.qcnn              the model in qcnn's own format (preprocessing and
                                    labels included): qcnn's bundled default model

weights.npz is an intermediate (git-ignored); ``--export-only`` rebuilds the
.qcnn file from it without training.

Data: the Debian package ``dataset-fashion-mnist``, which installs the idx files
under /usr/share/datasets/fashion-mnist/. Setup:

    pip install torch==2.13.0
    apt-get install -y dataset-fashion-mnist
    python scripts/train_fashion_mnist.py
"""

from __future__ import annotations

import argparse
import gzip
import platform
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")

CLASS_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

# Classes for which a sample PNG is written (indices into CLASS_NAMES).
SAMPLE_CLASSES = [7, 1, 8, 9]  # Sneaker, Trouser, Bag, Ankle boot
SAMPLE_MIN_CONFIDENCE = 0.99

BATCH_SIZE = 128
LEARNING_RATE = 1e-3


# --------------------------------------------------------------------------- data


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped idx file (the MNIST format) into a uint8 array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = data[0:2], data[2], data[3]
    if zero != b"\x00\x00" or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    return array.reshape(shape)


def load_split(data_dir: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 (N, 28, 28), labels int64 (N,)) for 'train' or 't10k'."""
    images = read_idx(data_dir / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(data_dir / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{prefix}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) in [0, 1]: the net's input scaling."""
    return torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)


# -------------------------------------------------------------------------- model


class CaffeNet(nn.Module):
    """The network above; attribute names are the Caffe layer names."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=5, stride=1, padding=2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, stride=1, padding=2)
        self.fc1 = nn.Linear(64 * 7 * 7, 512)
        self.drop1 = nn.Dropout(0.5)
        self.fc2 = nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits (the fc2 top); the Caffe net applies Softmax on top of them."""
        x = F.max_pool2d(F.relu(self.conv1(x)), kernel_size=2, stride=2)  # pool1
        x = F.max_pool2d(F.relu(self.conv2(x)), kernel_size=2, stride=2)  # pool2
        x = torch.flatten(x, 1)  # NCHW flatten == Caffe's InnerProduct on a 4-D blob
        x = self.drop1(F.relu(self.fc1(x)))
        return self.fc2(x)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    generator: torch.Generator,
) -> float:
    """One pass over (x, y) in shuffled mini-batches, with random horizontal flips."""
    model.train()
    order = torch.randperm(x.shape[0], generator=generator)
    total_loss = 0.0
    for start in range(0, x.shape[0], BATCH_SIZE):
        idx = order[start : start + BATCH_SIZE]
        xb, yb = x[idx], y[idx]
        flip = torch.rand(xb.shape[0], generator=generator) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)

        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * xb.shape[0]
    return total_loss / x.shape[0]


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> np.ndarray:
    """Softmax probabilities (N, 10), float32, in eval mode (dropout off)."""
    model.eval()
    out = [F.softmax(model(x[i : i + batch_size]), dim=1) for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out).numpy().astype(np.float32)


# ------------------------------------------------------------------------- export

DEPLOY_PROTOTXT = """\
name: "FashionMNIST"
layer {
  name: "data"
  type: "Input"
  top: "data"
  input_param { shape: { dim: 1 dim: 1 dim: 28 dim: 28 } }
}
layer {
  name: "conv1"
  type: "Convolution"
  bottom: "data"
  top: "conv1"
  convolution_param {
    num_output: 32
    kernel_size: 5
    pad: 2
    stride: 1
  }
}
layer {
  name: "relu1"
  type: "ReLU"
  bottom: "conv1"
  top: "conv1"
}
layer {
  name: "pool1"
  type: "Pooling"
  bottom: "conv1"
  top: "pool1"
  pooling_param {
    pool: MAX
    kernel_size: 2
    stride: 2
  }
}
layer {
  name: "conv2"
  type: "Convolution"
  bottom: "pool1"
  top: "conv2"
  convolution_param {
    num_output: 64
    kernel_size: 5
    pad: 2
    stride: 1
  }
}
layer {
  name: "relu2"
  type: "ReLU"
  bottom: "conv2"
  top: "conv2"
}
layer {
  name: "pool2"
  type: "Pooling"
  bottom: "conv2"
  top: "pool2"
  pooling_param {
    pool: MAX
    kernel_size: 2
    stride: 2
  }
}
layer {
  name: "fc1"
  type: "InnerProduct"
  bottom: "pool2"
  top: "fc1"
  inner_product_param {
    num_output: 512
  }
}
layer {
  name: "relu3"
  type: "ReLU"
  bottom: "fc1"
  top: "fc1"
}
layer {
  name: "drop1"
  type: "Dropout"
  bottom: "fc1"
  top: "fc1"
  dropout_param {
    dropout_ratio: 0.5
  }
}
layer {
  name: "fc2"
  type: "InnerProduct"
  bottom: "fc1"
  top: "fc2"
  inner_product_param {
    num_output: 10
  }
}
layer {
  name: "prob"
  type: "Softmax"
  bottom: "fc2"
  top: "prob"
}
"""


def export_weights(model: CaffeNet, path: Path) -> dict[str, np.ndarray]:
    """Write ``<layer>/0`` (weight) and ``<layer>/1`` (bias) as float32, Caffe layout.

    PyTorch's Conv2d weight is already (Cout, Cin, kh, kw) and Linear's is
    (out_features, in_features), exactly Caffe's Convolution and InnerProduct
    blob layouts, so no transposition is needed.
    """
    arrays = {}
    for name in ("conv1", "conv2", "fc1", "fc2"):
        layer = getattr(model, name)
        arrays[f"{name}/0"] = layer.weight.detach().numpy().astype(np.float32)
        arrays[f"{name}/1"] = layer.bias.detach().numpy().astype(np.float32)
    np.savez(path, **arrays)
    return arrays


def export_qcnn(model_dir: Path, path: Path) -> None:
    """Build qcnn's model file from the exported prototxt, weights and labels.

    Preprocessing stored with it: grey, resized straight to 28x28, pixel / 255.
    """
    import qcnn  # the library itself needs no torch; imported here to keep the dependency visible

    arrays = np.load(model_dir / "weights.npz")
    weights = {}
    for key in sorted(arrays.files):
        layer, index = key.split("/")
        weights.setdefault(layer, []).insert(int(index), arrays[key])
    metadata = {"preprocess": {"channel_order": "GRAY", "mean": [0.0], "scale": 1 / 255, "resize": None},
                "labels": (model_dir / "labels.txt").read_text().splitlines()}
    net = qcnn.load_caffe(model_dir / "deploy.prototxt", weights, metadata=metadata)
    qcnn.save(net, path)


def slug(name: str) -> str:
    """'Ankle boot' -> 'ankle_boot', 'T-shirt/top' -> 't_shirt_top'."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def write_samples(
    images: np.ndarray, labels: np.ndarray, proba: np.ndarray, out_dir: Path
) -> list[tuple[Path, int, float]]:
    """For each class in SAMPLE_CLASSES, save the first test image (in file order)
    that the model classifies correctly with probability >= SAMPLE_MIN_CONFIDENCE;
    falls back to the most confident correct one."""
    written = []
    predicted = proba.argmax(axis=1)
    for cls in SAMPLE_CLASSES:
        correct = np.flatnonzero((labels == cls) & (predicted == cls))
        if correct.size == 0:
            print(f"warning: no correctly classified test image of class {CLASS_NAMES[cls]}")
            continue
        confident = correct[proba[correct, cls] >= SAMPLE_MIN_CONFIDENCE]
        index = int(confident[0]) if confident.size else int(correct[proba[correct, cls].argmax()])
        path = out_dir / f"fashion_{slug(CLASS_NAMES[cls])}.png"
        Image.fromarray(images[index], mode="L").save(path)
        written.append((path, index, float(proba[index, cls])))
    return written


def training_report(
    *,
    command: str,
    seed: int,
    epochs: int,
    train_seconds: float,
    total_seconds: float,
    accuracy: float,
    n_test: int,
    samples: list[tuple[Path, int, float]],
) -> str:
    sample_lines = "\n".join(
        f"- `{path.name}`: test image #{index}, p = {p:.4f}" for path, index, p in samples
    )
    return f"""\
# Fashion-MNIST weights

Made by `scripts/train_fashion_mnist.py`:

    {command}

| | |
| --- | --- |
| torch | {torch.__version__} (CPU, {torch.get_num_threads()} threads) |
| numpy | {np.__version__} |
| python | {platform.python_version()} |
| seed | {seed} |
| epochs | {epochs} (batch {BATCH_SIZE}, Adam lr {LEARNING_RATE:g}, cosine decay, random horizontal flips) |
| training set | full Fashion-MNIST train split, 60,000 images |
| training wall time | {train_seconds:.1f} s |
| script wall time | {total_seconds:.1f} s |
| test accuracy | **{accuracy * 100:.2f}%** on the full {n_test:,}-image test split (float32, PyTorch, eval mode) |

Input: 1x1x28x28, pixel / 255 (range [0, 1]), no mean subtraction.
Net: see `deploy.prototxt`; weights in `weights.npz` as `<layer>/0` (weight) and
`<layer>/1` (bias), float32, Caffe layouts. Class names, in output order, are in
`labels.txt`.

Sample test images (correctly classified by this model), in `../samples/`:

{sample_lines}

## Provenance and licence

These weights are derived from the Fashion-MNIST data set by Zalando Research
(https://github.com/zalandoresearch/fashion-mnist), which is distributed under the
MIT licence; the data were taken from Debian's `dataset-fashion-mnist` package.
The sample PNGs are images from the Fashion-MNIST test split.
"""


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=7, help="training epochs (default 7)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--out", type=Path, default=Path("weights"), help="output root (default weights/)"
    )
    parser.add_argument(
        "--data", type=Path, default=DATA_DIR, help=f"Fashion-MNIST idx dir (default {DATA_DIR})"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--export-only", action="store_true",
                        help="skip training: rebuild fashion_mnist.qcnn from the exported weights.npz")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_dir = args.out / "fashion_mnist"
    if args.export_only:
        export_qcnn(model_dir, args.out / "fashion_mnist.qcnn")
        print(f"wrote {args.out / 'fashion_mnist.qcnn'}")
        return 0
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)

    samples_dir = args.out / "samples"
    model_dir.mkdir(parents=True, exist_ok=True)
    samples_dir.mkdir(parents=True, exist_ok=True)

    train_images, train_labels = load_split(args.data, "train")
    test_images, test_labels = load_split(args.data, "t10k")
    x_train, y_train = to_input(train_images), torch.from_numpy(train_labels)
    x_test = to_input(test_images)
    print(f"train {tuple(x_train.shape)}, test {tuple(x_test.shape)}")

    model = CaffeNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    generator = torch.Generator().manual_seed(args.seed)

    train_start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        loss = train_one_epoch(model, optimizer, x_train, y_train, generator)
        scheduler.step()
        acc = float((predict_proba(model, x_test).argmax(1) == test_labels).mean())
        print(
            f"epoch {epoch}/{args.epochs}: loss {loss:.4f}, test acc {acc * 100:.2f}%, "
            f"{time.perf_counter() - t0:.1f} s"
        )
    train_seconds = time.perf_counter() - train_start

    proba = predict_proba(model, x_test)
    accuracy = float((proba.argmax(1) == test_labels).mean())

    (model_dir / "deploy.prototxt").write_text(DEPLOY_PROTOTXT)
    export_weights(model, model_dir / "weights.npz")
    (model_dir / "labels.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    samples = write_samples(test_images, test_labels, proba, samples_dir)
    export_qcnn(model_dir, args.out / "fashion_mnist.qcnn")

    command = " ".join(["python", "scripts/train_fashion_mnist.py", *sys.argv[1:]])
    report = training_report(
        command=command,
        seed=args.seed,
        epochs=args.epochs,
        train_seconds=train_seconds,
        total_seconds=time.perf_counter() - start,
        accuracy=accuracy,
        n_test=len(test_labels),
        samples=samples,
    )
    (model_dir / "TRAINING.md").write_text(report)
    print(report)
    for path in sorted(model_dir.iterdir()) + [p for p, _, _ in samples]:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
