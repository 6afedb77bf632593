"""Local response normalisation and the per-channel affine layers (BatchNorm, Scale, Bias).

BatchNorm, Scale and Bias are all ``y = x * a[c] + b[c]`` on the channel
axis at inference time; :meth:`ChannelAffine.affine` gives ``(a, b)`` so the
graph can fold them into a preceding convolution or inner product.
"""

import numpy as np

from qcnn.layers.base import Layer, register
from qcnn.layers.conv import patches


@register
class LRN(Layer):
    """Local response normalisation, Caffe semantics.

    ACROSS_CHANNELS: ``x_c / (k + alpha/n * sum_{c' in window(c)} x_c'^2) ** beta``
    over ``n = local_size`` channels centred on c, zero padded.
    WITHIN_CHANNEL: ``x / (1 + alpha/n^2 * sum over the n x n window of x^2) ** beta``
    (zero padded, ``k`` unused, as Caffe computes it).
    """

    type = "LRN"
    defaults = {"local_size": 5, "alpha": 1.0, "beta": 0.75, "k": 1.0,
                "norm_region": "ACROSS_CHANNELS"}

    def setup(self):
        p = self.params
        p["norm_region"] = str(p["norm_region"]).upper()
        if p["norm_region"] not in ("ACROSS_CHANNELS", "WITHIN_CHANNEL"):
            raise ValueError(f"norm_region {p['norm_region']} is not supported")
        if int(p["local_size"]) < 1 or int(p["local_size"]) % 2 == 0:
            raise ValueError(f"local_size must be a positive odd number, got {p['local_size']}")

    def output_shapes(self, input_shapes):
        if len(input_shapes[0]) != 4:
            raise self.error(f"needs a 4-D input (N, C, H, W), got shape {input_shapes[0]}")
        return [tuple(input_shapes[0])]

    def forward(self, inputs):
        x = inputs[0]
        p = self.params
        size = int(p["local_size"])
        half = (size - 1) // 2
        square = x * x
        if p["norm_region"] == "ACROSS_CHANNELS":
            window = square.copy()
            for shift in range(1, half + 1):  # zero padding = shorter shifted slices
                window[:, shift:] += square[:, :-shift]
                window[:, :-shift] += square[:, shift:]
            denom = window
            denom *= np.float32(p["alpha"] / size)
            denom += np.float32(p["k"])
        else:
            view = patches(square, (size, size), (1, 1), (half, half), (1, 1), x.shape[2:])
            denom = np.zeros_like(x)
            for i in range(size):
                for j in range(size):
                    denom += view[:, :, i, j]
            denom *= np.float32(p["alpha"] / size**2)
            denom += np.float32(1.0)
        return [x * _power(denom, -float(p["beta"]))]


def _power(x, exponent):
    """``x ** exponent`` for positive float32 ``x``; NumPy's float32 ``power`` is slow,
    so the common LRN exponent -0.75 uses square roots and others exp/log."""
    if exponent == -0.75:
        root = np.sqrt(x)
        root *= np.sqrt(root)
        return np.reciprocal(root, out=root)
    return np.exp(np.float32(exponent) * np.log(x))


class ChannelAffine(Layer):
    """``y = x * a + b`` per channel (axis 1); subclasses say how blobs give ``a, b``."""

    def output_shapes(self, input_shapes):
        if len(input_shapes[0]) < 2:
            raise self.error(f"needs a channel axis, got shape {input_shapes[0]}")
        self.check_blobs(input_shapes)
        return [tuple(input_shapes[0])]

    def affine(self):
        """Per-channel ``(a, b)``, float32 arrays of shape (C,)."""
        raise NotImplementedError

    def forward(self, inputs):
        x = inputs[0]
        a, b = self.affine()
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return [x * a.reshape(shape) + b.reshape(shape)]


@register
class BatchNorm(ChannelAffine):
    """Inference-time batch normalisation with stored statistics.

    Blobs (Caffe's): mean (C,), variance (C,), scale factor (1,); the
    statistics are divided by the factor (0 means 0).
    ``y = (x - mean/f) / sqrt(var/f + eps)``.
    """

    type = "BatchNorm"
    defaults = {"eps": 1e-5}

    def blob_shapes(self, input_shapes):
        c = input_shapes[0][1]
        return [(c,), (c,), (1,)]

    def init_blobs(self, input_shapes, rng):
        c = input_shapes[0][1]
        self.blobs = [rng.normal(0, 0.1, c).astype(np.float32),
                      rng.uniform(0.5, 1.5, c).astype(np.float32), np.ones(1, np.float32)]

    def affine(self):
        mean, var, factor = (b.astype(np.float64) for b in self.blobs)
        factor = 0.0 if factor[0] == 0 else 1.0 / factor[0]
        a = 1.0 / np.sqrt(var * factor + float(self.params["eps"]))
        return a.astype(np.float32), (-mean * factor * a).astype(np.float32)


@register
class Scale(ChannelAffine):
    """``y = x * gamma + beta`` per channel; blobs gamma (C,) and, with ``bias_term``, beta (C,)."""

    type = "Scale"
    defaults = {"bias_term": False}

    def blob_shapes(self, input_shapes):
        c = input_shapes[0][1]
        return [(c,), (c,)] if self.params["bias_term"] else [(c,)]

    def init_blobs(self, input_shapes, rng):
        c = input_shapes[0][1]
        self.blobs = [rng.uniform(0.5, 1.5, c).astype(np.float32)]
        if self.params["bias_term"]:
            self.blobs.append(rng.normal(0, 0.1, c).astype(np.float32))

    def affine(self):
        gamma = self.blobs[0]
        beta = self.blobs[1] if self.params["bias_term"] else np.zeros_like(gamma)
        return gamma, beta


@register
class Bias(ChannelAffine):
    """``y = x + beta`` per channel; blob beta (C,)."""

    type = "Bias"

    def blob_shapes(self, input_shapes):
        return [(input_shapes[0][1],)]

    def affine(self):
        return np.ones_like(self.blobs[0]), self.blobs[0]
