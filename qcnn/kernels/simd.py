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
``<8 x float>``, ``fadd``, ``shufflevector`` -- and portable LLVM intrinsics only (the one exception, the byte
shuffle of the byte-table lookups at the end, is chosen per CPU): on x86-64 LLVM maps a vector
to one AVX register, on aarch64 to a pair of NEON registers, elsewhere to whatever the target
has. The LLVM names used:

* ``llvm.fmuladd.v8f32`` (:func:`vmuladd`): ``a * b + c``, fused into one instruction with one
  rounding where the CPU has FMA, a multiply and an add elsewhere;
* ``llvm.masked.load.v8f32.p0v8f32`` (:func:`vload_n`): a load of the first lanes only, the
  others set to zero and never read from memory (so it cannot fault past an array's end).
  llvmlite's IR builder writes typed pointers (``<8 x float>*``), and an overloaded
  intrinsic's name must spell its pointer argument's type, so this is the typed-pointer
  name; LLVM 15 and later (opaque pointers) upgrade it to ``llvm.masked.load.v8f32.p0`` when
  they parse the module;
* ``llvm.prefetch.p0i8`` (:func:`prefetch`): a software prefetch hint (typed-pointer name
  likewise);
* ``llvm.x86.avx2.pshuf.b`` or ``llvm.aarch64.neon.tbl1/tbl2.v16i8`` (:func:`add_lookups`):
  byte-table lookups, compiled only where :data:`SHUFFLE_ISA` says the host has them.

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


# --- Byte-table lookups (float tables as byte planes) ------------------------------------------
#
# A table of up to 32 float32 entries is stored as byte planes: plane p holds byte p of every entry
# (:func:`store_planes`). A vector byte shuffle then looks up 32 codes at once in each plane, and
# interleaving the four planes' results rebuilds the 32 float32 entries exactly
# (:func:`add_lookups`). The shuffle is the one target-specific instruction here: AVX2
# ``vpshufb`` on x86-64 (16-entry tables per 128-bit lane, so entries 16..31 take a second
# shuffle) or NEON ``tbl`` on aarch64 (up to 32 entries in two registers). SHUFFLE_ISA names the
# one the host has, or is None: then the kernels must not use these operations.

def _shuffle_isa():
    """The byte shuffle that the CPU Numba compiles for has: NEON is part of every aarch64 CPU;
    on x86-64, AVX2 of the host, or of NUMBA_CPU_NAME / NUMBA_CPU_FEATURES when those are set
    (e.g. ``generic`` for caches shared between machines)."""
    import platform

    import numba
    from llvmlite import binding

    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return "neon"
    if machine not in ("x86_64", "amd64"):
        return None
    if numba.config.CPU_NAME and numba.config.CPU_NAME != "host":
        avx2 = "+avx2" in (numba.config.CPU_FEATURES or "").split(",")
    else:
        avx2 = bool(binding.get_host_cpu_features().get("avx2"))
    return "avx2" if avx2 else None


SHUFFLE_ISA = _shuffle_isa()
TABLE_ENTRIES = 32  # entries per byte table (codes must be < TABLE_ENTRIES)
SHUFFLE_OUTPUTS = 32  # codes looked up per add_lookups call

_I8 = ir.IntType(8)
_I8X16 = ir.VectorType(_I8, 16)
_I8X32 = ir.VectorType(_I8, 32)
_I16X16 = ir.VectorType(ir.IntType(16), 16)


def _mask(indices):
    return ir.Constant(ir.VectorType(_I32, len(indices)), list(indices))


# The AVX2 unpack instructions interleave within each 128-bit lane; these masks are exactly
# theirs, so that x86-64 gets one instruction each (aarch64: zip1/zip2 per half).
_UNPACK8 = [_mask([x for lane in (0, 1) for i in half for x in (16 * lane + i, 32 + 16 * lane + i)])
            for half in (range(8), range(8, 16))]
_UNPACK16 = [_mask([x for lane in (0, 1) for i in half for x in (8 * lane + i, 16 + 8 * lane + i)])
             for half in (range(4), range(4, 8))]

#: SHUFFLE_POSITION[j] is the output (0..31) whose code must sit at byte j of the 32 codes given
#: to :func:`add_lookups`: the order in which the in-lane interleaves deliver the float32 results.
SHUFFLE_POSITION = tuple(8 * ((j % 16) // 4) + 4 * (j // 16) + j % 4 for j in range(32))


def _plane_rows(wide):
    """Byte rows of the stored table, 16 bytes each: row ``p`` (narrow: 16 entries) or ``2p + h``
    (wide: entries 16h..16h+15) holds byte p of those entries."""
    halves = (0, 1) if wide else (0,)
    return [[4 * (16 * h + j) + p for j in range(16)] for p in range(4) for h in halves]


def table_bytes(wide):
    """Bytes of one stored byte-plane table."""
    return (8 if wide else 4) * 16


@intrinsic
def store_planes(typingctx, tables, offset, lut, wide):
    """Write the float32 entries ``lut[0:32]`` (16 when ``wide`` is the literal False) as byte
    planes to ``tables[offset:offset + table_bytes(wide)]``: see :func:`_plane_rows`."""
    if not (isinstance(tables, types.Array) and tables.dtype == types.uint8 and _is_float32_vector(lut)
            and isinstance(offset, types.Integer) and isinstance(wide, types.BooleanLiteral)):
        return None
    rows = _plane_rows(wide.literal_value)
    n_bytes = 4 * (TABLE_ENTRIES if wide.literal_value else TABLE_ENTRIES // 2)  # the float32 entries

    def codegen(context, builder, sig, args):
        src_type = ir.VectorType(_I8, n_bytes)
        src_ptr = _element_pointer(context, builder, sig.args[2], args[2], types.intp, context.get_constant(types.intp, 0))
        src = builder.load(builder.bitcast(src_ptr, src_type.as_pointer()), align=4)
        planes = builder.shuffle_vector(src, ir.Constant(src_type, ir.Undefined),
                                        _mask([i for row in rows for i in row]))
        dst = _element_pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        builder.store(planes, builder.bitcast(dst, src_type.as_pointer()), align=1)
        return context.get_dummy_value()
    return types.void(tables, offset, lut, wide), codegen


def _shuffle_bytes(builder, rows, index, wide):
    """One byte plane looked up at the 32 byte ``index``es: ``rows`` the plane's 16-byte table
    rows (one, or two when ``wide``)."""
    if SHUFFLE_ISA == "avx2":
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I8X32, [_I8X32, _I8X32]),
                                            "llvm.x86.avx2.pshuf.b")
        both = _mask(list(range(16)) * 2)  # the row in both 128-bit lanes (a broadcast load)
        tables = [builder.shuffle_vector(row, ir.Constant(_I8X16, ir.Undefined), both) for row in rows]
        if not wide:
            return builder.call(fn, [tables[0], index])
        # vpshufb reads the low 4 bits and gives 0 where bit 7 is set: +0x70 sets bit 7 for codes
        # 16..31, -16 (+0xF0) sets it for codes 0..15, so each half answers its own codes only.
        low = builder.call(fn, [tables[0], builder.add(index, ir.Constant(_I8X32, [0x70] * 32))])
        high = builder.call(fn, [tables[1], builder.add(index, ir.Constant(_I8X32, [0xF0] * 32))])
        return builder.or_(low, high)
    name = "llvm.aarch64.neon.tbl2.v16i8" if wide else "llvm.aarch64.neon.tbl1.v16i8"
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I8X16, [_I8X16] * (len(rows) + 1)), name)
    halves = [builder.call(fn, rows + [builder.shuffle_vector(index, ir.Constant(_I8X32, ir.Undefined),
                                                                _mask(range(16 * h, 16 * h + 16)))])
              for h in (0, 1)]
    return builder.shuffle_vector(halves[0], halves[1], _mask(range(32)))


