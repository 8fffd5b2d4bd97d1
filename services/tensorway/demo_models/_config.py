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
class ModelConfig:
    """A Python-backend model with one CPU instance, batched by Triton's dynamic batcher."""

    name: str
    max_batch_size: int
    inputs: tuple[TensorConfig, ...]
    outputs: tuple[TensorConfig, ...]
    parameters: Mapping[str, str] = field(default_factory=dict)

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
            # Each execute() is a round trip to the stub process; the generic model.py runs
            # every request of a batch through onnxruntime at once, so batching pays.
            "dynamic_batching { }",
        ]
        lines += [
            f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}'
            for key, value in sorted(self.parameters.items())
        ]
        return "\n".join(lines) + "\n"
