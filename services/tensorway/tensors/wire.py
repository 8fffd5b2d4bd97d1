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


def select(message: bytes, fields: Collection[int]) -> bytes:
    """The given top-level length-delimited fields of `message` as a message of their own, in
    their order: parsing it reads those fields (a request's names, id and parameters) without
    parsing, or copying, the tensors beside them."""
    kept: list[bytes] = []
    offset, end = 0, len(message)
    while offset < end:
        start = offset
        key, offset = _varint(message, offset)
        number, wire_type = key >> 3, key & 7
        if wire_type == _LENGTH_DELIMITED:
            length, offset = _varint(message, offset)
            offset += length
            if offset > end:
                raise MalformedMessage(f"field {number} runs past the end of the message")
            if number in fields:
                kept.append(message[start:offset])
        else:
            offset = _skip(message, offset, number, wire_type)
    if offset != end:
        raise MalformedMessage("the last field runs past the end of the message")
    return b"".join(kept)


def message_field(number: int, value: bytes) -> bytes:
    """One serialized length-delimited field holding `value` (a serialized message)."""
    return _encode_varint(number << 3 | _LENGTH_DELIMITED) + _encode_varint(len(value)) + value


def string_field(number: int, value: str) -> bytes:
    """One serialized string field. Appended to a message, it replaces the field's value: a
    parser keeps the last occurrence of a singular field."""
    encoded = value.encode()
    return _encode_varint(number << 3 | _LENGTH_DELIMITED) + _encode_varint(len(encoded)) + encoded


def largest_first_dimension(message: bytes, tensors_field: int, shape_field: int) -> int:
    """The largest first dimension among the tensors in the repeated `tensors_field` of `message`,
    whose `shape_field` is a repeated int64 (packed, or unpacked as older writers send it).

    A tensor with no shape counts one row; a negative dimension counts none. Tensor contents are
    jumped over, so the cost does not grow with the payload.
    """
    rows = 0
    offset, end = 0, len(message)
    while offset < end:
        key, offset = _varint(message, offset)
        number, wire_type = key >> 3, key & 7
        if wire_type == _LENGTH_DELIMITED:
            length, offset = _varint(message, offset)
            if offset + length > end:
                raise MalformedMessage(f"field {number} runs past the end of the message")
            if number == tensors_field:
                rows = max(rows, _first_dimension(message, offset, offset + length, shape_field))
            offset += length
        else:
            offset = _skip(message, offset, number, wire_type)
    if offset != end:
        raise MalformedMessage("the last field runs past the end of the message")
    return rows


def _first_dimension(message: bytes, offset: int, end: int, shape_field: int) -> int:
    while offset < end:
        key, offset = _varint(message, offset)
        number, wire_type = key >> 3, key & 7
        if number == shape_field and wire_type in (_LENGTH_DELIMITED, _VARINT):
            if wire_type == _LENGTH_DELIMITED:
                length, offset = _varint(message, offset)
                if length == 0:
                    continue  # an empty packed run; a later one may carry the dimensions
                if offset + length > end:
                    raise MalformedMessage(f"field {number} runs past the end of its tensor")
            first, _ = _varint(message, offset)
            # int64 on the wire: a negative dimension is a ten-byte two's complement varint.
            return first if first < 1 << 63 else 0
        if wire_type == _LENGTH_DELIMITED:
            length, offset = _varint(message, offset)
            offset += length
        else:
            offset = _skip(message, offset, number, wire_type)
        if offset > end:
            raise MalformedMessage(f"field {number} runs past the end of its tensor")
    return 1


def _skip(message: bytes, offset: int, number: int, wire_type: int) -> int:
    """The offset past a field's value that is not length-delimited."""
    if wire_type == _VARINT:
        return _varint(message, offset)[1]
    if wire_type == _FIXED64:
        return offset + 8
    if wire_type == _FIXED32:
        return offset + 4
    raise MalformedMessage(f"unsupported wire type {wire_type} of field {number}")
