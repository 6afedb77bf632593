"""Whole-network product quantization: replace conv and inner-product layers by quantized ones.

Settings follow the paper's defaults (Q-CNN, section 2): convolutions
``subdim`` (C'_s) 8 with K = 128 codewords, inner products ``subdim`` 4 with
K = 32; a convolution with fewer input channels per group than its
``subdim`` (the first RGB layer, a depthwise layer) uses one subspace of all
its channels. Layers too small to gain (codebooks larger than the float
weights, e.g. a 10-way classifier) stay float. Per-layer overrides and skips
are allowed. Layers are quantized by k-means on their weights and, given
unlabeled calibration inputs, error-corrected in network order, optionally
with a weight prior (``ec_options={"prior": alpha}``) that keeps them from
over-fitting few calibration images. With ``channel_scales`` each layer's
output channels are normalised before quantization and the quantized layer
keeps their scales (BatchNorm folding leaves them very unequal).
"""

import time

import numpy as np

from qcnn.errors import QcnnError
from qcnn.graph import Net
from qcnn.layers.conv import Convolution, patches
from qcnn.layers.dense import InnerProduct
from qcnn.layers.quantized import QuantizedConvolution, QuantizedInnerProduct
from qcnn.quantization.pq import decode, num_subspaces, quantize_weight, storage_bytes

_QUANTIZED = {Convolution: QuantizedConvolution, InnerProduct: QuantizedInnerProduct}
# Error correction keeps G * L^2 float64 statistics per layer (AlexNet fc6: 0.7 GB, VGG fc6: 5 GB).
MAX_EC_GRAM_BYTES = 4 * 2**30


def is_depthwise(layer):
    """A grouped convolution with one input channel per group."""
    return isinstance(layer, Convolution) and layer.group > 1 and layer.blobs[0].shape[1] == 1


def layer_settings(layer, conv=(8, 128), fc=(4, 32), overrides=None, shared=True, depthwise=(8, 128),
                   codebook_dtype="float32"):
    """``(subdim, num_codewords)`` for ``layer``, or None if it is not quantized.

    By default conv and inner-product layers are quantized unless that would
    not make them smaller; an override always applies. ``subdim`` is capped
    at the input channels per group (e.g. an RGB first layer: one subspace of
    3 channels; a depthwise layer: scalar codebooks).

    Parameters
    ----------
    layer : Layer
    conv, fc, depthwise : (int, int) or None
        Settings of Convolution, InnerProduct and depthwise Convolution
        layers; None leaves that kind float.
    overrides : dict, optional
        Layer name -> ``(subdim, num_codewords)``, or None to leave that layer float.
    shared : bool
        Codebooks shared by the groups of a grouped convolution.
    codebook_dtype : {"float32", "float16"}
        How the codebooks would be stored (their bytes decide whether a layer gains).
    """
    overrides = overrides or {}
    if type(layer) not in _QUANTIZED:
        if layer.name in overrides and overrides[layer.name] is not None:
            raise QcnnError(f"layer '{layer.name}' ({layer.type}) cannot be quantized")
        return None
    if layer.name in overrides:
        return None if overrides[layer.name] is None else tuple(int(v) for v in overrides[layer.name])
    settings = depthwise if is_depthwise(layer) else conv if isinstance(layer, Convolution) else fc
    if settings is None:
        return None
    group = getattr(layer, "group", 1)
    weight_shape = layer.blobs[0].shape if layer.blobs[0].ndim == 4 else layer.blobs[0].shape + (1, 1)
    if isinstance(layer, InnerProduct) and layer.transpose:
        weight_shape = weight_shape[1::-1] + (1, 1)
    subdim, k = settings
    subdim = min(subdim, weight_shape[1])
    codebook_bytes = 2 if codebook_dtype == "float16" else 4
    if storage_bytes(weight_shape, group, subdim, k, shared, codebook_bytes) >= 4 * int(np.prod(weight_shape)):
        return None  # too small a layer: the codebooks alone outweigh its float weights
    return (subdim, k)


