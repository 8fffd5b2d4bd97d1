"""A model's signature as Triton declares it: what one version of a model takes and returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TensorSignature:
    """One input or output: its datatype and its dims without the batch dimension (-1 is dynamic)."""

    name: str
    datatype: str
    dims: tuple[int, ...]
    optional: bool = False


@dataclass(frozen=True)
class ModelSignature:
    """What one version of a model takes and returns, from Triton's metadata and config."""

    name: str
    versions: tuple[str, ...]
    platform: str
    max_batch_size: int
    inputs: Mapping[str, TensorSignature]
    outputs: Mapping[str, TensorSignature]
    decoupled: bool = False
    """Whether the model may answer a request with any number of responses (Triton's decoupled
    transaction policy), which only a stream can carry."""

    @classmethod
    def from_triton(cls, metadata: Any, config: Any) -> ModelSignature:
        """From Triton's ModelMetadataResponse and ModelConfig.

        Datatypes come from the metadata (V2 names); dims from the config, which leaves out the
        batch dimension and, unlike the metadata, tells which inputs are optional.
        """
        configured_inputs = {tensor.name: tensor for tensor in config.input}
        configured_outputs = {tensor.name: tensor for tensor in config.output}
        batch_dims = 1 if config.max_batch_size > 0 else 0

        def signature(tensor: Any, configured: Any) -> TensorSignature:
            dims = tuple(configured.dims) if configured is not None else tuple(tensor.shape[batch_dims:])
            optional = bool(getattr(configured, "optional", False))
            return TensorSignature(tensor.name, tensor.datatype, dims, optional)

        return cls(
            name=metadata.name,
            versions=tuple(metadata.versions),
            platform=metadata.platform or config.backend,
            max_batch_size=config.max_batch_size,
            inputs={t.name: signature(t, configured_inputs.get(t.name)) for t in metadata.inputs},
            outputs={t.name: signature(t, configured_outputs.get(t.name)) for t in metadata.outputs},
            decoupled=config.model_transaction_policy.decoupled,
        )

    def expected_shape(self, tensor: TensorSignature) -> list[int]:
        """The full shape a request carries, with -1 for the batch and dynamic dims."""
        return [-1, *tensor.dims] if self.max_batch_size > 0 else list(tensor.dims)
