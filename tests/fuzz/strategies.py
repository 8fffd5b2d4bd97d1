"""Hypothesis strategies for malformed and extreme messages: any protobuf message built from its
descriptor with edge values in every field, raw bytes that are not quite the message, and
inference requests that are almost right for a real model."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf import descriptor, message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as triton

from tensorway.common.v1 import tensor_pb2
from tensorway.inference.v1 import inference_service_pb2 as inference_pb
from tensorway.tensors.layouts import CONTENTS_FIELDS, FIXED_SIZE_DTYPES

# Strings long enough to hurt a server that copies, logs or indexes them carelessly.
HUGE_STRING_SIZES = (1_000, 70_000, 1_000_000)
INT_BOUNDS = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_ENUM: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
DATATYPES = (*FIXED_SIZE_DTYPES, "BYTES")


def edgy_text() -> st.SearchStrategy[str]:
    """Short text of any kind, names that look like resource names, a huge string, or NUL."""
    return st.one_of(
        st.text(max_size=40),
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-/._*{}=:", max_size=60),
        st.sampled_from(
            ["models/", "models/-", "pools/", "jobs/", "jobs/0", "models/x/versions/", "*", ".."]
        ),
        st.sampled_from(HUGE_STRING_SIZES).map(lambda size: "x" * size),
        # NUL, which PostgreSQL text cannot hold, alone and inside names.
        st.sampled_from(["\0", "models/a\0b", "pools/\0", "jobs/\0", "a\0"]),
    )


def json_values() -> st.SearchStrategy[object]:
    """JSON values of every kind, nested a few levels."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        edgy_text(),
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
        max_leaves=12,
    )


def integers_of(kind: int) -> st.SearchStrategy[int]:
    low, high = INT_BOUNDS[kind]
    return st.one_of(st.sampled_from([low, high, 0, -1 if low < 0 else 1]), st.integers(low, high))


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return edgy_text()
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), st.sampled_from(HUGE_STRING_SIZES).map(lambda n: b"\0" * n))
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_DOUBLE:
        return st.floats(allow_nan=True, allow_infinity=True)
    if kind == FieldDescriptor.TYPE_FLOAT:
        return st.floats(allow_nan=True, allow_infinity=True, width=32)
    return integers_of(kind)


def messages(message_descriptor: descriptor.Descriptor, depth: int = 3) -> st.SearchStrategy[Message]:
    """Messages of this type with any subset of fields set to edge values, nested `depth` deep."""
    message_class = message_factory.GetMessageClass(message_descriptor)

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = message_class()
        fields = list(message_descriptor.fields)
        chosen = draw(st.lists(st.sampled_from(fields), unique=True, max_size=len(fields))) if fields else []
        for field in chosen:
            _fill(draw, message, field, depth)
        return message

    return build()


def _fill(draw: st.DrawFn, message: Message, field: FieldDescriptor, depth: int) -> None:
    target = getattr(message, field.name)
    is_message = field.type == FieldDescriptor.TYPE_MESSAGE
    if is_message and field.message_type.GetOptions().map_entry:
        key_field, value_field = (
            field.message_type.fields_by_name["key"],
            field.message_type.fields_by_name["value"],
        )
        for key in draw(st.lists(_scalar(key_field), max_size=3)):
            if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                if depth > 0:
                    target[key].CopyFrom(draw(messages(value_field.message_type, depth - 1)))
            else:
                target[key] = draw(_scalar(value_field))
        return
    if is_message and depth <= 0:
        return
    if field.is_repeated:
        if is_message:
            for item in draw(st.lists(messages(field.message_type, depth - 1), max_size=3)):
                target.add().CopyFrom(item)
        else:
            target.extend(draw(st.lists(_scalar(field), max_size=8)))
    elif is_message:
        target.CopyFrom(draw(messages(field.message_type, depth - 1)))
    else:
        setattr(message, field.name, draw(_scalar(field)))


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def wire_garbage(message_descriptor: descriptor.Descriptor) -> st.SearchStrategy[bytes]:
    """Bytes that are not a valid serialized message of this type: random bytes, a message cut
    short, a string field holding invalid UTF-8, a length prefix past the end, nesting deeper than
    any parser allows."""
    serialized = messages(message_descriptor, depth=2).map(lambda m: m.SerializeToString())
    strings = [f.number for f in message_descriptor.fields if f.type == FieldDescriptor.TYPE_STRING]
    submessages = [f.number for f in message_descriptor.fields if f.type == FieldDescriptor.TYPE_MESSAGE]
    choices = [
        st.binary(min_size=1, max_size=200),
        serialized.filter(lambda data: len(data) > 1).flatmap(
            lambda data: st.integers(1, len(data) - 1).map(lambda cut: data[:cut])
        ),
        st.tuples(serialized, st.integers(1, 2**32)).map(
            lambda pair: pair[0] + bytes([(1 << 3) | 2]) + _varint(pair[1]) + b"\x01"
        ),
    ]
    if strings:
        choices.append(
            st.tuples(
                serialized, st.sampled_from(strings), st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80"])
            ).map(lambda t: t[0] + _varint((t[1] << 3) | 2) + _varint(len(t[2])) + t[2])
        )
    if submessages:
        # A field nested far past protobuf's recursion limit of 100.
        def nested(field: int, levels: int) -> bytes:
            data = b""
            for _ in range(levels):
                data = _varint((field << 3) | 2) + _varint(len(data)) + data
            return data

        choices.append(
            st.tuples(st.sampled_from(submessages), st.integers(101, 3000)).map(lambda t: nested(*t))
        )
    return st.one_of(choices)


