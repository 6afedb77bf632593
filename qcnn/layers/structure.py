"""Layers that combine, split or reshape blobs: Eltwise, Concat, Split, Slice, Flatten, Reshape."""

import numpy as np

from qcnn.layers.base import Layer, register


def _axis(axis, ndim, layer):
    axis = int(axis)
    if not -ndim <= axis < ndim:
        raise layer.error(f"axis {axis} is out of range for a {ndim}-D input")
    return axis % ndim


@register
class Eltwise(Layer):
    """Element-wise SUM (with optional per-input ``coeff``), PROD or MAX of equal-shape inputs."""

    type = "Eltwise"
    defaults = {"operation": "SUM", "coeff": None}
    num_bottoms = (2, 1000)

    def setup(self):
        p = self.params
        p["operation"] = str(p["operation"]).upper()
        if p["operation"] not in ("SUM", "PROD", "MAX"):
            raise ValueError(f"operation {p['operation']} is not supported (SUM, PROD or MAX)")
        if p["coeff"] is not None:
            p["coeff"] = [float(c) for c in np.atleast_1d(p["coeff"])] or None
        if p["coeff"] is not None:
            if p["operation"] != "SUM":
                raise ValueError("coeff is only allowed with operation SUM")
            if len(p["coeff"]) != len(self.bottoms):
                raise ValueError(f"{len(p['coeff'])} coefficients for {len(self.bottoms)} inputs")

    def output_shapes(self, input_shapes):
        first = tuple(input_shapes[0])
        for name, shape in zip(self.bottoms, input_shapes):
            if tuple(shape) != first:
                raise self.error(f"input '{name}' has shape {tuple(shape)}, expected {first}")
        return [first]

    def forward(self, inputs):
        op, coeff = self.params["operation"], self.params["coeff"]
        if op == "SUM":
            coeff = coeff or [1.0] * len(inputs)
            out = inputs[0] * np.float32(coeff[0]) if coeff[0] != 1 else inputs[0].copy()
            for x, c in zip(inputs[1:], coeff[1:]):
                out += x if c == 1 else x * np.float32(c)
            return [out]
        combine = np.multiply if op == "PROD" else np.maximum
        out = inputs[0].copy()
        for x in inputs[1:]:
            combine(out, x, out=out)
        return [out]


@register
class Concat(Layer):
    """Concatenate inputs along ``axis`` (default 1, channels)."""

    type = "Concat"
    defaults = {"axis": 1}
    num_bottoms = (1, 1000)

    def output_shapes(self, input_shapes):
        first = tuple(input_shapes[0])
        axis = _axis(self.params["axis"], len(first), self)
        total = 0
        for name, shape in zip(self.bottoms, input_shapes):
            shape = tuple(shape)
            if len(shape) != len(first) or shape[:axis] + shape[axis + 1:] != \
                    first[:axis] + first[axis + 1:]:
                raise self.error(f"input '{name}' has shape {shape}, incompatible with {first} "
                                 f"outside axis {axis}")
            total += shape[axis]
        return [first[:axis] + (total,) + first[axis + 1:]]

    def forward(self, inputs):
        return [np.concatenate(inputs, axis=int(self.params["axis"]))]


@register
class Split(Layer):
    """Copy one blob under several names (Caffe inserts these for fan-out)."""

    type = "Split"
    num_tops = (1, 1000)

    def output_shapes(self, input_shapes):
        return [tuple(input_shapes[0])] * len(self.tops)

    def forward(self, inputs):
        return [inputs[0]] * len(self.tops)


@register
class Slice(Layer):
    """Cut one blob into parts along ``axis`` at ``slice_point`` (or equal parts)."""

    type = "Slice"
    defaults = {"axis": 1, "slice_point": None}
    num_tops = (1, 1000)

    def _points(self, size):
        points = self.params["slice_point"]
        if points:
            points = [int(p) for p in np.atleast_1d(points)]
            if len(points) != len(self.tops) - 1 or points != sorted(points) or \
                    not 0 < points[0] or points[-1] >= size:
                raise self.error(f"slice_point {points} does not cut size {size} into "
                                 f"{len(self.tops)} parts")
            return points
        if size % len(self.tops):
            raise self.error(f"size {size} is not divisible into {len(self.tops)} equal parts")
        step = size // len(self.tops)
        return [step * i for i in range(1, len(self.tops))]

    def output_shapes(self, input_shapes):
        shape = tuple(input_shapes[0])
        axis = _axis(self.params["axis"], len(shape), self)
        bounds = [0] + self._points(shape[axis]) + [shape[axis]]
        return [shape[:axis] + (b - a,) + shape[axis + 1:] for a, b in zip(bounds, bounds[1:])]

    def forward(self, inputs):
        x = inputs[0]
        axis = _axis(self.params["axis"], x.ndim, self)
        return np.split(x, self._points(x.shape[axis]), axis=axis)


@register
class Flatten(Layer):
    """Merge axes ``axis`` .. ``end_axis`` into one: (N, C, H, W) -> (N, C*H*W) by default."""

    type = "Flatten"
    defaults = {"axis": 1, "end_axis": -1}

    def output_shapes(self, input_shapes):
        shape = tuple(input_shapes[0])
        start = _axis(self.params["axis"], len(shape), self)
        end = _axis(self.params["end_axis"], len(shape), self)
        if end < start:
            raise self.error(f"end_axis {end} comes before axis {start}")
        return [shape[:start] + (int(np.prod(shape[start:end + 1])),) + shape[end + 1:]]

    def forward(self, inputs):
        x = inputs[0]
        return [x.reshape(self.output_shapes([x.shape])[0])]


@register
class Reshape(Layer):
    """Caffe Reshape: ``shape`` with 0 (copy the input dimension) and one -1 (infer)."""

    type = "Reshape"
    defaults = {"shape": None, "axis": 0, "num_axes": -1}

    def setup(self):
        if self.params["shape"] is None:
            raise ValueError("shape is required")
        self.params["shape"] = [int(d) for d in np.atleast_1d(self.params["shape"])]
        if self.params["shape"].count(-1) > 1:
            raise ValueError("at most one dimension may be -1")

    def output_shapes(self, input_shapes):
        shape = tuple(input_shapes[0])
        axis = _axis(self.params["axis"], len(shape) + 1, self)
        num_axes = int(self.params["num_axes"])
        end = len(shape) if num_axes == -1 else axis + num_axes
        if end > len(shape):
            raise self.error(f"axis {axis} + num_axes {num_axes} exceeds the input's {len(shape)} axes")
        new = [shape[axis + i] if d == 0 else d for i, d in enumerate(self.params["shape"])]
        out = list(shape[:axis]) + new + list(shape[end:])
        total = int(np.prod(shape))
        if -1 in out:
            known = int(np.prod([d for d in out if d != -1]))
            if known == 0 or total % known:
                raise self.error(f"cannot reshape {shape} to {self.params['shape']}")
            out[out.index(-1)] = total // known
        if int(np.prod(out)) != total:
            raise self.error(f"cannot reshape {shape} ({total} values) to {tuple(out)}")
        return [tuple(out)]

    def forward(self, inputs):
        x = inputs[0]
        return [x.reshape(self.output_shapes([x.shape])[0])]
