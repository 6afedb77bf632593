"""The network graph: outputs, intermediate blobs, in-place layers, tracing, input checks."""

import numpy as np
import pytest

import qcnn
from qcnn.errors import QcnnError
from qcnn.layers.activation import ReLU, Softmax
from qcnn.layers.conv import Convolution
from qcnn.layers.dense import InnerProduct
from qcnn.layers.structure import Concat, Eltwise


def make_net():
    rng = np.random.default_rng(0)
    conv = Convolution("conv", ["data"], ["conv"], [rng.normal(size=(4, 2, 3, 3)).astype(np.float32),
                                                    np.zeros(4, np.float32)], num_output=4, kernel_size=3, pad=1)
    relu = ReLU("relu", ["conv"], ["conv"])  # in place
    side = ReLU("side", ["data"], ["side"], negative_slope=0.1)
    concat = Concat("concat", ["conv", "side"], ["cat"])
    fc = InnerProduct("fc", ["cat"], ["fc"], [rng.normal(size=(3, 6 * 5 * 5)).astype(np.float32)],
                      num_output=3, bias_term=False)
    prob = Softmax("prob", ["fc"], ["prob"])
    return qcnn.Net({"data": (1, 2, 5, 5)}, [conv, relu, side, concat, fc, prob], "toy")


def test_outputs_shapes_and_default_forward():
    net = make_net()
    assert net.outputs == ["prob"]
    assert net.blob_shapes["cat"] == (1, 6, 5, 5) and net.blob_shapes["fc"] == (1, 3)
    x = np.random.default_rng(1).normal(size=(4, 2, 5, 5))  # float64 is converted
    out = net.forward(x)
    assert list(out) == ["prob"] and out["prob"].shape == (4, 3) and out["prob"].dtype == np.float32
    np.testing.assert_allclose(out["prob"].sum(axis=1), 1, rtol=1e-6)


def test_intermediate_blobs_in_place_and_early_stop():
    net = make_net()
    x = np.random.default_rng(2).normal(size=(2, 2, 5, 5)).astype(np.float32)
    out = net.forward(x, outputs=["conv", "data", "cat"])
    assert (out["conv"] >= 0).all()  # the in-place ReLU's result, as Caffe gives it
    np.testing.assert_array_equal(out["data"], x)
    np.testing.assert_array_equal(out["cat"][:, :4], out["conv"])
    ran = [layer.name for layer, _, _ in net.trace(x, until=net._last_writer["conv"])]
    assert ran == ["conv", "relu"]
    traced = {layer.name: (ins, outs) for layer, ins, outs in net.trace(x)}
    assert traced["relu"][0][0].min() < 0  # the pre-ReLU value is still available
    np.testing.assert_array_equal(traced["relu"][1][0], out["conv"])


def test_dense_math_against_numpy():
    net = make_net()
    x = np.random.default_rng(3).normal(size=(1, 2, 5, 5)).astype(np.float32)
    conv = net.layer("conv")
    w = conv.blobs[0].astype(np.float64)
    xp = np.pad(x[0].astype(np.float64), ((0, 0), (1, 1), (1, 1)))
    expected = np.zeros((4, 5, 5))
    for i in range(5):
        for j in range(5):
            expected[:, i, j] = np.tensordot(w, xp[:, i:i + 3, j:j + 3], axes=3)
    np.testing.assert_allclose(net.forward(x, "conv")["conv"][0], np.maximum(expected, 0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x, message", [
    (np.zeros((1, 3, 5, 5), np.float32), r"must have shape \(N, 2, 5, 5\)"),
    (np.zeros((2, 5, 5), np.float32), r"must have shape"),
    (np.array([["a"]]), "must be numeric"),
    ({"other": np.zeros((1, 2, 5, 5))}, "missing network input 'data'"),
])
def test_bad_inputs(x, message):
    with pytest.raises(QcnnError, match=message):
        make_net().forward(x)


def test_unknown_blob_and_bad_graphs():
    net = make_net()
    with pytest.raises(QcnnError, match="no blob named 'nope'"):
        net.forward(np.zeros((1, 2, 5, 5)), outputs="nope")
    with pytest.raises(QcnnError, match="used twice"):
        qcnn.Net({"data": (1, 2)}, [ReLU("r", ["data"], ["a"]), ReLU("r", ["a"], ["b"])])
    with pytest.raises(QcnnError, match="input 'b' has shape"):
        qcnn.Net({"a": (1, 2), "b": (1, 3)}, [Eltwise("e", ["a", "b"], ["c"])])
    with pytest.raises(QcnnError, match="takes 1 input"):
        ReLU("r", ["a", "b"], ["c"])
    with pytest.raises(QcnnError, match="unknown parameter"):
        ReLU("r", ["a"], ["c"], slope=1)


def test_summary_counts():
    rows = {r["name"]: r for r in make_net().summary()}
    assert rows["conv"]["macs"] == 5 * 5 * 4 * 2 * 9 and rows["conv"]["params"] == 4 * 2 * 9 + 4
    assert rows["fc"]["macs"] == 150 * 3 and rows["fc"]["bytes"] == 150 * 3 * 4
    assert rows["relu"]["macs"] == 0


def test_alexnet_macs_and_bytes_match_the_paper():
    """The Q-CNN paper's AlexNet: 724.4M multiply-adds, 232.56 MiB of float weights."""
    from conftest import CAFFE_DIR
    net = qcnn.load_caffe(CAFFE_DIR / "alexnet.prototxt", seed=0)
    rows = net.summary()
    assert sum(r["macs"] for r in rows) == pytest.approx(724.4e6, rel=1e-3)
    assert sum(r["bytes"] for r in rows) / 2**20 == pytest.approx(232.56, abs=0.01)
