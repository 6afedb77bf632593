"""Element-wise activations, Dropout (identity at test time) and Softmax."""

import numpy as np

from qcnn.layers.base import Layer, register


class _Elementwise(Layer):
    """A layer whose single output has its input's shape."""

    def output_shapes(self, input_shapes):
        self.check_blobs(input_shapes)
        return [tuple(input_shapes[0])]


@register
class ReLU(_Elementwise):
    """``max(x, 0) + negative_slope * min(x, 0)`` (leaky when the slope is not 0)."""

    type = "ReLU"
    defaults = {"negative_slope": 0.0}

    def forward(self, inputs):
        x = inputs[0]
        slope = float(self.params["negative_slope"])
        if slope == 0.0:
            return [np.maximum(x, np.float32(0))]
        return [np.where(x > 0, x, x * np.float32(slope))]


@register
class Clip(_Elementwise):
    """``min(max(x, min), max)``."""

    type = "Clip"
    defaults = {"min": None, "max": None}

    def setup(self):
        if self.params["min"] is None or self.params["max"] is None:
            raise ValueError("both min and max are required")
        if float(self.params["min"]) > float(self.params["max"]):
            raise ValueError(f"min {self.params['min']} is greater than max {self.params['max']}")

    def forward(self, inputs):
        return [np.clip(inputs[0], np.float32(self.params["min"]), np.float32(self.params["max"]))]


@register
class ReLU6(Clip):
    """``min(max(x, 0), 6)`` (MobileNet-style nets)."""

    type = "ReLU6"
    defaults = {"min": 0.0, "max": 6.0}


@register
class Sigmoid(_Elementwise):
    """``1 / (1 + exp(-x))``."""

    type = "Sigmoid"

    def forward(self, inputs):
        x = inputs[0]
        return [(0.5 * np.tanh(0.5 * x) + 0.5).astype(np.float32)]


@register
class TanH(_Elementwise):
    """``tanh(x)``."""

    type = "TanH"

    def forward(self, inputs):
        return [np.tanh(inputs[0])]


@register
class Power(_Elementwise):
    """``(shift + scale * x) ** power``."""

    type = "Power"
    defaults = {"power": 1.0, "scale": 1.0, "shift": 0.0}

    def forward(self, inputs):
        p = self.params
        y = np.float32(p["shift"]) + np.float32(p["scale"]) * inputs[0]
        return [y if p["power"] == 1 else np.power(y, np.float32(p["power"]))]


@register
class ELU(_Elementwise):
    """``x`` if ``x > 0`` else ``alpha * (exp(x) - 1)``."""

    type = "ELU"
    defaults = {"alpha": 1.0}

    def forward(self, inputs):
        x = inputs[0]
        return [np.where(x > 0, x, np.float32(self.params["alpha"]) * np.expm1(np.minimum(x, 0)))]


@register
class PReLU(_Elementwise):
    """Leaky ReLU with a learned slope per channel (``blobs[0]``: (C,)) or shared ((1,))."""

    type = "PReLU"
    defaults = {"channel_shared": False}

    def blob_shapes(self, input_shapes):
        return [(1,) if self.params["channel_shared"] else (input_shapes[0][1],)]

    def forward(self, inputs):
        x = inputs[0]
        slope = self.blobs[0].reshape((1, -1) + (1,) * (x.ndim - 2))
        return [np.where(x > 0, x, x * slope)]


@register
class Dropout(_Elementwise):
    """Identity: Caffe scales at training time, so inference passes values through."""

    type = "Dropout"
    defaults = {"dropout_ratio": 0.5}

    def forward(self, inputs):
        return [inputs[0]]


@register
class Softmax(_Elementwise):
    """Softmax along ``axis`` (default 1, the channel axis), numerically stable."""

    type = "Softmax"
    defaults = {"axis": 1}

    def output_shapes(self, input_shapes):
        ndim = len(input_shapes[0])
        if not -ndim <= int(self.params["axis"]) < ndim:
            raise self.error(f"axis {self.params['axis']} is out of range for shape {input_shapes[0]}")
        return [tuple(input_shapes[0])]

    def forward(self, inputs):
        axis = int(self.params["axis"])
        x = inputs[0]
        e = np.exp(x - x.max(axis=axis, keepdims=True))
        return [e / e.sum(axis=axis, keepdims=True)]
