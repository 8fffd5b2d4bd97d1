"""The warm-up request a freshly loaded version answers before it counts as ready."""

from __future__ import annotations

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from tensorway.orchestrator.warmup import warmed_by_triton, warmup_request


def config(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_zeros_of_each_required_input_at_its_shape_with_a_batch_of_one() -> None:
    request = warmup_request(
        "digits",
        "3",
        config(
            """
            max_batch_size: 8
            input { name: "pixels" data_type: TYPE_FP32 dims: [ 2, -1 ] }
            input { name: "words" data_type: TYPE_STRING dims: [ 3 ] }
            input { name: "mask" data_type: TYPE_BOOL dims: [ 4 ] optional: true }
            """
        ),
    )
    assert (request.model_name, request.model_version) == ("digits", "3")
    assert [(t.name, t.datatype, list(t.shape)) for t in request.inputs] == [
        ("pixels", "FP32", [1, 2, 1]),
        ("words", "BYTES", [1, 3]),
    ]
    # FP32 zeros, and BYTES elements of length 0 (a 4-byte length each).
    assert list(request.raw_input_contents) == [bytes(8), bytes(12)]


def test_a_model_that_does_not_batch_gets_its_shape_as_declared() -> None:
    request = warmup_request("simple", "1", config('input { name: "x" data_type: TYPE_INT64 dims: [ 16 ] }'))
    assert [list(t.shape) for t in request.inputs] == [[16]]
    assert list(request.raw_input_contents) == [bytes(128)]


def test_triton_warms_what_declares_model_warmup_and_what_a_plain_request_cannot() -> None:
    assert warmed_by_triton(config('model_warmup { name: "zeros" batch_size: 1 }'))
    assert warmed_by_triton(config("sequence_batching { }"))
    assert warmed_by_triton(config("model_transaction_policy { decoupled: true }"))
    assert not warmed_by_triton(config("max_batch_size: 4"))


def test_a_registered_signature_that_does_not_fit_the_loaded_model_is_named() -> None:
    from tensorway.orchestrator.declared import signature_mismatch
    from tensorway.tensors.signatures import ModelSignature, TensorSpec

    loaded = config(
        """
        max_batch_size: 8
        input { name: "INPUT0" data_type: TYPE_INT32 dims: [ 16 ] }
        input { name: "INPUT1" data_type: TYPE_INT32 dims: [ -1 ] }
        output { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 16 ] }
        """
    )
    fits = ModelSignature(
        "m",
        (TensorSpec("INPUT0", "INT32", (16,)), TensorSpec("INPUT1", "INT32", (4,))),
        (TensorSpec("OUTPUT0", "INT32", (16,)),),
        8,
    )
    assert signature_mismatch(fits, loaded) is None
    nothing_declared = ModelSignature("m", (), (), 0)
    assert signature_mismatch(nothing_declared, loaded) is None
    misfit = ModelSignature(
        "m",
        (TensorSpec("INPUT0", "FP32", (16,)), TensorSpec("pixels", "FP32", (64,))),
        (TensorSpec("OUTPUT0", "INT32", (16,)),),
        4,
    )
    reason = signature_mismatch(misfit, loaded)
    assert reason is not None
    for part in (
        "input 'INPUT0' is declared FP32[16], the model has INT32[16]",
        "input 'pixels' is declared but the model has none",
        "input 'INPUT1' is required by the model but not declared",
        "max_batch_size is declared 4, the model has 8",
    ):
        assert part in reason
