"""Generic Triton Python-backend model serving the ``model.onnx`` beside it with onnxruntime.

This file never runs in the tensorway process: `build_repository` copies it into every
model's version directory as ``model.py``, and Triton's Python-backend stub loads it there.
It is self-contained for that reason. Triton inputs and outputs map to ONNX graph inputs
and outputs of the same name; per-model behaviour comes from config.pbtxt only:

- a ``BYTES`` tensor bound to a numeric ONNX tensor needs the model parameter
  ``string_encoding: "decimal"``, and carries one decimal integer per element;
- an ONNX output whose rank differs from the configured one (a classifier's ``label``
  is [N], Triton needs dims [1] when batching) is reshaped to the configured shape.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

# Triton's stub process provides this module; it cannot be installed, so mypy sees it
# as Any and the rest of this file is still type-checked.
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]

# The same names as in _config.py, which cannot be imported from inside Triton.
STRING_ENCODING_PARAMETER = "string_encoding"
DECIMAL_ENCODING = "decimal"

_ONNX_DTYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
}

Array = npt.NDArray[Any]


class RequestError(ValueError):
    """The request's tensors cannot be converted for the graph; the client must fix them."""


@dataclass(frozen=True)
class Binding:
    """A Triton tensor of the model config bound to the ONNX tensor of the same name."""

    name: str
    dims: tuple[int, ...]
    triton_dtype: np.dtype[Any]
    onnx_dtype: np.dtype[Any]

    @property
    def decimal(self) -> bool:
        return self.triton_dtype == np.object_

    @classmethod
    def bind(cls, tensor: dict[str, Any], onnx_tensors: dict[str, Any], encoding: str | None) -> "Binding":
        name = tensor["name"]
        if name not in onnx_tensors:
            raise ValueError(f"{name} is not a tensor of the ONNX graph (it has {sorted(onnx_tensors)})")
        onnx_type = onnx_tensors[name].type
        if onnx_type not in _ONNX_DTYPES:
            raise ValueError(f"{name}: ONNX type {onnx_type} is not supported")
        binding = cls(
            name=name,
            dims=tuple(int(d) for d in tensor["dims"]),
            triton_dtype=np.dtype(pb_utils.triton_string_to_numpy(tensor["data_type"])),
            onnx_dtype=np.dtype(_ONNX_DTYPES[onnx_type]),
        )
        if binding.decimal and encoding != DECIMAL_ENCODING:
            raise ValueError(
                f"{name} is BYTES over a numeric ONNX tensor, which needs the model parameter "
                f'{STRING_ENCODING_PARAMETER}: "{DECIMAL_ENCODING}"'
            )
        return binding

    def to_onnx(self, array: Array) -> Array:
        if not self.decimal:
            return np.asarray(array, dtype=self.onnx_dtype)
        try:
            values = [int(v) for v in array.ravel().tolist()]
        except ValueError as error:
            raise RequestError(f"{self.name} must hold decimal integers: {error}") from None
        limits = np.iinfo(self.onnx_dtype)
        if values and not limits.min <= min(values) <= max(values) <= limits.max:
            raise RequestError(f"{self.name} holds a value outside {self.onnx_dtype}")
        return np.array(values, dtype=self.onnx_dtype).reshape(array.shape)

    def to_triton(self, array: Array, shape: tuple[int, ...]) -> Array:
        if array.ndim != len(shape):
            array = array.reshape(shape)
        if self.decimal:
            encoded = [str(v).encode() for v in array.ravel().tolist()]
            return np.array(encoded, dtype=np.object_).reshape(array.shape)
        return np.asarray(array, dtype=self.triton_dtype)


class TritonPythonModel:
    """The Python backend's entry point: one instance per model instance."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        # Requests are stacked along the batch dimension into one onnxruntime run.
        if int(config["max_batch_size"]) <= 0:
            raise ValueError("this model needs max_batch_size > 0")
        options = ort.SessionOptions()
        # Triton scales a model by instances (instance_group); threads inside each
        # instance would only compete with the other instances for the same cores.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        graph = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self._session = ort.InferenceSession(
            str(graph), sess_options=options, providers=["CPUExecutionProvider"]
        )
        encoding = config.get("parameters", {}).get(STRING_ENCODING_PARAMETER, {}).get("string_value")
        onnx_inputs = {t.name: t for t in self._session.get_inputs()}
        onnx_outputs = {t.name: t for t in self._session.get_outputs()}
        self._inputs = [Binding.bind(t, onnx_inputs, encoding) for t in config["input"]]
        self._outputs = [Binding.bind(t, onnx_outputs, encoding) for t in config["output"]]

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        feeds: list[tuple[int, dict[str, Array]]] = []
        for index, request in enumerate(requests):
            try:
                feeds.append((index, self._decode(request)))
            except RequestError as error:
                responses[index] = _error_response(str(error), pb_utils.TritonError.INVALID_ARG)
        if feeds:
            self._run(feeds, responses)
        return responses

    def _decode(self, request: Any) -> dict[str, Array]:
        return {
            b.name: b.to_onnx(pb_utils.get_input_tensor_by_name(request, b.name).as_numpy())
            for b in self._inputs
        }

    def _run(self, group: list[tuple[int, dict[str, Array]]], responses: list[Any]) -> None:
        feed = {b.name: np.concatenate([f[b.name] for _, f in group]) for b in self._inputs}
        try:
            results = self._session.run([b.name for b in self._outputs], feed)
        # onnxruntime's exceptions share no base class; whatever fails, every request of
        # the batch must still get an answer.
        except Exception as error:
            for index, _ in group:
                responses[index] = _error_response(
                    f"inference failed: {error}", pb_utils.TritonError.INTERNAL
                )
            return
        start = 0
        for index, f in group:
            size = f[self._inputs[0].name].shape[0]
            tensors = [
                pb_utils.Tensor(b.name, b.to_triton(result[start : start + size], (size, *b.dims)))
                for b, result in zip(self._outputs, results, strict=True)
            ]
            responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)
            start += size


def _error_response(message: str, code: Any) -> Any:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