@dataclass(frozen=True)
class InputSpec:
    name: str
    datatype: str
    dims: tuple[int, ...]


# The demo models the mesh serves (README), as the router's signatures describe them.
DEMO_INPUTS = {
    "simple": (InputSpec("INPUT0", "INT32", (16,)), InputSpec("INPUT1", "INT32", (16,))),
    "digits": (InputSpec("input", "FP32", (64,)),),
    "iris": (InputSpec("input", "FP32", (4,)),),
}
DEMO_OUTPUTS = {
    "simple": ("OUTPUT0", "OUTPUT1"),
    "digits": ("label", "probabilities"),
    "iris": ("label", "probabilities"),
}
HUGE_DIMS = (2**31, 2**40, 2**62, 2**63 - 1)


def _shape(draw: st.DrawFn, batch: int, dims: tuple[int, ...]) -> list[int]:
    right = [batch, *dims]
    return draw(
        st.one_of(
            st.just(right),
            st.just(list(dims)),  # batch dimension left out
            st.just([*right, 1]),
            st.just([]),
            st.lists(
                st.one_of(st.integers(-3, 70), st.sampled_from(HUGE_DIMS), st.just(-(2**63))), max_size=9
            ),
        )
    )


def _values(draw: st.DrawFn, datatype: str, count: int) -> np.ndarray:
    dtype = FIXED_SIZE_DTYPES.get(datatype, FIXED_SIZE_DTYPES["FP32"])
    if dtype.kind == "f":
        elements = st.floats(allow_nan=True, allow_infinity=True, width=min(dtype.itemsize * 8, 64))
    elif dtype.kind == "b":
        elements = st.booleans()
    else:
        info = np.iinfo(dtype)
        elements = st.integers(int(info.min), int(info.max))
    return np.array(draw(st.lists(elements, min_size=count, max_size=count)), dtype=dtype)


@st.composite
def almost_right_tensors(draw: st.DrawFn, spec: InputSpec, batch: int) -> tensor_pb2.Tensor:
    """One input of a demo model, right or wrong in its name, datatype, shape and contents."""
    datatype = draw(st.one_of(st.just(spec.datatype), st.sampled_from(DATATYPES), edgy_text()))
    shape = _shape(draw, batch, spec.dims)
    tensor = tensor_pb2.Tensor(
        name=draw(st.one_of(st.just(spec.name), edgy_text())), datatype=datatype, shape=shape
    )
    count = batch * math.prod(spec.dims)
    values = _values(draw, datatype, count)
    layout = draw(st.sampled_from(["raw", "raw-short", "raw-long", "typed", "typed-wrong-field", "empty"]))
    if layout == "raw":
        tensor.raw_contents = values.tobytes()
    elif layout == "raw-short":
        tensor.raw_contents = values.tobytes()[: draw(st.integers(0, max(0, values.nbytes - 1)))]
    elif layout == "raw-long":
        tensor.raw_contents = values.tobytes() + draw(st.binary(min_size=1, max_size=9))
    elif layout.startswith("typed"):
        field = CONTENTS_FIELDS.get(datatype, "fp32_contents")
        if layout == "typed-wrong-field":
            field = draw(st.sampled_from(sorted(set(CONTENTS_FIELDS.values()) - {field})))
        contents = getattr(tensor.contents, field)
        if field == "bytes_contents":
            contents.extend(draw(st.lists(st.binary(max_size=8), min_size=count, max_size=count)))
        else:
            contents.extend(_values(draw, _FIELD_DATATYPES[field], count).tolist())
    return tensor


