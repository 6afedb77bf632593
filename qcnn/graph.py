"""The network: a graph of layers over named blobs, run forward in NumPy.

Blobs follow Caffe's rules: a layer reads its ``bottoms`` and writes its
``tops``; writing a name that already exists (an in-place layer such as
ReLU) replaces that blob. The network's outputs are the blobs no later layer
reads. Layers run in the order given, which must be a topological order.
"""

from collections import Counter

import numpy as np

from qcnn.errors import QcnnError
from qcnn.layers import Layer
from qcnn.layers.conv import Convolution
from qcnn.layers.dense import InnerProduct
from qcnn.layers.normalization import ChannelAffine


class Net:
    """A feed-forward network of named blobs.

    Parameters
    ----------
    inputs : dict of str -> tuple of int
        Input blob names and shapes, batch first, e.g. ``{"data": (1, 3, 224, 224)}``.
    layers : list of Layer
        In execution order.
    name : str
    metadata : dict, optional
        JSON-serialisable extras stored with the model: ``preprocess``
        (image preprocessing, see :mod:`qcnn.io.image`) and ``labels``.
    init : numpy.random.Generator, optional
        Fill layers that have no weights with random ones (architecture-only
        networks for shape checks and benchmarks); without it, missing
        weights are an error.

    Attributes
    ----------
    outputs : list of str
        Blobs no later layer reads (Caffe's network outputs), in order of production.
    blob_shapes : dict of str -> tuple
        Final shape of every blob for the declared input shapes.
    """

    def __init__(self, inputs, layers, name="", metadata=None, init=None):
        self.inputs = {str(k): tuple(int(d) for d in v) for k, v in inputs.items()}
        self.layers = list(layers)
        self.name = name
        self.metadata = dict(metadata or {})
        if not self.inputs:
            raise QcnnError(f"network '{name}' declares no input")
        self._analyse(init)

    def _analyse(self, init):
        shapes = dict(self.inputs)
        seen = set()
        available = list(self.inputs)
        for layer in self.layers:
            if not isinstance(layer, Layer):
                raise TypeError(f"not a Layer: {layer!r}")
            if layer.name in seen:
                raise QcnnError(f"layer name '{layer.name}' is used twice")
            seen.add(layer.name)
            for b in layer.bottoms:
                if b not in shapes:
                    raise layer.error(f"input blob '{b}' is not produced by an earlier layer "
                                      "or declared as a network input")
            layer.input_shapes = [shapes[b] for b in layer.bottoms]
            if init is not None and not layer.blobs:
                layer.init_blobs(layer.input_shapes, init)
            layer.output_shapes_ = [tuple(s) for s in layer.output_shapes(layer.input_shapes)]
            for b in layer.bottoms:
                if b in available:
                    available.remove(b)
            for t, s in zip(layer.tops, layer.output_shapes_):
                shapes[t] = s
                if t not in available:
                    available.append(t)
        self.blob_shapes = shapes
        self.outputs = available
        self._last_writer = {}
        for i, layer in enumerate(self.layers):
            for t in layer.tops:
                self._last_writer[t] = i

    def __repr__(self):
        return f"Net({self.name!r}, {len(self.layers)} layers, inputs={self.inputs}, outputs={self.outputs})"

    def layer(self, name):
        """The layer called ``name``."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise QcnnError(f"no layer named '{name}' in network '{self.name}'")

    # ------------------------------------------------------------ running

    def _feeds(self, x):
        if not isinstance(x, dict):
            if len(self.inputs) != 1:
                raise QcnnError(f"network has inputs {list(self.inputs)}: pass a dict")
            x = {next(iter(self.inputs)): x}
        feeds = {}
        for name, shape in self.inputs.items():
            if name not in x:
                raise QcnnError(f"missing network input '{name}'")
            value = np.asarray(x[name])
            if value.dtype.kind not in "fiu":
                raise QcnnError(f"input '{name}' must be numeric, got dtype {value.dtype}")
            value = value.astype(np.float32, copy=False)
            if value.ndim != len(shape) or value.shape[1:] != shape[1:]:
                want = ("N",) + shape[1:]
                raise QcnnError(f"input '{name}' must have shape ({', '.join(map(str, want))}), "
                                f"got {value.shape}")
            feeds[name] = value
        unknown = set(x) - set(self.inputs)
        if unknown:
            raise QcnnError(f"unknown network input(s) {sorted(unknown)}; inputs are {list(self.inputs)}")
        return feeds

    def trace(self, x, until=None):
        """Run layer by layer, yielding each layer with its actual inputs and outputs.

        Parameters
        ----------
        x : ndarray (N, C, H, W) or dict of str -> ndarray
            Network input(s); converted to float32.
        until : int, optional
            Index of the last layer to run (default: all).

        Yields
        ------
        layer : Layer
        inputs, outputs : list of ndarray
            What the layer read and wrote (float32). Earlier arrays are not
            modified by later layers, so they can be kept.
        """
        blobs = self._feeds(x)
        stop = len(self.layers) - 1 if until is None else until
        for layer in self.layers[:stop + 1]:
            inputs = [blobs[b] for b in layer.bottoms]
            outputs = layer.forward(inputs)
            for t, value in zip(layer.tops, outputs):
                blobs[t] = value
            yield layer, inputs, outputs

    def forward(self, x, outputs=None):
        """Run the network and return the requested blobs.

        Parameters
        ----------
        x : ndarray, shape (N, C, H, W), or dict of input name -> ndarray
            The batch; any numeric dtype, converted to float32.
        outputs : str or list of str, optional
            Blob names to return (default: the network outputs). Layers past
            the last one needed are not run. An in-place blob is returned as
            its last writer leaves it.

        Returns
        -------
        dict of str -> ndarray (float32)
        """
        wanted = self.outputs if outputs is None else [outputs] if isinstance(outputs, str) else list(outputs)
        for name in wanted:
            if name not in self.blob_shapes:
                raise QcnnError(f"no blob named '{name}' in network '{self.name}'")
        stop = max((self._last_writer.get(name, -1) for name in wanted), default=-1)
        result = {name: v for name, v in self._feeds(x).items() if name in wanted}
        for layer, _, outs in self.trace(x, until=stop):
            for t, value in zip(layer.tops, outs):
                if t in wanted:
                    result[t] = value
        return {name: result[name] for name in wanted}

    # ------------------------------------------------------------ statistics

    def summary(self):
        """Per-layer statistics for batch size 1.

        Returns
        -------
        list of dict
            ``name``, ``type``, ``bottoms``, ``tops``, ``output_shapes`` (batch 1),
            ``params`` (stored values), ``bytes`` (weight storage), ``macs``, and
            ``dense_bytes``/``dense_macs``: the same for the float layer a
            quantized layer replaces (equal to bytes/macs for float layers).
        """
        rows = []
        for layer in self.layers:
            shapes = [(1,) + tuple(s[1:]) for s in layer.input_shapes]
            rows.append({
                "name": layer.name, "type": layer.type,
                "bottoms": layer.bottoms, "tops": layer.tops,
                "output_shapes": [[1] + list(s[1:]) for s in layer.output_shapes_],
                "params": int(sum(b.size for b in layer.blobs)),
                "bytes": layer.storage_bytes(),
                "macs": int(layer.macs(shapes)),
                "dense_bytes": int(layer.dense_bytes(shapes)),
                "dense_macs": int(layer.dense_macs(shapes)),
            })
        return rows

    # ------------------------------------------------------------ rewriting

    def fold_batchnorm(self):
        """A copy with BatchNorm/Scale/Bias folded into the preceding conv or inner product.

        A per-channel affine layer ``y = a * x + b`` whose input was written by
        a Convolution or InnerProduct (axis 1) and is read by nothing else
        becomes part of that layer's weights: ``W' = a W``, ``bias' = a bias + b``.
        Affine layers that cannot be folded stay as layers. Outputs are equal
        up to float32 rounding.

        Returns
        -------
        Net
        """
        readers = Counter()  # (blob, index of the layer that wrote this version) -> readers
        writer = {name: -1 for name in self.inputs}
        for i, layer in enumerate(self.layers):
            for b in layer.bottoms:
                readers[b, writer[b]] += 1
            for t in layer.tops:
                writer[t] = i
        for name in self.outputs:
            readers[name, writer[name]] += 1

        layers, folded_into = [], {}  # folded_into: original index -> position in `layers`
        writer = {name: -1 for name in self.inputs}
        for i, layer in enumerate(self.layers):
            if isinstance(layer, ChannelAffine):
                source = writer[layer.bottoms[0]]
                target = folded_into.get(source)
                if target is not None and readers[layer.bottoms[0], source] == 1:
                    layers[target] = _fold_affine(layers[target], layer)
                    folded_into[i] = target
                    writer[layer.tops[0]] = i
                    continue
            if isinstance(layer, Convolution) or (isinstance(layer, InnerProduct) and layer.axis == 1):
                folded_into[i] = len(layers)
            layers.append(layer)
            for t in layer.tops:
                writer[t] = i
        return Net(self.inputs, layers, self.name, self.metadata)


def _fold_affine(layer, affine):
    """``layer`` (Convolution/InnerProduct) followed by ``affine``, as one new layer."""
    a, b = affine.affine()
    weight = layer.blobs[0]
    if isinstance(layer, InnerProduct) and layer.transpose:
        weight = weight * a[None, :]
    else:
        weight = weight * a.reshape((-1,) + (1,) * (weight.ndim - 1))
    bias = layer.blobs[1] * a + b if layer.bias_term else b.copy()
    params = dict(layer.params, bias_term=True)
    return type(layer)(layer.name, layer.bottoms, affine.tops, [weight, bias], **params)
