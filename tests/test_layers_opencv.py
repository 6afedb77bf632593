"""Single layers against OpenCV's independent Caffe implementation, on random shapes.

Each hypothesis case writes a tiny deploy prototxt (Input layer(s) + the layer(s) under
test), builds our net from it with seeded random weights, writes those weights as a
caffemodel with :func:`qcnn.io.caffe.save_caffemodel`, loads both files with
``cv2.dnn.readNetFromCaffe`` and compares every output of the checked layers.
(A net without weighted layers gives a caffemodel holding only the net name; OpenCV
accepts it.) BatchNorm/Scale are compared unfolded (``fold_batchnorm=False``); folding
is tested elsewhere. OpenCV's layer fusion and Winograd convolution are switched off so
that it computes each layer on its own, in the direct way.

Tolerance. Both engines compute in float32 (unit round-off u = 2**-24 ~ 6e-8) but sum
in different orders (im2col + BLAS here, OpenCV's own blocked kernels there). A sum of
n products has a worst-case error of about n * u * sum|terms|, and typically
sqrt(n) * u * sum|terms|. The largest sums here are convolutions with n = C/group * kh * kw
<= 6 * 5 * 5 = 150 terms (inner products: <= 180), whose sum of |terms| is a small
multiple of the output scale for He-initialised weights and unit-normal inputs, so the
expected difference is ~1e-6 of the output scale. We accept
``max|ours - ref| <= RTOL * max|ref| + ATOL`` with RTOL = 1e-4, ATOL = 1e-6: loose enough
for any summation order, tight enough to catch any indexing, padding, rounding or
parameter-reading error (those change outputs by O(1) relative amounts). Layers that
only move, select or compare values (pooling MAX, Concat, Slice, Flatten, ReLU, Eltwise
MAX) get the same bound; OpenCV reproduces them exactly in practice.

Where OpenCV 4.x itself departs from Caffe, the cases are steered around it (and our side
is checked another way), never loosened:

* depthwise 3x3 convolutions with pad 1 (channel multiplier 1) take an OpenCV fast path
  that is wrong when H or W is 1 or the dilation is not 1 (garbage up to 1e22): checked
  against a float64 direct sum instead (``test_depthwise_3x3_against_direct_sum``);
* OpenCV ignores ``lrn_param.k`` (always 1): ACROSS_CHANNELS with ``k`` is compared through
  the identity ``x / (k + a/n S)^b = k^-b * x / (1 + (a/k)/n S)^b``;
* OpenCV ignores ``inner_product_param.transpose``: not compared;
* pooling windows that lie wholly outside the input (pad 0, stride > kernel, ceil rounding:
  e.g. W=2, kernel 1, stride 2) have no meaningful value (Caffe: -FLT_MAX for MAX, 0/0 = NaN
  for AVE; OpenCV: 0 and NaN): qcnn refuses them with a clear error
  (``test_pooling_window_outside_input_is_refused``), so they are not compared;
* a Slice without ``slice_point`` is only sized by OpenCV when its tops are consumed, so the
  Slice test consumes each top with a ReLU.
"""

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import cv2  # the test extra pins opencv-python-headless<5, which still reads Caffe models

import qcnn
from qcnn.io.caffe import save_caffemodel

RTOL = 1e-4
ATOL = 1e-6

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

seeds = st.integers(0, 2**31 - 1)


# ------------------------------------------------------------------ prototxt text

