"""Caffe import (``.prototxt`` + ``.caffemodel``, V1 and V2) and caffemodel export, without Caffe.

The prototxt gives the architecture and hyper-parameters; the caffemodel
(a binary ``NetParameter``) gives the weights, matched to layers by name.
Both the current ``layer`` format (string types) and the old V1 ``layers``
format (enum types, legacy num/channels/height/width blob dimensions) are
read. Layers excluded from the TEST phase are dropped.
"""

import os
import warnings

import numpy as np

from qcnn.errors import QcnnError, QcnnWarning
from qcnn.graph import Net
from qcnn.io import protobuf, prototext
from qcnn.io.files import atomic_write, read_bytes
from qcnn.layers import LAYER_TYPES

# ----------------------------------------------------------------- binary schemas

_BLOB_SHAPE = {1: ("dim", "int64s")}
_BLOB = {1: ("num", "varint"), 2: ("channels", "varint"), 3: ("height", "varint"),
         4: ("width", "varint"), 5: ("data", "floats"), 7: ("shape", _BLOB_SHAPE),
         8: ("double_data", "doubles")}
_V0_LAYER = {1: ("name", "string"), 2: ("type", "string"), 50: ("blobs", _BLOB)}
_LAYER = {1: ("name", "string"), 2: ("type", "string"), 3: ("bottom", "string"),
          4: ("top", "string"), 7: ("blobs", _BLOB)}
_V1_LAYER = {1: ("layer", _V0_LAYER), 2: ("bottom", "string"), 3: ("top", "string"),
             4: ("name", "string"), 5: ("type", "varint"), 6: ("blobs", _BLOB)}
_NET = {1: ("name", "string"), 2: ("layers", _V1_LAYER), 100: ("layer", _LAYER)}

# V1LayerParameter.LayerType enum -> current type name.
V1_TYPES = {
    35: "AbsVal", 1: "Accuracy", 30: "ArgMax", 2: "BNLL", 3: "Concat", 37: "ContrastiveLoss",
    4: "Convolution", 5: "Data", 39: "Deconvolution", 6: "Dropout", 32: "DummyData",
    7: "EuclideanLoss", 25: "Eltwise", 38: "Exp", 8: "Flatten", 9: "HDF5Data",
    10: "HDF5Output", 28: "HingeLoss", 11: "Im2col", 12: "ImageData", 13: "InfogainLoss",
    14: "InnerProduct", 15: "LRN", 29: "MemoryData", 16: "MultinomialLogisticLoss", 34: "MVN",
    17: "Pooling", 26: "Power", 18: "ReLU", 19: "Sigmoid", 27: "SigmoidCrossEntropyLoss",
    36: "Silence", 20: "Softmax", 21: "SoftmaxWithLoss", 22: "Split", 33: "Slice", 23: "TanH",
    24: "WindowData", 31: "Threshold",
}
_V1_NAMES = {name: number for number, name in V1_TYPES.items()}
# V1 prototxts spell types as enum identifiers: INNER_PRODUCT -> InnerProduct.
_V1_IDENTS = {name.upper(): name for name in V1_TYPES.values()}
_V1_IDENTS.update(INNER_PRODUCT="InnerProduct", SOFTMAX_LOSS="SoftmaxWithLoss",
                  DUMMY_DATA="DummyData", HDF5_DATA="HDF5Data", HDF5_OUTPUT="HDF5Output",
                  IMAGE_DATA="ImageData", MEMORY_DATA="MemoryData", WINDOW_DATA="WindowData",
                  EUCLIDEAN_LOSS="EuclideanLoss", HINGE_LOSS="HingeLoss",
                  INFOGAIN_LOSS="InfogainLoss", CONTRASTIVE_LOSS="ContrastiveLoss",
                  MULTINOMIAL_LOGISTIC_LOSS="MultinomialLogisticLoss",
                  SIGMOID_CROSS_ENTROPY_LOSS="SigmoidCrossEntropyLoss")

# ----------------------------------------------------------------- prototxt parameters

def _last(msg, name, default=None):
    return msg.get1(name, default) if msg is not None else default


def _bool(value):
    if isinstance(value, str):
        if value.lower() not in ("true", "false"):
            raise ValueError(f"expected true or false, got {value!r}")
        return value.lower() == "true"
    return bool(value)


