"""What a model takes and returns: its tensors' specs and its signature, defined once for the mesh.

The registry declares a version's signature, the orchestrator reads one from Triton's metadata and
config, and batch workers read the one the mesh answers GetModelMetadata with; each builds this
`ModelSignature` with the constructor for its source. Shapes leave out the batch dimension, as
`tensorway.common.v1.TensorSpec` does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property

from tritonclient.grpc import model_config_pb2
from tritonclient.grpc import service_pb2 as triton

from tensorway.common.v1 import tensor_pb2
from tensorway.inference.v1 import inference_service_pb2 as pb


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model: its name, V2 datatype ("FP32", "BYTES") and shape without
    the batch dimension (-1 is dynamic); an optional input may be left out of a request."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    optional: bool = False

    @classmethod
    def from_proto(cls, spec: tensor_pb2.TensorSpec) -> TensorSpec:
        return cls(spec.name, spec.datatype, tuple(spec.shape))

    def to_proto(self) -> tensor_pb2.TensorSpec:
        return tensor_pb2.TensorSpec(name=self.name, datatype=self.datatype, shape=self.shape)


def specs_from_proto(specs: Iterable[tensor_pb2.TensorSpec]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec.from_proto(spec) for spec in specs)


def specs_to_proto(specs: Iterable[TensorSpec]) -> list[tensor_pb2.TensorSpec]:
    return [spec.to_proto() for spec in specs]


@dataclass(frozen=True)
class ModelSignature:
    """What one version of a model takes and returns, and the largest batch it accepts (0: it
    does not batch)."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    versions: tuple[str, ...] = ()
    platform: str = ""
    decoupled: bool = False
    """Whether the model may answer a request with any number of responses (Triton's decoupled
    transaction policy), which only a stream can carry."""

    @classmethod
    def from_triton(
        cls, metadata: triton.ModelMetadataResponse, config: model_config_pb2.ModelConfig
    ) -> ModelSignature:
        """From Triton's ModelMetadataResponse and ModelConfig.

        Datatypes come from the metadata (V2 names); shapes from the config, which leaves out the
        batch dimension and, unlike the metadata, tells which inputs are optional.
        """
        configured_inputs = {tensor.name: tensor for tensor in config.input}
        configured_outputs = {tensor.name: tensor for tensor in config.output}
        batch_dims = 1 if config.max_batch_size > 0 else 0

        def spec(
            tensor: triton.ModelMetadataResponse.TensorMetadata,
            configured: model_config_pb2.ModelInput | model_config_pb2.ModelOutput | None,
        ) -> TensorSpec:
            if configured is None:
                return TensorSpec(tensor.name, tensor.datatype, tuple(tensor.shape[batch_dims:]))
            optional = isinstance(configured, model_config_pb2.ModelInput) and configured.optional
            return TensorSpec(tensor.name, tensor.datatype, tuple(configured.dims), optional)

        return cls(
            name=metadata.name,
            inputs=tuple(spec(t, configured_inputs.get(t.name)) for t in metadata.inputs),
            outputs=tuple(spec(t, configured_outputs.get(t.name)) for t in metadata.outputs),
            max_batch_size=config.max_batch_size,
            versions=tuple(metadata.versions),
            platform=metadata.platform or config.backend,
            decoupled=config.model_transaction_policy.decoupled,
        )

    @classmethod
    def from_metadata(cls, response: pb.GetModelMetadataResponse) -> ModelSignature:
        """From the mesh's answer to GetModelMetadata (which `to_metadata` builds)."""
        return cls(
            name=response.name,
            inputs=specs_from_proto(response.inputs),
            outputs=specs_from_proto(response.outputs),
            max_batch_size=response.max_batch_size,
            versions=tuple(response.versions),
            platform=response.platform,
        )

    def to_metadata(self) -> pb.GetModelMetadataResponse:
        """GetModelMetadata's answer."""
        return pb.GetModelMetadataResponse(
            name=self.name,
            versions=self.versions,
            platform=self.platform,
            inputs=specs_to_proto(self.inputs),
            outputs=specs_to_proto(self.outputs),
            max_batch_size=self.max_batch_size,
        )

    @cached_property
    def inputs_by_name(self) -> Mapping[str, TensorSpec]:
        return {spec.name: spec for spec in self.inputs}

    @cached_property
    def outputs_by_name(self) -> Mapping[str, TensorSpec]:
        return {spec.name: spec for spec in self.outputs}

    def expected_shape(self, tensor: TensorSpec) -> list[int]:
        """The full shape a request carries, with -1 for the batch and dynamic dims."""
        return [-1, *tensor.shape] if self.max_batch_size > 0 else list(tensor.shape)
