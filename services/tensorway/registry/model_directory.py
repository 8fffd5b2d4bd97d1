"""A Triton model directory on disk as a registry version: its signature read from its
`config.pbtxt`, and its files uploaded to S3 as the version's artifact.

An artifact is stored under a digest of its files (`s3://{bucket}/{model}/{digest}/`), so
uploading the same directory twice gives the same URI and writes nothing new, and a changed
directory never overwrites what a registered version points to.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from google.protobuf import text_format

from tensorway.common.v1 import tensor_pb2
from tensorway.registry.v1 import registry_service_pb2 as registry_pb

if TYPE_CHECKING:
    from tritonclient.grpc import model_config_pb2

CONFIG_FILE = "config.pbtxt"
MODELS_BUCKET = "tensorway-models"
"""The bucket model artifacts are uploaded to."""


class ModelDirectoryError(Exception):
    """A directory that is not a Triton model directory the mesh can serve."""


def parse_config(text: str) -> model_config_pb2.ModelConfig:
    """A config.pbtxt as Triton's ModelConfig; ModelDirectoryError when it does not parse."""
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as error:
        raise ModelDirectoryError(f"{CONFIG_FILE} does not parse: {error}") from error


def version_from_config(text: str) -> registry_pb.ModelVersion:
    """A version's signature (platform, inputs, outputs, largest batch) from a config.pbtxt.
    Shapes are a row's, as the config's dims are and as every signature in the registry is: the
    batch dimension is `max_batch_size`'s, added where an API shows it (Triton's metadata)."""
    # Imported here, as tritonclient is by parse_config: the registry pays for it only when used.
    from tensorway.tensors.triton import config_datatype

    config = parse_config(text)

    def specs(tensors: Any) -> list[tensor_pb2.TensorSpec]:
        return [
            tensor_pb2.TensorSpec(name=t.name, datatype=config_datatype(t.data_type), shape=list(t.dims))
            for t in tensors
        ]

    return registry_pb.ModelVersion(
        platform=config.platform or config.backend,
        inputs=specs(config.input),
        outputs=specs(config.output),
        max_batch_size=config.max_batch_size,
    )


@dataclass(frozen=True)
class ModelDirectory:
    """The files of a Triton model directory: config.pbtxt and one version folder."""

    root: Path
    files: dict[str, Path]

    @classmethod
    def read(cls, root: Path) -> ModelDirectory:
        if not (root / CONFIG_FILE).is_file():
            raise ModelDirectoryError(f"{root} has no {CONFIG_FILE}: it is not a Triton model directory")
        files = {CONFIG_FILE: root / CONFIG_FILE}
        for path in sorted(root.rglob("*")):
            relative = path.relative_to(root)
            # Hidden files, build stamps and Python's byte code are the tools' own, not the model's.
            hidden = any(part.startswith(".") or part == "__pycache__" for part in relative.parts)
            if path.is_file() and len(relative.parts) > 1 and not hidden:
                files[relative.as_posix()] = path
        folders = {key.split("/", 1)[0] for key in files if "/" in key}
        if not folders:
            raise ModelDirectoryError(f"{root} has no version folder (such as 1/ with the model's files)")
        if len(folders) > 1:
            raise ModelDirectoryError(f"{root} has version folders {sorted(folders)}; register one at a time")
        return cls(root, files)

    @property
    def config_text(self) -> str:
        return self.files[CONFIG_FILE].read_text()

    def digest(self) -> str:
        summary = hashlib.sha256()
        for key, path in sorted(self.files.items()):
            summary.update(key.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
        return summary.hexdigest()[:20]

    def upload(self, client: Any, model: str, bucket: str = MODELS_BUCKET) -> str:
        """Upload the files with a `minio.Minio` client; returns the artifact's URI."""
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)
        prefix = f"{model}/{self.digest()}/"
        for key, path in self.files.items():
            data = path.read_bytes()
            client.put_object(bucket, prefix + key, io.BytesIO(data), len(data))
        return f"s3://{bucket}/{prefix}"


def s3_client(endpoint: str, access_key: str, secret_key: str, region: str = "us-east-1") -> Any:
    """A `minio.Minio` client for an `http(s)://host:port` endpoint."""
    from minio import Minio

    parts = urlsplit(endpoint)
    return Minio(
        parts.netloc,
        access_key=access_key,
        secret_key=secret_key,
        secure=parts.scheme == "https",
        region=region,
    )
