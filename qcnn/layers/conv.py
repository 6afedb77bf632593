"""Convolution, by im2col + BLAS (and a direct Numba kernel for depthwise convolution)."""

import numpy as np
from numpy.lib.stride_tricks import as_strided

from qcnn.layers.base import Layer, as_pair, register


def conv_output_size(size, kernel, stride, pad, dilation):
    """Caffe's convolution output size (floor rounding)."""
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def patches(x, kernel, stride, pad, dilation, out_size, pad_value=0.0):
    """A strided view of all kernel windows of ``x``.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
    kernel, stride, pad, dilation, out_size : (int, int)
        Per axis (height, width). ``out_size`` may need more bottom/right
        padding than ``pad`` (pooling's ceil rounding); it is added.

    Returns
    -------
    view : ndarray, shape (N, C, kh, kw, Ho, Wo)
        ``view[n, c, i, j, y, x] = xpad[n, c, y*sh + i*dh, x*sw + j*dw]``; no copy
        beyond the padding.
    """
    (kh, kw), (sh, sw), (dh, dw), (ho, wo) = kernel, stride, dilation, out_size
    n, c = x.shape[:2]
    x = pad_for_windows(x, kernel, stride, pad, dilation, out_size, pad_value)
    s_n, s_c, s_h, s_w = x.strides
    return as_strided(x, (n, c, kh, kw, ho, wo),
                      (s_n, s_c, s_h * dh, s_w * dw, s_h * sh, s_w * sw), writeable=False)


def pad_for_windows(x, kernel, stride, pad, dilation, out_size, pad_value=0.0):
    """``x`` (N, C, H, W) padded by ``pad`` and, at the bottom/right, as much more as
    ``out_size`` windows need (pooling's ceil rounding); ``x`` itself if no padding is needed."""
    extra = [max(0, (o - 1) * s + (k - 1) * d + 1 - size - 2 * p) for o, s, k, d, size, p in
             zip(out_size, stride, kernel, dilation, x.shape[2:], pad)]
    if not any(pad) and not any(extra):
        return x
    return np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0] + extra[0]), (pad[1], pad[1] + extra[1])),
                  constant_values=pad_value)