def quantize_net(net, conv=(8, 128), fc=(4, 32), overrides=None, shared_codebook=True, seed=0,
                 kernel="auto", depthwise=(8, 128), codebook_dtype="float32", calibration=None,
                 error_correction=True, max_samples=8192,
                 max_patch_values=2 ** 26, ec_options=None, channel_scales=False, progress=None,
                 **kmeans_options):
    """Product-quantize the conv and inner-product layers of ``net``, in order.

    Each layer starts from k-means on its weights. With ``calibration`` data
    and ``error_correction``, its codebooks and codes are then fitted to the
    layer's response (Q-CNN's error correction): the layer's input ``S`` comes
    from the network quantized so far, its target ``T`` from the original
    float network, so errors of earlier layers are corrected rather than
    accumulated.

    Parameters
    ----------
    net : Net
        A float network (BatchNorm already folded, for best compression).
    conv, fc, depthwise, overrides
        See :func:`layer_settings`.
    shared_codebook : bool
        One codebook per subspace for all groups of a grouped convolution.
    seed : int
        Seed of k-means and of the sampled positions (layer i uses ``seed + i``).
    kernel : {"auto", "lut", "dense"}
        Stored in the quantized layers: how they run.
    codebook_dtype : {"float32", "float16"}
        Precision of the stored codebooks; float16 halves their bytes (the codebooks
        are rounded to it before error correction's result is used, so the model in
        memory equals the saved one).
    calibration : ndarray (N, C, H, W) or dict of str -> ndarray, optional
        Unlabeled network inputs, preprocessed.
    error_correction : bool
        Fit to the responses on ``calibration`` (without it the data only
        measures the response error).
    max_samples : int
        Rows of the least-squares problem per layer: sampled output positions
        (conv) or inputs (inner product).
    max_patch_values : int
        Fewer rows when ``rows * C_in * kh * kw`` would exceed this, which bounds
        a layer's sampled inputs to ``4 * max_patch_values`` bytes (256 MiB).
    ec_options : dict, optional
        Passed to :func:`qcnn.quantization.ec.error_correct` (``max_iter``, ``tol``,
        ``ridge``, ``prior``). With ``prior`` alpha > 0 each layer's EC also
        penalises ``mu ||W - W_q||^2`` (W the layer's float weights,
        ``mu = alpha trace(S^T S) / L``): a pull toward the weights that
        generalises better when the calibration set is small.
    channel_scales : bool
        Quantize each layer's weights divided by their output channel's largest
        magnitude ``s_c``; the quantized layer keeps the scales (C_t float32
        values, ``W_q = diag(s) D B``). Codebooks are shared by all output channels,
        whose scales differ by an order of magnitude once BatchNorm is folded
        in; normalised, every channel gets the codebook's full resolution.
        Error correction then fits ``T / s`` (each channel's relative error).
    progress : callable, optional
        ``progress(event, info)``: ``"layer"`` when a layer starts (``name``,
        ``position``, ``count``), ``"iteration"`` after each error-correction
        iteration (``name``, ``iteration``, ``max_iter``, ``objective``) and
        ``"done"`` with the layer's report row.
    **kmeans_options
        Passed to :func:`qcnn.quantization.kmeans.kmeans`.

    Returns
    -------
    quantized : Net
    report : list of dict
        Per quantized layer: ``name``, ``type``, ``subdim``, ``num_codewords``,
        ``subspaces``, ``bytes_before``, ``bytes_after``, ``compression``,
        ``macs_before``, ``macs_after``, ``weight_error`` (relative Frobenius
        error of the decoded weights), ``samples`` and, with calibration data,
        ``response_error_kmeans`` / ``response_error`` (relative response error
        ``||T - W_q S|| / ||T||`` on the sampled rows before and after error
        correction), ``iterations`` and ``seconds``.
    """
    overrides = dict(overrides or {})
    unknown = set(overrides) - {layer.name for layer in net.layers}
    if unknown:
        raise QcnnError(f"no layer named {', '.join(sorted(unknown))} in network '{net.name}'")
    plan = [layer_settings(layer, conv, fc, overrides, shared_codebook, depthwise, codebook_dtype)
            for layer in net.layers]
    count = sum(s is not None for s in plan)
    layers, report = [], []
    for index, (layer, settings, f_in, q_in, f_out) in enumerate(_walk(net, plan, calibration, layers)):
        if settings is None:
            layers.append(layer)
            continue
        if progress is not None:
            progress("layer", {"name": layer.name, "position": len(report) + 1, "count": count})
        start = time.perf_counter()
        scales = _channel_scales(_float_weight(layer)) if channel_scales else None
        source = layer if scales is None else _scaled(layer, 1 / scales)
        new, row = _quantize_layer(source, settings, shared_codebook, kernel, codebook_dtype, seed + index,
                                   kmeans_options)
        row["bytes_before"] = layer.storage_bytes()
        if calibration is not None:
            rng = np.random.default_rng(seed + index)
            target = f_out[0]
            if scales is not None:  # error correction fits the response divided by the scales
                axis = 1 if isinstance(layer, Convolution) else target.ndim - 1
                target = target / scales.reshape((-1,) + (1,) * (target.ndim - 1 - axis))
            inputs, targets = _samples(new, q_in[0], target, rng, max_samples, max_patch_values)
            row.update(_correct(new, inputs, targets, error_correction, ec_options, progress,
                                weight=_float_weight(source)))
        if scales is not None:
            new = _with_scales(new, scales, layer)
        row["seconds"] = time.perf_counter() - start
        layers.append(new)
        report.append(row)
        if progress is not None:
            progress("done", row)
    quantized = Net(net.inputs, layers, net.name, net.metadata)
    for row in report:
        layer = quantized.layer(row["name"])
        shapes = [(1,) + tuple(s[1:]) for s in layer.input_shapes]
        after = layer.storage_bytes()
        row.update(bytes_after=after, macs_after=int(layer.macs(shapes)),
                   compression=row["bytes_before"] / max(after, 1))
    return quantized, report


