"""Calibration and evaluation data: a folder of images or an array file, with optional labels.

Sources accepted by :func:`open_dataset`:

folder
    Image files anywhere below it (any size; preprocessed as the model says).
    When every image lies in a first-level sub-folder, the sub-folder names are
    class labels: a model label name or an integer class index.
``.npy``
    One array: float (N, C, H, W), already preprocessed network input; or
    uint8 pixels (N, H, W) / (N, H, W, C) in RGB or grey, preprocessed like
    image files.
``.npz``
    The same array under ``data`` (or ``x``, ``images``), plus optional
    integer ``labels`` (or ``y``) of shape (N,).

Images are loaded batch by batch, so a large folder is never all in memory.
:meth:`Dataset.crops` turns a few images into many inputs (seeded random square
crops, the first of each image its centre), for calibrating on a handful of photos.
"""

import os
import zipfile
from typing import NamedTuple

import numpy as np
from PIL import Image

from qcnn.errors import QcnnError
from qcnn.io.files import reading
from qcnn.io.image import check_preprocess, load_images, open_image, to_array

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
_DATA_KEYS = ("data", "x", "images")
_LABEL_KEYS = ("labels", "y")


class Crop(NamedTuple):
    """A square region of one image item: ``box`` (left, top, right, bottom) in pixels, ``flip``
    left-right after cropping."""

    item: object
    box: tuple
    flip: bool


def crop_boxes(width, height, count, rng, min_scale=0.35):
    """``count`` square crop boxes of a ``width`` x ``height`` image, and their flips.

    The first is the centre square of the shorter side, unflipped; each other has a
    side of ``min_scale``..1 times the shorter side, a uniform random position and a
    left-right flip with probability 1/2 (drawn from ``rng`` in that order).

    Returns
    -------
    list of (box (left, top, right, bottom), flip)
    """
    short = min(width, height)
    out = []
    for i in range(count):
        side = short if i == 0 else max(1, int(short * rng.uniform(min_scale, 1.0)))
        left = (width - side) // 2 if i == 0 else int(rng.integers(0, width - side + 1))
        top = (height - side) // 2 if i == 0 else int(rng.integers(0, height - side + 1))
        flip = bool(i and rng.random() < 0.5)
        out.append(((left, top, left + side, top + side), flip))
    return out


class Dataset:
    """Network inputs for one model, read in batches.

    Parameters
    ----------
    source : str
        Where the data came from (for messages).
    items : list of str or Crop, or ndarray
        Image paths (or crops of image files or uint8 pixel arrays), or an array
        (see the module docstring).
    input_shape : tuple (C, H, W)
    preprocess : dict
        The model's preprocessing (see :mod:`qcnn.io.image`).
    labels : ndarray int64 (N,), optional

    Attributes
    ----------
    labels : ndarray int64 (N,) or None
    """

    def __init__(self, source, items, input_shape, preprocess, labels=None):
        self.source = str(source)
        self.items = items
        self.input_shape = tuple(int(d) for d in input_shape)
        self.preprocess = check_preprocess(preprocess, self.input_shape[0])
        self.labels = None if labels is None else np.asarray(labels, np.int64)

    def __len__(self):
        return len(self.items)

    def subset(self, indices):
        """The items at ``indices`` (int array), as a new :class:`Dataset`."""
        indices = np.asarray(indices, np.int64)
        items = [self.items[i] for i in indices] if isinstance(self.items, list) else self.items[indices]
        labels = None if self.labels is None else self.labels[indices]
        return Dataset(self.source, items, self.input_shape, self.preprocess, labels)

    def sample(self, count, seed=0):
        """A seeded random subset of ``count`` items, in their original order (all, if fewer)."""
        order = np.random.default_rng(seed).permutation(len(self))
        return self.subset(np.sort(order[:count]))

    def crops(self, per_item, seed=0, min_scale=0.35):
        """``per_item`` seeded random square crops of every image (:func:`crop_boxes`), as a
        new unlabeled :class:`Dataset` of ``len(self) * per_item`` inputs; each crop is then
        preprocessed as the model says. Needs images (files or uint8 pixels), not network
        input arrays."""
        if per_item < 1:
            raise QcnnError(f"{self.source}: crops per image must be at least 1, got {per_item}")
        if not isinstance(self.items, list) and self.items.dtype != np.uint8:
            raise QcnnError(f"{self.source}: crops need images or uint8 pixels, not network input arrays")
        rng = np.random.default_rng(seed)
        crops = []
        for item in (self.items if isinstance(self.items, list) else list(self.items)):
            width, height = _image_of(item).size
            crops += [Crop(item, box, flip) for box, flip in crop_boxes(width, height, per_item, rng, min_scale)]
        return Dataset(self.source, crops, self.input_shape, self.preprocess)

    def batches(self, batch_size):
        """Yield ``(x, labels)``: x float32 (B, C, H, W), labels int64 (B,) or None."""
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            labels = None if self.labels is None else self.labels[start:stop]
            yield self._load(start, stop), labels

    def array(self):
        """All inputs at once: float32 (N, C, H, W)."""
        return self._load(0, len(self))

    def _load(self, start, stop):
        if isinstance(self.items, list):
            batch = self.items[start:stop]
            if batch and isinstance(batch[0], Crop):  # crops() makes datasets of crops only
                return _load_crops(batch, self.input_shape, self.preprocess)
            return load_images(batch, self.input_shape, self.preprocess)
        chunk = self.items[start:stop]
        if chunk.dtype == np.uint8:
            return np.stack([to_array(Image.fromarray(a), self.input_shape, self.preprocess) for a in chunk])
        chunk = np.asarray(chunk, np.float32)
        if not np.isfinite(chunk).all():
            raise QcnnError(f"{self.source}: array holds NaN or infinite values")
        return chunk