Float32x8Quad = types.UniTuple(float32x8, 4)


@intrinsic
def add_lookups(typingctx, tables, offset, codes, start, acc, wide):
    """``acc`` plus the 32 float32 table entries that the codes ``codes[start:start + 32]`` select
    from the byte-plane table at ``tables[offset:]`` (:func:`store_planes`). ``acc`` is four
    vectors; code byte ``j`` adds into output ``SHUFFLE_POSITION[j]`` (vector ``o // 8``, lane
    ``o % 8``). ``wide`` (a literal): entries up to 32, else 16. Needs SHUFFLE_ISA; unchecked."""
    if not (SHUFFLE_ISA and isinstance(tables, types.Array) and tables.dtype == types.uint8
            and isinstance(codes, types.Array) and codes.dtype == types.uint8
            and isinstance(offset, types.Integer) and isinstance(start, types.Integer)
            and acc == Float32x8Quad and isinstance(wide, types.BooleanLiteral)):
        return None
    is_wide = wide.literal_value

    def codegen(context, builder, sig, args):
        table = builder.bitcast(_element_pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1]),
                                _I8X16.as_pointer())
        code_ptr = _element_pointer(context, builder, sig.args[2], args[2], sig.args[3], args[3])
        index = builder.load(builder.bitcast(code_ptr, _I8X32.as_pointer()), align=1)
        per_plane = 2 if is_wide else 1
        planes = [_shuffle_bytes(builder, [builder.load(builder.gep(table, [_I32(per_plane * p + h)]), align=1)
                                           for h in range(per_plane)], index, is_wide)
                  for p in range(4)]
        low_words = [builder.bitcast(builder.shuffle_vector(planes[a], planes[a + 1], m), _I16X16)
                     for a in (0, 2) for m in _UNPACK8]  # bytes 0|1 and 2|3 of each entry, interleaved
        floats = [builder.bitcast(builder.shuffle_vector(low_words[h], low_words[2 + h], m), _LL_VEC8)
                  for h in (0, 1) for m in _UNPACK16]
        sums = [builder.fadd(builder.extract_value(args[4], i), floats[i]) for i in range(4)]
        return context.make_tuple(builder, sig.return_type, sums)
    return Float32x8Quad(tables, offset, codes, start, acc, wide), codegen
