"""Model artifacts from S3 into the Triton repository: checksummed, atomic, and removed when no
deployment needs them.

An artifact (`s3://bucket/prefix/`) is a Triton model directory: `config.pbtxt` and one version
folder (`1/model.py`, `1/model.onnx`, ...). A registry version `V` of model `M` lands at
`{repository}/M/V/`, whatever its folder is called in S3: it is downloaded into a temporary
directory beside the repository (same file system), checked against the listing (size, and the
MD5 that a single-part upload's ETag is), and renamed into place in one step, so Triton never sees
a half-copied version. A manifest in the version folder records the listing it came from (keys,
sizes, ETags, SHA-256): a later fetch of the same artifact compares listings and downloads nothing.

The model's `config.pbtxt` is written by the orchestrator, not copied: the newest loadable
version's config, named for the model, with a `version_policy` naming exactly the versions to
load. Orchestrators that share a repository take a file lock around every change to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

CONFIG_FILE = "config.pbtxt"
MANIFEST_FILE = ".tensorway-artifact.json"
ARTIFACT_CONFIG_FILE = ".tensorway-config.pbtxt"
"""The artifact's own config.pbtxt, kept in its version folder (Triton ignores it there)."""
_CHUNK = 1 << 20


class ArtifactError(Exception):
    """An artifact that cannot be served: the reason is meant for the version's FAILED state."""


