"""Reading ``torch.save`` checkpoints without PyTorch, on small checkpoints written here.

The writer below produces both of PyTorch's formats byte for byte as ``torch.save``
lays them out (legacy: five pickles then the storages; zip: data.pkl and one entry
per storage), naming the same globals (``torch._utils._rebuild_tensor_v2``,
``torch.FloatStorage`` ...) without importing torch. The real EfficientNet-Lite0
checkpoint is read in test_efficientnet.py.
"""

import io
import os
import pickle
import struct
import types
import zipfile
from collections import OrderedDict

import numpy as np
import pytest

from qcnn.errors import QcnnError
from qcnn.io.torch_checkpoint import MAGIC_NUMBER, PROTOCOL_VERSION, load_torch_checkpoint


def _torch_global(qualified):
    def stand_in(*args):
        raise AssertionError("only pickled, never called")
    stand_in.torch_name = qualified
    return stand_in


REBUILD_TENSOR_V2 = _torch_global("torch._utils._rebuild_tensor_v2")
REBUILD_PARAMETER = _torch_global("torch._utils._rebuild_parameter")
STORAGE_TYPES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
                 np.dtype(np.float16): "HalfStorage", np.dtype(np.int64): "LongStorage",
                 np.dtype(np.int32): "IntStorage", np.dtype(np.uint8): "ByteStorage",
                 np.dtype(np.bool_): "BoolStorage", "bfloat16": "BFloat16Storage"}
STORAGE_GLOBALS = {name: _torch_global(f"torch.{name}") for name in STORAGE_TYPES.values()}


class Storage:
    def __init__(self, key, data, type_name=None):
        self.key, self.data = key, np.ascontiguousarray(data)
        self.type_name = type_name or STORAGE_TYPES[self.data.dtype]


class Tensor:
    def __init__(self, storage, offset, size, stride, parameter=False):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
        self.parameter = parameter

    def __reduce__(self):
        tensor = (REBUILD_TENSOR_V2, (self.storage, self.offset, tuple(self.size), tuple(self.stride),
                                      False, OrderedDict()))
        if self.parameter:
            return REBUILD_PARAMETER, (_Reduced(tensor), True, OrderedDict())
        return tensor


class _Reduced:
    def __init__(self, reduced):
        self.reduced = reduced

    def __reduce__(self):
        return self.reduced


class _Pickler(pickle._Pickler):  # the pure-Python pickler, to write torch's globals by name
    def __init__(self, file, storages, legacy):
        super().__init__(file, protocol=2)
        self.storages, self.legacy = storages, legacy

    def save(self, obj, save_persistent_id=True):
        qualified = getattr(obj, "torch_name", None) if isinstance(obj, (type, types.FunctionType)) else None
        if qualified is None:
            return super().save(obj, save_persistent_id)
        module, _, attr = qualified.rpartition(".")
        self.write(pickle.GLOBAL + f"{module}\n{attr}\n".encode())

    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            self.storages[obj.key] = obj
            pid = ("storage", STORAGE_GLOBALS[obj.type_name], obj.key, "cpu", obj.data.size)
            return pid + (None,) if self.legacy else pid  # legacy: no view of another storage
        return None


def _dumps(obj, storages, legacy):
    f = io.BytesIO()
    _Pickler(f, storages, legacy).dump(obj)
    return f.getvalue()