def _spatial(msg, name, default):
    """Caffe's repeated ``pad``/``kernel_size``/``stride`` or their ``_h``/``_w`` pair."""
    h, w = _last(msg, name.replace("_size", "") + "_h"), _last(msg, name.replace("_size", "") + "_w")
    if h is not None or w is not None:
        if h is None or w is None:
            raise ValueError(f"{name}: both _h and _w must be given")
        return [int(h), int(w)]
    values = msg.get(name, []) if msg is not None else []
    return [int(v) for v in values] if values else default


def _conv(msg):
    if int(_last(msg, "axis", 1)) != 1:
        raise ValueError("only axis 1 convolutions are supported")
    kernel = _spatial(msg, "kernel_size", None)
    if kernel is not None and len(kernel) > 2:
        raise ValueError(f"only 2-D convolutions are supported, got kernel {kernel}")
    return {"num_output": _last(msg, "num_output"), "bias_term": _bool(_last(msg, "bias_term", True)),
            "kernel_size": kernel, "stride": _spatial(msg, "stride", [1]),
            "pad": _spatial(msg, "pad", [0]), "dilation": [int(d) for d in msg.get("dilation", [1])],
            "group": int(_last(msg, "group", 1))}


_POOL_METHODS = {0: "MAX", 1: "AVE", 2: "STOCHASTIC"}


def _inner_product(msg):
    return {"num_output": _last(msg, "num_output"), "bias_term": _bool(_last(msg, "bias_term", True)),
            "axis": int(_last(msg, "axis", 1)), "transpose": _bool(_last(msg, "transpose", False))}


def _pooling(msg):
    pool = _last(msg, "pool", "MAX")
    ceil_mode = True
    if _last(msg, "round_mode") is not None:
        ceil_mode = str(_last(msg, "round_mode")).upper() in ("CEIL", "0")
    if _last(msg, "ceil_mode") is not None:
        ceil_mode = _bool(_last(msg, "ceil_mode"))
    return {"pool": _POOL_METHODS.get(pool, pool), "kernel_size": _spatial(msg, "kernel_size", None),
            "stride": _spatial(msg, "stride", [1]), "pad": _spatial(msg, "pad", [0]),
            "global_pooling": _bool(_last(msg, "global_pooling", False)), "ceil_mode": ceil_mode}


def _channel_axis(msg, what):
    if int(_last(msg, "axis", 1)) != 1 or int(_last(msg, "num_axes", 1)) != 1:
        raise ValueError(f"only per-channel {what} (axis 1, num_axes 1) is supported")


def _scale(msg):
    _channel_axis(msg, "scaling")
    return {"bias_term": _bool(_last(msg, "bias_term", False))}


def _bias(msg):
    _channel_axis(msg, "bias")
    return {}


def _copy(*names):
    return lambda msg: {n: _last(msg, n) for n in names if _last(msg, n) is not None}


def _no_params(msg):
    return {}


def _eltwise(msg):
    ops = {0: "PROD", 1: "SUM", 2: "MAX"}
    op = _last(msg, "operation", "SUM")
    coeff = msg.get("coeff") if msg is not None else None
    return {"operation": ops.get(op, op), "coeff": [float(c) for c in coeff] if coeff else None}


def _concat(msg):
    axis = _last(msg, "axis")
    return {"axis": int(axis if axis is not None else _last(msg, "concat_dim", 1))}


def _slice(msg):
    axis = _last(msg, "axis")
    points = msg.get("slice_point") if msg is not None else None
    return {"axis": int(axis if axis is not None else _last(msg, "slice_dim", 1)),
            "slice_point": [int(p) for p in points] if points else None}


def _reshape(msg):
    shape = _last(msg, "shape")
    return {"shape": [int(d) for d in shape.get("dim", [])] if shape is not None else None,
            "axis": int(_last(msg, "axis", 0)), "num_axes": int(_last(msg, "num_axes", -1))}


def _lrn(msg):
    params = _copy("local_size", "alpha", "beta", "k")(msg)
    region = _last(msg, "norm_region")
    if region is not None:
        params["norm_region"] = {0: "ACROSS_CHANNELS", 1: "WITHIN_CHANNEL"}.get(region, str(region))
    return params


