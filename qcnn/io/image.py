"""Image loading and preprocessing with Pillow, driven by a model's ``preprocess`` metadata.

``preprocess`` keys (all optional):

``channel_order``
    ``"BGR"`` (Caffe's default for 3 channels), ``"RGB"`` or ``"GRAY"`` (1 channel).
``resize``
    Resize so the shorter side has this many pixels, then centre-crop to
    the network's input size. ``None`` (default) resizes straight to the
    input size (Caffe's classic "squash").
``mean``
    One value per channel, in the network's channel order, or a single value;
    subtracted from 0..255 pixel values.
``scale``
    Multiplier applied after the mean: ``(pixel - mean) * scale``.
"""

import numpy as np
from PIL import Image, UnidentifiedImageError

from qcnn.errors import QcnnError


def default_preprocess(channels):
    """Caffe conventions: BGR for colour input, no mean, no scaling."""
    return {"channel_order": "GRAY" if channels == 1 else "BGR", "resize": None,
            "mean": [0.0] * channels, "scale": 1.0}


def check_preprocess(preprocess, channels):
    """Complete ``preprocess`` with defaults and validate it; returns a new dict."""
    p = {**default_preprocess(channels), **(preprocess or {})}
    order = str(p["channel_order"]).upper()
    if order not in ("BGR", "RGB", "GRAY") or (order == "GRAY") != (channels == 1):
        raise QcnnError(f"channel_order {order} does not fit a {channels}-channel input")
    mean = [float(m) for m in np.atleast_1d(p["mean"])]
    if len(mean) == 1:
        mean *= channels
    if len(mean) != channels:
        raise QcnnError(f"mean has {len(mean)} values for a {channels}-channel input")
    resize = None if p["resize"] in (None, 0) else int(p["resize"])
    return {**p, "channel_order": order, "mean": mean, "scale": float(p["scale"]), "resize": resize}


def open_image(path):
    """Open an image file with Pillow (decoded fully, so corrupt files fail here)."""
    try:
        image = Image.open(path)
        image.load()
        return image
    except FileNotFoundError:
        raise QcnnError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise QcnnError(f"{path}: is a directory, not an image") from None
    except UnidentifiedImageError:
        raise QcnnError(f"{path}: not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise QcnnError(f"{path}: corrupt or unreadable image ({e})") from None


def to_array(image, input_shape, preprocess):
    """Preprocess a Pillow image into a network input.

    Parameters
    ----------
    image : PIL.Image.Image
        Any mode (RGB, L, RGBA, P, ...); alpha is dropped.
    input_shape : tuple (C, H, W)
    preprocess : dict
        See the module docstring.

    Returns
    -------
    ndarray, shape (C, H, W), float32
    """
    channels, height, width = input_shape
    p = check_preprocess(preprocess, channels)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = Image.fromarray((np.asarray(image, np.float64) / 257.0).clip(0, 255).astype(np.uint8))
    image = image.convert("L" if channels == 1 else "RGB")
    if p["resize"]:
        w, h = image.size
        ratio = p["resize"] / min(w, h)
        image = image.resize((max(width, round(w * ratio)), max(height, round(h * ratio))),
                             Image.BILINEAR)
        w, h = image.size
        left, top = (w - width) // 2, (h - height) // 2
        image = image.crop((left, top, left + width, top + height))
    elif image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    array = np.asarray(image, np.float32)
    array = array[None] if channels == 1 else array.transpose(2, 0, 1)
    if p["channel_order"] == "BGR":
        array = array[::-1]
    array = (array - np.asarray(p["mean"], np.float32).reshape(-1, 1, 1)) * np.float32(p["scale"])
    return np.ascontiguousarray(array, np.float32)


def load_images(paths, input_shape, preprocess):
    """Load and preprocess image files into a batch of shape (N, C, H, W), float32."""
    return np.stack([to_array(open_image(path), input_shape, preprocess) for path in paths])
