"""Generates `gen/` from `protos/`: messages, gRPC stubs and their `.pyi` stubs.

`python -m tensorway.protogen` regenerates; `--check` fails when `gen/` differs from what
`protos/` generate. google/api and google/rpc protos come from the installed
googleapis-common-protos package: they are staged into `.build/third_party_protos` for protoc
and buf, never copied into the repository.

Only `gen/tensorway/` is generated; `gen/pyproject.toml` and `gen/README.md` beside it make the
client package `tensorway-contracts` and are kept by hand.

`stubs/tritonclient/` is generated too: typed `.pyi` stubs for the Triton messages and gRPC
service that `tritonclient` ships untyped, built from the descriptors compiled into its modules
(the package carries no `.proto` files), so the type checker knows every Triton message the
router and orchestrator handle.
"""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

import typer

# The third-party protos that tensorway's contracts import (and that Envoy's transcoder must
# know to render error details).
THIRD_PARTY_PROTOS = (
    "google/api/annotations.proto",
    "google/api/http.proto",
    "google/rpc/code.proto",
    "google/rpc/error_details.proto",
    "google/rpc/status.proto",
)


def project_root() -> Path:
    """The checkout root: the directory that holds `protos/` and `pyproject.toml`."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "protos").is_dir() and (parent / "pyproject.toml").is_file():
            return parent
    raise RuntimeError("tensorway.protogen runs from a source checkout (protos/ not found)")


def stage_third_party_protos(root: Path) -> Path:
    """Copy the imported google protos from their installed package into `.build/`."""
    import google.api

    site = Path(next(iter(google.api.__path__))).parent.parent
    staged = root / ".build" / "third_party_protos"
    for relative in THIRD_PARTY_PROTOS:
        target = staged / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(site / relative, target)
    return staged


def contract_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root / "protos")) for p in (root / "protos").rglob("*.proto"))


def include_paths(root: Path) -> list[str]:
    well_known = resources.files("grpc_tools") / "_proto"
    return [str(root / "protos"), str(stage_third_party_protos(root)), str(well_known)]


def generate(root: Path, out: Path) -> None:
    """Run protoc with the Python, gRPC and mypy plugins over every contract into `out`."""
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    # protoc finds the mypy plugins on PATH; the venv's bin holds them.
    bin_dir = Path(sys.executable).parent
    args = [
        "protoc",
        *(f"-I{p}" for p in include_paths(root)),
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *contract_files(root),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed; see its messages above")
    # Typed packages (PEP 561), so a client's type checker reads the .pyi stubs of the installed
    # contracts. The marker goes in each package, since `tensorway` itself is a namespace.
    for package in sorted({module.parent for module in out.rglob("*_pb2.py")}):
        (package / "py.typed").touch()


# Triton's proto files as tritonclient compiled them, and the module path each is imported by.
TRITON_PROTOS = {
    "model_config.proto": "tritonclient/grpc/model_config.proto",
    "grpc_service.proto": "tritonclient/grpc/service.proto",
}
# Only the modules named are stubbed; anything else in tritonclient stays untyped.
PARTIAL_PACKAGE_STUB = "from _typeshed import Incomplete\n\ndef __getattr__(name: str) -> Incomplete: ...\n"


def generate_triton_stubs(out: Path) -> None:
    """Write typed stubs for `tritonclient.grpc.{service,model_config}_pb2` and the service's
    `service_pb2_grpc` into `out`, by handing mypy-protobuf's plugins the descriptors compiled
    into tritonclient, renamed to the paths they are imported by."""
    from google.protobuf import descriptor_pb2
    from google.protobuf.compiler import plugin_pb2
    from tritonclient.grpc import model_config_pb2, service_pb2

    request = plugin_pb2.CodeGeneratorRequest()
    for module in (model_config_pb2, service_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        proto.name = TRITON_PROTOS[proto.name]
        proto.dependency[:] = [TRITON_PROTOS[name] for name in proto.dependency]
        request.proto_file.append(proto)
        request.file_to_generate.append(proto.name)
    bin_dir = Path(sys.executable).parent
    for plugin in ("protoc-gen-mypy", "protoc-gen-mypy_grpc"):
        answer = subprocess.run(  # noqa: S603  # nosec B603: the venv's own plugin, no shell
            [str(bin_dir / plugin)], input=request.SerializeToString(), capture_output=True, check=True
        )
        response = plugin_pb2.CodeGeneratorResponse.FromString(answer.stdout)
        if response.error:
            raise RuntimeError(f"{plugin}: {response.error}")
        for file in response.file:
            if file.name.endswith("model_config_pb2_grpc.pyi"):
                continue  # model_config.proto declares no service
            target = out / file.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(file.content)
    for package in (out / "tritonclient", out / "tritonclient" / "grpc"):
        (package / "__init__.pyi").write_text(PARTIAL_PACKAGE_STUB)


def write_descriptor_set(root: Path, target: Path) -> Path:
    """A FileDescriptorSet of every contract and its imports (Envoy's gRPC-JSON transcoder)."""
    from grpc_tools import protoc

    target.parent.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        *(f"-I{p}" for p in include_paths(root)),
        "--include_imports",
        "--include_source_info",
        f"--descriptor_set_out={target}",
        *contract_files(root),
        *THIRD_PARTY_PROTOS,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed; see its messages above")
    return target


# What `make gen` writes, relative to the checkout root.
GENERATED_TREES = ("gen/tensorway", "stubs/tritonclient")


def generate_all(root: Path, out: Path) -> None:
    """Every generated tree, laid out under `out` as under the checkout root."""
    generate(root, out / "gen")
    generate_triton_stubs(out / "stubs")


def differences(expected: Path, actual: Path) -> list[str]:
    """Relative paths that differ between two generated trees, or exist in only one. Only the
    generated trees count: the client package's own files beside `gen/tensorway` do not."""

    def files(base: Path) -> set[str]:
        return {
            str(p.relative_to(base))
            for tree in GENERATED_TREES
            for p in (base / tree).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        }

    want, have = files(expected), files(actual)
    changed = {f for f in want & have if not filecmp.cmp(expected / f, actual / f, shallow=False)}
    return sorted((want ^ have) | changed)


def main(
    check: bool = typer.Option(False, help="Fail when gen/ differs from protos/ instead of writing."),
) -> None:
    root = project_root()
    with tempfile.TemporaryDirectory() as scratch:
        fresh = Path(scratch)
        generate_all(root, fresh)
        drift = differences(fresh, root)
        if check:
            if drift:
                typer.echo("generated files are out of date (run `make gen`):", err=True)
                for path in drift:
                    typer.echo(f"  {path}", err=True)
                raise typer.Exit(1)
            typer.echo("gen/ and stubs/ match what protos/ and tritonclient generate")
            return
        for tree in GENERATED_TREES:
            shutil.rmtree(root / tree, ignore_errors=True)
            shutil.copytree(fresh / tree, root / tree)
        typer.echo(f"regenerated gen/ and stubs/ ({len(drift)} files changed)")


if __name__ == "__main__":
    typer.run(main)
