"""Layer implementations (NumPy, float32, NCHW). ``LAYER_TYPES`` maps Caffe type names to classes."""

from qcnn.layers import activation, conv, dense, normalization, pooling, quantized, structure  # noqa: F401
from qcnn.layers.base import LAYER_TYPES, Layer

__all__ = ["LAYER_TYPES", "Layer"]
