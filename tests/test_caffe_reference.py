"""Whole networks against OpenCV's ``cv2.dnn`` Caffe importer, an independent implementation.

Tolerance: both engines compute in float32 but sum in different orders
(im2col + OpenBLAS here, OpenCV's own kernels there), through up to 50 layers
whose inner products have up to 4,608 terms. Round-off then reaches a few
1e-6 of a blob's largest magnitude (measured: at most 1e-5 on nsfw); we
allow 1e-4 of the blob's max |value|, far below any semantic error (a wrong
pad, rounding rule or channel order gives errors of order 1e-1).
"""

import cv2
import numpy as np
import pytest

import qcnn
from qcnn.io import image
from qcnn.io.caffe import save_caffemodel

from conftest import CAFFE_DIR

RTOL = 1e-4
NSFW_PREPROCESS = {"channel_order": "BGR", "mean": [104, 117, 123], "resize": 256}


def assert_close(ours, reference, what):
    assert ours.shape == reference.shape, f"{what}: shape {ours.shape} != OpenCV {reference.shape}"
    scale = float(np.abs(reference).max())
    error = float(np.abs(ours - reference).max())
    assert error <= RTOL * scale + 1e-7, f"{what}: max |diff| {error:.3g} > {RTOL} x {scale:.3g}"


def opencv_net(prototxt, caffemodel):
    net = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    net.enableFusion(False)  # compare every layer unfused
    return net


def opencv_layers(cv_net, x):
    """OpenCV's output of every layer, by layer name."""
    cv_net.setInput(x)
    names = list(cv_net.getLayerNames())
    return dict(zip(names, cv_net.forward(names)))


@pytest.fixture(scope="module")
def nsfw_batch(photos):
    return image.load_images(photos, (3, 224, 224), NSFW_PREPROCESS)


def test_nsfw_every_layer_matches_opencv(nsfw_files, nsfw_batch):
    net = qcnn.load_caffe(*nsfw_files, fold_batchnorm=False)
    cv_net = opencv_net(*nsfw_files)
    for x in nsfw_batch:
        reference = opencv_layers(cv_net, x[None])
        compared = 0
        for layer, _, outputs in net.trace(x[None]):
            assert_close(outputs[0], reference[layer.name], f"layer {layer.name}")
            compared += 1
        assert compared == len(net.layers) == len(reference)


def test_nsfw_folded_blobs_and_probabilities_match_opencv(nsfw_files, nsfw_batch):
    unfolded = qcnn.load_caffe(*nsfw_files, fold_batchnorm=False)
    net = qcnn.load_caffe(*nsfw_files)
    assert len(net.layers) == len(unfolded.layers) - 2 * 53  # every BatchNorm + Scale folded
    # OpenCV's output of the last layer writing each blob = the blob's final value.
    last_writer = {t: layer.name for layer in unfolded.layers for t in layer.tops}
    blobs = [b for b in net.blob_shapes if b in last_writer]
    cv_net = opencv_net(*nsfw_files)
    ours = net.forward(nsfw_batch, outputs=blobs)
    for i, x in enumerate(nsfw_batch):
        reference = opencv_layers(cv_net, x[None])
        for blob in blobs:
            assert_close(ours[blob][i:i + 1], reference[last_writer[blob]], f"blob {blob}")
    cv_net.setInput(nsfw_batch)
    probabilities = cv_net.forward("prob")
    np.testing.assert_allclose(ours["prob"], probabilities, rtol=0, atol=1e-5)
    # Real photos, real model: the predictions are not degenerate.
    assert np.ptp(ours["prob"][:, 1]) > 0.01


@pytest.mark.parametrize("name, v1", [("alexnet", False), ("caffenet", True)])
def test_alexnet_family_matches_opencv(tmp_path, name, v1):
    prototxt = CAFFE_DIR / f"{name}.prototxt"
    random_net = qcnn.load_caffe(prototxt, seed=3)
    caffemodel = tmp_path / "weights.caffemodel"
    save_caffemodel(random_net, caffemodel, v1=v1)
    net = qcnn.load_caffe(prototxt, caffemodel)
    for a, b in zip(net.layers, random_net.layers):
        for wa, wb in zip(a.blobs, b.blobs):
            np.testing.assert_array_equal(wa, wb)

    expected_shapes = {"conv1": (96, 55, 55), "pool1": (96, 27, 27), "conv2": (256, 27, 27),
                       "pool2": (256, 13, 13), "conv5": (256, 13, 13), "pool5": (256, 6, 6),
                       "fc6": (4096,), "fc8": (1000,), "prob": (1000,)}
    for blob, shape in expected_shapes.items():
        assert net.blob_shapes[blob] == (1,) + shape

    # Small inputs keep the random logits moderate, so the softmax is not one-hot.
    x = np.random.default_rng(0).normal(0, 0.2, (2, 3, 227, 227)).astype(np.float32)
    cv_net = opencv_net(prototxt, caffemodel)
    reference = opencv_layers(cv_net, x[:1])
    for layer, _, outputs in net.trace(x[:1]):
        assert_close(outputs[0], reference[layer.name], f"{name} layer {layer.name}")
    probabilities = net.forward(x)["prob"]
    assert probabilities.max() < 0.99
    cv_net.setInput(x)
    np.testing.assert_allclose(probabilities, cv_net.forward("prob"), rtol=0, atol=1e-6)
