"""InnerProduct (fully connected) layer."""

import numpy as np

from qcnn.layers.base import Layer, register


@register
class InnerProduct(Layer):
    """Fully connected layer, Caffe semantics.

    The input is flattened from ``axis`` on (channel-major for NCHW): shape
    (N, C, H, W) with axis 1 -> (N, C*H*W). Weights ``blobs[0]``: float32,
    shape (num_output, K) (or (K, num_output) if ``transpose``); bias
    ``blobs[1]``: (num_output,). Output shape: input shape[:axis] + (num_output,).
    """

    type = "InnerProduct"
    defaults = {"num_output": None, "bias_term": True, "axis": 1, "transpose": False}

    def setup(self):
        p = self.params
        if p["num_output"] is None or int(p["num_output"]) <= 0:
            raise ValueError("num_output must be a positive integer")
        self.num_output = int(p["num_output"])
        self.bias_term = bool(p["bias_term"])
        self.axis = int(p["axis"])
        self.transpose = bool(p["transpose"])
        p.update(num_output=self.num_output, bias_term=self.bias_term, axis=self.axis,
                 transpose=self.transpose)

    def _split(self, shape):
        axis = self.axis + len(shape) if self.axis < 0 else self.axis
        if not 0 <= axis < len(shape):
            raise self.error(f"axis {self.axis} is out of range for input shape {shape}")
        return tuple(shape[:axis]), int(np.prod(shape[axis:]))

    def blob_shapes(self, input_shapes):
        _, k = self._split(input_shapes[0])
        weight = (k, self.num_output) if self.transpose else (self.num_output, k)
        return [weight, (self.num_output,)] if self.bias_term else [weight]

    def output_shapes(self, input_shapes):
        self.check_blobs(input_shapes)
        outer, _ = self._split(input_shapes[0])
        return [outer + (self.num_output,)]

    def macs(self, input_shapes):
        outer, k = self._split(input_shapes[0])
        return int(np.prod(outer[1:])) * k * self.num_output

    def forward(self, inputs):
        x = inputs[0]
        outer, k = self._split(x.shape)
        weight = self.blobs[0]
        x2 = x.reshape(-1, k)
        out = x2 @ (weight if self.transpose else weight.T)
        if self.bias_term:
            out += self.blobs[1]
        return [out.reshape(outer + (self.num_output,))]