def _image_of(item):
    """The Pillow image of an image item: a file path or a uint8 pixel array."""
    return open_image(item) if isinstance(item, str) else Image.fromarray(np.asarray(item))


def _load_crops(crops, input_shape, preprocess):
    """Preprocessed crops, float32 (N, C, H, W); each image is decoded once for its run of crops."""
    out, source, image = [], None, None
    for crop in crops:
        if crop.item is not source:
            source, image = crop.item, _image_of(crop.item)
        region = image.crop(crop.box)
        out.append(to_array(region.transpose(Image.FLIP_LEFT_RIGHT) if crop.flip else region,
                            input_shape, preprocess))
    return np.stack(out)


def open_dataset(path, input_shape, preprocess=None, class_names=None):
    """Open a folder of images or an array file as a :class:`Dataset`.

    Parameters
    ----------
    path : str
    input_shape : tuple (C, H, W)
        The model's input, batch dimension excluded.
    preprocess : dict, optional
    class_names : list of str, optional
        The model's labels, to read class folders named after them.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return _open_folder(path, input_shape, preprocess, class_names)
    if not os.path.exists(path):
        raise QcnnError(f"{path}: no such file or folder")
    data, labels = _read_arrays(path)
    _check_array(path, data, input_shape)
    if labels is not None:
        if labels.ndim != 1 or len(labels) != len(data) or labels.dtype.kind not in "iu":
            raise QcnnError(f"{path}: labels must be {len(data)} integers, got {labels.dtype} "
                            f"{labels.shape}")
    return Dataset(path, data, input_shape, preprocess, labels)


def _read_arrays(path):
    try:
        with reading(path):
            loaded = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise QcnnError(f"{path}: not a NumPy .npy/.npz file or a folder of images ({e})") from None
    if isinstance(loaded, np.ndarray):
        return loaded, None
    with loaded:
        data_key = next((k for k in _DATA_KEYS if k in loaded.files), None)
        if data_key is None:
            raise QcnnError(f"{path}: no array named {' or '.join(_DATA_KEYS)} (it has {loaded.files})")
        label_key = next((k for k in _LABEL_KEYS if k in loaded.files), None)
        return loaded[data_key], None if label_key is None else loaded[label_key]


def _check_array(path, data, input_shape):
    channels, height, width = input_shape
    if data.dtype == np.uint8:
        if not (data.ndim == 3 and channels == 1 or data.ndim == 4 and data.shape[3] in (1, 3, 4)):
            raise QcnnError(f"{path}: uint8 images must be (N, H, W) or (N, H, W, C), got {data.shape}")
        if data.ndim == 4 and data.shape[3] == 1:
            raise QcnnError(f"{path}: store grey uint8 images as (N, H, W), got {data.shape}")
    elif data.dtype.kind == "f":
        if data.shape[1:] != tuple(input_shape):
            raise QcnnError(f"{path}: float input must have shape (N, {channels}, {height}, {width}) "
                            f"for this model, got {data.shape}")
    else:
        raise QcnnError(f"{path}: array must be float (network input) or uint8 (pixels), got {data.dtype}")
    if len(data) == 0:
        raise QcnnError(f"{path}: no samples in array")


def image_files(folder):
    """Image files (by extension, ``IMAGE_EXTENSIONS``) in ``folder`` and its sub-folders, sorted;
    hidden files are left out."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found += [os.path.join(root, f) for f in sorted(files)
                  if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS and not f.startswith(".")]
    return found


def _open_folder(folder, input_shape, preprocess, class_names):
    paths = image_files(folder)
    if not paths:
        raise QcnnError(f"{folder}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in folder")
    parents = [os.path.relpath(p, folder).split(os.sep) for p in paths]
    labels = None
    if all(len(parts) == 2 for parts in parents):
        index = {name: i for i, name in enumerate(class_names or [])}
        labels = []
        for parts in parents:
            name = parts[0]
            if name in index:
                labels.append(index[name])
            elif name.isdigit():
                labels.append(int(name))
            else:
                raise QcnnError(f"{folder}: class folder '{name}' is neither a label of the model "
                                "nor a class index")
    return Dataset(folder, paths, input_shape, preprocess, labels)
