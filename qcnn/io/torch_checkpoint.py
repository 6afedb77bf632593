"""Reading PyTorch checkpoints (``torch.save`` files) without PyTorch.

Both of ``torch.save``'s formats are read, with the standard library and NumPy only:

* the legacy format (``_use_new_zipfile_serialization=False``, and every file
  written before PyTorch 1.6): five pickles in a row (the magic number
  ``0x1950a86a20f9469cfc6c``, the protocol version 1001, a ``sys_info``
  dict, the object itself, the sorted list of storage keys), then for each
  key the storage's element count (int64) and its raw elements, little-endian;
* the zip format (PyTorch 1.6 and later): ``<archive>/data.pkl`` and one
  ``<archive>/data/<key>`` entry of raw elements per storage, in the byte order
  ``<archive>/byteorder`` names (little-endian if absent).

In both, a tensor is pickled as ``torch._utils._rebuild_tensor_v2(storage,
storage_offset, size, stride, ...)`` with the storage a persistent id
``('storage', <torch.FloatStorage etc.>, key, location, numel[, view])``;
sizes, strides and offsets count elements. Tensors come back as NumPy arrays
(C-contiguous copies; bfloat16 is widened to float32).

Unpickling is restricted: only the few globals a checkpoint of tensors needs
(``collections.OrderedDict``, the tensor/parameter rebuild functions, the
storage types) are resolved, so a checkpoint cannot run code. A pickled
``nn.Module`` (``torch.save(model)``) is refused: save its ``state_dict()``.
"""

import io
import pickle
import struct
import tarfile
import zipfile
from collections import OrderedDict

import numpy as np

from qcnn.errors import QcnnError
from qcnn.io.files import read_bytes

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

# torch.<Name>Storage -> NumPy element type (byte order added per file).
STORAGE_DTYPES = {
    "DoubleStorage": "f8", "FloatStorage": "f4", "HalfStorage": "f2", "BFloat16Storage": "u2",
    "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?",
}


class _StorageType:
    """Stands for ``torch.<name>`` while unpickling."""

    def __init__(self, name):
        self.name = name
        self.dtype = np.dtype(STORAGE_DTYPES[name])


class _Storage:
    """A storage named by the pickle; ``array`` is filled from the file's data afterwards."""

    def __init__(self, key, storage_type, numel):
        self.key, self.type, self.numel = key, storage_type, numel
        self.array = None


class _StorageView:
    """Old legacy files: a storage that is a slice of another one."""

    def __init__(self, root, offset, numel):
        self.root, self.offset, self.numel = root, offset, numel
        self.type = root.type


class _Tensor:
    """A tensor to build once its storage's data is read."""

    def __init__(self, storage, offset, size, stride):
        if not isinstance(storage, (_Storage, _StorageView)):
            raise pickle.UnpicklingError("tensor without a storage")
        self.storage, self.offset = storage, int(offset)
        self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
        if len(self.size) != len(self.stride) or min(self.size + self.stride + (self.offset,), default=0) < 0:
            raise pickle.UnpicklingError(f"bad tensor geometry: size {self.size}, stride {self.stride}, "
                                         f"offset {self.offset}")

    def array(self):
        storage = self.storage
        if isinstance(storage, _StorageView):
            data = storage.root.array[storage.offset:storage.offset + storage.numel]
            if data.size != storage.numel:
                raise QcnnError(f"a view of {storage.numel} elements at offset {storage.offset} lies "
                                f"outside its storage '{storage.root.key}'")
            key = storage.root.key
        else:
            data, key = storage.array, storage.key
        if all(self.size):
            last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
            if last >= data.size:
                raise QcnnError(f"a tensor of size {self.size} (stride {self.stride}, offset "
                                f"{self.offset}) lies outside its storage '{key}' of {data.size} elements")
            view = np.lib.stride_tricks.as_strided(data[self.offset:], self.size,
                                                   [s * data.itemsize for s in self.stride],
                                                   writeable=False)
            out = np.array(view, order="C")
        else:
            out = np.zeros(self.size, data.dtype)
        if storage.type.name == "BFloat16Storage":
            out = (out.astype(np.uint32) << 16).view(np.float32)
        return out.astype(out.dtype.newbyteorder("="), copy=False)


# Unpickling damaged bytes can raise almost anything (even SystemError from CPython's
# unpickler); with globals restricted, every such failure just means a corrupt file.
_PICKLE_ERRORS = Exception


def _rebuild_tensor(storage, storage_offset, size, stride, *_):
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *_):
    return data


_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, storages):
        super().__init__(file)
        self.storages = storages  # key -> _Storage, shared by the whole file

    def find_class(self, module, name):
        if (module, name) in _GLOBALS:
            return _GLOBALS[module, name]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch" and name.endswith("Storage"):
            raise pickle.UnpicklingError(f"storage type torch.{name} is not supported")
        raise pickle.UnpicklingError(f"refusing to load the global {module}.{name}: only checkpoints "
                                     "of tensors (a state_dict) can be read")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"storage '{key}' has no storage type")
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = _Storage(key, storage_type, numel)
        view = pid[5] if len(pid) > 5 else None
        if view is not None:  # legacy: (view key, offset, numel) within this storage
            _, offset, view_numel = view
            return _StorageView(storage, int(offset), int(view_numel))
        return storage


def _resolve(obj):
    """``obj`` with every tensor placeholder replaced by its array."""
    if isinstance(obj, _Tensor):
        return obj.array()
    if isinstance(obj, dict):
        out = type(obj)() if type(obj) in (dict, OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _resolve(v)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v) for v in obj)
    if isinstance(obj, (_Storage, _StorageView, _StorageType)):
        raise QcnnError("bare storages (not tensors) in a checkpoint are not supported")
    return obj


