"""Pooling (MAX, AVE, global) with Caffe's ceil rounding and clip rule."""

import math

import numpy as np

from qcnn.layers.base import Layer, as_pair, register
from qcnn.layers.conv import pad_for_windows


def pool_output_size(size, kernel, stride, pad, ceil_mode=True):
    """Caffe's pooling output size.

    ``ceil((size + 2*pad - kernel) / stride) + 1``, minus one when the last
    window would start in the bottom/right padding (``(out-1)*stride >= size + pad``).
    With ``ceil_mode=False`` (forks' ``round_mode: FLOOR``) floor is used.
    """
    span = size + 2 * pad - kernel
    out = (math.ceil(span / stride) if ceil_mode else span // stride) + 1
    if pad > 0 and (out - 1) * stride >= size + pad:
        out -= 1
    return out


@register
class Pooling(Layer):
    """MAX or AVE pooling over (H, W) windows, or over the whole map (``global_pooling``).

    AVE divides each window's sum by its size clipped to the padded input
    (padding counts, the overhang beyond it does not), as Caffe does. MAX
    ignores padding.
    """

    type = "Pooling"
    defaults = {"pool": "MAX", "kernel_size": None, "stride": [1, 1], "pad": [0, 0],
                "global_pooling": False, "ceil_mode": True}

    def setup(self):
        p = self.params
        self.pool = str(p["pool"]).upper()
        if self.pool not in ("MAX", "AVE"):
            raise ValueError(f"pool method {self.pool} is not supported (MAX or AVE)")
        self.global_pooling = bool(p["global_pooling"])
        self.ceil_mode = bool(p["ceil_mode"])
        self.stride = as_pair(p["stride"], "stride")
        self.pad = as_pair(p["pad"], "pad")
        if self.global_pooling:
            self.kernel = None
            self.stride, self.pad = (1, 1), (0, 0)
        else:
            if p["kernel_size"] is None:
                raise ValueError("kernel_size is required unless global_pooling is set")
            self.kernel = as_pair(p["kernel_size"], "kernel_size")
            if min(self.kernel + self.stride) < 1 or min(self.pad) < 0:
                raise ValueError("kernel and stride must be >= 1 and pad >= 0")
            if self.pad[0] >= self.kernel[0] or self.pad[1] >= self.kernel[1]:
                raise ValueError(f"pad {self.pad} must be smaller than kernel {self.kernel}")
        p.update(pool=self.pool, global_pooling=self.global_pooling, ceil_mode=self.ceil_mode,
                 stride=list(self.stride), pad=list(self.pad),
                 kernel_size=None if self.kernel is None else list(self.kernel))

    def geometry(self, in_size):
        """``(kernel, out_size)`` for an input of spatial size ``in_size`` (H, W)."""
        kernel = tuple(in_size) if self.global_pooling else self.kernel
        out = tuple(pool_output_size(s, k, st, p, self.ceil_mode)
                    for s, k, st, p in zip(in_size, kernel, self.stride, self.pad))
        return kernel, out

    def output_shapes(self, input_shapes):
        shape = input_shapes[0]
        if len(shape) != 4:
            raise self.error(f"needs a 4-D input (N, C, H, W), got shape {shape}")
        kernel, (ho, wo) = self.geometry(shape[2:])
        if ho < 1 or wo < 1 or kernel[0] > shape[2] + 2 * self.pad[0] \
                or kernel[1] > shape[3] + 2 * self.pad[1]:
            raise self.error(f"kernel {kernel} does not fit input {shape[2:]} with pad {self.pad}")
        # Caffe writes -FLT_MAX (MAX) or NaN (AVE) for a window with no input pixel in it.
        for size, k, s, p, out in zip(shape[2:], kernel, self.stride, self.pad, (ho, wo)):
            if (out - 1) * s - p >= size:
                raise self.error(f"the last window (stride {s}, kernel {k}, pad {p}) lies outside "
                                 f"the input of size {size}: no pixel to pool")
        return [shape[:2] + (ho, wo)]

    def forward(self, inputs):
        x = np.asarray(inputs[0], np.float32)
        h, w = x.shape[2:]
        kernel, out_size = self.geometry((h, w))
        if out_size == (1, 1) and kernel == (h, w) and self.pad == (0, 0):
            reduce = np.max if self.pool == "MAX" else np.mean
            return [reduce(x, axis=(2, 3), keepdims=True)]
        # Separable: reduce along the width, then along the height (kh + kw passes, not kh * kw).
        is_max = self.pool == "MAX"
        combine = np.maximum if is_max else np.add
        (kh, kw), (sh, sw), (ho, wo) = kernel, self.stride, out_size
        padded = pad_for_windows(x, kernel, self.stride, self.pad, (1, 1), out_size,
                                 -np.inf if is_max else 0.0)
        rows = padded[:, :, :, 0:sw * (wo - 1) + 1:sw].copy()
        for j in range(1, kw):
            combine(rows, padded[:, :, :, j:j + sw * (wo - 1) + 1:sw], out=rows)
        out = rows[:, :, 0:sh * (ho - 1) + 1:sh].copy()
        for i in range(1, kh):
            combine(out, rows[:, :, i:i + sh * (ho - 1) + 1:sh], out=out)
        if not is_max:
            count_h = self._window_sizes(h, kh, sh, self.pad[0], ho)
            count_w = self._window_sizes(w, kw, sw, self.pad[1], wo)
            out /= np.outer(count_h, count_w).astype(np.float32)
        return [out]

    @staticmethod
    def _window_sizes(size, kernel, stride, pad, out):
        start = np.arange(out) * stride - pad
        return np.minimum(start + kernel, size + pad) - start