_FIELD_DATATYPES = {
    "bool_contents": "BOOL",
    "int_contents": "INT32",
    "int64_contents": "INT64",
    "uint_contents": "UINT32",
    "uint64_contents": "UINT64",
    "fp32_contents": "FP32",
    "fp64_contents": "FP64",
}


@st.composite
def almost_right_requests(draw: st.DrawFn) -> inference_pb.InferRequest:
    """An InferRequest for a demo model (or one that does not exist) that is right in most
    respects and wrong in a few: datatypes, shapes, byte lengths, NaN and inf, missing, extra or
    repeated inputs, unknown outputs and versions, odd parameters."""
    model = draw(st.sampled_from(sorted(DEMO_INPUTS)))
    batch = draw(st.one_of(st.integers(0, 3), st.sampled_from([9, 257])))
    specs = list(DEMO_INPUTS[model])
    inputs = [draw(almost_right_tensors(spec, batch)) for spec in specs]
    inputs = draw(
        st.one_of(st.just(inputs), st.permutations(inputs), st.just(inputs[:-1]), st.just(inputs * 2))
    )
    outputs = draw(
        st.lists(
            st.builds(
                inference_pb.RequestedOutput,
                name=st.one_of(st.sampled_from(DEMO_OUTPUTS[model]), edgy_text()),
                binary=st.booleans(),
            ),
            max_size=3,
        )
    )
    request = inference_pb.InferRequest(
        model_name=draw(st.one_of(st.just(model), edgy_text())),
        model_version=draw(st.sampled_from(["", "1", "production", "2", "0", "-1", "99999999999999999999"])),
        id=draw(st.one_of(st.just(""), edgy_text())),
        inputs=inputs,
        outputs=outputs,
    )
    for key, parameter in draw(
        st.dictionaries(edgy_text(), messages(tensor_pb2.Parameter.DESCRIPTOR), max_size=2)
    ).items():
        request.parameters[key].CopyFrom(parameter)
    return request


@st.composite
def almost_right_triton_requests(draw: st.DrawFn) -> Any:
    """A Triton ModelInferRequest made from an almost right tensorway one: raw buffers in
    raw_input_contents (sometimes one too few or too many) or typed contents, and parameters of
    every Triton kind, unsigned ones past int64 included."""
    request = draw(almost_right_requests())
    converted = triton.ModelInferRequest(
        model_name=request.model_name, model_version=request.model_version, id=request.id
    )
    raw = draw(st.booleans())
    for tensor in request.inputs:
        entry = converted.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        if raw:
            converted.raw_input_contents.append(tensor.raw_contents)
        else:
            entry.contents.MergeFromString(tensor.contents.SerializeToString())
    if raw:
        extra = draw(st.sampled_from(["none", "one-less", "one-more"]))
        if extra == "one-less" and converted.raw_input_contents:
            del converted.raw_input_contents[-1]
        elif extra == "one-more":
            converted.raw_input_contents.append(draw(st.binary(max_size=16)))
    for output in request.outputs:
        converted.outputs.add(name=output.name)
    for key, parameter in draw(
        st.dictionaries(edgy_text(), messages(triton.InferParameter.DESCRIPTOR), max_size=2)
    ).items():
        converted.parameters[key].CopyFrom(parameter)
        if converted.inputs:
            converted.inputs[0].parameters[key].CopyFrom(parameter)
    return converted


def request_metadata() -> st.SearchStrategy[list[tuple[str, str]]]:
    """Request headers the services read (tenant, request id, route key, trace context), with
    values of any printable ASCII, the most gRPC lets a client send in a text header."""
    keys = st.sampled_from(
        ["x-tenant-id", "x-request-id", "x-tensorway-route-key", "traceparent", "tracestate", "baggage"]
    )
    printable = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
    values = st.one_of(
        printable,
        st.sampled_from(
            ["00-zz-zz-01", "00-" + "0" * 32 + "-" + "0" * 16 + "-01", "ff-" * 40, "a=b,c", "=,=,="]
        ),
        st.sampled_from([1_000, 7_000]).map(lambda size: "t" * size),
    )
    return st.lists(st.tuples(keys, values), max_size=4)
