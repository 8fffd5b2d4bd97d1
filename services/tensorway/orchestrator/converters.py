"""The orchestrator's answer to GetModelMetadata; tensors cross to and from Triton in
`tensorway.tensors.triton`, and their byte layouts live in `tensorway.tensors.layouts`."""

from __future__ import annotations

from collections.abc import Iterable

from tensorway.common.v1 import tensor_pb2
from tensorway.inference.v1 import inference_service_pb2 as pb
from tensorway.orchestrator.signatures import ModelSignature, TensorSignature


def metadata_response(signature: ModelSignature) -> pb.GetModelMetadataResponse:
    """GetModelMetadata's answer: shapes without the batch dimension, as TensorSpec says."""

    def specs(tensors: Iterable[TensorSignature]) -> list[tensor_pb2.TensorSpec]:
        return [tensor_pb2.TensorSpec(name=t.name, datatype=t.datatype, shape=t.dims) for t in tensors]

    return pb.GetModelMetadataResponse(
        name=signature.name,
        versions=signature.versions,
        platform=signature.platform,
        inputs=specs(signature.inputs.values()),
        outputs=specs(signature.outputs.values()),
        max_batch_size=signature.max_batch_size,
    )
