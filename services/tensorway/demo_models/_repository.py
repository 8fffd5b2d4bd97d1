"""Writes the demo models as a Triton model repository, skipping models already built."""

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path

from tensorway.demo_models._config import (
    DECIMAL_ENCODING,
    STRING_ENCODING_PARAMETER,
    ModelConfig,
    SequenceBatching,
    TensorConfig,
)
from tensorway.demo_models._datasets import digits_split, iris_split
from tensorway.demo_models._graphs import arithmetic_onnx, classifier_onnx, train_digits, train_iris

_log = logging.getLogger(__name__)

_VERSION = "1"
_STAMP = "build-stamp.json"
_MODEL_SOURCE = "triton_model.py"
_ACCUMULATE_SOURCE = "accumulate_model.py"
_TOKENS_SOURCE = "tokens_model.py"
# A model is rebuilt when any of these changes: they decide what the graphs hold.
_RECIPE_SOURCES = ("_datasets.py", "_graphs.py", _MODEL_SOURCE, _ACCUMULATE_SOURCE, _TOKENS_SOURCE)
_RECIPE_DISTRIBUTIONS = ("numpy", "scikit-learn", "skl2onnx", "onnx")


@dataclass(frozen=True)
class _DemoModel:
    config: ModelConfig
    graph: Callable[[], bytes] | None
    """The ONNX graph the generic model.py runs; None for a model with code of its own."""
    source: str = _MODEL_SOURCE
    """The file of this package that becomes the model's model.py."""


def _arithmetic(name: str, data_type: str, parameters: dict[str, str]) -> _DemoModel:
    def tensor(tensor_name: str) -> TensorConfig:
        return TensorConfig(tensor_name, data_type, (16,))

    return _DemoModel(
        ModelConfig(
            name=name,
            max_batch_size=8,
            inputs=(tensor("INPUT0"), tensor("INPUT1")),
            outputs=(tensor("OUTPUT0"), tensor("OUTPUT1")),
            parameters=parameters,
        ),
        arithmetic_onnx,
    )


def _classifier(
    name: str, n_features: int, n_classes: int, max_batch_size: int, graph: Callable[[], bytes]
) -> _DemoModel:
    return _DemoModel(
        ModelConfig(
            name=name,
            max_batch_size=max_batch_size,
            inputs=(TensorConfig("input", "FP32", (n_features,)),),
            # Triton forbids empty dims on a batched model, so the per-row label is [1].
            outputs=(
                TensorConfig("label", "INT64", (1,)),
                TensorConfig("probabilities", "FP32", (n_classes,)),
            ),
        ),
        graph,
    )


_MODELS = (
    _arithmetic("simple", "INT32", {}),
    _arithmetic("simple_string", "STRING", {STRING_ENCODING_PARAMETER: DECIMAL_ENCODING}),
    # Batch jobs send requests of a model's max batch: at 1,024 rows (256 KB) a request, the
    # mesh's fixed cost per request is small beside the rows it carries.
    _classifier("digits", 64, 10, 1024, lambda: classifier_onnx(train_digits(digits_split()), 64)),
    _classifier("iris", 4, 3, 64, lambda: classifier_onnx(train_iris(iris_split()), 4)),
    # Stateful: the running sum of a sequence's inputs, as Triton's own sequence examples do.
    _DemoModel(
        ModelConfig(
            name="accumulate",
            max_batch_size=8,
            inputs=(TensorConfig("INPUT", "INT32", (1,)),),
            outputs=(TensorConfig("OUTPUT", "INT32", (1,)),),
            sequence_batching=SequenceBatching(),
        ),
        graph=None,
        source=_ACCUMULATE_SOURCE,
    ),
    # Decoupled: a prompt's words, one response each, as a language model streams its tokens.
    _DemoModel(
        ModelConfig(
            name="tokens",
            max_batch_size=0,
            inputs=(TensorConfig("PROMPT", "STRING", (1,)),),
            outputs=(TensorConfig("TOKEN", "STRING", (1,)), TensorConfig("INDEX", "INT32", (1,))),
            decoupled=True,
        ),
        graph=None,
        source=_TOKENS_SOURCE,
    ),
)


def build_repository(target: Path) -> list[str]:
    """Write the demo models into the Triton model repository ``target``; return their names.

    Every model gets ``<name>/config.pbtxt`` and ``<name>/1/model.py``: the generic onnxruntime
    model beside its ``<name>/1/model.onnx``, or for ``accumulate`` (stateful, sequence
    batching) and ``tokens`` (decoupled, several responses per request) a model.py of its own.
    Training uses fixed seeds and no download, so a build is byte-for-byte reproducible on one
    machine. A model whose files and recipe are unchanged since the last build is left alone,
    which makes a repeated call cheap; concurrent calls on one target wait for each other. Other
    directories in ``target`` are not touched.
    """
    target.mkdir(parents=True, exist_ok=True)
    recipe = _recipe_digest()
    with _exclusive(target):
        for model in _MODELS:
            _build_model(target, model, _package_file(model.source), recipe)
    return [model.config.name for model in _MODELS]


def _build_model(target: Path, model: _DemoModel, model_source: bytes, recipe: str) -> None:
    name = model.config.name
    config = model.config.to_pbtxt().encode()
    fingerprint = _sha256(recipe.encode() + b"\0" + config)
    model_dir = target / name
    if _is_current(model_dir, fingerprint):
        _log.debug("demo model %s is up to date", name)
        return
    started = time.perf_counter()
    files = {"config.pbtxt": config, f"{_VERSION}/model.py": model_source}
    if model.graph is not None:
        files[f"{_VERSION}/model.onnx"] = model.graph()
    stamp = {"fingerprint": fingerprint, "files": {path: _sha256(data) for path, data in files.items()}}
    files[_STAMP] = json.dumps(stamp, indent=2, sort_keys=True).encode() + b"\n"
    # Written beside the model and swapped in, so Triton never sees a half-written model.
    staging = target / f".{name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    for path, data in files.items():
        (staging / path).parent.mkdir(parents=True, exist_ok=True)
        (staging / path).write_bytes(data)
    _swap_in(staging, model_dir)
    _log.info("built demo model %s in %.1fs", name, time.perf_counter() - started)


def _is_current(model_dir: Path, fingerprint: str) -> bool:
    try:
        stamp = json.loads((model_dir / _STAMP).read_bytes())
        return bool(stamp["fingerprint"] == fingerprint) and all(
            _sha256((model_dir / path).read_bytes()) == digest for path, digest in stamp["files"].items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _swap_in(staging: Path, model_dir: Path) -> None:
    retired = model_dir.with_name(f".{model_dir.name}.retired")
    shutil.rmtree(retired, ignore_errors=True)
    if model_dir.exists():
        model_dir.rename(retired)
    staging.rename(model_dir)
    shutil.rmtree(retired, ignore_errors=True)


@contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    # Locking the directory itself leaves no lock file in the repository for Triton to see.
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _recipe_digest() -> str:
    parts = [_sha256(_package_file(name)) for name in _RECIPE_SOURCES]
    parts += [f"{dist}=={metadata.version(dist)}" for dist in _RECIPE_DISTRIBUTIONS]
    return _sha256("\n".join(parts).encode())


def _package_file(name: str) -> bytes:
    return (resources.files(__package__) / name).read_bytes()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