# type -> (parameter message, {known fields}, converter)
_PARAMS = {
    "Convolution": ("convolution_param", {"num_output", "bias_term", "pad", "kernel_size", "stride",
                    "dilation", "group", "pad_h", "pad_w", "kernel_h", "kernel_w", "stride_h",
                    "stride_w", "axis", "engine", "weight_filler", "bias_filler",
                    "force_nd_im2col"}, _conv),
    "InnerProduct": ("inner_product_param", {"num_output", "bias_term", "axis", "transpose",
                     "weight_filler", "bias_filler"}, _inner_product),
    "Pooling": ("pooling_param", {"pool", "pad", "pad_h", "pad_w", "kernel_size", "kernel_h",
                "kernel_w", "stride", "stride_h", "stride_w", "engine", "global_pooling",
                "round_mode", "ceil_mode"}, _pooling),
    "ReLU": ("relu_param", {"negative_slope", "engine"}, _copy("negative_slope")),
    "ReLU6": ("relu6_param", set(), _no_params),
    "Clip": ("clip_param", {"min", "max"}, _copy("min", "max")),
    "LRN": ("lrn_param", {"local_size", "alpha", "beta", "norm_region", "k", "engine"}, _lrn),
    "BatchNorm": ("batch_norm_param", {"use_global_stats", "moving_average_fraction", "eps"},
                  _copy("eps")),
    "Scale": ("scale_param", {"axis", "num_axes", "filler", "bias_term", "bias_filler"}, _scale),
    "Bias": ("bias_param", {"axis", "num_axes", "filler"}, _bias),
    "Eltwise": ("eltwise_param", {"operation", "coeff", "stable_prod_grad"}, _eltwise),
    "Concat": ("concat_param", {"axis", "concat_dim"}, _concat),
    "Flatten": ("flatten_param", {"axis", "end_axis"}, _copy("axis", "end_axis")),
    "Dropout": ("dropout_param", {"dropout_ratio", "scale_train"}, _copy("dropout_ratio")),
    "Softmax": ("softmax_param", {"axis", "engine"}, _copy("axis")),
    "Sigmoid": ("sigmoid_param", {"engine"}, _no_params),
    "TanH": ("tanh_param", {"engine"}, _no_params),
    "Power": ("power_param", {"power", "scale", "shift"}, _copy("power", "scale", "shift")),
    "ELU": ("elu_param", {"alpha"}, _copy("alpha")),
    "PReLU": ("prelu_param", {"filler", "channel_shared"},
              lambda msg: {"channel_shared": _bool(_last(msg, "channel_shared", False))}),
    "Split": ("split_param", set(), _no_params),
    "Slice": ("slice_param", {"axis", "slice_point", "slice_dim"}, _slice),
    "Reshape": ("reshape_param", {"shape", "axis", "num_axes"}, _reshape),
}
_DATA_LAYERS = {"Data", "ImageData", "HDF5Data", "MemoryData", "WindowData", "DummyData"}
_LAYER_FIELDS = {"name", "type", "bottom", "top", "phase", "loss_weight", "param", "blobs",
                 "propagate_down", "include", "exclude", "blobs_lr", "weight_decay", "layer"}
_NET_FIELDS = {"name", "input", "input_dim", "input_shape", "layer", "layers", "state",
               "force_backward", "debug_info"}


def _warn(what):
    warnings.warn(what, QcnnWarning, stacklevel=3)


def _in_test_phase(msg):
    def phase(rule):
        return str(rule.get1("phase", "")).upper() or None
    include = msg.get("include", [])
    if include and not any(phase(r) in (None, "TEST", "1") for r in include):
        return False
    return not any(phase(r) in ("TEST", "1") for r in msg.get("exclude", []))


def _shape(msg):
    return tuple(int(d) for d in msg.get("dim", []))


