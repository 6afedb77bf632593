"""Product-quantized Convolution and InnerProduct layers (Q-CNN).

Weights are stored as codebooks and codes (see :mod:`qcnn.quantization.pq`):

``blobs[0]``  codebooks, float32 (G_cb, M, K, subdim)
``blobs[1]``  codes, uint8 (C_t, kh, kw, M) (kh = kw = 1 for InnerProduct);
              bit-packed to ceil(log2 K) bits in model files
``blobs[2]``  bias, float32 (C_t,), when ``bias_term``
last blob     output-channel scales ``s``, float32 (C_t,), when ``channel_scales``:
              ``W_q = diag(s) D B`` (one codebook serves channels of very
              different magnitudes; see :func:`qcnn.compress.quantize_net`)

Forward runs either the lookup-table kernel (build ``LUT = S^T D`` per input
position with BLAS, then sum table entries picked by the codes) or decodes
``W_q`` and runs the dense layer; ``kernel`` chooses ("lut", "dense" or "auto":
the cheaper by :func:`choose_kernel`). Both give the same result up to float32
rounding. A layer keeps its decoded weights only when they take at most
``DECODE_CACHE_BYTES`` (the small layers of mobile networks, whose scalar
codebooks give the lookup tables nothing to save); larger ones decode on each
dense call, so a big network's dense weights are never all in memory.
"""

import numpy as np

from qcnn.layers.base import register
from qcnn.layers.conv import Convolution, conv_output_size, convolve, pad_for_windows
from qcnn.layers.dense import InnerProduct
from qcnn.quantization.pq import code_bits, decode, num_subspaces
from qcnn.quantization.pq import storage_bytes as pq_storage_bytes

KERNELS = ("auto", "lut", "dense")
PQ_DEFAULTS = {"subdim": 8, "num_codewords": 128, "shared_codebook": True, "kernel": "auto",
               "parallel": True, "codebook_dtype": "float32", "channel_scales": False}
# Decoded weights up to this size stay in memory (EfficientNet-Lite0's largest layer: 4.9 MiB;
# AlexNet's fc6, 144 MiB, is decoded per call).
DECODE_CACHE_BYTES = 8 * 2**20
CODEBOOK_DTYPES = ("float32", "float16")


