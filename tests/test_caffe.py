"""The Caffe importer: prototxt variants, V1/V2 caffemodels, warnings and errors."""

import warnings

import numpy as np
import pytest

import qcnn
from qcnn.errors import QcnnError, QcnnWarning
from qcnn.io import protobuf
from qcnn.io.caffe import parse_prototxt, read_caffemodel, read_mean_file, save_caffemodel

from conftest import CAFFE_DIR

SMALL = """
name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" top: "loss" include { phase: TRAIN } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


def write(tmp_path, text, name="deploy.prototxt"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def small_model(tmp_path):
    prototxt = write(tmp_path, SMALL)
    net = qcnn.load_caffe(prototxt, fold_batchnorm=False, seed=5)
    caffemodel = tmp_path / "small.caffemodel"
    save_caffemodel(net, caffemodel)
    return prototxt, caffemodel, net


@pytest.mark.arm
def test_input_declarations_are_equivalent(tmp_path):
    body = 'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 2 } }'
    variants = [
        'input: "data" input_dim: 2 input_dim: 3 input_dim: 4 input_dim: 5\n',
        'input: "data" input_shape { dim: 2 dim: 3 dim: 4 dim: 5 }\n',
        'layer { name: "in" type: "Input" top: "data" input_param { shape: { dim: [2, 3, 4, 5] } } }\n',
    ]
    for i, head in enumerate(variants):
        _, inputs, specs = parse_prototxt(write(tmp_path, head + body, f"v{i}.prototxt"))
        assert inputs == {"data": (2, 3, 4, 5)}
        assert [s[1] for s in specs] == ["InnerProduct"]


@pytest.mark.arm
def test_train_only_layers_are_dropped_and_weights_round_trip(small_model):
    prototxt, caffemodel, net = small_model
    loaded = qcnn.load_caffe(prototxt, caffemodel, fold_batchnorm=False)
    assert [layer.name for layer in loaded.layers] == ["conv", "bn", "scale", "relu", "fc", "prob"]
    for a, b in zip(loaded.layers, net.layers):
        for wa, wb in zip(a.blobs, b.blobs):
            np.testing.assert_array_equal(wa, wb)


@pytest.mark.arm
def test_batchnorm_folding_is_exact_up_to_rounding(small_model):
    prototxt, caffemodel, _ = small_model
    unfolded = qcnn.load_caffe(prototxt, caffemodel, fold_batchnorm=False)
    folded = qcnn.load_caffe(prototxt, caffemodel)
    assert [layer.type for layer in folded.layers] == ["Convolution", "ReLU", "InnerProduct", "Softmax"]
    x = np.random.default_rng(1).normal(size=(3, 3, 8, 8)).astype(np.float32)
    a, b = unfolded.forward(x, ["conv", "prob"]), folded.forward(x, ["conv", "prob"])
    np.testing.assert_allclose(b["conv"], a["conv"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b["prob"], a["prob"], rtol=1e-5, atol=1e-6)


@pytest.mark.arm
def test_batchnorm_with_a_second_reader_is_not_folded(tmp_path):
    text = SMALL.replace('layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }',
                         'layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "bn" }\n'
                         'layer { name: "side" type: "ReLU" bottom: "conv" top: "side" }') \
        .replace('bottom: "conv" top: "conv" scale_param', 'bottom: "bn" top: "conv2" scale_param') \
        .replace('name: "relu" type: "ReLU" bottom: "conv" top: "conv"', 'name: "relu" type: "ReLU" bottom: "conv2" top: "conv2"') \
        .replace('bottom: "conv" top: "fc"', 'bottom: "conv2" top: "fc"')
    net = qcnn.load_caffe(write(tmp_path, text), seed=2, fold_batchnorm=False)
    folded = net.fold_batchnorm()
    # conv's output also feeds "side", so BatchNorm cannot fold; Scale follows a BatchNorm.
    assert [layer.type for layer in folded.layers] == [layer.type for layer in net.layers]
    x = np.random.default_rng(0).normal(size=(1, 3, 8, 8)).astype(np.float32)
    for blob in ("side", "prob"):
        np.testing.assert_allclose(folded.forward(x, blob)[blob], net.forward(x, blob)[blob],
                                   rtol=1e-5, atol=1e-6)


def test_v1_caffemodel_with_legacy_dims(tmp_path):
    prototxt = CAFFE_DIR / "caffenet.prototxt"
    net = qcnn.load_caffe(prototxt, seed=0)
    path = tmp_path / "v1.caffemodel"
    save_caffemodel(net, path, v1=True)
    weights = read_caffemodel(path)
    assert weights["conv2"][0].shape == (256, 48, 5, 5)
    assert weights["fc6"][0].shape == (1, 1, 4096, 9216)  # legacy 4-D: reshaped on import
    loaded = qcnn.load_caffe(prototxt, path)
    assert loaded.layer("fc6").blobs[0].shape == (4096, 9216)
    np.testing.assert_array_equal(loaded.layer("fc8").blobs[1], net.layer("fc8").blobs[1])


@pytest.mark.arm
def test_v1_prototxt_types_and_unknown_fields_warn(tmp_path):
    text = """input: "data" input_dim: 1 input_dim: 2 input_dim: 4 input_dim: 4
    mystery_net_field: 3
    layers { name: "c" type: CONVOLUTION bottom: "data" top: "c" blobs_lr: 1
             convolution_param { num_output: 2 kernel_size: 1 frobnicate: true } }
    layers { name: "r" type: RELU bottom: "c" top: "c" colour: "blue" }
    """
    with pytest.warns(QcnnWarning) as record:
        _, _, specs = parse_prototxt(write(tmp_path, text))
    messages = [str(w.message) for w in record]
    assert [s[1] for s in specs] == ["Convolution", "ReLU"]
    assert any("mystery_net_field" in m for m in messages)
    assert any("'frobnicate' in convolution_param" in m and "layer 'c'" in m for m in messages)
    assert any("'colour'" in m and "layer 'r'" in m for m in messages)


@pytest.mark.arm
def test_mean_file(tmp_path):
    mean = np.arange(3 * 4 * 5, dtype=np.float32).reshape(1, 3, 4, 5)
    path = tmp_path / "mean.binaryproto"
    path.write_bytes(protobuf.encode({"num": [1], "channels": [3], "height": [4], "width": [5],
                                      "data": [mean]}, {1: ("num", "varint"), 2: ("channels", "varint"),
                                                        3: ("height", "varint"), 4: ("width", "varint"),
                                                        5: ("data", "floats")}))
    np.testing.assert_array_equal(read_mean_file(path), mean[0])


def test_caffemodel_loads_fast(nsfw_files):
    import time
    start = time.perf_counter()
    weights = read_caffemodel(nsfw_files[1])
    assert time.perf_counter() - start < 5  # generous: about 0.05 s here; catches per-value parsing
    assert len(weights) == 53 * 3 + 1


# ---------------------------------------------------------------- bad input

def one_line_error(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


@pytest.mark.arm
@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_truncated_caffemodel(small_model, tmp_path, cut):
    prototxt, caffemodel, _ = small_model
    data = caffemodel.read_bytes()
    broken = tmp_path / "broken.caffemodel"
    broken.write_bytes(data[:int(len(data) * cut)])
    with pytest.raises(QcnnError) as error:
        qcnn.load_caffe(prototxt, broken)
    one_line_error(error, str(broken))


@pytest.mark.arm
def test_corrupt_caffemodel(small_model, tmp_path):
    prototxt, caffemodel, _ = small_model
    data = bytearray(caffemodel.read_bytes())
    data[0:6] = b"\xff" * 6  # a garbage key
    broken = tmp_path / "corrupt.caffemodel"
    broken.write_bytes(bytes(data))
    with pytest.raises(QcnnError) as error:
        qcnn.load_caffe(prototxt, broken)
    one_line_error(error, str(broken), "not a valid caffemodel")


@pytest.mark.arm
def test_caffemodel_that_is_not_one(small_model, tmp_path):
    prototxt, _, _ = small_model
    with pytest.raises(QcnnError) as error:
        qcnn.load_caffe(prototxt, prototxt)
    one_line_error(error, str(prototxt))


@pytest.mark.arm
def test_unparsable_prototxt(tmp_path):
    path = write(tmp_path, 'layer { name: "x" type: "ReLU" bottom: "data" top: "x"\n')
    with pytest.raises(QcnnError) as error:
        qcnn.load_caffe(path)
    one_line_error(error, str(path), "missing '}'")


@pytest.mark.arm
def test_blob_shape_mismatch(small_model, tmp_path):
    prototxt, caffemodel, _ = small_model
    other = write(tmp_path, SMALL.replace("num_output: 4", "num_output: 6"), "other.prototxt")
    with pytest.raises(QcnnError) as error:
        qcnn.load_caffe(other, caffemodel)
    one_line_error(error, str(caffemodel), "layer 'conv'", "(4, 3, 3, 3)", "(6, 3, 3, 3)")


@pytest.mark.arm
def test_unknown_layer_type(tmp_path):
    path = write(tmp_path, SMALL.replace('type: "ReLU"', 'type: "Frobnicate"'))
    with pytest.raises(QcnnError) as error:
        qcnn.load_caffe(path)
    one_line_error(error, str(path), "layer 'relu'", "unknown layer type 'Frobnicate'")


@pytest.mark.arm
def test_missing_files(small_model, tmp_path):
    prototxt, _, _ = small_model
    with pytest.raises(QcnnError) as error:
        qcnn.load_caffe(tmp_path / "nope.prototxt")
    one_line_error(error, "nope.prototxt", "no such file")
    with pytest.raises(QcnnError) as error:
        qcnn.load_caffe(prototxt, tmp_path / "nope.caffemodel")
    one_line_error(error, "nope.caffemodel", "no such file")


@pytest.mark.arm
def test_missing_weights_and_dangling_bottoms(small_model, tmp_path):
    prototxt, caffemodel, _ = small_model
    renamed = write(tmp_path, SMALL.replace('name: "fc"', 'name: "fc_new"'), "renamed.prototxt")
    with pytest.raises(QcnnError) as error:
        qcnn.load_caffe(renamed, caffemodel)
    one_line_error(error, "layer 'fc_new'", "has no weights")
    dangling = write(tmp_path, SMALL.replace('bottom: "conv" top: "fc"', 'bottom: "cnov" top: "fc"'),
                     "dangling.prototxt")
    with pytest.raises(QcnnError) as error:
        qcnn.load_caffe(dangling)
    one_line_error(error, "layer 'fc'", "'cnov'")


@pytest.mark.arm
def test_nan_weights_are_refused(small_model, tmp_path):
    prototxt, _, net = small_model
    net.layer("fc").blobs[0][0, 0] = np.nan
    path = tmp_path / "nan.caffemodel"
    save_caffemodel(net, path)
    with pytest.raises(QcnnError) as error:
        qcnn.load_caffe(prototxt, path)
    one_line_error(error, "layer 'fc'", "NaN")


@pytest.mark.arm
def test_bad_layer_parameters(tmp_path):
    cases = {
        "num_output: 4 kernel_size: 3 pad: 1": "num_output: 4 pad: 1",  # no kernel
        'pool: MAX kernel_size: 3': 'pool: STOCHASTIC kernel_size: 3',
    }
    text = SMALL + 'layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 3 } }'
    for good, bad in cases.items():
        path = write(tmp_path, text.replace(good, bad))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(QcnnError) as error:
                qcnn.load_caffe(path)
        one_line_error(error, str(path))
