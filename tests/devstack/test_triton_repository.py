"""Triton serving a model repository given in the settings instead of the demo models."""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tensorway.devstack import DevStackError, DevStackSettings, Stack

ECHO_CONFIG = """
name: "echo"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

ECHO_MODEL = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [
            pb_utils.InferenceResponse(
                [pb_utils.Tensor("OUTPUT0", pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy())]
            )
            for request in requests
        ]
"""


def write_echo_repository(root: Path) -> Path:
    model = root / "echo"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(ECHO_CONFIG)
    (model / "1" / "model.py").write_text(ECHO_MODEL)
    return root


def test_triton_serves_a_configured_repository(settings: DevStackSettings, tmp_path: Path) -> None:
    repository = write_echo_repository(tmp_path / "models")
    stack = Stack(settings.model_copy(update={"triton_model_repository": repository}))
    state = stack.up(["triton"])
    shared_memory = state.components["triton"].cleanup
    try:
        address = state.endpoints()["triton_grpc"].address
        with grpcclient.InferenceServerClient(address) as client:
            assert client.is_model_ready("echo")
            tensor = grpcclient.InferInput("INPUT0", [3], "FP32")
            tensor.set_data_from_numpy(np.array([1.0, 2.0, 3.0], dtype=np.float32))
            result = client.infer("echo", [tensor])
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), [1.0, 2.0, 3.0])
        assert any(glob.glob(pattern) for pattern in shared_memory), "the Python backend's regions"
    finally:
        stack.down()
    assert not any(glob.glob(pattern) for pattern in shared_memory)


def test_a_missing_repository_is_a_clear_error(settings: DevStackSettings, tmp_path: Path) -> None:
    stack = Stack(settings.model_copy(update={"triton_model_repository": tmp_path / "nowhere"}))
    with pytest.raises(DevStackError, match="is not a directory") as raised:
        stack.up(["triton"])
    assert "TENSORWAY_DEV_TRITON_MODEL_REPOSITORY" in raised.value.hint
