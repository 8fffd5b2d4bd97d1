"""Envoy's config for a profile, and the files it reads: the descriptor set for transcoding,
the OpenAPI document with its Swagger UI page, and the JWKS.

`envoy/templates/envoy.yaml.j2` is rendered with `envoy/values/<profile>.yaml`. The values'
``files.dir`` is where Envoy finds the files written by `write_edge_files` (empty: where they
were written); a relative ``jwt.jwks_file`` is inside that directory.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import swagger_ui_bundle
import yaml

from tensorway import protogen
from tensorway.edge.bindings import transcoder_descriptor_set
from tensorway.edge.keys import ensure_key_pair
from tensorway.edge.openapi import build_openapi
from tensorway.edge.tls import ensure_local_certificates
from tensorway.runtime.context import Scope

TEMPLATE_NAME = "envoy.yaml.j2"
# The APIs Envoy transcodes, in precedence order: where two bind the same method and path, the
# first one's binding is served (and documented).
PUBLIC_SERVICES = (
    "tensorway.inference.v1.InferenceService",
    "tensorway.registry.v1.RegistryService",
    "tensorway.batch.v1.BatchService",
)


@dataclass(frozen=True)
class AccessPolicy:
    """gRPC methods (a regex over the path, REST calls included once transcoded) that a token may
    call when its scope claim grants `scope`."""

    methods: str
    scope: Scope


# What each scope opens at the edge; the services check the same scopes again. Triton's repository
# control changes what a shared pool serves, so it is the admin's, like registry writes.
_TRITON_READS = (
    "ServerLive|ServerReady|ModelReady|ServerMetadata|ModelMetadata|ModelConfig|ModelStatistics"
    "|RepositoryIndex|ModelInfer|ModelStreamInfer"
)
ACCESS_POLICIES = {
    "inference": AccessPolicy(
        rf"^/(tensorway\.inference\.v1\.InferenceService/[A-Za-z]+|inference\.GRPCInferenceService/({_TRITON_READS}))$",
        Scope.INFER,
    ),
    # Triton's V2 HTTP/REST protocol (tritonclient.http), matched on the path without its query.
    "inference-http": AccessPolicy(
        r"^/v2(/health/(live|ready)|/repository/index"
        r"|/models(/stats|/[^/]+(/versions/[^/]+)?(/(ready|config|stats|infer))?))?$",
        Scope.INFER,
    ),
    "triton-repository": AccessPolicy(
        r"^/inference\.GRPCInferenceService/(RepositoryModelLoad|RepositoryModelUnload)$", Scope.MODELS_WRITE
    ),
    "batch": AccessPolicy(r"^/tensorway\.batch\.v1\.BatchService/[A-Za-z]+$", Scope.BATCH),
    "registry-read": AccessPolicy(
        r"^/tensorway\.registry\.v1\.RegistryService/(Get|List|Resolve)[A-Za-z]*$", Scope.MODELS_READ
    ),
    "registry-write": AccessPolicy(
        r"^/tensorway\.registry\.v1\.RegistryService/(Create|Update|Delete|Transition)[A-Za-z]*$",
        Scope.MODELS_WRITE,
    ),
    "registry-rollouts": AccessPolicy(
        r"^/tensorway\.registry\.v1\.RegistryService/(Start|Pause|Resume|Abort)Rollout$", Scope.MODELS_WRITE
    ),
}
DESCRIPTOR_FILE = "api.pb"
OPENAPI_FILE = "openapi.json"
DOCS_DIR = "docs"
# Swagger UI's own files, served from the installed swagger-ui-bundle package, by content type.
SWAGGER_ASSETS = {"swagger-ui.css": "text/css", "swagger-ui-bundle.js": "application/javascript"}
DOCS_PAGE = """<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>tensorway API</title>
<link rel="stylesheet" href="./swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="./swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
</body></html>
"""


class UnknownProfileError(LookupError):
    """No values file exists for the profile."""

    def __init__(self, profile: str, path: Path) -> None:
        super().__init__(f"no values file for the profile {profile!r} ({path})")
        self.profile = profile


def default_envoy_dir() -> Path:
    """The repository's envoy/ directory (templates/ and values/)."""
    # services/tensorway/edge/config.py -> the repository root is four levels up.
    return Path(__file__).resolve().parents[3] / "envoy"


