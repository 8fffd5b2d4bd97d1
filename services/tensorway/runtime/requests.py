"""Checks every service makes of a request before it reaches storage."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.protobuf.message import Message

from tensorway.runtime.errors import FieldViolation, InvalidArgument


def refuse_nul(message: Message, path: str = "") -> None:
    """INVALID_ARGUMENT when a string anywhere in the request (map keys included) holds NUL,
    which PostgreSQL text cannot store: the query would fail inside the store instead of naming
    the field."""
    for field, value in message.ListFields():
        name = f"{path}{field.name}"
        items: Iterable[Any] = value if field.is_repeated else [value]
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            items = [item for pair in value.items() for item in pair]
        for item in items:
            if isinstance(item, Message):
                refuse_nul(item, f"{name}.")
            elif isinstance(item, str) and "\0" in item:
                raise InvalidArgument(
                    f"{name} holds a NUL character", [FieldViolation(name, "no NUL characters")]
                )