@dataclass(frozen=True)
class ArtifactUri:
    """`s3://bucket/prefix/`: where a Triton model directory lives."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, uri: str) -> ArtifactUri:
        parts = urlsplit(uri)
        if parts.scheme != "s3" or not parts.netloc:
            raise ArtifactError(f"artifact {uri!r} is not an s3://bucket/prefix/ URI")
        prefix = parts.path.strip("/")
        return cls(parts.netloc, f"{prefix}/" if prefix else "")


def is_fetched(uri: str) -> bool:
    """Whether the orchestrator fetches this artifact (s3://); other URIs (empty, file://) name
    models already in the Triton's repository."""
    return uri.startswith("s3://")


@dataclass(frozen=True)
class ListedObject:
    """One object of an artifact's listing: its key relative to the prefix, size and ETag."""

    key: str
    size: int
    etag: str


class ObjectSource(Protocol):
    """Where artifacts are read from: S3, or a test's wrapper around it."""

    async def list(self, uri: ArtifactUri) -> list[ListedObject]:
        """Every object under the prefix, keys relative to it."""
        ...

    async def download(self, uri: ArtifactUri, key: str, target: Path) -> None:
        """Write the object `key` (relative to the prefix) to `target`."""
        ...


class S3Objects:
    """Artifacts on S3 (MinIO, SeaweedFS, AWS) through the minio SDK, in worker threads."""

    def __init__(self, endpoint: str, access_key: str, secret_key: str, region: str) -> None:
        from minio import Minio

        parts = urlsplit(endpoint)
        self._client = Minio(
            parts.netloc,
            access_key=access_key,
            secret_key=secret_key,
            secure=parts.scheme == "https",
            region=region,
        )

    async def list(self, uri: ArtifactUri) -> list[ListedObject]:
        def call() -> list[ListedObject]:
            return [
                ListedObject(
                    item.object_name[len(uri.prefix) :], item.size or 0, (item.etag or "").strip('"')
                )
                for item in self._client.list_objects(uri.bucket, prefix=uri.prefix, recursive=True)
                if item.object_name and not item.is_dir
            ]

        listing: list[ListedObject] = await self._guarded(uri, call)
        return listing

    async def download(self, uri: ArtifactUri, key: str, target: Path) -> None:
        def call() -> None:
            response = self._client.get_object(uri.bucket, uri.prefix + key)
            try:
                with target.open("wb") as file:
                    for chunk in response.stream(_CHUNK):
                        file.write(chunk)
            finally:
                response.close()
                response.release_conn()

        await self._guarded(uri, call)

    @staticmethod
    async def _guarded(uri: ArtifactUri, call: Any) -> Any:
        from minio.error import MinioException

        try:
            return await asyncio.to_thread(call)
        except (MinioException, OSError) as error:
            raise ArtifactError(f"cannot read s3://{uri.bucket}/{uri.prefix}: {error}") from error


def _digests(path: Path) -> tuple[str, str]:
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            md5.update(chunk)
            sha256.update(chunk)
    return md5.hexdigest(), sha256.hexdigest()


def _version_folder(listing: Sequence[ListedObject], version: str) -> str:
    """The artifact's version folder: the one named like the registry version, else its only one."""
    folders = sorted({item.key.split("/", 1)[0] for item in listing if "/" in item.key})
    if version in folders:
        return version
    if len(folders) == 1:
        return folders[0]
    raise ArtifactError(
        f"the artifact holds version folders {folders or 'none'}; "
        f"it needs exactly one, or one named {version}"
    )


class ModelRepository:
    """The Triton model repository this orchestrator fills from artifacts."""

    def __init__(self, root: Path, objects: ObjectSource) -> None:
        self.root = root
        self._objects = objects
        self._lock_path = root.parent / f".{root.name}.lock"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # Orchestrators that front the same Tritons share the repository.
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock_path.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def managed(self, model: str) -> bool:
        """Whether some version of `model` came from an artifact."""
        return any((folder / MANIFEST_FILE).exists() for folder in self._versions_of(model))

    def fetched_versions(self, model: str) -> list[str]:
        """The versions of `model` that came from artifacts."""
        return sorted(folder.name for folder in self._versions_of(model) if (folder / MANIFEST_FILE).exists())

    def _versions_of(self, model: str) -> list[Path]:
        directory = self.root / model
        return [child for child in directory.iterdir() if child.is_dir()] if directory.is_dir() else []

    async def fetch(self, model: str, version: str, uri: str) -> None:
        """Make `{repository}/{model}/{version}/` hold the artifact's version folder, checked
        against its listing; nothing is downloaded when the manifest there matches the listing.
        Raises ArtifactError, leaving the repository as it was."""
        if not version.isdigit():
            raise ArtifactError(f"version {version!r} is not a number, as Triton's version folders are")
        where = ArtifactUri.parse(uri)
        listing = await self._objects.list(where)
        if not any(item.key == CONFIG_FILE for item in listing):
            raise ArtifactError(f"the artifact {uri} has no {CONFIG_FILE}")
        folder = _version_folder(listing, version)
        wanted = [item for item in listing if item.key == CONFIG_FILE or item.key.startswith(folder + "/")]
        manifest = {
            "uri": uri,
            "files": {item.key: {"size": item.size, "etag": item.etag} for item in wanted},
        }
        target = self.root / model / version
        if self._manifest_matches(target, manifest):
            return
        self.root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".fetch-{model}-{version}-", dir=self.root.parent))
        try:
            fetched = staging / version
            fetched.mkdir()
            for item in wanted:
                relative = ARTIFACT_CONFIG_FILE if item.key == CONFIG_FILE else item.key[len(folder) + 1 :]
                path = fetched / relative
                if not path.resolve().is_relative_to(fetched.resolve()):
                    raise ArtifactError(f"the artifact {uri} names {item.key!r}, outside its folder")
                path.parent.mkdir(parents=True, exist_ok=True)
                await self._objects.download(where, item.key, path)
                md5, sha256 = await asyncio.to_thread(_digests, path)
                size = path.stat().st_size
                if size != item.size or ("-" not in item.etag and item.etag and item.etag != md5):
                    raise ArtifactError(
                        f"{item.key} of {uri} arrived as {size} bytes (MD5 {md5}); the listing says "
                        f"{item.size} bytes (ETag {item.etag})"
                    )
                manifest["files"][item.key]["sha256"] = sha256  # type: ignore[index]
            (fetched / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True))
            await asyncio.to_thread(self._move_into_place, fetched, target)
        finally:
            await asyncio.to_thread(shutil.rmtree, staging, True)

    @staticmethod
    def _manifest_matches(target: Path, manifest: dict[str, Any]) -> bool:
        try:
            kept = json.loads((target / MANIFEST_FILE).read_text())
        except (OSError, ValueError):
            return False
        files = {
            key: {"size": entry.get("size"), "etag": entry.get("etag")}
            for key, entry in kept.get("files", {}).items()
        }
        return bool(kept.get("uri") == manifest["uri"] and files == manifest["files"])

    def _move_into_place(self, fetched: Path, target: Path) -> None:
        with self._locked():
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                # What was there (an older artifact, or a model put there by hand) goes aside
                # first: rename cannot replace a directory that has files.
                aside = Path(tempfile.mkdtemp(prefix=".replaced-", dir=self.root.parent))
                target.rename(aside / "old")
                fetched.rename(target)
                shutil.rmtree(aside, ignore_errors=True)
            else:
                fetched.rename(target)

    def config_of(self, model: str, version: str) -> Any:
        """The version's own config (a ModelConfig), as its artifact has it; ArtifactError when
        it does not parse."""
        path = self.root / model / version / ARTIFACT_CONFIG_FILE
        try:
            return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        except (OSError, text_format.ParseError) as error:
            raise ArtifactError(f"{CONFIG_FILE} of version {version} does not parse: {error}") from error

    async def write_config(self, model: str, versions: Sequence[str]) -> None:
        """Write the model's config.pbtxt: the newest of `versions`' config, named `model`,
        loading exactly `versions`."""
        newest = max(versions, key=int)
        config = self.config_of(model, newest)
        config.name = model
        config.version_policy.Clear()
        config.version_policy.specific.versions.extend(sorted(int(version) for version in versions))
        text = text_format.MessageToString(config)

        def write() -> None:
            with self._locked():
                final = self.root / model / CONFIG_FILE
                temporary = final.with_name(f".{CONFIG_FILE}.{os.getpid()}")
                temporary.write_text(text)
                temporary.replace(final)

        await asyncio.to_thread(write)

    async def remove_version(self, model: str, version: str) -> None:
        """Take a fetched version out of the repository (it failed, or is no longer deployed)."""
        await asyncio.to_thread(self._remove, self.root / model / version)

    async def remove(self, model: str) -> None:
        """Take a model that came from artifacts out of the repository."""
        if self.managed(model):
            await asyncio.to_thread(self._remove, self.root / model)

    def _remove(self, path: Path) -> None:
        with self._locked():
            if not path.exists():
                return
            aside = Path(tempfile.mkdtemp(prefix=".removed-", dir=self.root.parent))
            path.rename(aside / "old")
        shutil.rmtree(aside, ignore_errors=True)


class _RepositorySettings(Protocol):
    tritons: tuple[str, ...]
    model_repository: Path | None
    model_repositories: dict[str, Path]
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    s3_region: str


def model_repositories(settings: _RepositorySettings) -> dict[str, ModelRepository]:
    """The repository each Triton's artifacts are fetched into, by Triton address, from the
    orchestrator's settings: `model_repositories` where it names the Triton, else the shared
    `model_repository`; Tritons with neither get no artifacts."""
    objects = S3Objects(
        settings.s3_endpoint, settings.s3_access_key, settings.s3_secret_key, settings.s3_region
    )
    shared = (
        None if settings.model_repository is None else ModelRepository(settings.model_repository, objects)
    )
    chosen: dict[str, ModelRepository] = {}
    for triton in settings.tritons:
        own = settings.model_repositories.get(triton)
        repository = shared if own is None else ModelRepository(own, objects)
        if repository is not None:
            chosen[triton] = repository
    return chosen
