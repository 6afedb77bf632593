"""Whole-network product quantization: replace conv and inner-product layers by quantized ones.

Settings follow the paper's defaults (Q-CNN, section 2): convolutions
``subdim`` (C'_s) 8 with K = 128 codewords, inner products ``subdim`` 4 with
K = 32; a convolution with fewer input channels per group than its
``subdim`` (the first RGB layer, a depthwise layer) uses one subspace of all
its channels. Layers too small to gain (codebooks larger than the float
weights, e.g. a 10-way classifier) stay float. Per-layer overrides and skips
are allowed. This module does
plain k-means on the weights (no calibration data).
"""

import time

import numpy as np

from qcnn.errors import QcnnError
from qcnn.graph import Net
from qcnn.layers.conv import Convolution
from qcnn.layers.dense import InnerProduct
from qcnn.layers.quantized import QuantizedConvolution, QuantizedInnerProduct
from qcnn.quantization.pq import decode, num_subspaces, quantize_weight, storage_bytes

_QUANTIZED = {Convolution: QuantizedConvolution, InnerProduct: QuantizedInnerProduct}


def layer_settings(layer, conv=(8, 128), fc=(4, 32), overrides=None, shared=True):
    """``(subdim, num_codewords)`` for ``layer``, or None if it is not quantized.

    By default conv and inner-product layers are quantized unless that would
    not make them smaller; an override always applies.

    Parameters
    ----------
    layer : Layer
    conv, fc : (int, int)
        Defaults for Convolution and InnerProduct layers.
    overrides : dict, optional
        Layer name -> ``(subdim, num_codewords)``, or None to leave that layer float.
    shared : bool
        Codebooks shared by the groups of a grouped convolution.
    """
    overrides = overrides or {}
    if type(layer) not in _QUANTIZED:
        if layer.name in overrides and overrides[layer.name] is not None:
            raise QcnnError(f"layer '{layer.name}' ({layer.type}) cannot be quantized")
        return None
    if layer.name in overrides:
        return None if overrides[layer.name] is None else tuple(int(v) for v in overrides[layer.name])
    group = getattr(layer, "group", 1)
    weight_shape = layer.blobs[0].shape if layer.blobs[0].ndim == 4 else layer.blobs[0].shape + (1, 1)
    subdim, k = conv if isinstance(layer, Convolution) else fc
    subdim = min(subdim, weight_shape[1])  # e.g. an RGB first layer: one subspace of 3 channels
    if storage_bytes(weight_shape, group, subdim, k, shared) >= 4 * int(np.prod(weight_shape)):
        return None  # too small a layer: the codebooks alone outweigh its float weights
    return (subdim, k)


def quantize_net(net, conv=(8, 128), fc=(4, 32), overrides=None, shared_codebook=True, seed=0,
                 kernel="auto", progress=None, **kmeans_options):
    """Product-quantize the conv and inner-product layers of ``net`` (k-means on the weights).

    Parameters
    ----------
    net : Net
        A float network (BatchNorm already folded, for best compression).
    conv, fc, overrides
        See :func:`layer_settings`.
    shared_codebook : bool
        One codebook per subspace for all groups of a grouped convolution.
    seed : int
        k-means seed (layer i uses ``seed + i``).
    kernel : {"auto", "lut", "dense"}
        Stored in the quantized layers: how they run.
    progress : callable, optional
        Called with each finished report row.

    Returns
    -------
    quantized : Net
    report : list of dict
        Per quantized layer: ``name``, ``type``, ``subdim``, ``num_codewords``,
        ``subspaces``, ``bytes_before``, ``bytes_after``, ``compression``,
        ``macs_before``, ``macs_after``, ``weight_error`` (relative Frobenius
        error of the decoded weights) and ``seconds``.
    """
    overrides = dict(overrides or {})
    unknown = set(overrides) - {layer.name for layer in net.layers}
    if unknown:
        raise QcnnError(f"no layer named {', '.join(sorted(unknown))} in network '{net.name}'")
    layers, report = [], []
    for index, layer in enumerate(net.layers):
        settings = layer_settings(layer, conv, fc, overrides, shared_codebook)
        if settings is None:
            layers.append(layer)
            continue
        start = time.perf_counter()
        subdim, k = settings
        weight = layer.blobs[0]
        group = getattr(layer, "group", 1)
        codebooks, codes = quantize_weight(weight, group, subdim, k, shared_codebook, seed + index,
                                           **kmeans_options)
        params = {**layer.params, "subdim": subdim, "num_codewords": k,
                  "shared_codebook": shared_codebook, "kernel": kernel}
        new = _QUANTIZED[type(layer)](layer.name, layer.bottoms, layer.tops,
                                      [codebooks, codes] + layer.blobs[1:], **params)
        layers.append(new)
        shapes = [(1,) + tuple(s[1:]) for s in layer.input_shapes]
        channels = weight.shape[1]
        decoded = decode(codebooks, codes, channels).reshape(weight.shape)
        row = {"name": layer.name, "type": layer.type, "subdim": subdim, "num_codewords": k,
               "subspaces": num_subspaces(channels, subdim),
               "bytes_before": layer.storage_bytes(), "macs_before": int(layer.macs(shapes)),
               "weight_error": float(np.linalg.norm(decoded - weight) / max(np.linalg.norm(weight), 1e-30)),
               "seconds": time.perf_counter() - start}
        report.append(row)
        if progress is not None:
            progress(row)
    quantized = Net(net.inputs, layers, net.name, net.metadata)
    for row in report:
        layer = quantized.layer(row["name"])
        shapes = [(1,) + tuple(s[1:]) for s in layer.input_shapes]
        row.update(bytes_after=layer.storage_bytes(), macs_after=int(layer.macs(shapes)),
                   compression=row["bytes_before"] / max(layer.storage_bytes(), 1))
    return quantized, report
