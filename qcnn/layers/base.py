"""The layer interface and the registry of layer types.

A layer maps a list of input arrays (its *bottoms*) to a list of output
arrays (its *tops*), in Caffe's sense: blobs are named, a layer may write
its output under the name of its input (in place). Layers hold their
hyper-parameters in ``params`` (JSON-serialisable, Caffe's names and
defaults) and their weights in ``blobs`` (float32 arrays, Caffe's layouts).
"""

import numpy as np

from qcnn.errors import QcnnError

LAYER_TYPES = {}


def register(cls):
    """Class decorator: make ``cls`` constructible by its ``type`` name."""
    LAYER_TYPES[cls.type] = cls
    return cls


def as_pair(value, name):
    """``3`` or ``[3]`` or ``[3, 5]`` -> ``(3, 3)`` / ``(3, 5)`` (height, width)."""
    values = [int(v) for v in np.atleast_1d(value)]
    if len(values) == 1:
        values *= 2
    if len(values) != 2:
        raise ValueError(f"{name} must have 1 or 2 values, got {values}")
    return tuple(values)


class Layer:
    """Base class of all layers.

    Parameters
    ----------
    name : str
        Unique layer name.
    bottoms, tops : list of str
        Names of the input and output blobs.
    blobs : list of ndarray, optional
        Weights, in the layout the subclass documents (``blob_shapes``).
    **params
        Hyper-parameters; unknown names are an error, missing ones take the
        defaults of the subclass (Caffe's defaults).
    """

    type = None
    defaults = {}
    num_bottoms = (1, 1)  # inclusive range
    num_tops = (1, 1)

    def __init__(self, name, bottoms, tops, blobs=(), **params):
        self.name = str(name)
        self.bottoms = [str(b) for b in bottoms]
        self.tops = [str(t) for t in tops]
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise self.error(f"unknown parameter(s) {', '.join(sorted(unknown))}")
        self.params = {**self.defaults, **params}
        self.blobs = [np.asarray(b) for b in blobs]
        lo, hi = self.num_bottoms
        if not lo <= len(self.bottoms) <= hi:
            raise self.error(f"takes {_count(lo, hi)} input blob(s), got {len(self.bottoms)}")
        lo, hi = self.num_tops
        if not lo <= len(self.tops) <= hi:
            raise self.error(f"produces {_count(lo, hi)} output blob(s), got {len(self.tops)}")
        try:
            self.setup()
        except (ValueError, TypeError) as e:
            raise self.error(str(e)) from None

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r}, {self.bottoms} -> {self.tops})"

    def error(self, what):
        """A :class:`QcnnError` naming this layer."""
        return QcnnError(f"layer '{self.name}' ({self.type}): {what}")

    def setup(self):
        """Validate and normalise ``self.params`` (raise ValueError on bad values)."""

    def blob_shapes(self, input_shapes):
        """The weight shapes this layer expects for these input shapes (none by default)."""
        return []

    def init_blobs(self, input_shapes, rng):
        """Fill ``blobs`` with random weights of the right shapes (architecture-only models).

        The first blob gets He-normal values (fan-in = product of all but its
        first axis), further blobs small normal values; subclasses with
        constrained blobs (statistics, scales) override this.
        """
        shapes = self.blob_shapes(input_shapes)
        blobs = []
        for i, shape in enumerate(shapes):
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            std = np.sqrt(2.0 / fan_in) if i == 0 and len(shape) > 1 else 0.1
            blobs.append(rng.normal(0.0, std, shape).astype(np.float32))
        self.blobs = blobs

    def check_blobs(self, input_shapes):
        """Raise a clear error unless ``blobs`` match :meth:`blob_shapes`."""
        expected = [tuple(s) for s in self.blob_shapes(input_shapes)]
        if not expected and not self.blobs:
            return
        actual = [tuple(b.shape) for b in self.blobs]
        if not actual:
            raise self.error(f"has no weights (needs {len(expected)} blob(s) of shapes {expected})")
        if len(actual) != len(expected):
            raise self.error(f"expected {len(expected)} weight blob(s) {expected}, got "
                             f"{len(actual)} {actual}")
        for i, (a, e) in enumerate(zip(actual, expected)):
            if a != e and (int(np.prod(a)) != int(np.prod(e)) or not _is_legacy(a, e)):
                raise self.error(f"weight blob {i} has shape {a}, but the network needs {e}")
        # Aligned and contiguous: views into a file buffer can be misaligned, and BLAS
        # refuses misaligned arrays (NumPy then falls back to loops 20x slower). Weights are
        # float32; blobs stored bit-packed (integer codes) are uint8.
        self.blobs = [np.require(b.reshape(e), np.uint8 if isinstance(bits, int) else np.float32, ("C", "A"))
                      for b, e, bits in zip(self.blobs, expected, self.blob_storage())]
        for i, b in enumerate(self.blobs):
            if b.dtype == np.float32 and not np.isfinite(b).all():
                raise self.error(f"weight blob {i} contains NaN or infinite values")

    def blob_storage(self):
        """Per blob: bits per value when stored bit-packed (integer codes), "float16" when
        stored in half precision, else None (stored as is)."""
        return [None] * len(self.blobs)

    def storage_bytes(self):
        """Bytes the weights take in a model file."""
        return int(sum(b.nbytes for b in self.blobs))

    def dense_bytes(self, input_shapes):
        """Bytes of the float32 weights this layer stands for (``storage_bytes`` unless compressed)."""
        return self.storage_bytes()

    def dense_macs(self, input_shapes):
        """Multiply-accumulates of the float layer this layer stands for (``macs`` unless compressed)."""
        return self.macs(input_shapes)

    def output_shapes(self, input_shapes):
        """Output shapes (tuples, batch first) for the given input shapes; validates."""
        raise NotImplementedError

    def forward(self, inputs):
        """Compute the outputs (list of float32 arrays) from the inputs."""
        raise NotImplementedError

    def macs(self, input_shapes):
        """Multiply-accumulates of one forward pass for these input shapes."""
        return 0


def _count(lo, hi):
    return str(lo) if lo == hi else f"{lo} or more" if hi > 99 else f"{lo} to {hi}"


def _is_legacy(actual, expected):
    """Old Caffe files pad shapes with leading ones (num, channels, height, width)."""
    strip = lambda shape: tuple(d for d in shape if d != 1)  # noqa: E731
    return strip(actual) == strip(expected)