def _scalar(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    return str(value)  # enum identifiers: MAX, SUM, ACROSS_CHANNELS


def layer(name, type_, bottoms, tops=None, **messages):
    """One ``layer { }`` block; ``messages`` maps e.g. ``convolution_param`` to ``{field: value}``.

    A list value becomes a repeated field. ``tops`` defaults to ``[name]``.
    """
    parts = [f'name: "{name}"', f'type: "{type_}"']
    parts += [f'bottom: "{b}"' for b in bottoms]
    parts += [f'top: "{t}"' for t in (tops or [name])]
    for message, fields in messages.items():
        body = " ".join(f"{key}: {_scalar(v)}" for key, value in fields.items()
                        for v in (value if isinstance(value, (list, tuple)) else [value]))
        parts.append(f"{message} {{ {body} }}")
    return "layer { " + " ".join(parts) + " }"


def input_layer(name, shape):
    dims = " ".join(f"dim: {d}" for d in shape)
    return f'layer {{ name: "{name}" type: "Input" top: "{name}" input_param {{ shape {{ {dims} }} }} }}'


def spatial(name, hw, style):
    """Caffe's spellings of a (height, width) pair: ``name: k``, ``name: h name: w``, ``name_h/_w``.

    ``name`` is ``kernel``, ``stride`` or ``pad`` (the single-field spelling of kernel is
    ``kernel_size``). ``style`` 0 uses the single value when ``h == w``, 1 the repeated
    field (ConvolutionParameter only: PoolingParameter's fields are not repeated), 2 ``_h/_w``.
    """
    h, w = hw
    single = "kernel_size" if name == "kernel" else name
    if style == 0 and h == w:
        return {single: h}
    if style == 1:
        return {single: [h, w]}
    return {f"{name}_h": h, f"{name}_w": w}


# ------------------------------------------------------------------ running both engines

def run_both(inputs, layers, check, seed=0, prepare=None, opencv_layers=None, expected=None):
    """Run ``layers`` in qcnn and OpenCV on ``inputs`` and compare the checked layers' outputs.

    Parameters
    ----------
    inputs : dict of str -> ndarray (float32)
        One Input layer per entry, named like the blob.
    layers : list of str
        Layer blocks (see :func:`layer`), in order.
    check : list of str
        Layer names; every top of each is compared (the layer must be the last writer
        of its tops, as in-place layers are read back by blob name in qcnn).
    seed : int
        Seed of qcnn's random weights.
    prepare : callable, optional
        Called with our net before the weights are saved (to set special weight values).
    opencv_layers : list of str, optional
        Different layer blocks for OpenCV (same names and weights), to work around an
        OpenCV deviation from Caffe; ``expected(layer_name, opencv_output)`` then maps
        OpenCV's output to the value ours must have.

    Returns
    -------
    Net
        Our network (for further checks).
    """
    def prototxt(blocks):
        return "\n".join(['name: "case"'] + [input_layer(n, a.shape) for n, a in inputs.items()]
                         + list(blocks)) + "\n"

    text = prototxt(layers)
    with tempfile.TemporaryDirectory() as tmp:
        proto, cv_proto = Path(tmp) / "net.prototxt", Path(tmp) / "opencv.prototxt"
        model = Path(tmp) / "net.caffemodel"
        proto.write_text(text)
        cv_proto.write_text(prototxt(opencv_layers or layers))
        net = qcnn.load_caffe(str(proto), seed=seed, fold_batchnorm=False)
        if prepare is not None:
            prepare(net)
        save_caffemodel(net, str(model))
        cv = cv2.dnn.readNetFromCaffe(str(cv_proto), str(model))
    cv.enableFusion(False)
    cv.enableWinograd(False)
    for name, value in inputs.items():
        cv.setInput(np.ascontiguousarray(value, np.float32), name)
    theirs = cv.forwardAndRetrieve(list(check))
    for layer_name, refs in zip(check, theirs):
        tops = net.layer(layer_name).tops
        ours = net.forward(inputs, outputs=tops)
        # OpenCV's MAX pooling also returns its argmax mask as an extra output.
        assert len(refs) >= len(tops), f"{layer_name}: OpenCV gives {len(refs)} outputs, we {len(tops)}"
        for top, ref in zip(tops, refs):
            if expected is not None:
                ref = expected(layer_name, ref)
            assert_close(ours[top], ref, f"layer '{layer_name}' top '{top}'", text)
    return net


def assert_close(ours, ref, what, text, rtol=RTOL, atol=ATOL):
    """``max|ours - ref| <= rtol * max|ref| + atol``, else a message locating the worst element."""
    ref = np.asarray(ref)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape}, reference {ref.shape}\n{text}"
    assert ours.dtype == np.float32, f"{what}: dtype {ours.dtype}"
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    diff = np.abs(ours.astype(np.float64) - ref)
    worst = float(diff.max()) if diff.size else 0.0
    bound = rtol * scale + atol
    if not worst <= bound:  # also catches NaN
        index = np.unravel_index(np.nanargmax(diff) if not np.isnan(diff).all() else 0, diff.shape)
        raise AssertionError(
            f"{what}: max |ours - ref| = {worst:.3g} > {bound:.3g} (max |ref| = {scale:.3g}); "
            f"at {tuple(int(i) for i in index)}: ours {ours[index]!r}, ref {ref[index]!r}\n{text}")