@register
class Convolution(Layer):
    """2-D convolution with Caffe's semantics.

    Weights ``blobs[0]``: float32, shape (C_out, C_in / group, kh, kw);
    bias ``blobs[1]``: shape (C_out,) when ``bias_term``.
    Input (N, C_in, H, W) -> output (N, C_out, Ho, Wo), floor rounding.
    ``group == C_in`` with ``C_out`` a multiple of it is depthwise.
    """

    type = "Convolution"
    defaults = {"num_output": None, "bias_term": True, "kernel_size": None,
                "stride": [1, 1], "pad": [0, 0], "dilation": [1, 1], "group": 1}

    def setup(self):
        p = self.params
        if p["num_output"] is None or int(p["num_output"]) <= 0:
            raise ValueError("num_output must be a positive integer")
        if p["kernel_size"] is None:
            raise ValueError("kernel_size is required")
        self.num_output = int(p["num_output"])
        self.bias_term = bool(p["bias_term"])
        self.kernel = as_pair(p["kernel_size"], "kernel_size")
        self.stride = as_pair(p["stride"], "stride")
        self.pad = as_pair(p["pad"], "pad")
        self.dilation = as_pair(p["dilation"], "dilation")
        self.group = int(p["group"])
        if min(self.kernel + self.stride + self.dilation) < 1 or min(self.pad) < 0 or self.group < 1:
            raise ValueError("kernel, stride, dilation and group must be >= 1 and pad >= 0")
        if self.num_output % self.group:
            raise ValueError(f"num_output {self.num_output} is not divisible by group {self.group}")
        p.update(num_output=self.num_output, bias_term=self.bias_term, kernel_size=list(self.kernel),
                 stride=list(self.stride), pad=list(self.pad), dilation=list(self.dilation),
                 group=self.group)

    def blob_shapes(self, input_shapes):
        c_in = input_shapes[0][1]
        shapes = [(self.num_output, c_in // self.group) + self.kernel]
        return shapes + [(self.num_output,)] if self.bias_term else shapes

    def output_shapes(self, input_shapes):
        shape = input_shapes[0]
        if len(shape) != 4:
            raise self.error(f"needs a 4-D input (N, C, H, W), got shape {shape}")
        if shape[1] % self.group:
            raise self.error(f"{shape[1]} input channels are not divisible by group {self.group}")
        self.check_blobs(input_shapes)
        ho, wo = self.out_size(shape[2:])
        if ho < 1 or wo < 1:
            raise self.error(f"kernel {self.kernel} does not fit input {shape[2:]} with pad {self.pad}")
        return [(shape[0], self.num_output, ho, wo)]

    def out_size(self, in_size):
        return tuple(conv_output_size(s, k, st, p, d) for s, k, st, p, d in
                     zip(in_size, self.kernel, self.stride, self.pad, self.dilation))

    def macs(self, input_shapes):
        ho, wo = self.out_size(input_shapes[0][2:])
        return ho * wo * self.num_output * (input_shapes[0][1] // self.group) * self.kernel[0] * self.kernel[1]

    def forward(self, inputs):
        return [convolve(inputs[0], self.blobs[0], self.blobs[1] if self.bias_term else None,
                         self.stride, self.pad, self.dilation, self.group)]


def convolve(x, weight, bias, stride, pad, dilation, group):
    """Caffe convolution of ``x`` (N, C, H, W) with ``weight`` (C_out, C/group, kh, kw).

    im2col (a strided view copied to (N, group, C/group*kh*kw, Ho*Wo)) and one
    batched BLAS product per group. Depthwise convolutions (one input channel per
    group) with float32 weights (every layer's) run a direct Numba kernel
    (:func:`_depthwise`); with float64 weights (a reference computation) they
    accumulate over the kh*kw kernel offsets in NumPy, in float64 like the BLAS path.
    """
    x = np.asarray(x, np.float32)
    n, _, h, w = x.shape
    c_out, c_group, kh, kw = weight.shape
    depthwise = c_group == 1 and group > 1
    if depthwise and weight.dtype == np.float32:
        return _depthwise(x, weight, bias, stride, pad, dilation, c_out // group)
    ho, wo = (conv_output_size(s, k, st, p, d) for s, k, st, p, d in
              zip((h, w), (kh, kw), stride, pad, dilation))
    view = patches(x, (kh, kw), stride, pad, dilation, (ho, wo))
    if depthwise:
        out = _depthwise_numpy(view, weight, c_out // group)
    else:
        cols = view.reshape(n, group, c_group * kh * kw, ho * wo)
        out = np.matmul(weight.reshape(group, c_out // group, c_group * kh * kw), cols)
        out = out.reshape(n, c_out, ho, wo)
    if bias is not None:
        out += bias.reshape(1, -1, 1, 1)
    return out


def _depthwise(x, weight, bias, stride, pad, dilation, multiplier):
    """Depthwise convolution of ``x`` (N, C, H, W) with float32 ``weight`` (C * multiplier, 1,
    kh, kw), bias included: output channel ``c`` reads input channel ``c // multiplier``. The
    Numba kernel :func:`qcnn.kernels.depthwise.depthwise_conv`, on Numba's threads."""
    from qcnn.kernels import depthwise  # Numba takes 0.4 s to import: only when a depthwise layer runs

    return depthwise.depthwise_conv(x, weight, bias, stride, pad, dilation, multiplier)


def _depthwise_numpy(view, weight, multiplier):
    """Sum over kernel offsets of ``patches`` (in ``weight``'s precision): each output channel
    reads input channel ``c_out // multiplier``."""
    n, c, kh, kw, ho, wo = view.shape
    if multiplier > 1:
        view = np.repeat(view, multiplier, axis=1)
    out = np.zeros((n, c * multiplier, ho, wo), np.result_type(np.float32, weight.dtype))
    for i in range(kh):
        for j in range(kw):
            out += weight[:, 0, i, j].reshape(1, -1, 1, 1) * view[:, :, i, j]
    return out
