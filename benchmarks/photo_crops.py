"""Seeded random crops of the photos shipped in scikit-image and scikit-learn.

There is no ImageNet offline, so calibration and held-out evaluation inputs
for the ImageNet-style models are crops of these photos: one set of photos
gives the calibration crops, a disjoint set the evaluation crops.

    python benchmarks/photo_crops.py OUT_DIR [--per-photo 16] [--size 256]

writes ``OUT_DIR/calib.npz`` and ``OUT_DIR/heldout.npz`` (uint8 pixels, (N, size, size, 3),
usable by ``qcnn quantize --calib`` and ``qcnn evaluate``).
"""

import argparse
import importlib.util
import os
from pathlib import Path

import numpy as np
from PIL import Image

from qcnn.io.dataset import crop_boxes

# Colour photos and a few grey ones (converted to RGB), split in two disjoint sets.
CALIBRATION = ["astronaut.png", "coffee.png", "motorcycle_right.png", "hubble_deep_field.jpg",
               "retina.jpg", "camera.png", "coins.png", "horse.png", "grass.png", "china.jpg"]
HELDOUT = ["chelsea.png", "rocket.jpg", "motorcycle_left.png", "ihc.png", "brick.png",
           "gravel.png", "moon.png", "page.png", "clock_motion.png", "flower.jpg"]


def _package_dir(name):
    return Path(next(iter(importlib.util.find_spec(name).submodule_search_locations)))


def photo_path(name):
    """Where photo ``name`` lies: scikit-learn's two sample images, else scikit-image's data."""
    if name in ("china.jpg", "flower.jpg"):
        return _package_dir("sklearn") / "datasets" / "images" / name
    return _package_dir("skimage") / "data" / name


def crops(names, per_photo, size=256, seed=0, min_scale=0.35):
    """``per_photo`` random square crops of each photo, resized to ``size``.

    Returns
    -------
    ndarray uint8 (len(names) * per_photo, size, size, 3)
        The first crop of each photo is its centre square, the rest have a
        side of ``min_scale``..1 of the shorter side, random position, and a
        random horizontal flip.
    """
    rng = np.random.default_rng(seed)
    out = []
    for name in names:
        image = Image.open(photo_path(name)).convert("RGB")
        for box, flip in crop_boxes(*image.size, per_photo, rng, min_scale):
            crop = image.crop(box).resize((size, size), Image.BILINEAR)
            if flip:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            out.append(np.asarray(crop, np.uint8))
    return np.stack(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output")
    parser.add_argument("--per-photo", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    for name, photos, seed in (("calib", CALIBRATION, args.seed), ("heldout", HELDOUT, args.seed + 1)):
        data = crops(photos, args.per_photo, args.size, seed)
        np.savez(os.path.join(args.output, f"{name}.npz"), data=data)
        print(f"wrote {args.output}/{name}.npz: {len(data)} crops of {len(photos)} photos")


if __name__ == "__main__":
    main()
