"""What the data commands print: `-o table` for people, `-o json` and `-o yaml` for scripts.

JSON and YAML are the protobuf JSON mapping of the answers (`json_format`, field names as in the
protos), so a script reads the same fields the API documents. Tables never cut a value: columns
holding names, ids, addresses and URLs do not wrap, and a table wider than the terminal is printed
wider rather than cut; into a pipe or a file every value is printed whole on one line.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import typer
import yaml
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.measure import Measurement
from rich.table import Column, Table

STDOUT = Console()
"""Where the data commands print their answers."""
STDERR = Console(stderr=True)
"""Where they print progress and notes, so stdout stays the answer alone."""


class OutputFormat(enum.StrEnum):
    TABLE = "table"
    JSON = "json"
    YAML = "yaml"


OutputOption = Annotated[
    OutputFormat,
    typer.Option(
        "--output",
        "-o",
        case_sensitive=False,
        help="table for people; json or yaml (the API's protobuf JSON) for scripts.",
    ),
]

# Wider than any table, so measuring finds each column's full width.
_UNBOUNDED = 1_000_000


def message_data(message: Message) -> dict[str, Any]:
    """A message as its protobuf JSON mapping, with the protos' field names."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def key_column(header: str) -> Column:
    """A column of values that must stay whole and on one line: names, ids, addresses, URLs."""
    return Column(header, no_wrap=True, overflow="ignore")


def print_table(console: Console, table: Table) -> None:
    """Print `table` with its key columns whole: at the terminal's width when it fits, wider when it
    does not (the terminal wraps lines, the values stay whole), and at its natural width, nothing
    wrapped, when the output is not a terminal."""
    measured = Measurement.get(console, console.options.update_width(_UNBOUNDED), table)
    width = max(console.width, measured.minimum) if console.is_terminal else measured.maximum
    saved = console.width
    console.width = width
    try:
        console.print(table)
    finally:
        console.width = saved


def emit(
    output: OutputFormat,
    data: Message | Mapping[str, Any],
    table: Callable[[], None],
) -> None:
    """Print `data` as JSON or YAML, or call `table` to print it for people."""
    if output is OutputFormat.TABLE:
        table()
        return
    document = message_data(data) if isinstance(data, Message) else dict(data)
    if output is OutputFormat.JSON:
        # Plain text: rich would highlight it and wrap long strings at the console's width.
        typer.echo(json.dumps(document, indent=2))
    else:
        typer.echo(yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=_UNBOUNDED), nl=False)
