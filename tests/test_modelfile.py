"""qcnn's own model format: round trip, memory mapping, atomic writes, damaged files."""

import json
import struct

import numpy as np
import pytest

import qcnn
from qcnn.errors import QcnnError
from qcnn.io import modelfile

from conftest import CAFFE_DIR


@pytest.fixture(scope="module")
def caffenet():
    return qcnn.load_caffe(CAFFE_DIR / "caffenet.prototxt", seed=4,
                           metadata={"preprocess": {"mean": [104, 117, 123]}, "labels": ["a"] * 1000})


def test_round_trip_is_exact_and_memory_mapped(caffenet, tmp_path):
    path = tmp_path / "caffenet.qcnn"
    qcnn.save(caffenet, path)
    loaded = qcnn.load(path)
    assert loaded.name == caffenet.name and loaded.inputs == caffenet.inputs
    assert loaded.metadata == caffenet.metadata
    assert [(layer.name, layer.type, layer.params) for layer in loaded.layers] == \
        [(layer.name, layer.type, layer.params) for layer in caffenet.layers]
    for a, b in zip(loaded.layers, caffenet.layers):
        for wa, wb in zip(a.blobs, b.blobs):
            np.testing.assert_array_equal(wa, wb)
            assert wa.ctypes.data % 64 == 0
    assert is_mapped(loaded.layer("fc6").blobs[0])
    x = np.random.default_rng(0).normal(0, 0.2, (1, 3, 227, 227)).astype(np.float32)
    np.testing.assert_array_equal(loaded.forward(x)["prob"], caffenet.forward(x)["prob"])
    in_memory = qcnn.load(path, mmap=False)
    assert not is_mapped(in_memory.layer("fc6").blobs[0])


def is_mapped(array):
    while isinstance(array, np.ndarray):
        if isinstance(array, np.memmap):
            return True
        array = array.base
    return False


def test_failed_write_keeps_the_old_file(caffenet, tmp_path):
    path = tmp_path / "model.qcnn"
    qcnn.save(caffenet, path)
    before = path.read_bytes()
    caffenet.metadata["bad"] = object()  # not JSON-serialisable: save must fail
    try:
        with pytest.raises(QcnnError):
            qcnn.save(caffenet, path)
    finally:
        del caffenet.metadata["bad"]
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.qcnn"]


@pytest.fixture
def small_file(caffenet, tmp_path):
    path = tmp_path / "small.qcnn"
    qcnn.save(qcnn.Net(caffenet.inputs, caffenet.layers[:5], "head"), path)
    return path


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:len(b) // 2], "truncated"),
    (lambda b: b[:20], "truncated"),
    (lambda b: b"GARBAGE!" + b[8:], "not a qcnn model file"),
    (lambda b: b[:-100] + bytes(100 - 1) + b"\x01", "checksum"),
    (lambda b: b[:8] + struct.pack("<I", 99) + b[12:], "newer"),
    (lambda b: b[:30] + b"}}}" + b[33:], "corrupt model header"),
])
def test_damaged_files_give_one_line_errors(small_file, damage, message):
    path = small_file
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(QcnnError) as error:
        qcnn.load(path)
    text = str(error.value)
    assert message in text and str(path) in text and "\n" not in text


def test_header_with_unknown_layer_type(small_file):
    path = small_file
    data = path.read_bytes()
    header_len = struct.unpack_from("<Q", data, 16)[0]
    header = json.loads(data[24:24 + header_len])
    header["layers"][0]["type"] = "FancyConv"
    new_header = json.dumps(header).encode()
    new_header += b" " * (header_len - len(new_header))  # keep the data offset
    assert len(new_header) == header_len
    path.write_bytes(data[:24] + new_header + data[24 + header_len:])
    with pytest.raises(QcnnError, match="unknown layer type 'FancyConv'"):
        modelfile.load(path)


@pytest.mark.arm
def test_missing_file(tmp_path):
    with pytest.raises(QcnnError, match="no such file"):
        qcnn.load(tmp_path / "none.qcnn")