def _channel_scales(weight):
    """Largest magnitude of each output channel's weights, float32 (C_t,); 1 for all-zero channels."""
    peak = np.abs(weight.reshape(weight.shape[0], -1)).max(axis=1)
    return np.where(peak > 0, peak, 1).astype(np.float32)


def _scaled(layer, factors):
    """A copy of conv/inner-product ``layer``, each output channel's weights and bias times ``factors``."""
    blobs = list(layer.blobs)
    weight = blobs[0]
    if isinstance(layer, InnerProduct) and layer.transpose:
        blobs[0] = (weight * factors[None, :]).astype(np.float32)
    else:
        blobs[0] = (weight * factors.reshape((-1,) + (1,) * (weight.ndim - 1))).astype(np.float32)
    if len(blobs) > 1:
        blobs[1] = (blobs[1] * factors).astype(np.float32)
    copy = type(layer)(layer.name, layer.bottoms, layer.tops, blobs, **layer.params)
    copy.input_shapes, copy.output_shapes_ = layer.input_shapes, layer.output_shapes_
    return copy


def _with_scales(normalised, scales, original):
    """``normalised`` (quantized from ``original`` divided by ``scales``) as a layer holding the
    scales (``channel_scales``), with ``original``'s float bias: the same function as the
    normalised layer followed by a per-channel product."""
    params = dict(normalised.params, channel_scales=True)
    bias = [original.blobs[1]] if normalised.bias_term else []
    scaled = type(normalised)(normalised.name, normalised.bottoms, normalised.tops,
                              normalised.blobs[:2] + bias + [scales], **params)
    scaled.input_shapes, scaled.output_shapes_ = normalised.input_shapes, normalised.output_shapes_
    return scaled


