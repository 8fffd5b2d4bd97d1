"""build_repository, checked with onnxruntime alone: no Triton needed."""

from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from tensorway.demo_models import build_repository
from tensorway.demo_models._datasets import Split, digits_split, iris_split

MODELS = ["simple", "simple_string", "digits", "iris", "accumulate", "tokens"]
ONNX_MODELS = MODELS[:4]


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("repository")
    assert build_repository(target) == MODELS
    return target


def session(repository: Path, name: str) -> ort.InferenceSession:
    return ort.InferenceSession(repository / name / "1" / "model.onnx", providers=["CPUExecutionProvider"])


def files(repository: Path) -> dict[str, bytes]:
    return {str(p.relative_to(repository)): p.read_bytes() for p in repository.rglob("*") if p.is_file()}


def test_every_onnx_model_has_config_and_the_generic_model_py(repository: Path) -> None:
    generic = (resources.files("tensorway.demo_models") / "triton_model.py").read_bytes()
    for name in ONNX_MODELS:
        config = text_format.Parse(
            (repository / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
        )
        assert config.name == name
        assert config.backend == "python"
        assert config.HasField("dynamic_batching")
        assert (repository / name / "1" / "model.py").read_bytes() == generic
        assert (repository / name / "1" / "model.onnx").stat().st_size > 0


@pytest.mark.parametrize(
    ("name", "max_batch_size", "inputs", "outputs"),
    [
        ("simple", 8, {"INPUT0": ("TYPE_INT32", [16]), "INPUT1": ("TYPE_INT32", [16])},
         {"OUTPUT0": ("TYPE_INT32", [16]), "OUTPUT1": ("TYPE_INT32", [16])}),
        ("simple_string", 8, {"INPUT0": ("TYPE_STRING", [16]), "INPUT1": ("TYPE_STRING", [16])},
         {"OUTPUT0": ("TYPE_STRING", [16]), "OUTPUT1": ("TYPE_STRING", [16])}),
        ("digits", 1024, {"input": ("TYPE_FP32", [64])},
         {"label": ("TYPE_INT64", [1]), "probabilities": ("TYPE_FP32", [10])}),
        ("iris", 64, {"input": ("TYPE_FP32", [4])},
         {"label": ("TYPE_INT64", [1]), "probabilities": ("TYPE_FP32", [3])}),
    ],
)  # fmt: skip
def test_signatures(
    repository: Path,
    name: str,
    max_batch_size: int,
    inputs: dict[str, tuple[str, list[int]]],
    outputs: dict[str, tuple[str, list[int]]],
) -> None:
    config = text_format.Parse(
        (repository / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )

    def signature(tensors: Iterable[Any]) -> dict[str, tuple[str, list[int]]]:
        return {t.name: (model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in tensors}

    assert config.max_batch_size == max_batch_size
    assert signature(config.input) == inputs
    assert signature(config.output) == outputs
    # The generic model.py binds Triton tensors to graph tensors by name.
    graph = session(repository, name)
    assert {i.name for i in graph.get_inputs()} == set(inputs)
    assert {o.name for o in graph.get_outputs()} == set(outputs)


def test_accumulate_is_stateful_with_triton_sequence_controls(repository: Path) -> None:
    config = text_format.Parse(
        (repository / "accumulate" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    source = (resources.files("tensorway.demo_models") / "accumulate_model.py").read_bytes()
    assert (repository / "accumulate" / "1" / "model.py").read_bytes() == source
    assert not (repository / "accumulate" / "1" / "model.onnx").exists()
    assert config.backend == "python"
    assert not config.HasField("dynamic_batching")
    controls = {
        control.name: model_config_pb2.ModelSequenceBatching.Control.Kind.Name(control.control[0].kind)
        for control in config.sequence_batching.control_input
    }
    assert controls == {
        "START": "CONTROL_SEQUENCE_START",
        "END": "CONTROL_SEQUENCE_END",
        "READY": "CONTROL_SEQUENCE_READY",
        "CORRID": "CONTROL_SEQUENCE_CORRID",
    }


def test_tokens_is_decoupled_and_unbatched(repository: Path) -> None:
    config = text_format.Parse(
        (repository / "tokens" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    source = (resources.files("tensorway.demo_models") / "tokens_model.py").read_bytes()
    assert (repository / "tokens" / "1" / "model.py").read_bytes() == source
    assert config.model_transaction_policy.decoupled
    assert config.max_batch_size == 0
    assert not config.HasField("dynamic_batching")
    assert [(t.name, model_config_pb2.DataType.Name(t.data_type)) for t in config.output] == [
        ("TOKEN", "TYPE_STRING"),
        ("INDEX", "TYPE_INT32"),
    ]


def test_simple_adds_and_subtracts(repository: Path) -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(-1000, 1000, size=(3, 16), dtype=np.int32)
    b = rng.integers(-1000, 1000, size=(3, 16), dtype=np.int32)
    total, difference = session(repository, "simple").run(["OUTPUT0", "OUTPUT1"], {"INPUT0": a, "INPUT1": b})
    np.testing.assert_array_equal(total, a + b)
    np.testing.assert_array_equal(difference, a - b)
    assert total.dtype == np.int32


@pytest.mark.parametrize(
    ("name", "split", "classes"), [("digits", digits_split, 10), ("iris", iris_split, 3)]
)
def test_classifier_is_accurate_on_held_out_rows(
    repository: Path, name: str, split: Callable[[], Split], classes: int
) -> None:
    data = split()
    labels, probabilities = session(repository, name).run(["label", "probabilities"], {"input": data.x_test})
    assert labels.dtype == np.int64
    assert labels.shape == (len(data.x_test),)
    assert probabilities.shape == (len(data.x_test), classes)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert np.mean(labels == data.y_test) > 0.9


def test_rebuild_elsewhere_gives_identical_bytes(repository: Path, tmp_path: Path) -> None:
    build_repository(tmp_path)
    assert files(tmp_path) == files(repository)


def test_repeated_build_leaves_current_models_alone(tmp_path: Path) -> None:
    build_repository(tmp_path)
    graphs = {name: (tmp_path / name / "1" / "model.onnx") for name in ONNX_MODELS}
    written = {name: path.stat().st_mtime_ns for name, path in graphs.items()}
    before = files(tmp_path)
    graphs["digits"].write_bytes(b"damaged")
    (tmp_path / "unrelated").mkdir()

    assert build_repository(tmp_path) == MODELS

    assert files(tmp_path) == before
    assert (tmp_path / "unrelated").is_dir()
    assert graphs["digits"].stat().st_mtime_ns != written["digits"]
    for name in ["simple", "simple_string", "iris"]:
        assert graphs[name].stat().st_mtime_ns == written[name]
