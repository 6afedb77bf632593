"""A parser for the protobuf text format (``.prototxt``), schema-free.

The result is a :class:`Message`: a dict from field name to the list of values
that field took (fields may repeat). Values are ``int``, ``float``, ``str``
(quoted strings, unescaped), :class:`Ident` (bare identifiers such as enum
names, ``true``) or nested :class:`Message` objects. Comments (``#``), the
optional ``:`` before a nested message, ``<...>`` braces, ``,``/``;``
separators and list values (``dim: [1, 3]``) are accepted.
"""

import ast
import re

from qcnn.errors import QcnnError
from qcnn.io.files import read_bytes


class Ident(str):
    """A bare identifier (enum value or ``true``/``false``), as opposed to a quoted string."""


class Message(dict):
    """Field name -> list of values. :meth:`get1` reads an optional scalar."""

    def get1(self, name, default=None):
        """The last value of ``name`` (protobuf's rule for repeated scalars), or ``default``."""
        values = self.get(name)
        return values[-1] if values else default


_TOKEN = re.compile(r"""
    (?P<space>[ \t\r\f\v]+|\#[^\n]*)
  | (?P<newline>\n)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<number>[-+]?(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)[fF]?
               |[-+]?(?:inf(?:inity)?|nan)\b)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<punct>[{}<>:\[\],;])
""", re.VERBOSE | re.IGNORECASE)


class _Tokens:
    def __init__(self, text, filename):
        self.filename = filename
        self.items = []  # (kind, text, line, column)
        line, line_start, pos = 1, 0, 0
        while pos < len(text):
            match = _TOKEN.match(text, pos)
            if match is None:
                self.fail(f"unexpected character {text[pos]!r}", line, pos - line_start + 1)
            kind = match.lastgroup
            if kind == "newline":
                line, line_start = line + 1, match.end()
            elif kind != "space":
                self.items.append((kind, match.group(), line, pos - line_start + 1))
            pos = match.end()
        self.index = 0
        self.end_position = (line, pos - line_start + 1)

    def fail(self, what, line=None, column=None):
        if line is None:
            line, column = self.position()
        raise QcnnError(f"{self.filename}:{line}:{column}: {what}")

    def position(self):
        if self.index < len(self.items):
            return self.items[self.index][2:]
        return self.end_position

    def peek(self):
        return self.items[self.index][:2] if self.index < len(self.items) else (None, None)

    def take(self):
        token = self.peek()
        self.index += 1
        return token

    def accept(self, text):
        if self.peek()[1] == text:
            self.index += 1
            return True
        return False


def parse(text, filename="<string>"):
    """Parse protobuf text format into a :class:`Message`.

    Raises
    ------
    QcnnError
        With ``filename:line:column`` and what was expected, if it does not parse.
    """
    tokens = _Tokens(text, filename)
    message = _parse_fields(tokens, closing=None)
    return message


def parse_file(path):
    """Read and parse a ``.prototxt`` file."""
    try:
        text = read_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        raise QcnnError(f"{path}: not a text file (invalid UTF-8); is it a binary model?") from None
    return parse(text, str(path))


_CLOSING = {"{": "}", "<": ">"}


def _parse_fields(tokens, closing):
    message = Message()
    while True:
        kind, text = tokens.peek()
        if kind is None:
            if closing is not None:
                tokens.fail(f"missing '{closing}' before the end of the file")
            return message
        if text == closing:
            tokens.take()
            return message
        if kind != "ident":
            tokens.fail(f"expected a field name, found {text!r}")
        tokens.take()
        name = text
        has_colon = tokens.accept(":")
        if tokens.peek()[1] in _CLOSING:
            value = _parse_fields(tokens, _CLOSING[tokens.take()[1]])
            message.setdefault(name, []).append(value)
        elif not has_colon:
            tokens.fail(f"expected ':' or '{{' after field name '{name}'")
        elif tokens.accept("["):
            values = message.setdefault(name, [])
            while not tokens.accept("]"):
                if tokens.peek()[1] in _CLOSING:
                    values.append(_parse_fields(tokens, _CLOSING[tokens.take()[1]]))
                else:
                    values.append(_parse_scalar(tokens, name))
                if not tokens.accept(","):
                    if tokens.peek()[1] != "]":
                        tokens.fail(f"expected ',' or ']' in the list of field '{name}'")
        else:
            message.setdefault(name, []).append(_parse_scalar(tokens, name))
        if not tokens.accept(","):
            tokens.accept(";")


def _parse_scalar(tokens, name):
    kind, text = tokens.peek()
    if kind == "string":
        tokens.take()
        value = _unquote(text)
        # Adjacent string literals concatenate, as in C.
        while tokens.peek()[0] == "string":
            value += _unquote(tokens.take()[1])
        return value
    if kind == "number":
        tokens.take()
        return _number(text)
    if kind == "ident":
        tokens.take()
        return Ident(text)
    tokens.fail(f"expected a value for field '{name}', found {text!r}" if text
                else f"expected a value for field '{name}', found the end of the file")


def _unquote(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text[1:-1]


def _number(text):
    lowered = text.lower()
    if "inf" in lowered or "nan" in lowered:
        return float(lowered.replace("infinity", "inf"))
    if lowered.lstrip("+-").startswith("0x"):
        return int(lowered, 16)
    lowered = lowered.rstrip("f")  # C-style float suffix: 1.5f
    if any(c in lowered for c in ".e"):
        return float(lowered)
    return int(lowered)
