"""Product quantization of weights: sub-vectors, codes, decoding, bit packing."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qcnn.quantization.pq import code_bits, decode, pack_codes, quantize_weight, subvectors, unpack_codes


@st.composite
def weight_cases(draw):
    group = draw(st.integers(1, 3))
    c_out = group * draw(st.integers(1, 4))
    channels = draw(st.integers(1, 7))
    kernel = draw(st.sampled_from([(1, 1), (3, 3), (1, 2)]))
    return dict(group=group, shape=(c_out, channels) + kernel, subdim=draw(st.integers(1, 4)),
                shared=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=40, deadline=None)
@given(case=weight_cases())
def test_few_distinct_subvectors_quantize_exactly(case):
    """Weights built from at most K distinct sub-vectors per subspace decode to themselves."""
    rng = np.random.default_rng(case["seed"])
    palette = rng.normal(size=(3, case["shape"][1])).astype(np.float32)
    c_out, channels, kh, kw = case["shape"]
    choice = rng.integers(0, 3, (c_out, kh, kw))
    weight = np.ascontiguousarray(palette[choice].transpose(0, 3, 1, 2))
    codebooks, codes = quantize_weight(weight, case["group"], case["subdim"], 4, case["shared"],
                                       case["seed"])
    m = -(-channels // case["subdim"])
    assert codebooks.shape == ((1 if case["shared"] else case["group"]), m, 4, case["subdim"])
    assert codes.shape == (c_out, kh, kw, m) and codes.dtype == np.uint8
    np.testing.assert_array_equal(decode(codebooks, codes, channels), weight)


@settings(max_examples=30, deadline=None)
@given(case=weight_cases(), k=st.sampled_from([2, 5, 16]))
def test_decode_matches_codebook_lookup(case, k):
    """decode(D, B)[t, c, y, x] is component c % subdim of codeword codes[t, y, x, c // subdim]."""
    rng = np.random.default_rng(case["seed"])
    weight = rng.normal(size=case["shape"]).astype(np.float32)
    codebooks, codes = quantize_weight(weight, case["group"], case["subdim"], k, case["shared"], case["seed"])
    decoded = decode(codebooks, codes, case["shape"][1])
    c_out = case["shape"][0]
    for t, c, y, x in np.ndindex(decoded.shape):
        book = t // (c_out // case["group"]) if not case["shared"] else 0
        m, j = divmod(c, case["subdim"])
        assert decoded[t, c, y, x] == codebooks[book, m, codes[t, y, x, m], j]
    # Each sub-vector gets its nearest codeword (k-means converged: assignment step is exact).
    vectors = subvectors(weight, case["group"], case["subdim"], case["shared"])
    distances = ((vectors[:, :, :, None, :] - codebooks[:, :, None, :, :]) ** 2).sum(-1)
    chosen = np.take_along_axis(distances, distances.argmin(-1)[..., None], -1)[..., 0]
    quantized = subvectors(decoded, case["group"], case["subdim"], case["shared"])
    np.testing.assert_allclose(((vectors - quantized) ** 2).sum(-1), chosen, rtol=1e-4, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 256), shape=st.tuples(st.integers(1, 9), st.integers(1, 7)), seed=st.integers(0, 99))
def test_bit_packing_round_trip(k, shape, seed):
    codes = np.random.default_rng(seed).integers(0, k, shape).astype(np.uint8)
    bits = code_bits(k)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.size == -(-codes.size * bits // 8)
    np.testing.assert_array_equal(unpack_codes(packed, bits, shape), codes)


def test_code_bits():
    assert [code_bits(k) for k in (1, 2, 3, 16, 32, 128, 129, 256)] == [1, 1, 2, 4, 5, 7, 8, 8]