def write_legacy(path, obj, *, magic=MAGIC_NUMBER, protocol=PROTOCOL_VERSION):
    storages = {}
    body = _dumps(obj, storages, legacy=True)
    sys_info = {"protocol_version": PROTOCOL_VERSION, "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 4}}
    keys = sorted(storages)
    with open(path, "wb") as f:
        for header in (magic, protocol, sys_info):
            f.write(pickle.dumps(header, protocol=2))
        f.write(body)
        f.write(pickle.dumps(keys, protocol=2))
        for key in keys:
            data = storages[key].data
            f.write(struct.pack("<q", data.size))
            f.write(data.astype(data.dtype.newbyteorder("<")).tobytes())


def write_zip(path, obj, byteorder="little"):
    storages = {}
    body = _dumps(obj, storages, legacy=False)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", body)
        z.writestr("archive/byteorder", byteorder)
        z.writestr("archive/version", "3\n")
        for key, storage in storages.items():
            order = "<" if byteorder == "little" else ">"
            z.writestr(f"archive/data/{key}", storage.data.astype(storage.data.dtype.newbyteorder(order)).tobytes())


def bfloat16_bits(values):
    return (np.asarray(values, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def sample_checkpoint():
    """A state dict exercising offsets, strides, shared storages, 0-d tensors and dtypes,
    and the arrays it must read back as."""
    shared = Storage("0", np.arange(20, dtype=np.float32))
    counts = Storage("1", np.array([7], np.int64))
    doubles = Storage("2", np.linspace(0, 1, 6))
    flags = Storage("3", np.array([True, False, True]))
    halves = Storage("4", np.array([1.5, -2.0], np.float16))
    brain = Storage("5", bfloat16_bits([1.0, -3.5, 0.15625]), "BFloat16Storage")
    empty = Storage("6", np.zeros(0, np.float32))
    state = OrderedDict([
        ("conv.weight", Tensor(shared, 0, (2, 3, 2), (6, 2, 1))),
        ("transposed", Tensor(shared, 12, (4, 2), (1, 4))),  # a transposed view at an offset
        ("layer.bias", Tensor(shared, 13, (3,), (1,), parameter=True)),
        ("bn.num_batches_tracked", Tensor(counts, 0, (), ())),
        ("doubles", Tensor(doubles, 1, (5,), (1,))),
        ("flags", Tensor(flags, 0, (3,), (1,))),
        ("halves", Tensor(halves, 0, (2,), (1,))),
        ("bfloat16", Tensor(brain, 0, (3,), (1,))),
        ("empty", Tensor(empty, 0, (0, 4), (4, 1))),
    ])
    base = np.arange(20, dtype=np.float32)
    expected = {
        "conv.weight": base[:12].reshape(2, 3, 2),
        "transposed": base[12:20].reshape(2, 4).T,
        "layer.bias": base[13:16],
        "bn.num_batches_tracked": np.array(7, np.int64),
        "doubles": np.linspace(0, 1, 6)[1:],
        "flags": np.array([True, False, True]),
        "halves": np.array([1.5, -2.0], np.float16),
        "bfloat16": np.array([1.0, -3.5, 0.15625], np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }
    return state, expected


def check_state(loaded, expected):
    assert isinstance(loaded, OrderedDict)
    assert list(loaded) == list(expected)
    for name, want in expected.items():
        got = loaded[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert got.flags.c_contiguous and got.dtype.isnative, name
        np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.mark.parametrize("fmt", ["legacy", "zip", "zip-big-endian"])
def test_reads_both_formats(tmp_path, fmt):
    state, expected = sample_checkpoint()
    path = tmp_path / "model.pth"
    if fmt == "legacy":
        write_legacy(path, state)
    else:
        write_zip(path, state, "big" if fmt.endswith("big-endian") else "little")
    check_state(load_torch_checkpoint(path), expected)


def test_nested_containers(tmp_path):
    storage = Storage("9", np.array([1.0, 2.0], np.float32))
    obj = {"epoch": 3, "model": OrderedDict(w=Tensor(storage, 0, (2,), (1,))),
           "history": [Tensor(storage, 1, (1,), (1,)), "note"]}
    write_legacy(tmp_path / "c.pth", obj)
    loaded = load_torch_checkpoint(tmp_path / "c.pth")
    assert loaded["epoch"] == 3 and loaded["history"][1] == "note"
    np.testing.assert_array_equal(loaded["model"]["w"], [1.0, 2.0])
    np.testing.assert_array_equal(loaded["history"][0], [2.0])


def _error(path):
    with pytest.raises(QcnnError) as info:
        load_torch_checkpoint(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message
    return message


def test_errors_name_the_file(tmp_path):
    state, _ = sample_checkpoint()
    good = tmp_path / "good.pth"
    write_legacy(good, state)
    data = good.read_bytes()

    assert "no such file" in _error(tmp_path / "missing.pth")
    text = tmp_path / "text.pth"
    text.write_text("hello, not a checkpoint\n")
    assert "not a PyTorch checkpoint" in _error(text)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    assert "not a PyTorch checkpoint" in _error(empty)

    wrong_magic = tmp_path / "magic.pth"
    write_legacy(wrong_magic, state, magic=12345)
    assert "magic number" in _error(wrong_magic)
    wrong_protocol = tmp_path / "protocol.pth"
    write_legacy(wrong_protocol, state, protocol=1000)
    assert "protocol 1000" in _error(wrong_protocol)

    for cut in (len(data) - 3, len(data) - 90, len(data) // 2, 60):
        truncated = tmp_path / f"cut{cut}.pth"
        truncated.write_bytes(data[:cut])
        assert "truncated" in _error(truncated) or "corrupt" in _error(truncated)

    broken_zip = tmp_path / "broken.pt"
    write_zip(broken_zip, state)
    broken_zip.write_bytes(broken_zip.read_bytes()[:200])
    assert "zip" in _error(broken_zip)


def test_refuses_code_and_modules(tmp_path):
    witness = tmp_path / "witness"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {witness}",)

    evil = tmp_path / "evil.pth"
    write_legacy(evil, {"w": Exploit()})
    message = _error(evil)
    assert "refusing to load the global" in message and "system" in message
    assert not witness.exists()

    class Module:  # what torch.save(model) pickles: the module's own class
        pass
    Module.torch_name = "mypackage.model.Net"
    module = tmp_path / "module.pth"
    write_legacy(module, {"model": _Reduced((Module, ()))})
    assert "mypackage.model.Net" in _error(module)


def test_tensor_outside_its_storage(tmp_path):
    storage = Storage("0", np.zeros(6, np.float32))
    path = tmp_path / "bad.pth"
    write_legacy(path, {"w": Tensor(storage, 2, (2, 3), (3, 1))})  # needs 8 elements
    assert "outside its storage" in _error(path)


def test_storage_size_mismatch(tmp_path):
    state, _ = sample_checkpoint()
    path = tmp_path / "zip.pt"
    write_zip(path, state)
    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    entries["archive/data/0"] = entries["archive/data/0"][:-4]
    with zipfile.ZipFile(path, "w") as z:
        for name, value in entries.items():
            z.writestr(name, value)
    assert "should hold 20 FloatStorage elements" in _error(path)
