"""Triton model configurations for the demo models, rendered as config.pbtxt text."""

from collections.abc import Mapping
from dataclasses import dataclass, field

# triton_model.py cannot be imported outside Triton, so it repeats these two names.
STRING_ENCODING_PARAMETER = "string_encoding"
DECIMAL_ENCODING = "decimal"


@dataclass(frozen=True)
class TensorConfig:
    """One input or output as Triton declares it; ``dims`` exclude the batch dimension."""

    name: str
    data_type: str
    dims: tuple[int, ...]

    def to_pbtxt(self) -> str:
        dims = ", ".join(str(d) for d in self.dims)
        return f'  {{ name: "{self.name}" data_type: TYPE_{self.data_type} dims: [ {dims} ] }}'


@dataclass(frozen=True)
class SequenceBatching:
    """Triton's sequence batcher for a stateful model: every request of a sequence goes to the
    model instance holding its state, with the control inputs Triton fills in from the request's
    sequence_id / sequence_start / sequence_end parameters.

    The control inputs are START, END and READY (INT32, 0 or 1) and CORRID (UINT64, the sequence
    id). The "oldest" strategy batches requests of different sequences together and, unlike
    "direct", sends no empty slots for the model to skip.
    """

    max_sequence_idle_microseconds: int = 60_000_000
    """A sequence that sends nothing for this long is ended by Triton and its slot freed."""
    max_candidate_sequences: int = 64
    """Sequences batched at once; more wait in Triton's backlog until one ends."""

    def to_pbtxt(self) -> str:
        def flag(name: str, kind: str) -> str:
            return f'    {{ name: "{name}" control [ {{ kind: {kind} int32_false_true: [ 0, 1 ] }} ] }}'

        controls = [
            flag("START", "CONTROL_SEQUENCE_START"),
            flag("END", "CONTROL_SEQUENCE_END"),
            flag("READY", "CONTROL_SEQUENCE_READY"),
            '    { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } ] }',
        ]
        return "\n".join(
            [
                "sequence_batching {",
                f"  max_sequence_idle_microseconds: {self.max_sequence_idle_microseconds}",
                "  control_input [",
                ",\n".join(controls),
                "  ]",
                f"  oldest {{ max_candidate_sequences: {self.max_candidate_sequences} "
                "max_queue_delay_microseconds: 0 }",
                "}",
            ]
        )


@dataclass(frozen=True)
class ModelConfig:
    """A Python-backend model with one CPU instance, batched by Triton's dynamic batcher, or by
    its sequence batcher when it keeps state per sequence (`sequence_batching`); a model that
    does not batch (`max_batch_size` 0) gets neither."""

    name: str
    max_batch_size: int
    inputs: tuple[TensorConfig, ...]
    outputs: tuple[TensorConfig, ...]
    parameters: Mapping[str, str] = field(default_factory=dict)
    sequence_batching: SequenceBatching | None = None
    decoupled: bool = False
    """Whether the model answers a request with any number of responses (Triton's decoupled
    transaction policy), which clients receive on a stream."""

    def to_pbtxt(self) -> str:
        lines = [
            f'name: "{self.name}"',
            'backend: "python"',
            f"max_batch_size: {self.max_batch_size}",
            "input [",
            ",\n".join(t.to_pbtxt() for t in self.inputs),
            "]",
            "output [",
            ",\n".join(t.to_pbtxt() for t in self.outputs),
            "]",
            "instance_group [ { kind: KIND_CPU count: 1 } ]",
        ]
        if self.sequence_batching is not None:
            lines.append(self.sequence_batching.to_pbtxt())
        elif self.max_batch_size > 0:
            # Each execute() is a round trip to the stub process; the generic model.py runs
            # every request of a batch through onnxruntime at once, so batching pays.
            lines.append("dynamic_batching { }")
        if self.decoupled:
            lines.append("model_transaction_policy { decoupled: true }")
        lines += [
            f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}'
            for key, value in sorted(self.parameters.items())
        ]
        return "\n".join(lines) + "\n"
