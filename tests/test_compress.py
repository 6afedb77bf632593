"""Whole-network quantization and its accounting (``qcnn quantize``, ``qcnn info``)."""

import json

import numpy as np
import pytest

import qcnn
from qcnn.cli import main
from qcnn.compress import layer_settings, quantize_net
from qcnn.errors import QcnnError
from qcnn.layers import LAYER_TYPES

from conftest import CAFFE_DIR

# The authors' released AlexNet model (QCNN-REFERENCE section 2).
AUTHORS_ALEXNET = {"conv1": (3, 128), "conv2": (8, 128), "conv3": (8, 128), "conv4": (8, 128),
                   "conv5": (8, 128), "fc6": (4, 32), "fc7": (4, 32), "fc8": (1, 16)}


def test_alexnet_info_reproduces_the_paper(tmp_path, capsys):
    """724.4M -> 174.3M multiply-adds and 232.56 MiB -> 12.60 MiB at the authors' settings."""
    net = qcnn.load_caffe(CAFFE_DIR / "alexnet.prototxt", seed=0)
    layers = []
    for layer in net.layers:
        if layer.name in AUTHORS_ALEXNET:
            subdim, k = AUTHORS_ALEXNET[layer.name]
            layer = LAYER_TYPES["Quantized" + layer.type](layer.name, layer.bottoms, layer.tops,
                                                          **layer.params, subdim=subdim, num_codewords=k)
        layers.append(layer)
    path = tmp_path / "alexnet_q.qcnn"
    qcnn.save(qcnn.Net(net.inputs, layers, net.name, init=np.random.default_rng(0)), path)
    assert main(["info", str(path), "--json"]) == 0
    total = json.loads(capsys.readouterr().out)["total"]
    assert total["dense_macs"] / 1e6 == pytest.approx(724.4, abs=0.1)
    assert total["macs"] / 1e6 == pytest.approx(174.3, abs=0.1)
    assert total["dense_bytes"] / 2**20 == pytest.approx(232.56, abs=0.01)
    assert total["bytes"] / 2**20 == pytest.approx(12.60, abs=0.05)
    assert main(["info", str(path)]) == 0
    assert "compression 18.49x" in capsys.readouterr().out


def test_default_settings():
    net = qcnn.load_caffe(CAFFE_DIR / "alexnet.prototxt", seed=0)
    settings = {layer.name: layer_settings(layer) for layer in net.layers}
    assert settings["conv1"] == (3, 128)  # RGB input: one subspace
    assert settings["conv2"] == (8, 128) and settings["fc6"] == (4, 32)
    assert settings["relu1"] is None
    assert layer_settings(net.layer("fc8"), overrides={"fc8": (1, 16)}) == (1, 16)
    with pytest.raises(QcnnError, match="cannot be quantized"):
        layer_settings(net.layer("relu1"), overrides={"relu1": (4, 32)})


def test_quantize_default_model_end_to_end(tmp_path, capsys):
    out = tmp_path / "fashion_q.qcnn"
    assert main(["quantize", str(qcnn.resources.DEFAULT_MODEL), "-o", str(out), "--no-ec", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    names = [row["name"] for row in report["layers"]]
    assert "fc1" in names and "fc2" not in names  # 512 x 10: codebooks would outweigh the weights
    assert report["total"]["compression"] > 8
    float_net, quantized = qcnn.load(qcnn.resources.DEFAULT_MODEL), qcnn.load(out)
    assert quantized.layer("fc1").type == "QuantizedInnerProduct"
    samples = sorted((qcnn.resources.WEIGHTS_DIR / "samples").glob("*.png"))
    from qcnn.io.image import load_images
    batch = load_images(samples, (1, 28, 28), float_net.metadata["preprocess"])
    expected = float_net.forward(batch)["prob"].argmax(1)
    probabilities = {}
    for kernel in ("lut", "dense"):
        assert main(["classify", *map(str, samples), "--model", str(out), "--kernel", kernel, "--json"]) == 0
        results = json.loads(capsys.readouterr().out)["results"]
        assert [r["top"][0]["index"] for r in results] == list(expected)
        probabilities[kernel] = [r["top"][0]["probability"] for r in results]
    np.testing.assert_allclose(probabilities["lut"], probabilities["dense"], rtol=1e-4)


def test_fast_kmeans_option(tmp_path, capsys):
    out = tmp_path / "fast.qcnn"
    model = str(qcnn.resources.DEFAULT_MODEL)
    assert main(["quantize", model, "-o", str(out), "--no-ec", "--fast-kmeans", "--json"]) == 0
    fast = json.loads(capsys.readouterr().out)["layers"]
    assert main(["quantize", model, "-o", str(out), "--no-ec", "--json"]) == 0
    grown = json.loads(capsys.readouterr().out)["layers"]
    for a, b in zip(fast, grown):
        assert a["name"] == b["name"] and 0 < a["weight_error"] < 1 and 0 < b["weight_error"] < 1


def test_quantize_errors(tmp_path):
    model = str(qcnn.resources.DEFAULT_MODEL)
    out = tmp_path / "x.qcnn"
    assert main(["quantize", model, "-o", str(out)]) == 1  # EC needs calibration data
    assert main(["quantize", model, "-o", str(out), "--no-ec", "--fc-k", "300"]) == 1
    assert main(["quantize", model, "-o", str(out), "--no-ec", "--layer", "nope=4,32"]) == 1
    assert not out.exists()


def test_quantize_net_reports_and_skips():
    net = qcnn.load(qcnn.resources.DEFAULT_MODEL)
    quantized, report = quantize_net(net, overrides={"conv1": None, "fc2": (2, 4)})
    assert [r["name"] for r in report] == ["conv2", "fc1", "fc2"]
    assert quantized.layer("conv1").type == "Convolution"
    for row in report:
        assert row["bytes_after"] < row["bytes_before"] or row["name"] == "fc2"
        assert 0 <= row["weight_error"] < 1