class _ProductQuantized:
    """What quantized Convolution and InnerProduct share: validation, storage, forward."""

    _kernel_codes = _decoded = None  # built on first use; reset when the blobs are checked

    def _setup_pq(self):
        p = self.params
        p["subdim"], p["num_codewords"] = int(p["subdim"]), int(p["num_codewords"])
        for flag in ("shared_codebook", "parallel", "channel_scales"):
            p[flag] = bool(p[flag])
        if p["subdim"] < 1 or not 1 <= p["num_codewords"] <= 256:
            raise ValueError(f"subdim must be >= 1 and num_codewords in 1..256, got "
                             f"{p['subdim']} and {p['num_codewords']}")
        if p["kernel"] not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {p['kernel']!r}")
        if p["codebook_dtype"] not in CODEBOOK_DTYPES:
            raise ValueError(f"codebook_dtype must be float32 or float16, got {p['codebook_dtype']!r}")

    def _pq_blob_shapes(self, channels, group, kernel):
        p = self.params
        m = num_subspaces(channels, p["subdim"])
        books = 1 if p["shared_codebook"] else group
        shapes = [(books, m, p["num_codewords"], p["subdim"]), (self.num_output,) + kernel + (m,)]
        return shapes + [(self.num_output,)] * (self.bias_term + p["channel_scales"])

    def init_blobs(self, input_shapes, rng):
        """Random codebooks, codes, bias and scales (architecture-only networks)."""
        books, codes = self.blob_shapes(input_shapes)[:2]
        self.blobs = [rng.normal(0, 0.1, books).astype(np.float32),
                      rng.integers(0, self.params["num_codewords"], codes).astype(np.uint8)]
        if self.bias_term:
            self.blobs.append(rng.normal(0, 0.1, self.num_output).astype(np.float32))
        if self.params["channel_scales"]:
            self.blobs.append(rng.uniform(0.5, 2, self.num_output).astype(np.float32))

    @property
    def bias(self):
        """float32 (C_t,), or None without ``bias_term``."""
        return self.blobs[2] if self.bias_term else None

    @property
    def scales(self):
        """Output-channel scales ``s``, float32 (C_t,), or None without ``channel_scales``."""
        return self.blobs[-1] if self.params["channel_scales"] else None

    def check_blobs(self, input_shapes):
        super().check_blobs(input_shapes)
        codes = self.blobs[1]
        if codes.size and int(codes.max()) >= self.params["num_codewords"]:
            raise self.error(f"codes reach {int(codes.max())}, but there are only "
                             f"{self.params['num_codewords']} codewords")
        self._kernel_codes = self._decoded = None

    def blob_storage(self):
        """Per blob: bits per stored value of the bit-packed codes, "float16" for half-precision
        codebooks, or None (stored as is)."""
        books = "float16" if self.params["codebook_dtype"] == "float16" else None
        return [books, code_bits(self.params["num_codewords"])] + [None] * (len(self.blobs) - 2)

    def storage_bytes(self):
        """Bytes on disk: codebooks (float32 or float16), codes at ceil(log2 K) bits, float32 bias
        and scales."""
        books, m, k, subdim = self.blobs[0].shape
        c_out, kh, kw, _ = self.blobs[1].shape
        return pq_storage_bytes((c_out, m * subdim, kh, kw), books, subdim, k, shared=books == 1,
                                codebook_bytes=2 if self.params["codebook_dtype"] == "float16" else 4) \
            + int(sum(b.nbytes for b in self.blobs[2:]))

    def decoded_weight(self, channels):
        """The dense weights ``W_q`` (C_t, C_s, kh, kw), float32, scales applied; built now."""
        weight = decode(self.blobs[0], self.blobs[1], channels)
        if self.params["channel_scales"]:
            weight *= self.scales.reshape(-1, 1, 1, 1)
        return weight

    def _caches_decoded(self):
        c_out, kh, kw, m = self.blobs[1].shape
        return 4 * c_out * kh * kw * m * self.blobs[0].shape[3] <= DECODE_CACHE_BYTES

    def _dense_weight(self, channels):
        """``decoded_weight``, kept for later calls when small enough (``DECODE_CACHE_BYTES``)."""
        if self._decoded is not None:
            return self._decoded
        weight = self.decoded_weight(channels)
        if self._caches_decoded():
            self._decoded = weight
        return weight

    def _pq_forward(self, x, group, stride, pad, dilation, kernel_size):
        """Quantized convolution of ``x`` (N, C, H, W); an inner product is a 1x1 case."""
        kernel = self._kernel_for(self._lut_ops(x.shape, group, stride, pad, dilation, kernel_size))
        if kernel == "dense":
            return convolve(x, self._dense_weight(x.shape[1] // group), self.bias, stride, pad, dilation, group)
        out_size = tuple(conv_output_size(s, k, st, p, d) for s, k, st, p, d in
                         zip(x.shape[2:], kernel_size, stride, pad, dilation))
        from qcnn.kernels import lut  # Numba takes 0.4 s to import: only when a LUT layer runs

        if self._kernel_codes is None:
            self._kernel_codes = lut.prepare_codes(self.blobs[1], group)
        padded = pad_for_windows(np.asarray(x, np.float32), kernel_size, stride, pad, dilation, out_size)
        out = lut.lut_conv(padded, self.blobs[0], self._kernel_codes, group, stride, dilation, out_size,
                           self.params["parallel"])
        if self.params["channel_scales"]:
            out *= self.scales.reshape(1, -1, 1, 1)
        if self.bias_term:
            out += self.bias.reshape(1, -1, 1, 1)
        return out

    def _lut_ops(self, shape, group, stride, pad, dilation, kernel_size):
        """Operation counts of both paths for input ``shape``, for :func:`choose_kernel`."""
        n, c, h, w = shape
        ho, wo = (conv_output_size(s, k, st, p, d) for s, k, st, p, d in
                  zip((h, w), kernel_size, stride, pad, dilation))
        books, m, k, subdim = self.blobs[0].shape
        positions = h * w  # tables of zero padding are zero: the paper does not count them
        kh, kw = kernel_size
        return {"lut_build_macs": n * group * m * subdim * k * positions,
                "lookups": n * ho * wo * kh * kw * m * self.num_output,
                "decode_values": 0 if self._caches_decoded() else self.num_output * kh * kw * m * subdim,
                "dense_macs": n * ho * wo * self.num_output * (c // group) * kh * kw}

    def pq_macs(self, shape, group, stride, pad, dilation, kernel_size):
        """Operations of the kernel that runs for input ``shape``: for the LUT path the paper's
        count (table multiply-adds plus lookup additions), for the dense path its multiply-adds."""
        ops = self._lut_ops(shape, group, stride, pad, dilation, kernel_size)
        return ops["lut_build_macs"] + ops["lookups"] if self._kernel_for(ops) == "lut" else ops["dense_macs"]

    def _kernel_for(self, ops):
        """"lut" or "dense": the layer's ``kernel``, "auto" resolved by :func:`choose_kernel`."""
        kernel = self.params["kernel"]
        return choose_kernel(ops) if kernel == "auto" else kernel


def set_kernel(layers, kernel):
    """Make every quantized layer among ``layers`` run with ``kernel`` ("auto", "lut" or "dense")."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    for layer in layers:
        if isinstance(layer, _ProductQuantized):
            layer.params["kernel"] = kernel


def choose_kernel(ops):
    """Pick "lut" or "dense" from operation counts by a simple cost model.

    Costs in units of one BLAS multiply-add: a table lookup-add costs about
    ``LOOKUP_COST`` of them and decoding one weight value ``DECODE_COST``.
    """
    lut = ops["lut_build_macs"] + LOOKUP_COST * ops["lookups"]
    dense = DECODE_COST * ops["decode_values"] + ops["dense_macs"]
    return "lut" if lut <= dense else "dense"


# From benchmarks/bench_lut.py on the 2-core x86 machine, one thread: a conv lookup-add costs
# 2.6-4.1 dense multiply-adds (inner products: less, their dense path is memory bound);
# decoding one weight value costs 100-400.
LOOKUP_COST = 3.5
DECODE_COST = 150.0


@register
class QuantizedConvolution(_ProductQuantized, Convolution):
    """A :class:`~qcnn.layers.conv.Convolution` with product-quantized weights (see module doc)."""

    type = "QuantizedConvolution"
    defaults = {**Convolution.defaults, **PQ_DEFAULTS}

    def setup(self):
        super().setup()
        self._setup_pq()

    def blob_shapes(self, input_shapes):
        return self._pq_blob_shapes(input_shapes[0][1] // self.group, self.group, self.kernel)

    def macs(self, input_shapes):
        return self.pq_macs(input_shapes[0], self.group, self.stride, self.pad, self.dilation, self.kernel)

    def dense_macs(self, input_shapes):
        return Convolution.macs(self, input_shapes)

    def dense_bytes(self, input_shapes):
        return 4 * sum(int(np.prod(s)) for s in Convolution.blob_shapes(self, input_shapes))

    def forward(self, inputs):
        return [self._pq_forward(inputs[0], self.group, self.stride, self.pad, self.dilation, self.kernel)]


@register
class QuantizedInnerProduct(_ProductQuantized, InnerProduct):
    """An :class:`~qcnn.layers.dense.InnerProduct` with product-quantized weights (see module doc)."""

    type = "QuantizedInnerProduct"
    defaults = {**InnerProduct.defaults, **PQ_DEFAULTS, "subdim": 4, "num_codewords": 32}

    def setup(self):
        super().setup()
        self._setup_pq()
        if self.transpose:
            raise ValueError("transpose is not supported for quantized inner products")

    def blob_shapes(self, input_shapes):
        _, k = self._split(input_shapes[0])
        return self._pq_blob_shapes(k, 1, (1, 1))

    def macs(self, input_shapes):
        outer, k = self._split(input_shapes[0])
        return self.pq_macs((int(np.prod(outer[1:])), k, 1, 1), 1, (1, 1), (0, 0), (1, 1), (1, 1))

    def dense_macs(self, input_shapes):
        return InnerProduct.macs(self, input_shapes)

    def dense_bytes(self, input_shapes):
        return 4 * sum(int(np.prod(s)) for s in InnerProduct.blob_shapes(self, input_shapes))

    def forward(self, inputs):
        x = inputs[0]
        outer, k = self._split(x.shape)
        out = self._pq_forward(x.reshape(-1, k, 1, 1), 1, (1, 1), (0, 0), (1, 1), (1, 1))
        return [out.reshape(outer + (self.num_output,))]
