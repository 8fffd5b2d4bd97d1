"""The request that warms a freshly loaded model version before it counts as ready.

A config with `model_warmup` is warmed by Triton itself while it loads; sequence and decoupled
models take no stateless request. Every other version gets one request of zeros: each required
input at its declared shape (dynamic dims 1) and datatype, batch 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as triton

from tensorway.tensors.triton import config_datatype

# Element sizes of Triton's fixed-size datatypes; BYTES elements are a 4-byte length each.
_ELEMENT_BYTES = {
    "BOOL": 1,
    "UINT8": 1,
    "INT8": 1,
    "UINT16": 2,
    "INT16": 2,
    "FP16": 2,
    "BF16": 2,
    "UINT32": 4,
    "INT32": 4,
    "FP32": 4,
    "UINT64": 8,
    "INT64": 8,
    "FP64": 8,
    "BYTES": 4,
}


def warmed_by_triton(config: Any) -> bool:
    """Whether Triton warms the model itself (model_warmup), or a plain request cannot (sequence
    batching needs a correlation id; a decoupled model answers on a stream)."""
    return bool(
        len(config.model_warmup)
        or config.HasField("sequence_batching")
        or config.model_transaction_policy.decoupled
    )


def warmup_request(model: str, version: str, config: Any) -> Any:
    """A ModelInferRequest of zeros for every required input of `config` (a ModelConfig)."""
    request = triton.ModelInferRequest(model_name=model, model_version=version)
    for tensor in config.input:
        if tensor.optional:
            continue
        datatype = config_datatype(tensor.data_type)
        dims = [1 if dim < 0 else int(dim) for dim in tensor.dims]
        shape = [1, *dims] if config.max_batch_size > 0 else dims
        request.inputs.add(name=tensor.name, datatype=datatype, shape=shape)
        elements = int(np.prod(shape)) if shape else 1
        request.raw_input_contents.append(bytes(elements * _ELEMENT_BYTES.get(datatype, 1)))
    return request
