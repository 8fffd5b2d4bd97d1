"""Reading and amending serialized protobuf messages without parsing them.

A hop that only routes a request needs two short strings out of it, not its tensors: reading
them from the wire skips a parse and a re-serialization of every tensor byte. The walk visits
the message's top-level fields only, jumping over each length-delimited one (a tensor of
megabytes is one jump), so its cost does not grow with the payload.
"""

from __future__ import annotations

from collections.abc import Collection

_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5


class MalformedMessage(ValueError):
    """The bytes are not a serialized protobuf message."""


def _varint(buffer: bytes, offset: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if offset >= len(buffer):
            raise MalformedMessage("truncated varint")
        byte = buffer[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, offset
        shift += 7
        if shift > 63:
            raise MalformedMessage("varint longer than 10 bytes")


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def read_strings(message: bytes, fields: Collection[int]) -> dict[int, bytes]:
    """The values of the given top-level length-delimited fields (strings) of `message`.

    As in a parse, the last occurrence of a field wins; an absent field is absent from the result.
    """
    found: dict[int, bytes] = {}
    offset, end = 0, len(message)
    while offset < end:
        key, offset = _varint(message, offset)
        number, wire_type = key >> 3, key & 7
        if wire_type == _LENGTH_DELIMITED:
            length, offset = _varint(message, offset)
            if offset + length > end:
                raise MalformedMessage(f"field {number} runs past the end of the message")
            if number in fields:
                found[number] = message[offset : offset + length]
            offset += length
        elif wire_type == _VARINT:
            _, offset = _varint(message, offset)
        elif wire_type == _FIXED64:
            offset += 8
        elif wire_type == _FIXED32:
            offset += 4
        else:
            raise MalformedMessage(f"unsupported wire type {wire_type} of field {number}")
    if offset != end:
        raise MalformedMessage("the last field runs past the end of the message")
    return found


def string_field(number: int, value: str) -> bytes:
    """One serialized string field. Appended to a message, it replaces the field's value: a
    parser keeps the last occurrence of a singular field."""
    encoded = value.encode()
    return _encode_varint(number << 3 | _LENGTH_DELIMITED) + _encode_varint(len(encoded)) + encoded