def normal(seed, shape, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


# ------------------------------------------------------------------ Convolution

@st.composite
def conv_cases(draw):
    kind = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
    if kind == "dense":
        group, c_in, c_out = 1, draw(st.integers(1, 6)), draw(st.integers(1, 6))
    elif kind == "grouped":
        group = draw(st.integers(2, 3))
        c_in, c_out = group * draw(st.integers(1, 2)), group * draw(st.integers(1, 3))
    else:  # group == C_in, channel multiplier 1..3
        group = c_in = draw(st.integers(1, 6))
        c_out = c_in * draw(st.integers(1, 3))
    square = draw(st.booleans())

    def pair(lo, hi):
        first = draw(st.integers(lo, hi))
        return (first, first) if square else (first, draw(st.integers(lo, hi)))

    return dict(n=draw(st.integers(1, 3)), c_in=c_in, c_out=c_out, group=group,
                hw=(draw(st.integers(1, 12)), draw(st.integers(1, 12))),
                kernel=pair(1, 5), stride=pair(1, 3), pad=pair(0, 2), dilation=pair(1, 2),
                bias=draw(st.booleans()), style=draw(st.integers(0, 2)))


def conv_fields(case):
    fields = {"num_output": case["c_out"], "bias_term": case["bias"]}
    for name in ("kernel", "stride", "pad"):
        fields.update(spatial(name, case[name], case["style"]))
    dh, dw = case["dilation"]
    fields["dilation"] = dh if dh == dw else [dh, dw]
    if case["group"] > 1:
        fields["group"] = case["group"]
    return fields


def conv_fits(case):
    return all(s + 2 * p - (d * (k - 1) + 1) >= 0 for s, k, p, d in
               zip(case["hw"], case["kernel"], case["pad"], case["dilation"]))


def opencv_depthwise_bug(case):
    """Where OpenCV 4.x's depthwise 3x3 / pad 1 kernel gives wrong values (see the module docstring)."""
    return (case["group"] == case["c_in"] == case["c_out"] > 1 and case["kernel"] == (3, 3)
            and case["pad"] == (1, 1) and (1 in case["hw"] or case["dilation"] != (1, 1)))


@SETTINGS
@given(case=conv_cases(), seed=seeds)
@example(case=dict(n=2, c_in=4, c_out=8, group=4, hw=(7, 5), kernel=(3, 3), stride=(2, 2), pad=(1, 1),
                   dilation=(1, 1), bias=False, style=0), seed=1)
@example(case=dict(n=1, c_in=4, c_out=6, group=2, hw=(9, 8), kernel=(3, 5), stride=(1, 2), pad=(2, 1),
                   dilation=(2, 1), bias=True, style=2), seed=2)
@example(case=dict(n=1, c_in=3, c_out=3, group=3, hw=(8, 6), kernel=(3, 3), stride=(2, 2), pad=(1, 1),
                   dilation=(1, 1), bias=True, style=0), seed=3)  # MobileNet-style depthwise
def test_convolution(case, seed):
    assume(conv_fits(case) and not opencv_depthwise_bug(case))
    x = normal(seed, (case["n"], case["c_in"]) + case["hw"])
    run_both({"data": x}, [layer("conv", "Convolution", ["data"], convolution_param=conv_fields(case))],
             ["conv"], seed=seed)


def direct_convolution(x, weight, bias, stride, pad, dilation, group):
    """Caffe convolution as an explicit float64 sum over kernel offsets (reference)."""
    n, c, h, w = x.shape
    c_out, c_group, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, pad, dilation
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    out = np.zeros((n, c_out, ho, wo))
    per_group = c_out // group
    for o in range(c_out):
        channels = xp[:, (o // per_group) * c_group:(o // per_group + 1) * c_group]
        for i in range(kh):
            for j in range(kw):
                window = channels[:, :, i * dh:i * dh + (ho - 1) * sh + 1:sh,
                                  j * dw:j * dw + (wo - 1) * sw + 1:sw]
                out[:, o] += np.tensordot(weight[o, :, i, j].astype(np.float64), window, axes=([0], [1]))
    return out if bias is None else out + bias.reshape(1, -1, 1, 1)


@SETTINGS
@given(n=st.integers(1, 2), c=st.integers(2, 4), hw=st.tuples(st.integers(1, 8), st.integers(1, 8)),
       stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
       dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)), bias=st.booleans(), seed=seeds)
def test_depthwise_3x3_against_direct_sum(n, c, hw, stride, dilation, bias, seed):
    """The depthwise shapes where OpenCV is wrong, against a float64 direct sum instead."""
    case = dict(n=n, c_in=c, c_out=c, group=c, hw=hw, kernel=(3, 3), stride=stride, pad=(1, 1),
                dilation=dilation, bias=bias, style=0)
    assume(conv_fits(case) and opencv_depthwise_bug(case))
    x = normal(seed, (n, c) + hw)
    with tempfile.TemporaryDirectory() as tmp:
        proto = Path(tmp) / "net.prototxt"
        conv = layer("conv", "Convolution", ["data"], convolution_param=conv_fields(case))
        proto.write_text(input_layer("data", x.shape) + "\n" + conv + "\n")
        net = qcnn.load_caffe(str(proto), seed=seed, fold_batchnorm=False)
    conv = net.layer("conv")
    ref = direct_convolution(x, conv.blobs[0], conv.blobs[1] if bias else None, stride, (1, 1), dilation, c)
    assert_close(net.forward(x)["conv"], ref, "depthwise conv vs direct sum", str(case))


# ------------------------------------------------------------------ Pooling

@st.composite
def pool_cases(draw):
    if draw(st.booleans()):  # square
        k, s = draw(st.integers(1, 5)), draw(st.integers(1, 3))
        kernel, stride, pad = (k, k), (s, s), (draw(st.integers(0, min(2, k - 1))),) * 2
    else:
        kernel = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
        stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        pad = tuple(draw(st.integers(0, min(2, k - 1))) for k in kernel)
    return dict(n=draw(st.integers(1, 2)), c=draw(st.integers(1, 4)),
                hw=(draw(st.integers(1, 12)), draw(st.integers(1, 12))),
                pool=draw(st.sampled_from(["MAX", "AVE"])), kernel=kernel, stride=stride, pad=pad,
                style=draw(st.sampled_from([0, 2])))


def pool_geometry(size, kernel, stride, pad):
    """Caffe's output size (ceil rounding, then the clip rule) and whether the clip rule fired."""
    out = -(-(size + 2 * pad - kernel) // stride) + 1
    clipped = pad > 0 and (out - 1) * stride >= size + pad
    return out - clipped, clipped


def pool_case(hw, pool, kernel, stride, pad, n=1, c=1, style=0):
    """An explicit pooling case, in :func:`pool_cases`' format (an int means a square pair)."""
    kernel, stride, pad = ((v, v) if isinstance(v, int) else v for v in (kernel, stride, pad))
    return dict(n=n, c=c, hw=hw, pool=pool, kernel=kernel, stride=stride, pad=pad, style=style)


def pool_windows_overlap_input(case):
    """Every window holds at least one input value (else Caffe's value is undefined; see the docstring)."""
    return all(k <= s + 2 * p and (pool_geometry(s, k, st_, p)[0] - 1) * st_ - p < s
               for s, k, st_, p in zip(case["hw"], case["kernel"], case["stride"], case["pad"]))


def test_pooling_window_outside_input_is_refused():
    from qcnn.errors import QcnnError
    from qcnn.layers.pooling import Pooling
    pool = Pooling("pool", ["data"], ["pool"], kernel_size=1, stride=2)
    with pytest.raises(QcnnError, match="lies outside the input"):
        pool.output_shapes([(1, 1, 2, 2)])


@SETTINGS
@given(case=pool_cases(), seed=seeds)
# (6 + 2*1 - 3) / 2 rounds up to 3: 4 windows, the last one overhanging the padding.
@example(case=pool_case((6, 6), "MAX", 3, 2, 1), seed=0)
@example(case=pool_case((6, 6), "AVE", 3, 2, 1, c=2, style=2), seed=1)
# (5 + 2*1 - 2) / 2 rounds up to 3: a 4th window would start in the padding; the clip rule drops it.
@example(case=pool_case((5, 7), "AVE", 2, 2, 1), seed=0)
@example(case=pool_case((5, 7), "MAX", 2, 2, 1, n=2), seed=0)
@example(case=pool_case((12, 10), "AVE", (3, 2), (3, 2), (2, 1), n=2, c=3, style=2), seed=3)
def test_pooling(case, seed):
    assume(pool_windows_overlap_input(case))
    x = normal(seed, (case["n"], case["c"]) + case["hw"])
    fields = {"pool": case["pool"]}
    for name in ("kernel", "stride", "pad"):
        fields.update(spatial(name, case[name], case["style"]))
    net = run_both({"data": x}, [layer("pool", "Pooling", ["data"], pooling_param=fields)], ["pool"])
    expected = tuple(pool_geometry(*args)[0]
                     for args in zip(case["hw"], case["kernel"], case["stride"], case["pad"]))
    assert net.blob_shapes["pool"][2:] == expected


def test_pooling_examples_cover_ceil_rounding_and_the_clip_rule():
    assert (6 + 2 - 3) % 2 != 0 and pool_geometry(6, 3, 2, 1) == (4, False)
    assert pool_geometry(5, 2, 2, 1) == (3, True) and pool_geometry(7, 2, 2, 1) == (4, True)


@SETTINGS
@given(n=st.integers(1, 2), c=st.integers(1, 4), hw=st.tuples(st.integers(1, 9), st.integers(1, 9)),
       pool=st.sampled_from(["MAX", "AVE"]), seed=seeds)
def test_global_pooling(n, c, hw, pool, seed):
    x = normal(seed, (n, c) + hw)
    run_both({"data": x}, [layer("pool", "Pooling", ["data"],
                                 pooling_param={"pool": pool, "global_pooling": True})], ["pool"])


# ------------------------------------------------------------------ LRN

lrn_shapes = st.tuples(st.integers(1, 2), st.integers(1, 8), st.integers(1, 6), st.integers(1, 6))


@SETTINGS
@given(shape=lrn_shapes, local_size=st.sampled_from([1, 3, 5, 7]), alpha=st.floats(1e-4, 2.0),
       beta=st.floats(0.1, 1.5), k=st.one_of(st.just(1.0), st.floats(0.5, 3.0)), seed=seeds)
def test_lrn_across_channels(shape, local_size, alpha, beta, k, seed):
    """``x / (k + alpha/n * sum of x^2 over n channels)^beta``.

    OpenCV ignores ``k``, so it runs with ``alpha / k`` and its output is scaled by ``k^-beta``.
    """
    x = normal(seed, shape, 2.0)
    fields = {"local_size": local_size, "alpha": alpha, "beta": beta, "k": k}
    opencv_fields = dict(fields, alpha=alpha / k, k=1.0)
    run_both({"data": x}, [layer("lrn", "LRN", ["data"], lrn_param=fields)], ["lrn"],
             opencv_layers=[layer("lrn", "LRN", ["data"], lrn_param=opencv_fields)],
             expected=lambda name, ref: ref * k ** -beta)


@SETTINGS
@given(shape=lrn_shapes, local_size=st.sampled_from([1, 3, 5]), alpha=st.floats(1e-4, 2.0),
       beta=st.floats(0.1, 1.5), k=st.floats(0.5, 3.0), seed=seeds)
def test_lrn_within_channel(shape, local_size, alpha, beta, k, seed):
    """``x / (1 + alpha/n^2 * sum of x^2 over the n x n window)^beta``: Caffe (and OpenCV) ignore ``k``."""
    x = normal(seed, shape, 2.0)
    fields = {"local_size": local_size, "alpha": alpha, "beta": beta, "k": k, "norm_region": "WITHIN_CHANNEL"}
    run_both({"data": x}, [layer("lrn", "LRN", ["data"], lrn_param=fields)], ["lrn"])


# ------------------------------------------------------------------ InnerProduct

@SETTINGS
@given(n=st.integers(1, 3), c=st.integers(1, 4), hw=st.tuples(st.integers(1, 6), st.integers(1, 6)),
       c_conv=st.integers(1, 5), num_output=st.integers(1, 8), axis=st.sampled_from([1, 2, -1]),
       bias=st.booleans(), seed=seeds)
def test_inner_product_after_convolution(n, c, hw, c_conv, num_output, axis, bias, seed):
    """A 4-D conv output is flattened channel-major (C, H, W) from ``axis`` on before the product."""
    x = normal(seed, (n, c) + hw)
    fc_fields = {"num_output": num_output, "bias_term": bias}
    if axis != 1:
        fc_fields["axis"] = axis
    conv = layer("conv", "Convolution", ["data"], convolution_param={"num_output": c_conv, "kernel_size": 1})
    fc = layer("fc", "InnerProduct", ["conv"], inner_product_param=fc_fields)
    run_both({"data": x}, [conv, fc], ["conv", "fc"], seed=seed)


@SETTINGS
@given(n=st.integers(1, 4), k=st.integers(1, 40), num_output=st.integers(1, 16), bias=st.booleans(),
       seed=seeds)
def test_inner_product_2d(n, k, num_output, bias, seed):
    x = normal(seed, (n, k))
    fc = layer("fc", "InnerProduct", ["data"], inner_product_param={"num_output": num_output, "bias_term": bias})
    run_both({"data": x}, [fc], ["fc"], seed=seed)


# ------------------------------------------------------------------ BatchNorm + Scale

@SETTINGS
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 5), st.integers(1, 5)),
       eps=st.sampled_from([1e-5, 1e-3, 0.1]), factor=st.sampled_from([1.0, 0.5, 999.98, 0.0]),
       seed=seeds)
