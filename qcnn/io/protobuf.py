"""A small protobuf wire-format reader and writer driven by explicit schemas.

Only what Caffe files need: varints, length-delimited fields (strings, nested
messages, packed arrays), fixed32 floats and fixed64 doubles. Packed numeric
arrays are returned as NumPy views of the input buffer, so a 230 MB caffemodel
decodes in about the time it takes to read it.

A schema maps a field number to ``(name, kind)`` where kind is one of
``"varint"``, ``"string"``, ``"float"``, ``"double"``, ``"int64s"`` (repeated
varint, packed or not), ``"floats"``, ``"doubles"`` (repeated, packed or not)
or a nested schema dict (a message). Scalars and messages are repeated too:
every decoded field is a list, as in the text format, so callers decide
whether the last or all values count.
"""

import struct

import numpy as np

from qcnn.errors import QcnnError

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5

_ARRAY_DTYPES = {"floats": ("<f4", FIXED32), "doubles": ("<f8", FIXED64)}


class DecodeError(QcnnError):
    """Raised for truncated or corrupt protobuf bytes."""


def _read_varint(buf, pos, end):
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise DecodeError(f"truncated varint at byte {pos}")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise DecodeError(f"varint longer than 10 bytes at byte {pos}")


def iter_fields(buf, pos=0, end=None):
    """Yield ``(field_number, wire_type, value, pos)`` for each field in ``buf[pos:end]``.

    ``value`` is an int for varints, a ``(start, stop)`` byte range for
    length-delimited fields and fixed-width fields.
    """
    end = len(buf) if end is None else end
    while pos < end:
        key, pos = _read_varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise DecodeError(f"field number 0 at byte {pos}")
        if wire == VARINT:
            value, pos = _read_varint(buf, pos, end)
        elif wire == LENGTH:
            length, pos = _read_varint(buf, pos, end)
            value = (pos, pos + length)
            pos += length
        elif wire == FIXED32:
            value = (pos, pos + 4)
            pos += 4
        elif wire == FIXED64:
            value = (pos, pos + 8)
            pos += 8
        else:
            raise DecodeError(f"unsupported wire type {wire} at byte {pos}")
        if pos > end:
            raise DecodeError(f"field {number} runs past the end of its message (byte {end})")
        yield number, wire, value, pos


def decode(buf, schema, pos=0, end=None):
    """Decode the message in ``buf[pos:end]`` into a dict of lists, per ``schema``.

    Unknown fields are skipped. Numeric arrays are NumPy arrays sharing
    memory with ``buf`` where the data is packed.
    """
    buf = memoryview(buf)
    message = {}
    for number, wire, value, _ in iter_fields(buf, pos, end):
        spec = schema.get(number)
        if spec is None:
            continue
        name, kind = spec
        values = message.setdefault(name, [])
        if isinstance(kind, dict):
            _expect(wire, LENGTH, name)
            values.append(decode(buf, kind, *value))
        elif kind == "varint":
            _expect(wire, VARINT, name)
            values.append(value)
        elif kind == "string":
            _expect(wire, LENGTH, name)
            try:
                values.append(bytes(buf[value[0]:value[1]]).decode("utf-8"))
            except UnicodeDecodeError:
                raise DecodeError(f"field '{name}' is not valid UTF-8") from None
        elif kind == "int64s":
            if wire == LENGTH:
                values.extend(_unpack_varints(buf, *value))
            else:
                _expect(wire, VARINT, name)
                values.append(value)
        elif kind in _ARRAY_DTYPES:
            dtype, fixed_wire = _ARRAY_DTYPES[kind]
            if wire == LENGTH:
                start, stop = value
                itemsize = np.dtype(dtype).itemsize
                if (stop - start) % itemsize:
                    raise DecodeError(f"packed field '{name}' has {stop - start} bytes, "
                                      f"not a multiple of {itemsize}")
                values.append(np.frombuffer(buf, dtype, (stop - start) // itemsize, start))
            else:
                _expect(wire, fixed_wire, name)
                values.append(np.frombuffer(buf, dtype, 1, value[0]))
        elif kind in ("float", "double"):
            fmt = "<f" if kind == "float" else "<d"
            _expect(wire, FIXED32 if kind == "float" else FIXED64, name)
            values.append(struct.unpack_from(fmt, buf, value[0])[0])
        else:  # pragma: no cover - schema typo
            raise ValueError(f"unknown schema kind {kind!r}")
    return message


def _expect(wire, wanted, name):
    if wire != wanted:
        raise DecodeError(f"field '{name}' has wire type {wire}, expected {wanted}")


def _unpack_varints(buf, pos, end):
    out = []
    while pos < end:
        value, pos = _read_varint(buf, pos, end)
        out.append(value - (1 << 64) if value >= 1 << 63 else value)
    return out


def join_arrays(arrays, dtype):
    """Concatenate the per-field arrays of a repeated numeric field (usually one)."""
    if not arrays:
        return np.zeros(0, dtype)
    if len(arrays) == 1:
        return arrays[0]
    return np.concatenate(arrays)


# ---------------------------------------------------------------- writing

def _varint(value):
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(number, wire):
    return _varint(number << 3 | wire)


def encode(message, schema):
    """Encode a dict of lists (as :func:`decode` returns) into protobuf bytes.

    Numeric arrays are written packed. Fields are written in schema order.
    """
    return b"".join(encode_pieces(message, schema)[0])


def encode_pieces(message, schema):
    """Like :func:`encode` but as ``(pieces, total_length)``, so large arrays are not copied
    into one buffer before being written (write the pieces one after another)."""
    pieces = []

    def put(number, wire, payload=None, length=None):
        pieces.append(_key(number, wire))
        if wire == LENGTH:
            pieces.append(_varint(length if length is not None else len(payload)))
        if payload is not None:
            pieces.append(payload)

    for number, (name, kind) in sorted(schema.items()):
        values = message.get(name, ())
        if isinstance(kind, dict):
            for value in values:
                sub_pieces, length = encode_pieces(value, kind)
                put(number, LENGTH, length=length)
                pieces.extend(sub_pieces)
        elif kind == "int64s":
            if len(values):
                put(number, LENGTH, b"".join(_varint(int(v)) for v in values))
        elif kind in _ARRAY_DTYPES:
            arrays = [np.ascontiguousarray(v, _ARRAY_DTYPES[kind][0]).ravel() for v in values]
            if arrays:
                length = sum(a.nbytes for a in arrays)
                put(number, LENGTH, length=length)
                pieces.extend(memoryview(a).cast("B") for a in arrays)
        else:
            for value in values:
                if kind == "varint":
                    put(number, VARINT, _varint(int(value)))
                elif kind == "string":
                    put(number, LENGTH, value.encode("utf-8"))
                elif kind == "float":
                    put(number, FIXED32, struct.pack("<f", value))
                elif kind == "double":
                    put(number, FIXED64, struct.pack("<d", value))
                else:  # pragma: no cover - schema typo
                    raise ValueError(f"unknown schema kind {kind!r}")
    return pieces, sum(len(p) if isinstance(p, bytes) else p.nbytes for p in pieces)
