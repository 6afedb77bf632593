"""Product-quantized layers: both kernels agree with the dense layer on decoded weights."""

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import qcnn
from qcnn.errors import QcnnError
from qcnn.layers.conv import convolve
from qcnn.layers.quantized import QuantizedConvolution, QuantizedInnerProduct, choose_kernel
from qcnn.quantization.pq import decode

pytestmark = pytest.mark.arm  # also run on aarch64 (.ci/arm64)


@st.composite
def conv_cases(draw):
    group = draw(st.integers(1, 3))
    channels = draw(st.integers(1, 6))
    return dict(group=group, c_in=group * channels, c_out=group * draw(st.integers(1, 5)),
                kernel=draw(st.integers(1, 3)), stride=draw(st.integers(1, 2)), pad=draw(st.integers(0, 2)),
                dilation=draw(st.integers(1, 2)), subdim=draw(st.integers(1, 4)),
                k=draw(st.sampled_from([1, 3, 16, 256])), shared=draw(st.booleans()),
                size=draw(st.integers(3, 9)), batch=draw(st.integers(1, 3)), seed=draw(st.integers(0, 999)),
                scaled=draw(st.booleans()))


def random_pq_blobs(rng, c_out, channels, kh, kw, group, subdim, k, shared):
    m = -(-channels // subdim)
    codebooks = rng.normal(size=(1 if shared else group, m, k, subdim)).astype(np.float32)
    codes = rng.integers(0, k, (c_out, kh, kw, m)).astype(np.uint8)
    return codebooks, codes, rng.normal(size=c_out).astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(case=conv_cases())
def test_quantized_convolution_equals_dense_on_decoded_weights(case):
    rng = np.random.default_rng(case["seed"])
    k = case["kernel"]
    assume(case["size"] + 2 * case["pad"] - case["dilation"] * (k - 1) - 1 >= 0)
    channels = case["c_in"] // case["group"]
    codebooks, codes, bias = random_pq_blobs(rng, case["c_out"], channels, k, k, case["group"],
                                             case["subdim"], case["k"], case["shared"])
    x = rng.normal(size=(case["batch"], case["c_in"], case["size"], case["size"])).astype(np.float32)
    weight = decode(codebooks, codes, channels).astype(np.float64)
    scales = rng.uniform(0.1, 10, case["c_out"]).astype(np.float32)
    if case["scaled"]:  # W_q = diag(s) D B
        weight *= scales.reshape(-1, 1, 1, 1)
    reference = convolve(x.astype(np.float64), weight, bias,
                         (case["stride"],) * 2, (case["pad"],) * 2, (case["dilation"],) * 2, case["group"])
    blobs = [codebooks, codes, bias] + [scales] * case["scaled"]
    for kernel in ("lut", "dense"):
        for parallel in (True, False):
            layer = QuantizedConvolution(
                "q", ["x"], ["y"], blobs, num_output=case["c_out"], kernel_size=k,
                stride=case["stride"], pad=case["pad"], dilation=case["dilation"], group=case["group"],
                subdim=case["subdim"], num_codewords=case["k"], shared_codebook=case["shared"],
                kernel=kernel, parallel=parallel, channel_scales=case["scaled"])
            out = qcnn.Net({"x": (1,) + x.shape[1:]}, [layer]).forward(x)["y"]
            scale = np.abs(reference).max() + 1e-6
            assert np.abs(out - reference).max() <= 1e-5 * scale * np.sqrt(channels * k * k), (kernel, parallel)


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 4), c_in=st.integers(1, 40), c_out=st.integers(1, 30), subdim=st.integers(1, 6),
       k=st.sampled_from([2, 32, 256]), seed=st.integers(0, 999), scaled=st.booleans())
def test_quantized_inner_product_equals_dense(batch, c_in, c_out, subdim, k, seed, scaled):
    rng = np.random.default_rng(seed)
    codebooks, codes, bias = random_pq_blobs(rng, c_out, c_in, 1, 1, 1, subdim, k, True)
    x = rng.normal(size=(batch, c_in)).astype(np.float32)
    weight = decode(codebooks, codes, c_in)[:, :, 0, 0].astype(np.float64)
    scales = rng.uniform(0.1, 10, c_out).astype(np.float32)
    if scaled:
        weight *= scales[:, None]
    reference = x @ weight.T + bias
    for kernel in ("lut", "dense"):
        layer = QuantizedInnerProduct("fc", ["x"], ["y"], [codebooks, codes, bias] + [scales] * scaled,
                                      num_output=c_out, subdim=subdim, num_codewords=k, kernel=kernel,
                                      channel_scales=scaled)
        out = qcnn.Net({"x": (1, c_in)}, [layer]).forward(x)["y"]
        np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())