def test_batchnorm_scale(shape, eps, factor, seed):
    """BatchNorm (statistics stored times a moving-average factor; 0 means 0) then Scale with bias."""
    def store_with_factor(net):
        mean, var, _ = net.layer("bn").blobs
        net.layer("bn").blobs = [mean * np.float32(factor), var * np.float32(factor),
                                 np.array([factor], np.float32)]

    x = normal(seed, shape)
    layers = [layer("bn", "BatchNorm", ["data"], batch_norm_param={"eps": eps}),
              layer("scale", "Scale", ["bn"], scale_param={"bias_term": True})]
    run_both({"data": x}, layers, ["bn", "scale"], seed=seed, prepare=store_with_factor)


# ------------------------------------------------------------------ Eltwise, Concat, Slice

small_shapes = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5), st.integers(1, 5))


@SETTINGS
@given(shape=small_shapes, count=st.integers(2, 3),
       operation=st.sampled_from(["SUM", "SUM_COEFF", "PROD", "MAX"]),
       coeff=st.lists(st.floats(-2.0, 2.0), min_size=3, max_size=3), seed=seeds)
def test_eltwise(shape, count, operation, coeff, seed):
    inputs = {f"in{i}": normal(seed + i, shape) for i in range(count)}
    fields = {"operation": operation.split("_")[0]}
    if operation == "SUM_COEFF":
        fields["coeff"] = coeff[:count]
    run_both(inputs, [layer("elt", "Eltwise", list(inputs), eltwise_param=fields)], ["elt"])