def profiles(envoy_dir: Path | None = None) -> list[str]:
    """The profiles that have a values file."""
    return sorted(path.stem for path in ((envoy_dir or default_envoy_dir()) / "values").glob("*.yaml"))


def load_values(
    profile: str,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    envoy_dir: Path | None = None,
) -> dict[str, Any]:
    """A profile's values with sections overridden: ``{"admin": {"port": 19901}}`` replaces one key."""
    path = (envoy_dir or default_envoy_dir()) / "values" / f"{profile}.yaml"
    try:
        values: dict[str, Any] = copy.deepcopy(yaml.safe_load(path.read_text()))
    except FileNotFoundError:
        raise UnknownProfileError(profile, path) from None
    for section, keys in (overrides or {}).items():
        values.setdefault(section, {}).update(keys)
    return values


def render_envoy_config(
    profile: str,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    envoy_dir: Path | None = None,
) -> str:
    """The Envoy config of a profile, with sections of its values overridden."""
    root = envoy_dir or default_envoy_dir()
    values = load_values(profile, overrides, root)
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(root / "templates"),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        # The template renders YAML, not HTML.
        autoescape=False,  # noqa: S701  # nosec B701
    )
    return environment.get_template(TEMPLATE_NAME).render(
        **values,
        public_services=PUBLIC_SERVICES,
        access=ACCESS_POLICIES,
        descriptor_file=DESCRIPTOR_FILE,
        openapi_file=OPENAPI_FILE,
        docs_dir=DOCS_DIR,
        swagger_assets=SWAGGER_ASSETS,
    )


@dataclass(frozen=True)
class EdgeFiles:
    """The files one Envoy reads, in one directory."""

    directory: Path
    descriptor_set: Path
    openapi: Path


def write_edge_files(directory: Path, root: Path | None = None) -> EdgeFiles:
    """Write the descriptor set Envoy transcodes with (from protos/, shadowed bindings dropped),
    the OpenAPI document and the docs page."""
    directory.mkdir(parents=True, exist_ok=True)
    descriptor_set = protogen.write_descriptor_set(
        root or protogen.project_root(), directory / DESCRIPTOR_FILE
    )
    served, _ = transcoder_descriptor_set(descriptor_set.read_bytes(), PUBLIC_SERVICES)
    descriptor_set.write_bytes(served)
    document = build_openapi(served, PUBLIC_SERVICES, title="tensorway")
    openapi = directory / OPENAPI_FILE
    openapi.write_text(json.dumps(document, indent=1) + "\n")
    docs = directory / DOCS_DIR
    docs.mkdir(exist_ok=True)
    (docs / "index.html").write_text(DOCS_PAGE)
    assets = Path(swagger_ui_bundle.swagger_ui_path)
    for name in SWAGGER_ASSETS:
        shutil.copyfile(assets / name, docs / name)
    return EdgeFiles(directory, descriptor_set, openapi)


def render_profile(
    profile: str,
    out: Path,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    envoy_dir: Path | None = None,
) -> Path:
    """Write ``out/envoy.yaml`` and the files it reads; returns the config's path.

    A profile whose JWKS is one of these files (a relative ``jwt.jwks_file``) gets a key pair
    generated there on first render, so a fresh checkout runs; others read a mounted JWKS. The
    same goes for Envoy's certificate (a relative ``tls.cert_file``), signed by a local CA.
    """
    out = out.absolute()
    values = load_values(profile, overrides, envoy_dir)
    files_dir = values["files"]["dir"] or str(out)
    write_edge_files(out)
    if not Path(values["jwt"]["jwks_file"]).is_absolute():
        ensure_key_pair(out)
    if not Path(values["tls"]["cert_file"]).is_absolute():
        ensure_local_certificates(out)
    config = out / "envoy.yaml"
    config.write_text(
        render_envoy_config(profile, {**(overrides or {}), "files": {"dir": files_dir}}, envoy_dir)
    )
    return config
