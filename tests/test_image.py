"""Image loading and preprocessing with Pillow."""

import numpy as np
import pytest
from PIL import Image

from qcnn.errors import QcnnError
from qcnn.io.image import check_preprocess, load_images, open_image, to_array


def gradient_rgb(width=40, height=30):
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 77)], -1).astype(np.uint8)


@pytest.mark.arm
def test_bgr_order_mean_and_scale():
    rgb = gradient_rgb(8, 8)
    out = to_array(Image.fromarray(rgb), (3, 8, 8), {"channel_order": "BGR", "mean": [1, 2, 3], "scale": 0.5})
    assert out.shape == (3, 8, 8) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], (rgb[..., 2] - 1.0) * 0.5)
    np.testing.assert_allclose(out[2], (rgb[..., 0] - 3.0) * 0.5)
    rgb_out = to_array(Image.fromarray(rgb), (3, 8, 8), {"channel_order": "RGB"})
    np.testing.assert_allclose(rgb_out[0], rgb[..., 0])


@pytest.mark.arm
def test_resize_shorter_side_then_centre_crop():
    rgb = np.zeros((100, 200, 3), np.uint8)
    rgb[:, 90:110] = 255  # a bright band in the centre
    out = to_array(Image.fromarray(rgb), (3, 50, 50), {"resize": 50, "channel_order": "RGB"})
    assert out.shape == (3, 50, 50)
    assert out[:, :, 25].min() > 200 and out[:, :, 0].max() < 1  # band centred, edges cropped
    squash = to_array(Image.fromarray(rgb), (3, 50, 50), {"channel_order": "RGB"})
    assert squash[:, :, 0].max() < 1 and squash[:, :, 25].min() > 200


@pytest.mark.arm
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "LA", "CMYK", "I;16"])
def test_image_modes_load_as_three_or_one_channels(tmp_path, mode):
    base = Image.fromarray(gradient_rgb())
    if mode == "I;16":  # 16-bit grey spans 0..65535
        image = Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257)
    else:
        image = base.convert(mode)
    path = tmp_path / "image.png" if mode != "CMYK" else tmp_path / "image.jpg"
    image.save(path)
    colour = load_images([path], (3, 16, 16), {})
    grey = load_images([path], (1, 16, 16), {})
    assert colour.shape == (1, 3, 16, 16) and grey.shape == (1, 1, 16, 16)
    assert np.isfinite(colour).all() and colour.max() > 100


def test_jpeg_photo(photos):
    batch = load_images(photos[:2], (3, 224, 224), {"resize": 256, "mean": [104, 117, 123]})
    assert batch.shape == (2, 3, 224, 224) and abs(float(batch.mean())) < 100


@pytest.mark.arm
def test_bad_files(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(QcnnError, match="notes.txt: not an image"):
        open_image(text)
    with pytest.raises(QcnnError, match="no such file"):
        open_image(tmp_path / "missing.png")
    truncated = tmp_path / "truncated.png"
    Image.fromarray(gradient_rgb(200, 200)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(QcnnError, match="truncated.png: corrupt"):
        open_image(truncated)


@pytest.mark.arm
def test_preprocess_validation():
    with pytest.raises(QcnnError, match="mean has 2 values"):
        check_preprocess({"mean": [1, 2]}, 3)
    with pytest.raises(QcnnError, match="channel_order GRAY"):
        check_preprocess({"channel_order": "GRAY"}, 3)
    assert check_preprocess({"mean": 5}, 3)["mean"] == [5.0] * 3