@SETTINGS
@given(shape=small_shapes, axis=st.integers(0, 3), sizes=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       seed=seeds)
def test_concat(shape, axis, sizes, seed):
    inputs = {f"in{i}": normal(seed + i, shape[:axis] + (size,) + shape[axis + 1:])
              for i, size in enumerate(sizes)}
    fields = {} if axis == 1 else {"axis": axis}
    run_both(inputs, [layer("cat", "Concat", list(inputs), concat_param=fields)], ["cat"])


@st.composite
def slice_cases(draw):
    shape = draw(small_shapes)
    axis = draw(st.integers(1, 3))
    size = shape[axis]
    assume(size > 1)
    if draw(st.booleans()):  # explicit slice points
        points = sorted(draw(st.sets(st.integers(1, size - 1), min_size=1)))
        parts = len(points) + 1
    else:  # equal parts
        parts = draw(st.sampled_from([d for d in range(2, size + 1) if size % d == 0]))
        points = None
    return shape, axis, points, parts


@SETTINGS
@given(case=slice_cases(), seed=seeds)
def test_slice(case, seed):
    shape, axis, points, parts = case
    fields = {"axis": axis} if points is None else {"axis": axis, "slice_point": points}
    tops = [f"part{i}" for i in range(parts)]
    consumers = [layer(f"relu{i}", "ReLU", [top]) for i, top in enumerate(tops)]  # for OpenCV's sizing
    run_both({"data": normal(seed, shape)},
             [layer("slice", "Slice", ["data"], tops=tops, slice_param=fields)] + consumers, ["slice"])


