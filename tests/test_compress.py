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
                                                          **layer.params, subdim=subdim, num_codewords=k,
                                                          kernel="lut")  # the paper counts the LUT path
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
    assert main(["quantize", str(qcnn.resources.FASHION_MNIST_MODEL), "-o", str(out), "--no-ec", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    names = [row["name"] for row in report["layers"]]
    assert "fc1" in names and "fc2" not in names  # 512 x 10: codebooks would outweigh the weights
    assert report["total"]["compression"] > 8
    float_net, quantized = qcnn.load(qcnn.resources.FASHION_MNIST_MODEL), qcnn.load(out)
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
    model = str(qcnn.resources.FASHION_MNIST_MODEL)
    assert main(["quantize", model, "-o", str(out), "--no-ec", "--fast-kmeans", "--json"]) == 0
    fast = json.loads(capsys.readouterr().out)["layers"]
    assert main(["quantize", model, "-o", str(out), "--no-ec", "--json"]) == 0
    grown = json.loads(capsys.readouterr().out)["layers"]
    for a, b in zip(fast, grown):
        assert a["name"] == b["name"] and 0 < a["weight_error"] < 1 and 0 < b["weight_error"] < 1


def test_quantize_errors(tmp_path):
    model = str(qcnn.resources.FASHION_MNIST_MODEL)
    out = tmp_path / "x.qcnn"
    assert main(["quantize", model, "-o", str(out)]) == 1  # EC needs calibration data
    assert main(["quantize", model, "-o", str(out), "--no-ec", "--fc-k", "300"]) == 1
    assert main(["quantize", model, "-o", str(out), "--no-ec", "--layer", "nope=4,32"]) == 1
    assert not out.exists()


def test_quantize_net_reports_and_skips():
    net = qcnn.load(qcnn.resources.FASHION_MNIST_MODEL)
    quantized, report = quantize_net(net, overrides={"conv1": None, "fc2": (2, 4)})
    assert [r["name"] for r in report] == ["conv2", "fc1", "fc2"]
    assert quantized.layer("conv1").type == "Convolution"
    for row in report:
        assert row["bytes_after"] < row["bytes_before"] or row["name"] == "fc2"
        assert 0 <= row["weight_error"] < 1


def test_depthwise_and_kind_settings(tmp_path):
    proto = """name: "dw" input: "data" input_shape { dim: 1 dim: 8 dim: 10 dim: 10 }
    layer { name: "dw" type: "Convolution" bottom: "data" top: "dw"
            convolution_param { num_output: 8 group: 8 kernel_size: 3 pad: 1 } }
    layer { name: "pw" type: "Convolution" bottom: "dw" top: "pw" convolution_param { num_output: 64 kernel_size: 1 } }
    layer { name: "fc" type: "InnerProduct" bottom: "pw" top: "fc" inner_product_param { num_output: 300 } }"""
    (tmp_path / "dw.prototxt").write_text(proto)
    net = qcnn.load_caffe(tmp_path / "dw.prototxt", seed=0)
    assert layer_settings(net.layer("dw"), conv=(8, 16)) is None  # 72 weights: codebook too big
    assert layer_settings(net.layer("dw"), depthwise=(8, 4)) == (1, 4)  # scalar codebook
    assert layer_settings(net.layer("dw"), depthwise=None) is None
    assert layer_settings(net.layer("pw"), conv=None) is None
    # 64 x 8 weights (2048 bytes) at (1, 64): 2048 + 384 bytes with float32 codebooks, 1408 with float16
    assert layer_settings(net.layer("pw"), conv=(1, 64)) is None
    assert layer_settings(net.layer("pw"), conv=(1, 64), codebook_dtype="float16") == (1, 64)
    assert layer_settings(net.layer("fc"), fc=(4, 16)) == (4, 16)


def _calibration_images(count=48, seed=0):
    """The bundled samples, shifted and flipped: Fashion-MNIST-like inputs in [0, 1]."""
    from PIL import Image

    samples = sorted((qcnn.resources.WEIGHTS_DIR / "samples").glob("fashion_*.png"))
    base = np.stack([np.asarray(Image.open(p).convert("L"), np.float32) / 255 for p in samples])
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        image = np.roll(base[i % len(base)], tuple(rng.integers(-3, 4, 2)), axis=(0, 1))
        out.append(image[:, ::-1] if rng.random() < 0.5 else image)
    return np.stack(out)[:, None]


def test_layer_inputs_come_from_the_quantized_net_and_targets_from_the_float_net(monkeypatch):
    import qcnn.compress as compress

    net = qcnn.load(qcnn.resources.FASHION_MNIST_MODEL)
    x = _calibration_images(8)
    seen = {}
    original = compress._correct

    def spy(layer, inputs, targets, *args, **kwargs):
        seen[layer.name] = (inputs.copy(), targets.copy())
        return original(layer, inputs, targets, *args, **kwargs)

    monkeypatch.setattr(compress, "_correct", spy)
    quantized, report = quantize_net(net, conv=(4, 8), fc=(4, 8), calibration=x, max_samples=10**6,
                                     ec_options={"max_iter": 2})
    # fc1 reads pool2: from the quantized conv layers; its target is the float fc1 response.
    q_pool2 = quantized.forward(x, ["pool2"])["pool2"].reshape(len(x), -1)
    inputs, targets = seen["fc1"]
    np.testing.assert_allclose(inputs[0, :, 0], q_pool2, rtol=1e-5, atol=1e-5)
    float_pool2 = net.forward(x, ["pool2"])["pool2"].reshape(len(x), -1)
    # (fc1's blob is rewritten in place by relu3, so its response is computed here)
    np.testing.assert_allclose(targets, float_pool2 @ net.layer("fc1").blobs[0].T, rtol=1e-4, atol=1e-4)
    assert not np.allclose(inputs[0, :, 0], float_pool2)
    # conv2 targets: all 8 * 14 * 14 positions of the float conv2 response, in sampled order.
    inputs, targets = seen["conv2"]
    assert inputs.shape == (1, 8 * 14 * 14, 25, 32) and targets.shape == (8 * 14 * 14, 64)
    conv2 = net.layer("conv2")
    float_conv2 = conv2.forward([net.forward(x, ["pool1"])["pool1"]])[0] - conv2.blobs[1].reshape(1, -1, 1, 1)
    np.testing.assert_allclose(targets, float_conv2.transpose(0, 2, 3, 1).reshape(-1, 64), rtol=1e-4, atol=1e-4)


def test_error_correction_lowers_response_error_and_output_error():
    net = qcnn.load(qcnn.resources.FASHION_MNIST_MODEL)
    x = _calibration_images(48)
    reference = net.forward(x)
    errors = {}
    for ec in (False, True):
        quantized, report = quantize_net(net, conv=(4, 8), fc=(8, 8), calibration=x, error_correction=ec,
                                         seed=1, ec_options={"max_iter": 10})
        for row in report:
            assert row["response_error"] <= row["response_error_kmeans"] * (1 + 1e-5)
            assert row["samples"] > 0 and np.isfinite(row["response_error"])
        output = quantized.forward(x)
        errors[ec] = float(np.mean([np.abs(output[k] - reference[k]).sum(axis=1).mean() for k in reference]))
        if ec:
            assert all(row["response_error"] < 0.95 * row["response_error_kmeans"] for row in report)
    assert errors[True] < errors[False]


def _pixel_file(tmp_path, count):
    """``count`` calibration images saved as uint8 pixels (N, 28, 28) in tmp_path/calib.npy."""
    np.save(tmp_path / "calib.npy", (_calibration_images(count)[:, 0] * 255).round().astype(np.uint8))
    return str(tmp_path / "calib.npy")


def test_quantize_cli_with_calibration(tmp_path, capsys):
    calib = _pixel_file(tmp_path, 24)
    out, report = tmp_path / "q.qcnn", tmp_path / "report.json"
    assert main(["quantize", str(qcnn.resources.FASHION_MNIST_MODEL), "--calib", calib,
                 "--calib-size", "16", "--ec-iter", "3", "--conv-k", "16", "--fc-k", "16",
                 "-o", str(out), "--report", str(report)]) == 0
    captured = capsys.readouterr()
    assert "resp. err EC" in captured.out and "wrote" in captured.out
    assert "response error" in captured.err  # progress lines on stderr
    data = json.loads(report.read_text())
    assert data["error_correction"] and data["calibration"]["images"] == 16
    assert {r["name"] for r in data["layers"]} == {"conv1", "conv2", "fc1"}
    assert all(r["response_error"] <= r["response_error_kmeans"] * (1 + 1e-5) for r in data["layers"])
    assert qcnn.load(out).layer("fc1").type == "QuantizedInnerProduct"
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((3, 1, 5, 5), np.float32))
    before = out.read_bytes()
    assert main(["quantize", str(qcnn.resources.FASHION_MNIST_MODEL), "--calib", str(bad), "-o", str(out)]) == 1
    assert "bad.npy" in capsys.readouterr().err and out.read_bytes() == before


def test_half_codebooks_halve_codebook_bytes_and_round_trip(tmp_path):
    net = qcnn.load(qcnn.resources.FASHION_MNIST_MODEL)
    x = _calibration_images(8)
    full, _ = quantize_net(net, conv=(4, 16), fc=(4, 16), seed=2, calibration=x, ec_options={"max_iter": 2})
    half, report = quantize_net(net, conv=(4, 16), fc=(4, 16), seed=2, calibration=x, codebook_dtype="float16",
                                ec_options={"max_iter": 2})
    for row in report:
        a, b = full.layer(row["name"]), half.layer(row["name"])
        if a.type == b.type:
            assert a.storage_bytes() - b.storage_bytes() == b.blobs[0].size * 2
        else:  # fc2 (512 -> 10): its float32 codebooks would outweigh its weights, float16 ones do not
            assert (a.name, a.type) == ("fc2", "InnerProduct") and b.storage_bytes() < a.storage_bytes()
        books = b.blobs[0]
        np.testing.assert_array_equal(books, books.astype(np.float16).astype(np.float32))
        # EC result rounded to float16 afterwards: allowed to move by float16 precision
        assert row["response_error"] <= row["response_error_kmeans"] * (1 + 1e-3)
    path = tmp_path / "half.qcnn"
    qcnn.save(half, path)
    loaded = qcnn.load(path)
    qcnn.save(full, tmp_path / "full.qcnn")
    assert path.stat().st_size < (tmp_path / "full.qcnn").stat().st_size
    np.testing.assert_array_equal(loaded.forward(x)["prob"], half.forward(x)["prob"])
    assert loaded.layer("fc1").params["codebook_dtype"] == "float16"
    assert main(["info", str(path), "--json"]) == 0


def test_weight_prior_is_passed_to_error_correction_and_zero_changes_nothing(monkeypatch):
    """ec_options["prior"] reaches error_correct with the layer's float weights (transposed
    inner products in the quantizer's layout); prior 0 quantizes exactly as without the option."""
    from qcnn.quantization import ec

    net = qcnn.load(qcnn.resources.FASHION_MNIST_MODEL)
    x = _calibration_images(12)
    plain, _ = quantize_net(net, conv=(4, 8), fc=(4, 8), calibration=x, ec_options={"max_iter": 2})
    zero, _ = quantize_net(net, conv=(4, 8), fc=(4, 8), calibration=x,
                           ec_options={"max_iter": 2, "prior": 0.0})
    for a, b in zip(plain.layers, zero.layers):
        for u, v in zip(a.blobs, b.blobs):
            np.testing.assert_array_equal(u, v)
    seen = {}
    original = ec.error_correct

    def spy(*args, **kwargs):
        seen[args[0].shape] = kwargs.get("weight")
        return original(*args, **kwargs)

    monkeypatch.setattr(ec, "error_correct", spy)
    strong, report = quantize_net(net, conv=(4, 8), fc=(4, 8), calibration=x,
                                  ec_options={"max_iter": 2, "prior": 1e6})
    weights = [w for w in seen.values()]
    assert len(weights) == len(report) and all(w is not None for w in weights)
    assert any(w.shape == net.layer("fc1").blobs[0].shape for w in weights)
    # a strong prior (large against the Gram matrix's largest eigenvalue, not just its mean
    # diagonal) keeps the weights near k-means' (the weight-space fit), unlike plain EC
    kmeans, _ = quantize_net(net, conv=(4, 8), fc=(4, 8))
    from qcnn.quantization.pq import decode

    def weight_error(model, name):
        layer, original_weight = model.layer(name), net.layer(name).blobs[0]
        decoded = decode(layer.blobs[0], layer.blobs[1], original_weight.shape[1])
        decoded = decoded.reshape(original_weight.shape)
        return np.linalg.norm(decoded - original_weight)

    for name in ("conv2", "fc1"):
        assert weight_error(strong, name) < weight_error(plain, name)
        assert weight_error(strong, name) <= weight_error(kmeans, name) * 1.01


def test_channel_scales(tmp_path):
    """Each quantized layer keeps its output channels' peak magnitudes as scales; the quantized
    weights are the normalised ones; the network's function is kept (exactly when the codebooks
    can represent every weight), the bytes are counted, and the model round-trips through a file."""
    net = qcnn.load(qcnn.resources.FASHION_MNIST_MODEL)
    x = _calibration_images(8)
    quantized, report = quantize_net(net, conv=(1, 256), fc=(1, 256), overrides={"fc2": (1, 16)},
                                     channel_scales=True)
    assert [layer.name for layer in quantized.layers] == [layer.name for layer in net.layers]
    for row in report:
        layer = quantized.layer(row["name"])
        weight = net.layer(row["name"]).blobs[0]
        assert layer.params["channel_scales"]
        np.testing.assert_allclose(layer.scales, np.abs(weight.reshape(len(weight), -1)).max(axis=1))
        assert row["bytes_after"] == layer.storage_bytes()
        without = type(layer)(layer.name, layer.bottoms, layer.tops, layer.blobs[:-1],
                              **dict(layer.params, channel_scales=False))
        assert layer.storage_bytes() == without.storage_bytes() + 4 * len(weight)
    # fc2 (512 -> 10) at K = 16 >= 10 outputs per input channel: every weight is a codeword
    from qcnn.quantization.pq import decode

    fc2, weight = quantized.layer("fc2"), net.layer("fc2").blobs[0]
    np.testing.assert_allclose(decode(fc2.blobs[0], fc2.blobs[1], 512)[:, :, 0, 0] * fc2.scales[:, None], weight,
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fc2.decoded_weight(512)[:, :, 0, 0], weight, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(fc2.bias, net.layer("fc2").blobs[1])
    reference = net.forward(x)["prob"]
    np.testing.assert_allclose(quantized.forward(x)["prob"], reference, atol=2e-2)
    path = tmp_path / "scaled.qcnn"
    qcnn.save(quantized, path)
    np.testing.assert_array_equal(qcnn.load(path).forward(x)["prob"], quantized.forward(x)["prob"])
    _, rows = quantize_net(net, conv=(4, 8), fc=(4, 8), calibration=x, channel_scales=True,
                            ec_options={"max_iter": 2, "prior": 1.0})
    assert all(r["response_error"] <= r["response_error_kmeans"] * (1 + 1e-5) for r in rows)
    assert main(["quantize", str(qcnn.resources.FASHION_MNIST_MODEL), "--no-ec", "--channel-scales",
                 "-o", str(tmp_path / "cli.qcnn"), "-q"]) == 0
    assert qcnn.load(tmp_path / "cli.qcnn").layer("fc1").scales is not None
    assert main(["quantize", str(qcnn.resources.FASHION_MNIST_MODEL), "--no-ec", "--ec-prior", "-1",
                 "-o", str(tmp_path / "bad.qcnn")]) == 1


def test_quantize_cli_calibrates_on_crops(tmp_path, capsys):
    """--calib-crops N: N crops of each of the --calib-size images are the calibration inputs."""
    calib, report = _pixel_file(tmp_path, 6), tmp_path / "report.json"
    assert main(["quantize", str(qcnn.resources.FASHION_MNIST_MODEL), "--calib", calib, "--calib-size", "4",
                 "--calib-crops", "3", "--no-ec", "--fast-kmeans", "--conv-k", "8", "--fc-k", "8",
                 "-o", str(tmp_path / "q.qcnn"), "--report", str(report), "-q"]) == 0
    calibration = json.loads(report.read_text())["calibration"]
    assert (calibration["images"], calibration["crops_per_image"], calibration["inputs"]) == (4, 3, 12)
    assert main(["quantize", str(qcnn.resources.FASHION_MNIST_MODEL), "--calib", calib,
                 "--calib-crops", "0", "-o", str(tmp_path / "bad.qcnn")]) == 1
    assert "--calib-crops must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "bad.qcnn").exists()


def test_channel_scales_of_an_inner_product_on_a_later_axis(tmp_path):
    """An InnerProduct with axis 2 has its output channels last: scales and error correction
    follow them (channels 1000x apart, 8-bit scalar codebooks: nearly exact)."""
    (tmp_path / "ax.prototxt").write_text("""name: "ax" input: "data" input_shape { dim: 1 dim: 3 dim: 4 dim: 5 }
    layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 6 axis: 2 } }""")
    net = qcnn.load_caffe(tmp_path / "ax.prototxt", seed=0)
    net.layer("fc").blobs[0] *= np.array([1, 10, 100, 0.1, 1, 2], np.float32)[:, None]
    x = np.random.default_rng(0).normal(size=(8, 3, 4, 5)).astype(np.float32)
    quantized, report = quantize_net(net, overrides={"fc": (1, 256)}, channel_scales=True, calibration=x,
                                     ec_options={"max_iter": 2})
    assert report[0]["response_error"] <= report[0]["response_error_kmeans"] < 1e-5
    reference = net.forward(x)["fc"]
    assert np.abs(quantized.forward(x)["fc"] - reference).max() <= 1e-5 * np.abs(reference).max()