def _element_array(buffer, storage, byteorder, where):
    dtype = storage.type.dtype.newbyteorder(byteorder)
    if len(buffer) != storage.numel * dtype.itemsize:
        raise QcnnError(f"{where}: storage '{storage.key}' should hold {storage.numel} "
                        f"{storage.type.name} elements ({storage.numel * dtype.itemsize} bytes), "
                        f"found {len(buffer)} bytes")
    return np.frombuffer(buffer, dtype)


def _load_legacy(data, path):
    f = io.BytesIO(data)

    def header(what):
        try:
            return _Unpickler(f, {}).load()
        except _PICKLE_ERRORS:
            if what == "magic number":
                raise QcnnError(f"{path}: not a PyTorch checkpoint") from None
            raise QcnnError(f"{path}: truncated or corrupt checkpoint (cannot read the {what})") from None

    if header("magic number") != MAGIC_NUMBER:
        raise QcnnError(f"{path}: not a PyTorch checkpoint (wrong magic number)")
    protocol = header("protocol version")
    if protocol != PROTOCOL_VERSION:
        raise QcnnError(f"{path}: unsupported legacy checkpoint protocol {protocol!r} "
                        f"(expected {PROTOCOL_VERSION})")
    sys_info = header("system information")
    if not isinstance(sys_info, dict):
        raise QcnnError(f"{path}: corrupt checkpoint header (system information is not a dict)")
    storages = {}
    obj = _unpickle(f, storages, path)
    try:
        keys = _Unpickler(f, {}).load()
    except _PICKLE_ERRORS:
        raise QcnnError(f"{path}: truncated checkpoint (no list of storage keys)") from None
    if not isinstance(keys, list) or set(map(str, keys)) != set(storages):
        raise QcnnError(f"{path}: corrupt checkpoint (its storage key list does not match its tensors)")
    offset = f.tell()
    view = memoryview(data)
    for key in keys:
        storage = storages[str(key)]
        if offset + 8 > len(data):
            raise QcnnError(f"{path}: truncated checkpoint (storage '{key}' is missing)")
        (numel,) = struct.unpack_from("<q", data, offset)
        if numel != storage.numel:
            raise QcnnError(f"{path}: storage '{key}' has {numel} elements, but its tensors "
                            f"expect {storage.numel}")
        offset += 8
        size = numel * storage.type.dtype.itemsize
        if offset + size > len(data):
            raise QcnnError(f"{path}: truncated checkpoint (storage '{key}' ends after the file)")
        # Legacy files are always written little-endian, whatever sys_info says.
        storage.array = _element_array(view[offset:offset + size], storage, "<", path)
        offset += size
    return obj


def _unpickle(f, storages, path):
    try:
        return _Unpickler(f, storages).load()
    except QcnnError:
        raise
    except pickle.UnpicklingError as e:
        raise QcnnError(f"{path}: cannot read checkpoint: {e}") from None
    except _PICKLE_ERRORS as e:
        raise QcnnError(f"{path}: truncated or corrupt checkpoint ({type(e).__name__}: {e})") from None


def _load_zip(data, path):
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
    except Exception as e:  # noqa: BLE001  the central directory is damaged
        raise QcnnError(f"{path}: corrupt zip checkpoint ({str(e)[:100]})") from None
    pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise QcnnError(f"{path}: a zip file, but not a PyTorch checkpoint (no <archive>/data.pkl)")
    prefix = pickles[0][:-len("data.pkl")]
    storages = {}
    try:
        byteorder = "<"
        if prefix + "byteorder" in names:
            order = archive.read(prefix + "byteorder").decode("ascii", "replace").strip()
            if order not in ("little", "big"):
                raise QcnnError(f"{path}: unknown byte order {order[:20]!r}")
            byteorder = "<" if order == "little" else ">"
        obj = _unpickle(io.BytesIO(archive.read(pickles[0])), storages, path)
        for key, storage in storages.items():
            name = f"{prefix}data/{key}"
            if name not in names:
                raise QcnnError(f"{path}: storage '{key}' is missing from the archive")
            storage.array = _element_array(archive.read(name), storage, byteorder, path)
    except QcnnError:
        raise
    except Exception as e:  # noqa: BLE001  zipfile's CRC, truncation, encryption, method errors
        raise QcnnError(f"{path}: corrupt zip checkpoint ({str(e)[:100]})") from None
    return obj


def load_torch_checkpoint(path):
    """Read a ``torch.save`` file of tensors (a ``state_dict``, or dicts/lists of tensors).

    Parameters
    ----------
    path : str or path

    Returns
    -------
    object
        The saved object with every tensor as a NumPy array (C-contiguous, native
        byte order, PyTorch's dtype; bfloat16 as float32). A ``state_dict`` comes
        back as an ``OrderedDict`` of name -> array.

    Raises
    ------
    QcnnError
        Naming the file: not a checkpoint, truncated or corrupt data, a global
        other than the tensor machinery (e.g. a pickled ``nn.Module``), an
        unsupported storage type.
    """
    data = read_bytes(path)
    if data[:4] == b"PK\x03\x04":
        obj = _load_zip(data, path)
    elif len(data) >= 512 and tarfile.is_tarfile(io.BytesIO(data)):
        raise QcnnError(f"{path}: the tar-based checkpoint format of PyTorch < 0.4 is not supported")
    else:
        obj = _load_legacy(data, path)
    try:
        return _resolve(obj)
    except QcnnError as e:
        raise QcnnError(f"{path}: {e}") from None
