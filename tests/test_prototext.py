"""The protobuf text-format parser."""

import pytest

from qcnn.errors import QcnnError
from qcnn.io.prototext import Ident, parse, parse_file

pytestmark = pytest.mark.arm  # also run on aarch64 (.ci/arm64)


def test_fields_messages_comments_and_lists():
    text = '''
    # a comment
    name: "net"  # trailing comment
    input_dim: 1 input_dim: 3
    layer {
      name: 'conv' type: "Convolution"
      convolution_param: { kernel_size: [3, 5] pad: 1; stride: 2, bias_term: false }
      param < lr_mult: 1.5e-1 >
    }
    values: [-inf, 0x10, 2.5f, .5]
    joined: "a" "b"
    escaped: "tab\\there \\"quoted\\""
    '''
    message = parse(text)
    assert message.get1("name") == "net"
    assert message["input_dim"] == [1, 3]
    layer = message["layer"][0]
    conv = layer.get1("convolution_param")
    assert conv["kernel_size"] == [3, 5] and conv.get1("pad") == 1 and conv.get1("stride") == 2
    assert conv.get1("bias_term") == "false" and isinstance(conv.get1("bias_term"), Ident)
    assert layer.get1("param").get1("lr_mult") == pytest.approx(0.15)
    assert message["values"][0] == float("-inf") and message["values"][1:] == [16, 2.5, 0.5]
    assert message.get1("joined") == "ab"
    assert message.get1("escaped") == 'tab\there "quoted"'
    assert message.get1("missing", 7) == 7


@pytest.mark.parametrize("text, where, what", [
    ('layer { name: "x"\n type: }', "2:8", "expected a value for field 'type'"),
    ('layer { name: "x"', "1:18", "missing '}'"),
    ("name \"x\"", "1:6", "expected ':' or '{'"),
    ("a: 1 }", "1:6", "expected a field name"),
    ("a: 1 $", "1:6", "unexpected character"),
    ("a: [1 2]", "1:7", "expected ',' or ']'"),
])
def test_syntax_errors_name_file_line_and_column(text, where, what):
    with pytest.raises(QcnnError) as error:
        parse(text, "net.prototxt")
    message = str(error.value)
    assert message.startswith(f"net.prototxt:{where}: ") and what in message
    assert "\n" not in message


def test_parse_file_errors(tmp_path):
    with pytest.raises(QcnnError, match="no such file"):
        parse_file(tmp_path / "missing.prototxt")
    binary = tmp_path / "model.caffemodel"
    binary.write_bytes(b"\x0a\xff\xfe\x00\x80")
    with pytest.raises(QcnnError, match="not a text file"):
        parse_file(binary)
