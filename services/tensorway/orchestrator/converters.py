"""The orchestrator's answer to GetModelMetadata; tensors cross to and from Triton in
`tensorway.tensors.triton`.

The byte layouts stay importable from here for the batch workers and the CLI, which take them
from this module today; new code imports `tensorway.tensors.layouts`.
"""

from __future__ import annotations

from collections.abc import Iterable

from tensorway.common.v1 import tensor_pb2
from tensorway.inference.v1 import inference_service_pb2 as pb
from tensorway.orchestrator.signatures import ModelSignature, TensorSignature
from tensorway.tensors.layouts import BYTES, FIXED_SIZE_DTYPES, pack_bytes, pack_contents, unpack_bytes

__all__ = ["BYTES", "FIXED_SIZE_DTYPES", "metadata_response", "pack_bytes", "pack_contents", "unpack_bytes"]


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