def test_storage_round_trip_and_accounting(tmp_path):
    rng = np.random.default_rng(0)
    codebooks, codes, bias = random_pq_blobs(rng, 64, 9216, 1, 1, 1, 4, 32, True)
    layer = QuantizedInnerProduct("fc6", ["x"], ["y"], [codebooks, codes, bias], num_output=64)
    net = qcnn.Net({"x": (1, 9216)}, [layer])
    # The paper's formula: 4 C_s K + C_t M log2(K) / 8, plus the float bias.
    assert layer.storage_bytes() == 4 * 9216 * 32 + 64 * 2304 * 5 // 8 + 4 * 64
    path = tmp_path / "q.qcnn"
    qcnn.save(net, path)
    loaded = qcnn.load(path)
    np.testing.assert_array_equal(loaded.layers[0].blobs[1], codes)
    assert loaded.layers[0].blobs[1].dtype == np.uint8
    x = rng.normal(size=(2, 9216)).astype(np.float32)
    np.testing.assert_array_equal(loaded.forward(x)["y"], net.forward(x)["y"])


def test_bad_quantized_blobs():
    rng = np.random.default_rng(0)
    codebooks, codes, bias = random_pq_blobs(rng, 8, 16, 1, 1, 1, 4, 16, True)
    codes[0, 0, 0, 0] = 20
    with pytest.raises(QcnnError, match="codes reach 20"):
        qcnn.Net({"x": (1, 16)}, [QuantizedInnerProduct("fc", ["x"], ["y"], [codebooks, codes, bias],
                                                        num_output=8, num_codewords=16)])
    with pytest.raises(QcnnError, match="kernel must be one of"):
        QuantizedInnerProduct("fc", ["x"], ["y"], num_output=8, kernel="fast")


def test_kernel_choice_follows_the_cost_model():
    small_batch = {"lut_build_macs": 10, "lookups": 100, "decode_values": 10_000, "dense_macs": 10_000}
    big_batch = {"lut_build_macs": 10**6, "lookups": 10**8, "decode_values": 10_000, "dense_macs": 10**7}
    assert choose_kernel(small_batch) == "lut" and choose_kernel(big_batch) == "dense"


def test_small_layers_keep_their_decoded_weights(monkeypatch):
    """Dense calls of a layer within DECODE_CACHE_BYTES decode once; a larger layer decodes on
    every call; new blobs (error correction's) drop the kept weights."""
    from qcnn.layers import quantized

    rng = np.random.default_rng(1)
    codebooks, codes, bias = random_pq_blobs(rng, 12, 20, 1, 1, 1, 1, 16, True)
    x = rng.normal(size=(3, 20)).astype(np.float32)
    calls = []
    monkeypatch.setattr(quantized, "decode", lambda *args: calls.append(1) or decode(*args))
    for limit, decodes in ((4 * 12 * 20 - 1, 3), (4 * 12 * 20, 1)):
        monkeypatch.setattr(quantized, "DECODE_CACHE_BYTES", limit)
        calls.clear()
        layer = QuantizedInnerProduct("fc", ["x"], ["y"], [codebooks, codes, bias], num_output=12, subdim=1,
                                      num_codewords=16, kernel="dense")
        net = qcnn.Net({"x": (1, 20)}, [layer])
        outputs = [net.forward(x)["y"] for _ in range(3)]
        assert len(calls) == decodes
        np.testing.assert_array_equal(outputs[0], outputs[2])
    layer.blobs[1] = np.zeros_like(codes)
    layer.check_blobs(layer.input_shapes)
    np.testing.assert_allclose(net.forward(x)["y"], x @ decode(codebooks, layer.blobs[1], 20)[:, :, 0, 0].T + bias,
                               rtol=1e-5, atol=1e-5)