def _walk(net, plan, calibration, done):
    """Yield ``(layer, settings, float_inputs, quantized_inputs, float_outputs)`` in order.

    With calibration data, two copies of the activations advance together:
    the float network's and the quantized network's, whose layers so far are
    ``done`` (the caller appends each layer, quantized or not, before the
    next step). Blobs are freed after their last reader. Without data the
    arrays are None.
    """
    if calibration is None:
        for layer, settings in zip(net.layers, plan):
            yield layer, settings, None, None, None
        return
    float_blobs = net._feeds(calibration)
    quant_blobs = dict(float_blobs)
    last_read = {}
    for i, layer in enumerate(net.layers):
        for b in layer.bottoms:
            last_read[b] = i
    for i, (layer, settings) in enumerate(zip(net.layers, plan)):
        f_in = [float_blobs[b] for b in layer.bottoms]
        q_in = [quant_blobs[b] for b in layer.bottoms]
        f_out = _forward_in_chunks(layer, f_in)
        yield layer, settings, f_in, q_in, f_out
        same = all(q is f for q, f in zip(q_in, f_in))  # nothing quantized upstream yet
        q_out = f_out if same and done[-1] is layer else _forward_in_chunks(done[-1], q_in)
        for t, f, q in zip(layer.tops, f_out, q_out):
            float_blobs[t], quant_blobs[t] = f, q
        for b in set(layer.bottoms) | set(layer.tops):
            if last_read.get(b, -1) <= i:
                float_blobs.pop(b, None)
                quant_blobs.pop(b, None)


def _forward_in_chunks(layer, inputs, chunk=32):
    """``layer.forward`` over the batch in chunks, so im2col buffers stay small."""
    n = len(inputs[0]) if inputs else 0
    if n <= chunk or not isinstance(layer, (Convolution, InnerProduct)):
        return layer.forward(inputs)
    parts = [layer.forward([x[i:i + chunk] for x in inputs]) for i in range(0, n, chunk)]
    return [np.concatenate(outs) for outs in zip(*parts)]


def _quantize_layer(layer, settings, shared_codebook, kernel, codebook_dtype, seed, kmeans_options):
    """k-means product quantization of one layer: the new layer and its report row."""
    subdim, k = settings
    weight = layer.blobs[0]
    params = {**layer.params, "subdim": subdim, "num_codewords": k,
              "shared_codebook": shared_codebook, "kernel": kernel, "codebook_dtype": codebook_dtype}
    if isinstance(layer, InnerProduct) and layer.transpose:
        weight, params["transpose"] = weight.T, False
    group = getattr(layer, "group", 1)
    codebooks, codes = quantize_weight(weight, group, subdim, k, shared_codebook, seed, **kmeans_options)
    codebooks = _rounded(codebooks, codebook_dtype)
    new = _QUANTIZED[type(layer)](layer.name, layer.bottoms, layer.tops,
                                  [codebooks, codes] + layer.blobs[1:], **params)
    new.input_shapes, new.output_shapes_ = layer.input_shapes, layer.output_shapes_
    new.check_blobs(new.input_shapes)
    shapes = [(1,) + tuple(s[1:]) for s in layer.input_shapes]
    channels = weight.shape[1]
    row = {"name": layer.name, "type": layer.type, "subdim": subdim, "num_codewords": k,
           "subspaces": num_subspaces(channels, subdim),
           "bytes_before": layer.storage_bytes(), "macs_before": int(layer.macs(shapes)),
           "weight_error": _relative(decode(codebooks, codes, channels).reshape(weight.shape) - weight, weight)}
    return new, row


def _rounded(codebooks, dtype):
    """Codebooks as float32 holding values exactly representable in ``dtype`` (how they are stored)."""
    return codebooks if dtype == "float32" else codebooks.astype(dtype).astype(np.float32)


def _relative(error, reference):
    return float(np.linalg.norm(error) / max(float(np.linalg.norm(reference)), 1e-30))