def parse_prototxt(path):
    """Parse a deploy prototxt into ``(name, inputs, layer_specs)``.

    ``inputs`` maps input blob names to shapes; ``layer_specs`` is a list of
    ``(name, type, bottoms, tops, params)`` for the TEST phase. Unknown fields
    give a :class:`QcnnWarning`; structural problems a :class:`QcnnError`
    naming the file and layer.
    """
    net = prototext.parse_file(path)
    for field in net:
        if field not in _NET_FIELDS:
            _warn(f"{path}: ignoring unknown top-level field '{field}'")
    if net.get("layer") and net.get("layers"):
        raise QcnnError(f"{path}: mixes new 'layer' and old V1 'layers' definitions")
    inputs = {}
    names = [str(n) for n in net.get("input", [])]
    if names:
        if net.get("input_shape"):
            shapes = [_shape(s) for s in net["input_shape"]]
        else:
            dims = [int(d) for d in net.get("input_dim", [])]
            shapes = [tuple(dims[i:i + 4]) for i in range(0, len(dims), 4)]
        if len(shapes) != len(names):
            raise QcnnError(f"{path}: {len(names)} input(s) but {len(shapes)} input shape(s)")
        inputs.update(zip(names, shapes))

    specs = []
    for msg in net.get("layer") or net.get("layers") or []:
        name = str(msg.get1("name", f"layer{len(specs)}"))
        where = f"{path}: layer '{name}'"
        raw_type = msg.get1("type")
        if raw_type is None:
            raise QcnnError(f"{where}: has no type")
        layer_type = _V1_IDENTS.get(str(raw_type), str(raw_type)) if isinstance(raw_type, str) \
            else V1_TYPES.get(raw_type, str(raw_type))
        if not _in_test_phase(msg):
            continue
        for field in msg:
            if field not in _LAYER_FIELDS and not field.endswith("_param"):
                _warn(f"{where}: ignoring unknown field '{field}'")
        bottoms = [str(b) for b in msg.get("bottom", [])]
        tops = [str(t) for t in msg.get("top", [])]
        if layer_type == "Input":
            shapes = [_shape(s) for s in (msg.get1("input_param") or prototext.Message()).get("shape", [])]
            if not shapes:
                raise QcnnError(f"{where}: Input layer without input_param shape")
            if len(shapes) == 1:
                shapes *= len(tops)
            if len(shapes) != len(tops):
                raise QcnnError(f"{where}: {len(tops)} tops but {len(shapes)} shapes")
            inputs.update(zip(tops, shapes))
            continue
        if layer_type in _DATA_LAYERS:
            raise QcnnError(f"{where}: data layer type '{layer_type}' is not supported; "
                            "use a deploy prototxt with an Input layer or input: fields")
        if layer_type not in _PARAMS:
            raise QcnnError(f"{where}: unknown layer type '{layer_type}'")
        param_name, known, convert = _PARAMS[layer_type]
        param_msg = msg.get1(param_name)
        for field in param_msg or ():
            if field not in known:
                _warn(f"{where}: ignoring unknown field '{field}' in {param_name}")
        try:
            params = convert(param_msg)
        except (ValueError, TypeError, AttributeError) as e:
            raise QcnnError(f"{where}: bad {param_name}: {e}") from None
        specs.append((name, layer_type, bottoms, tops, params))
    for name, shape in inputs.items():
        if len(shape) < 1 or min(shape) < 1:
            raise QcnnError(f"{path}: input '{name}' has an invalid shape {shape}")
    return str(net.get1("name", os.path.splitext(os.path.basename(str(path)))[0])), inputs, specs


# ----------------------------------------------------------------- caffemodel

def _blob_array(blob, where):
    data = protobuf.join_arrays(blob.get("data", []), np.float32)
    if not data.size and blob.get("double_data"):
        data = protobuf.join_arrays(blob["double_data"], np.float64).astype(np.float32)
    if blob.get("shape"):
        shape = tuple(int(d) for d in blob["shape"][-1].get("dim", []))
    elif any(k in blob for k in ("num", "channels", "height", "width")):
        shape = tuple(blob.get(k, [1])[-1] for k in ("num", "channels", "height", "width"))
    else:
        shape = (data.size,)
    if int(np.prod(shape)) != data.size:
        raise QcnnError(f"{where}: blob of shape {shape} holds {data.size} values")
    return data.reshape(shape)


def read_caffemodel(path):
    """Read a binary caffemodel.

    Returns
    -------
    dict of str -> list of ndarray
        Layer name -> weight blobs (float32, read-only views of the file
        contents where the file stores packed floats).
    """
    data = read_bytes(path)
    try:
        net = protobuf.decode(data, _NET)
    except protobuf.DecodeError as e:
        raise QcnnError(f"{path}: not a valid caffemodel (truncated or corrupt: {e})") from None
    weights = {}
    for layer in net.get("layer", []) + net.get("layers", []):
        source = layer.get("layer", [layer])[-1] if "name" not in layer else layer
        name = source.get("name", [""])[-1]
        blobs = source.get("blobs", [])
        if blobs:
            weights[name] = [_blob_array(b, f"{path}: layer '{name}' blob {i}")
                             for i, b in enumerate(blobs)]
    if not net.get("layer") and not net.get("layers"):
        raise QcnnError(f"{path}: not a valid caffemodel (no layers found)")
    return weights


