"""The protobuf wire-format reader and writer."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcnn.errors import QcnnError
from qcnn.io import protobuf

pytestmark = pytest.mark.arm  # also run on aarch64 (.ci/arm64)

INNER = {1: ("dims", "int64s")}
SCHEMA = {1: ("count", "varint"), 2: ("name", "string"), 3: ("values", "floats"),
          4: ("inner", INNER), 5: ("ratio", "float"), 6: ("precise", "doubles"), 7: ("big", "double")}


@settings(max_examples=60, deadline=None)
@given(count=st.lists(st.integers(0, 2**63 - 1), max_size=3),
       name=st.lists(st.text(max_size=20), max_size=2),
       values=st.lists(st.floats(width=32, allow_nan=False), max_size=40),
       dims=st.lists(st.integers(-2**40, 2**40), max_size=5))
def test_round_trip(count, name, values, dims):
    message = {"count": count, "name": name, "values": [np.array(values, np.float32)] if values else [],
               "inner": [{"dims": dims}]}
    decoded = protobuf.decode(protobuf.encode(message, SCHEMA), SCHEMA)
    assert decoded.get("count", []) == count
    assert decoded.get("name", []) == name
    np.testing.assert_array_equal(protobuf.join_arrays(decoded.get("values", []), np.float32),
                                  np.array(values, np.float32))
    assert decoded["inner"][0].get("dims", []) == dims


def test_unpacked_repeated_floats_and_unknown_fields_are_read():
    # field 3 as three separate fixed32 values (unpacked), field 9 unknown (skipped).
    raw = b"".join(bytes([3 << 3 | 5]) + np.float32(v).tobytes() for v in (1.5, -2.0, 3.25))
    raw += bytes([9 << 3 | 0, 42]) + bytes([5 << 3 | 5]) + np.float32(0.5).tobytes()
    decoded = protobuf.decode(raw, SCHEMA)
    np.testing.assert_array_equal(protobuf.join_arrays(decoded["values"], np.float32), [1.5, -2.0, 3.25])
    assert decoded["ratio"] == [0.5]
    assert "9" not in decoded


def test_packed_floats_are_views_of_the_buffer():
    data = protobuf.encode({"values": [np.arange(1000, dtype=np.float32)]}, SCHEMA)
    decoded = protobuf.decode(data, SCHEMA)
    assert decoded["values"][0].base is not None  # no copy


@pytest.mark.parametrize("cut", [1, 5, 17, 100])
def test_truncated_input_is_a_clear_error(cut):
    data = protobuf.encode({"name": ["x" * 50], "values": [np.ones(20, np.float32)]}, SCHEMA)
    with pytest.raises(QcnnError, match="truncated|past the end"):
        protobuf.decode(data[:-cut], SCHEMA)


def test_wrong_wire_type_is_a_clear_error():
    with pytest.raises(QcnnError, match="wire type"):
        protobuf.decode(bytes([2 << 3 | 0, 1]), SCHEMA)  # 'name' as a varint
    with pytest.raises(QcnnError, match="wire type"):
        protobuf.decode(bytes([1 << 3 | 3]), SCHEMA)  # deprecated group
