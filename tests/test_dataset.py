"""Calibration and evaluation data: image folders and array files."""

import numpy as np
import pytest
from PIL import Image

from qcnn.errors import QcnnError
from qcnn.io.dataset import crop_boxes, open_dataset
from qcnn.io.image import to_array

SHAPE = (3, 8, 8)
PRE = {"channel_order": "RGB", "mean": [10.0, 20.0, 30.0], "scale": 0.5}


def _image(path, seed, size=(12, 10)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, size + (3,), dtype=np.uint8)).save(path)
    return path


def test_class_folders_give_labels_by_model_label_or_index(tmp_path):
    for name in ("cat", "dog", "2"):
        (tmp_path / name).mkdir()
        for i in range(2):
            _image(tmp_path / name / f"{i}.png", hash(name) % 100 + i)
    data = open_dataset(tmp_path, SHAPE, PRE, class_names=["bird", "cat", "dog"])
    # os.walk visits the folders in sorted order: "2", "cat", "dog"
    assert data.labels.tolist() == [2, 2, 1, 1, 2, 2]
    batches = list(data.batches(4))
    assert [x.shape for x, _ in batches] == [(4,) + SHAPE, (2,) + SHAPE]
    expected = to_array(Image.open(tmp_path / "2" / "0.png"), SHAPE, PRE)
    np.testing.assert_array_equal(batches[0][0][0], expected)


def test_flat_folder_has_no_labels_and_unknown_class_folder_is_an_error(tmp_path):
    _image(tmp_path / "a.jpg", 0)
    _image(tmp_path / "b.png", 1)
    (tmp_path / "notes.txt").write_text("not an image")
    data = open_dataset(tmp_path, SHAPE, PRE)
    assert len(data) == 2 and data.labels is None
    (tmp_path / "zebra").mkdir()
    for name in ("a.jpg", "b.png"):
        (tmp_path / name).rename(tmp_path / "zebra" / name)
    with pytest.raises(QcnnError, match="class folder 'zebra'"):
        open_dataset(tmp_path, SHAPE, PRE, class_names=["cat"])


def test_empty_folder_and_missing_path(tmp_path):
    with pytest.raises(QcnnError, match="no image files"):
        open_dataset(tmp_path, SHAPE, PRE)
    with pytest.raises(QcnnError, match="no such file"):
        open_dataset(tmp_path / "missing.npz", SHAPE, PRE)


def test_npz_float_input_with_labels_and_seeded_sample(tmp_path):
    x = np.random.default_rng(0).normal(size=(10,) + SHAPE).astype(np.float32)
    np.savez(tmp_path / "d.npz", data=x, labels=np.arange(10))
    data = open_dataset(tmp_path / "d.npz", SHAPE, PRE)
    np.testing.assert_array_equal(data.array(), x)
    a, b = data.sample(4, seed=3), data.sample(4, seed=3)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.array(), x[a.labels])
    assert len(data.sample(50)) == 10


def test_uint8_pixels_are_preprocessed_like_images(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 255, (3, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "p.npy", pixels)
    data = open_dataset(tmp_path / "p.npy", SHAPE, PRE)
    np.testing.assert_array_equal(data.array()[1], to_array(Image.fromarray(pixels[1]), SHAPE, PRE))
    grey = np.zeros((2, 5, 5), np.uint8)
    np.save(tmp_path / "g.npy", grey)
    assert open_dataset(tmp_path / "g.npy", (1, 5, 5), {"scale": 1 / 255}).array().shape == (2, 1, 5, 5)


@pytest.mark.parametrize("array, message", [
    (np.zeros((2, 3, 4, 4), np.float32), r"shape \(N, 3, 8, 8\)"),
    (np.zeros((2, 8, 8), np.uint8), "uint8 images"),
    (np.zeros((2, 3, 8, 8), np.int32), "float .* or uint8"),
    (np.zeros((0, 3, 8, 8), np.float32), "no samples"),
])
def test_bad_arrays_are_refused(tmp_path, array, message):
    np.save(tmp_path / "a.npy", array)
    with pytest.raises(QcnnError, match=message):
        open_dataset(tmp_path / "a.npy", SHAPE, PRE)


def test_bad_labels_nan_and_non_numpy_files(tmp_path):
    x = np.zeros((3,) + SHAPE, np.float32)
    np.savez(tmp_path / "l.npz", data=x, labels=np.array([0.5, 1, 2]))
    with pytest.raises(QcnnError, match="labels must be 3 integers"):
        open_dataset(tmp_path / "l.npz", SHAPE, PRE)
    np.savez(tmp_path / "k.npz", other=x)
    with pytest.raises(QcnnError, match="no array named data"):
        open_dataset(tmp_path / "k.npz", SHAPE, PRE)
    x[1, 0, 0, 0] = np.nan
    np.save(tmp_path / "n.npy", x)
    with pytest.raises(QcnnError, match="NaN"):
        open_dataset(tmp_path / "n.npy", SHAPE, PRE).array()
    (tmp_path / "t.npy").write_text("hello")
    with pytest.raises(QcnnError, match="t.npy: not a NumPy"):
        open_dataset(tmp_path / "t.npy", SHAPE, PRE)


def test_crop_boxes_centre_first_then_seeded_random_squares():
    boxes = crop_boxes(40, 30, 50, np.random.default_rng(3), min_scale=0.5)
    assert boxes[0] == ((5, 0, 35, 30), False)  # the centre square of the shorter side
    for (left, top, right, bottom), _ in boxes:
        side = right - left
        assert side == bottom - top and 15 <= side <= 30  # square, 0.5..1 of the shorter side
        assert 0 <= left and right <= 40 and 0 <= top and bottom <= 30
    flips = [flip for _, flip in boxes[1:]]
    assert any(flips) and not all(flips)
    assert boxes == crop_boxes(40, 30, 50, np.random.default_rng(3), min_scale=0.5)


def test_crops_of_image_files_and_pixel_arrays_are_the_preprocessed_regions(tmp_path):
    paths = [_image(tmp_path / f"{i}.png", i, size=(30, 40)) for i in range(2)]
    pixels = np.stack([np.asarray(Image.open(p)) for p in paths])
    np.save(tmp_path / "pixels.npy", pixels)
    for source in (tmp_path, tmp_path / "pixels.npy"):
        data = open_dataset(source, SHAPE, PRE)
        crops = data.crops(5, seed=7)
        assert len(crops) == 10 and crops.labels is None
        x = crops.array()
        rng = np.random.default_rng(7)  # one generator runs through the images in order
        boxes = [b for _ in range(2) for b in crop_boxes(40, 30, 5, rng)]
        for i, (box, flip) in enumerate(boxes):
            region = Image.open(paths[i // 5]).crop(box)
            region = region.transpose(Image.FLIP_LEFT_RIGHT) if flip else region
            np.testing.assert_array_equal(x[i], to_array(region, SHAPE, PRE))
        np.testing.assert_array_equal(data.crops(5, seed=7).array(), x)  # seeded
        assert not np.array_equal(data.crops(5, seed=8).array(), x)


def test_crops_need_images_and_a_positive_count(tmp_path):
    np.save(tmp_path / "input.npy", np.zeros((2,) + SHAPE, np.float32))
    with pytest.raises(QcnnError, match="input.npy: crops need images"):
        open_dataset(tmp_path / "input.npy", SHAPE, PRE).crops(2)
    _image(tmp_path / "a.png", 0)
    with pytest.raises(QcnnError, match="at least 1"):
        open_dataset(tmp_path, SHAPE, PRE).crops(0)