# ------------------------------------------------------------------ element-wise and shape layers

@SETTINGS
@given(shape=small_shapes, slope=st.sampled_from([0.0, 0.1, -0.5, 2.0]), in_place=st.booleans(),
       seed=seeds)
def test_relu(shape, slope, in_place, seed):
    """ReLU with negative_slope, also in place on a convolution's output (as Caffe nets do)."""
    x = normal(seed, shape)
    fields = {"negative_slope": slope} if slope else {}
    if in_place:
        conv = layer("conv", "Convolution", ["data"], convolution_param={"num_output": 3, "kernel_size": 1})
        layers = [conv, layer("relu", "ReLU", ["conv"], tops=["conv"], relu_param=fields)]
    else:
        layers = [layer("relu", "ReLU", ["data"], relu_param=fields)]
    run_both({"data": x}, layers, ["relu"], seed=seed)


@SETTINGS
@given(shape=st.one_of(small_shapes, st.tuples(st.integers(1, 3), st.integers(1, 10))),
       axis=st.integers(1, 3), scale=st.sampled_from([1.0, 10.0]), seed=seeds)
def test_softmax(shape, axis, scale, seed):
    axis = min(axis, len(shape) - 1)
    fields = {} if axis == 1 else {"axis": axis}
    run_both({"data": normal(seed, shape, scale)}, [layer("prob", "Softmax", ["data"], softmax_param=fields)],
             ["prob"])


@SETTINGS
@given(shape=small_shapes, axes=st.sampled_from([(1, -1), (1, 2), (2, 3), (2, -1), (1, 3)]), seed=seeds)
def test_flatten(shape, axes, seed):
    axis, end_axis = axes
    fields = {} if axes == (1, -1) else {"axis": axis, "end_axis": end_axis}
    run_both({"data": normal(seed, shape)}, [layer("flat", "Flatten", ["data"], flatten_param=fields)],
             ["flat"])
