"""An 8 x float32 vector type for Numba kernels, and the few operations on it they use.

The type
--------
:data:`float32x8` is a Numba type whose values are one LLVM ``<8 x float>`` (data model
:class:`_Float32x8Model`): a register-sized value that Numba passes around like a scalar. The
kernels of :mod:`qcnn.kernels.lut` and :mod:`qcnn.kernels.depthwise` keep a block of
accumulators in variables of this type, so that they stay in registers while a whole loop of
terms is added into them. With ``float32`` arrays instead, Numba/LLVM keeps the accumulators in
memory (it cannot prove that they do not alias the inputs) or vectorises the wrong loop.

Why LLVM intrinsics
-------------------
Numba has no SIMD type of its own; each operation here is a Numba ``@intrinsic`` that emits a
few lines of LLVM IR into the calling kernel (nothing is called at run time, and the kernels'
``cache=True`` works as for any other code). They are plain vector IR -- loads and stores of
``<8 x float>``, ``fadd``, ``shufflevector`` -- and portable LLVM intrinsics only, no
x86-specific ones: on x86-64 LLVM maps a vector to one AVX register, on aarch64 to a pair of
NEON registers, elsewhere to whatever the target has. The LLVM names used:

* ``llvm.fmuladd.v8f32`` (:func:`vmuladd`): ``a * b + c``, fused into one instruction with one
  rounding where the CPU has FMA, a multiply and an add elsewhere;
* ``llvm.masked.load.v8f32.p0v8f32`` (:func:`vload_n`): a load of the first lanes only, the
  others set to zero and never read from memory (so it cannot fault past an array's end).
  llvmlite's IR builder writes typed pointers (``<8 x float>*``), and an overloaded
  intrinsic's name must spell its pointer argument's type, so this is the typed-pointer
  name; LLVM 15 and later (opaque pointers) upgrade it to ``llvm.masked.load.v8f32.p0`` when
  they parse the module;
* ``llvm.prefetch.p0i8`` (:func:`prefetch`): a software prefetch hint (typed-pointer name
  likewise).

The operations do no bounds checks: a kernel that uses them must leave slack after its arrays
(see each module's notes).

Caching: Numba keys a cached kernel by its own source file only. After editing this module,
clear the kernel cache (``qcnn warmup`` prints its directory) or the kernels already cached keep
the old code.
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

LANES = 8  # float32 lanes per vector (one AVX register; LLVM splits it where registers are narrower)

_LL_VEC8 = ir.VectorType(ir.FloatType(), LANES)
_I32 = ir.IntType(32)


class Float32x8Type(types.Type):
    """The Numba type of an 8 x float32 vector value (LLVM ``<8 x float>``)."""

    def __init__(self):
        super().__init__(name="float32x8")


float32x8 = Float32x8Type()


@register_model(Float32x8Type)
class _Float32x8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _LL_VEC8)


# --- code generation helpers ------------------------------------------------------------------

def _is_float32_vector(arr):
    return isinstance(arr, types.Array) and arr.dtype == types.float32 and arr.ndim == 1 \
        and arr.layout == "C"


def _element_pointer(context, builder, arr_type, arr, index_type, index):
    """Pointer to ``arr[index]`` (no bounds check)."""
    data = context.make_array(arr_type)(context, builder, arr).data
    return builder.gep(data, [context.cast(builder, index, index_type, types.intp)])


def _vec_pointer(context, builder, sig, args):
    """Pointer to ``arr[index]`` (the first two arguments) as a ``<8 x float>*``."""
    ptr = _element_pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1])
    return builder.bitcast(ptr, _LL_VEC8.as_pointer())


def _broadcast(builder, value, vector_type):
    """A ``vector_type`` value with every lane ``value``."""
    one = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value, _I32(0))
    return builder.shuffle_vector(one, ir.Constant(vector_type, ir.Undefined),
                                  ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES))


def _splat(context, builder, value, value_type):
    """``<8 x float>`` with every lane the scalar ``value`` (converted to float32)."""
    return _broadcast(builder, context.cast(builder, value, value_type, types.float32), _LL_VEC8)


def _lane_mask(builder, n):
    """``<8 x i1>``: lane ``l`` is set when ``l < n`` (``n`` an i64)."""
    i64x8 = ir.VectorType(ir.IntType(64), LANES)
    return builder.icmp_signed("<", ir.Constant(i64x8, list(range(LANES))), _broadcast(builder, n, i64x8))


# --- the operations ---------------------------------------------------------------------------

@intrinsic
def vzero(typingctx):
    """An all-zero vector."""
    def codegen(context, builder, sig, args):
        return ir.Constant(_LL_VEC8, [0.0] * LANES)
    return float32x8(), codegen


@intrinsic
def vload(typingctx, arr, index):
    """``arr[index:index + 8]`` (1-D C-contiguous float32, unaligned, unchecked)."""
    if not (_is_float32_vector(arr) and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_vec_pointer(context, builder, sig, args), align=4)
    return float32x8(arr, index), codegen


@intrinsic
def vload_n(typingctx, arr, index, n):
    """``arr[index:index + 8]`` with the lanes from ``n`` on (any ``n``: all lanes when ``n >= 8``,
    none when ``n <= 0``) zero and not read (``llvm.masked.load``: never reads past ``arr``)."""
    if not (_is_float32_vector(arr) and isinstance(index, types.Integer) and isinstance(n, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        ptr = _vec_pointer(context, builder, sig, args)
        mask = _lane_mask(builder, context.cast(builder, args[2], sig.args[2], types.int64))
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_LL_VEC8, [ptr.type, _I32, mask.type, _LL_VEC8]),
            "llvm.masked.load.v8f32.p0v8f32")  # typed-pointer name (module notes)
        return builder.call(fn, [ptr, _I32(4), mask, ir.Constant(_LL_VEC8, [0.0] * LANES)])
    return float32x8(arr, index, n), codegen


@intrinsic
def vstore(typingctx, arr, index, value):
    """``arr[index:index + 8] = value`` (unaligned, unchecked)."""
    if not (_is_float32_vector(arr) and isinstance(index, types.Integer) and value == float32x8):
        return None

    def codegen(context, builder, sig, args):
        builder.store(args[2], _vec_pointer(context, builder, sig, args), align=4)
        return context.get_dummy_value()
    return types.void(arr, index, value), codegen


@intrinsic
def vadd(typingctx, a, b):
    """``a + b``."""
    if not (a == float32x8 and b == float32x8):
        return None

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1])
    return float32x8(a, b), codegen


@intrinsic
def vsplat(typingctx, scalar):
    """A vector with every lane ``scalar`` (a float, converted to float32)."""
    if not isinstance(scalar, types.Float):
        return None

    def codegen(context, builder, sig, args):
        return _splat(context, builder, args[0], sig.args[0])
    return float32x8(scalar), codegen


@intrinsic
def vmuladd(typingctx, acc, w, v):
    """``acc + w * v``, ``w`` a vector or a float (then in every lane); ``llvm.fmuladd``: fused
    where the CPU has FMA, one rounding instead of two."""
    if not (acc == float32x8 and v == float32x8 and (w == float32x8 or isinstance(w, types.Float))):
        return None

    def codegen(context, builder, sig, args):
        w_vec = args[1] if sig.args[1] == float32x8 else _splat(context, builder, args[1], sig.args[1])
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_LL_VEC8, [_LL_VEC8] * 3), "llvm.fmuladd.v8f32")
        return builder.call(fn, [w_vec, args[2], args[0]])
    return float32x8(acc, w, v), codegen


@intrinsic
def vphase(typingctx, lo, hi, phase):
    """Lanes ``phase, phase + 2, ..., phase + 14`` of the 16 lanes ``lo, hi`` (``phase`` a
    literal 0 or 1): the even or odd elements."""
    if not (lo == float32x8 and hi == float32x8 and isinstance(phase, types.IntegerLiteral)):
        return None
    lanes = [phase.literal_value + 2 * k for k in range(LANES)]

    def codegen(context, builder, sig, args):
        return builder.shuffle_vector(args[0], args[1], ir.Constant(ir.VectorType(_I32, LANES), lanes))
    return float32x8(lo, hi, phase), codegen


@intrinsic
def prefetch(typingctx, arr, index):
    """Prefetch the cache line of ``arr[index]`` (``llvm.prefetch``: read, keep in all levels;
    any array, ``index`` a flat element index; unchecked, a hint only)."""
    if not (isinstance(arr, types.Array) and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        byte_ptr = ir.IntType(8).as_pointer()
        ptr = builder.bitcast(_element_pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1]),
                              byte_ptr)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_ptr] + [_I32] * 3), "llvm.prefetch.p0i8")
        builder.call(fn, [ptr, _I32(0), _I32(3), _I32(1)])
        return context.get_dummy_value()
    return types.void(arr, index), codegen
