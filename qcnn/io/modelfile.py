"""qcnn's own model format (``.qcnn``): graph and weights in one versioned file.

Layout (all integers little-endian)::

    offset 0   magic      8 bytes  b"QCNN\\x00MDL"
    offset 8   version    uint32   (FORMAT_VERSION)
    offset 12  reserved   uint32   (0)
    offset 16  header_len uint64
    offset 24  header     header_len bytes of UTF-8 JSON
    ...        zero padding to a multiple of 64
    data       the arrays, each starting at a multiple of 64 bytes

The JSON header holds ``name``, ``inputs`` ({name: shape}), ``metadata``
(``preprocess``, ``labels`` ...), ``data_bytes`` and ``data_crc32`` (of the
data section) and ``layers``: a list of ``{name, type, bottoms, tops,
params, blobs}`` where each blob is ``{dtype, shape, offset}`` (offset from
the start of the data section), plus ``packed_bits`` for integer codes stored
bit-packed (``packed_bits`` bits per value, little-endian bit order). Arrays are C-ordered, so loading maps them
straight from the file (``numpy.memmap``) without copying.
"""

import json
import os
import struct
import zlib

import numpy as np

from qcnn.errors import QcnnError
from qcnn.graph import Net
from qcnn.io.files import atomic_write, reading
from qcnn.layers import LAYER_TYPES
from qcnn.quantization.pq import pack_codes, unpack_codes

MAGIC = b"QCNN\x00MDL"
FORMAT_VERSION = 1
ALIGN = 64
_PREFIX = struct.Struct("<8sIIQ")
_DTYPES = {"float32", "float16", "uint8", "int32", "int64"}


def _aligned(n):
    return -(-n // ALIGN) * ALIGN


def save(net, path):
    """Write ``net`` to ``path`` atomically (a failure leaves any old file intact)."""
    layers, chunks, offset = [], [], 0
    for layer in net.layers:
        blobs = []
        for blob, bits in zip(layer.blobs, layer.blob_storage()):
            array = np.ascontiguousarray(blob, np.float16 if bits == "float16" else None)
            if array.dtype.name not in _DTYPES:
                array = array.astype(np.float32)
            entry = {"dtype": array.dtype.name, "shape": list(array.shape), "offset": offset}
            if isinstance(bits, int):
                entry["packed_bits"] = int(bits)
                array = pack_codes(array, bits)
            blobs.append(entry)
            chunks.append((offset, array))
            offset = _aligned(offset + array.nbytes)
        layers.append({"name": layer.name, "type": layer.type, "bottoms": layer.bottoms,
                       "tops": layer.tops, "params": layer.params, "blobs": blobs})
    crc = 0
    for piece in _data_pieces(chunks, offset):
        crc = zlib.crc32(piece, crc)
    header = {"format": "qcnn", "version": FORMAT_VERSION, "name": net.name,
              "inputs": {k: list(v) for k, v in net.inputs.items()}, "metadata": net.metadata,
              "layers": layers, "data_bytes": offset, "data_crc32": crc}
    try:
        header_bytes = json.dumps(header, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise QcnnError(f"{path}: cannot serialise the model header ({e})") from None
    data_start = _aligned(_PREFIX.size + len(header_bytes))
    with atomic_write(path) as f:
        f.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(header_bytes)))
        f.write(header_bytes)
        f.write(b"\0" * (data_start - _PREFIX.size - len(header_bytes)))
        for piece in _data_pieces(chunks, offset):
            f.write(piece)


def _data_pieces(chunks, total):
    """The data section as byte pieces: each array, zero padding between and after."""
    position = 0
    for chunk_offset, array in chunks:
        yield b"\0" * (chunk_offset - position)
        yield memoryview(array).cast("B")
        position = chunk_offset + array.nbytes
    yield b"\0" * (total - position)


def read_header(path):
    """The parsed JSON header of a ``.qcnn`` file and the byte offset of its data."""
    with reading(path), open(path, "rb") as f:
        prefix = f.read(_PREFIX.size)
        if prefix[:8] != MAGIC:
            raise QcnnError(f"{path}: not a qcnn model file (bad magic bytes)")
        if len(prefix) < _PREFIX.size:
            raise QcnnError(f"{path}: truncated model file ({len(prefix)} bytes)")
        _, version, _, header_len = _PREFIX.unpack(prefix)
        if version > FORMAT_VERSION:
            raise QcnnError(f"{path}: model format version {version} is newer than this "
                            f"qcnn supports ({FORMAT_VERSION}); upgrade qcnn")
        raw = f.read(header_len)
        size = os.fstat(f.fileno()).st_size
    if len(raw) != header_len:
        raise QcnnError(f"{path}: truncated model file (header incomplete)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QcnnError(f"{path}: corrupt model header ({e})") from None
    if not isinstance(header, dict) or not isinstance(header.get("data_bytes", 0), int):
        raise QcnnError(f"{path}: corrupt model header (not a qcnn header object)")
    data_start = _aligned(_PREFIX.size + header_len)
    if size < data_start + header.get("data_bytes", 0):
        raise QcnnError(f"{path}: truncated model file ({size} bytes, expected "
                        f"{data_start + header.get('data_bytes', 0)})")
    return header, data_start


def load(path, mmap=True, verify=True):
    """Load a ``.qcnn`` model.

    Parameters
    ----------
    path : str or path
    mmap : bool
        Map the weights from the file (read-only, loaded lazily by the OS)
        instead of reading them into memory.
    verify : bool
        Check the CRC-32 of the weights (reads them once).

    Returns
    -------
    Net
    """
    header, data_start = read_header(path)
    data_bytes = int(header.get("data_bytes", 0))
    if data_bytes == 0:
        data = np.zeros(0, np.uint8)
    elif mmap:
        data = np.memmap(path, np.uint8, "r", offset=data_start, shape=(data_bytes,))
    else:
        with open(path, "rb") as f:
            f.seek(data_start)
            data = np.frombuffer(f.read(data_bytes), np.uint8)
    if verify and zlib.crc32(data) != header.get("data_crc32"):
        raise QcnnError(f"{path}: corrupt model file (weight checksum mismatch)")
    try:
        layers = []
        for spec in header["layers"]:
            blobs = []
            for blob in spec["blobs"]:
                if blob["dtype"] not in _DTYPES:
                    raise QcnnError(f"unsupported dtype {blob['dtype']}")
                dtype, shape, offset = np.dtype(blob["dtype"]), tuple(blob["shape"]), int(blob["offset"])
                count = int(np.prod(shape))
                bits = blob.get("packed_bits")
                nbytes = -(-count * int(bits) // 8) if bits else count * dtype.itemsize
                if offset < 0 or offset + nbytes > data_bytes:
                    raise QcnnError(f"blob of layer '{spec['name']}' lies outside the data section")
                raw = data[offset:offset + nbytes]
                blobs.append(unpack_codes(raw, int(bits), shape) if bits else raw.view(dtype).reshape(shape))
            cls = LAYER_TYPES.get(spec["type"])
            if cls is None:
                raise QcnnError(f"unknown layer type '{spec['type']}' (layer '{spec['name']}'); "
                                "the file may need a newer qcnn")
            layers.append(cls(spec["name"], spec["bottoms"], spec["tops"], blobs, **spec["params"]))
        return Net(header["inputs"], layers, header.get("name", ""), header.get("metadata"))
    except QcnnError as e:
        raise QcnnError(f"{path}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise QcnnError(f"{path}: corrupt model header ({type(e).__name__}: {e})") from None
