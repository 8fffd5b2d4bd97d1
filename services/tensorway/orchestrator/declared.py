"""The signature the registry declares for a version, checked against the config Triton loaded.

A version registered by hand may declare inputs or outputs its model does not have; routers answer
metadata calls and batch workers build tensors from the declared signature, so such a version
would fail every request. Once Triton has loaded it, the orchestrator compares the two and reports
a mismatch as the version's FAILED reason instead of letting it get traffic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tensorway.tensors.signatures import ModelSignature, TensorSpec
from tensorway.tensors.triton import config_datatype


def _dims_agree(declared: Sequence[int], loaded: Sequence[int]) -> bool:
    return len(declared) == len(loaded) and all(
        a == b or -1 in (a, b) for a, b in zip(declared, loaded, strict=True)
    )


def _tensors_differ(kind: str, declared: Sequence[TensorSpec], loaded: Any) -> list[str]:
    found = {tensor.name: tensor for tensor in loaded}
    problems = []
    for tensor in declared:
        actual = found.get(tensor.name)
        if actual is None:
            problems.append(f"{kind} {tensor.name!r} is declared but the model has none")
            continue
        datatype, dims = config_datatype(actual.data_type), list(actual.dims)
        if datatype != tensor.datatype or not _dims_agree(tensor.shape, dims):
            problems.append(
                f"{kind} {tensor.name!r} is declared {tensor.datatype}{list(tensor.shape)}, "
                f"the model has {datatype}{dims}"
            )
    return problems


def signature_mismatch(declared: ModelSignature | None, config: Any) -> str | None:
    """Why the registry's declared signature does not fit Triton's loaded ModelConfig; None when
    it does (or declares nothing to check)."""
    if declared is None or not (declared.inputs or declared.outputs):
        return None
    problems = _tensors_differ("input", declared.inputs, config.input)
    problems += _tensors_differ("output", declared.outputs, config.output)
    named = {tensor.name for tensor in declared.inputs}
    problems += [
        f"input {tensor.name!r} is required by the model but not declared"
        for tensor in config.input
        if not tensor.optional and tensor.name not in named
    ]
    if declared.max_batch_size != config.max_batch_size:
        problems.append(
            f"max_batch_size is declared {declared.max_batch_size}, the model has {config.max_batch_size}"
        )
    if not problems:
        return None
    return "the registered signature does not fit the model Triton loaded: " + "; ".join(problems)