def load_caffe(prototxt, caffemodel=None, fold_batchnorm=True, seed=0, metadata=None):
    """Build a :class:`~qcnn.graph.Net` from a Caffe deploy prototxt and its weights.

    Parameters
    ----------
    prototxt : str or path
        Deploy network definition (text format).
    caffemodel : str or path or dict, optional
        Binary weights, or a dict of layer name -> list of arrays (Caffe
        layouts; e.g. weights exported from another framework). Without it
        the weights are random (seeded): an architecture-only network for
        shapes, MAC counts and benchmarks.
    fold_batchnorm : bool
        Fold BatchNorm/Scale into the preceding convolution (see
        :meth:`Net.fold_batchnorm`); outputs are equal up to float32 rounding.
    seed : int
        Seed of the random weights when ``caffemodel`` is None.
    metadata : dict, optional
        Stored with the network (``preprocess``, ``labels``).

    Raises
    ------
    QcnnError
        Naming the file and layer: unparsable or corrupt files, unknown layer
        types, missing weights, weight shapes that do not match the prototxt.
    """
    name, inputs, specs = parse_prototxt(prototxt)
    if isinstance(caffemodel, dict):
        weights, caffemodel = caffemodel, "weights"
    else:
        weights = read_caffemodel(caffemodel) if caffemodel is not None else {}
    layers = []
    for layer_name, layer_type, bottoms, tops, params in specs:
        try:
            layers.append(LAYER_TYPES[layer_type](layer_name, bottoms, tops,
                                                  weights.get(layer_name, ()), **params))
        except QcnnError as e:
            raise QcnnError(f"{prototxt}: {e}") from None
    try:
        net = Net(inputs, layers, name, metadata,
                  init=np.random.default_rng(seed) if caffemodel is None else None)
    except QcnnError as e:
        source = caffemodel if caffemodel is not None else prototxt
        raise QcnnError(f"{source}: {e}") from None
    return net.fold_batchnorm() if fold_batchnorm else net


def save_caffemodel(net, path, v1=False):
    """Write the weights of ``net`` as a binary caffemodel (for Caffe, OpenCV and tests).

    Parameters
    ----------
    v1 : bool
        Write the old V1 ``layers`` format with legacy 4-D blob dimensions
        (num, channels, height, width), as 2014-era files have.
    """
    layers = []
    for layer in net.layers:
        if not layer.blobs:
            continue
        if v1:
            if layer.type not in _V1_NAMES:
                raise QcnnError(f"layer '{layer.name}': type {layer.type} has no V1 encoding")
            blobs = [dict(zip(("num", "channels", "height", "width"),
                              [[d] for d in (1,) * (4 - b.ndim) + b.shape]), data=[b]) for b in layer.blobs]
            layers.append({"name": [layer.name], "type": [_V1_NAMES[layer.type]], "blobs": blobs})
        else:
            blobs = [{"shape": [{"dim": list(b.shape)}], "data": [b]} for b in layer.blobs]
            layers.append({"name": [layer.name], "type": [layer.type], "blobs": blobs})
    message = {"name": [net.name], ("layers" if v1 else "layer"): layers}
    pieces, _ = protobuf.encode_pieces(message, _NET)
    with atomic_write(path) as f:
        for piece in pieces:
            f.write(piece)


def read_mean_file(path):
    """Read a Caffe mean image (``.binaryproto``, one BlobProto) as an array (C, H, W)."""
    data = read_bytes(path)
    try:
        mean = _blob_array(protobuf.decode(data, _BLOB), str(path))
    except protobuf.DecodeError as e:
        raise QcnnError(f"{path}: not a valid mean binaryproto ({e})") from None
    if mean.size == 0:
        raise QcnnError(f"{path}: mean file holds no values")
    return mean.reshape(mean.shape[-3:] if mean.ndim >= 3 else (mean.size, 1, 1))