def _samples(layer, x, target, rng, max_samples, max_patch_values):
    """Sampled rows of a layer's least-squares problem.

    Parameters
    ----------
    layer : QuantizedConvolution or QuantizedInnerProduct
    x : ndarray float32
        The layer's input from the quantized network, (N, C, H, W) or (N, ...).
    target : ndarray float32
        The float layer's output for the float network's input.

    Returns
    -------
    inputs : float32 (G, S, P, C_s)
        S sampled rows; P = kh * kw kernel positions; C_s input channels per group.
    targets : float32 (S, C_t)
        The float response without bias.
    """
    if isinstance(layer, Convolution):
        group, (kh, kw) = layer.group, layer.kernel
        n, c, ho, wo = target.shape
        rows = _choose_rows(n * ho * wo, c_in_values=x.shape[1] * kh * kw, rng=rng,
                            max_samples=max_samples, max_patch_values=max_patch_values)
        ni, yi, xi = np.unravel_index(rows, (n, ho, wo))
        view = patches(x, layer.kernel, layer.stride, layer.pad, layer.dilation, (ho, wo))
        cols = view[ni, :, :, :, yi, xi]  # (S, C, kh, kw)
        s = len(rows)
        inputs = cols.reshape(s, group, -1, kh * kw).transpose(1, 0, 3, 2)
        targets = target[ni, :, yi, xi]
    else:
        _, k = layer._split(x.shape)
        x2, t2 = x.reshape(-1, k), target.reshape(-1, layer.num_output)
        rows = _choose_rows(len(x2), k, rng, max_samples, max_patch_values)
        inputs, targets = x2[rows][None, :, None, :], t2[rows]
    if layer.bias_term:
        targets = targets - layer.blobs[2]
    return np.ascontiguousarray(inputs, np.float32), np.ascontiguousarray(targets, np.float32)


def _choose_rows(total, c_in_values, rng, max_samples, max_patch_values):
    count = max(1, min(total, max_samples, max_patch_values // max(c_in_values, 1)))
    return np.sort(rng.choice(total, count, replace=False)) if count < total else np.arange(total)


def _float_weight(layer):
    """The float weights of ``layer`` in the quantizer's layout: (C_t, C_s, kh, kw) or (C_t, C_s)."""
    weight = layer.blobs[0]
    return weight.T if isinstance(layer, InnerProduct) and layer.transpose else weight


def _correct(layer, inputs, targets, error_correction, ec_options, progress, weight=None):
    """Error-correct ``layer``'s codebooks and codes in place; report entries.

    ``weight``: the float weights W (for ``ec_options["prior"]``). The reported
    response errors are of the response alone, without the prior's penalty.
    """
    from qcnn.quantization.ec import error_correct, objective  # Numba: only when calibrating

    group = getattr(layer, "group", 1)
    codebooks, codes = layer.blobs[0], layer.blobs[1]
    scale = max(float(np.square(targets, dtype=np.float64).sum()), 1e-30)
    before = objective(inputs, targets, codebooks, codes, group)
    row = {"samples": int(targets.shape[0]), "response_error_kmeans": float(np.sqrt(before / scale))}
    if not error_correction:
        return {**row, "response_error": row["response_error_kmeans"], "iterations": 0}
    _, m, _, subdim = codebooks.shape
    gram_bytes = 8 * group * (m * subdim * codes.shape[1] * codes.shape[2]) ** 2
    if gram_bytes > MAX_EC_GRAM_BYTES:  # the solver's float64 statistics G * L^2 (L = M P C'_s)
        raise QcnnError(f"layer '{layer.name}': error correction would need {gram_bytes / 2**30:.1f} GiB "
                        f"for its statistics; quantize it without (--no-ec) or leave it float (--skip)")
    options = dict(ec_options or {})

    def report(iteration, value):
        if progress is not None:
            progress("iteration", {"name": layer.name, "iteration": iteration,
                                   "max_iter": options.get("max_iter"), "objective": value})

    if options.get("prior"):
        options["weight"] = weight
    result = error_correct(inputs, targets, codebooks, codes, group, progress=report, **options)
    layer.blobs[0], layer.blobs[1] = _rounded(result.codebooks, layer.params["codebook_dtype"]), result.codes
    layer.check_blobs(layer.input_shapes)
    after = objective(inputs, targets, layer.blobs[0], result.codes, group)
    return {**row, "response_error": float(np.sqrt(after / scale)), "iterations": result.iterations}
