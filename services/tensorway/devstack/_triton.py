"""Triton: the real tritonserver 2.51 shipped in the nvidia-pytriton wheel."""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import cast

from tensorway.devstack._component import (
    INSTALL_HINT,
    Component,
    LaunchContext,
    PackageFile,
    Started,
    loopback,
    path_with_venv_first,
)
from tensorway.devstack._errors import DevStackError
from tensorway.devstack._settings import DevStackSettings
from tensorway.devstack._state import Endpoint

# Where the Python backend keeps its shared-memory regions (POSIX shm_open).
_SHM_ROOT = Path("/dev/shm")  # noqa: S108  # nosec B108
TRITON_SERVER_TREE = PackageFile("pytriton", "tritonserver", "nvidia-pytriton")


class Triton(Component):
    """tritonserver on CPU with explicit model control, serving the demo models.

    Only the Python backend ships in the wheel; the demo models are ONNX graphs run by
    a small ``model.py`` through onnxruntime.
    """

    name = "triton"
    port_settings: tuple[str, ...] = ("triton_grpc_port", "triton_http_port")
    # Now and then, on a loaded machine, the Python backend aborts the server while it
    # initialises a model instance (boost::interprocess::lock_exception on a region it has just
    # made); the next start from clean shared memory gets past it.
    start_attempts = 2

    def __init__(
        self,
        server_tree: PackageFile = TRITON_SERVER_TREE,
        *,
        name: str = "triton",
        load_models: bool = True,
    ) -> None:
        """A ``name`` other than ``triton`` makes a replica (``triton-2``): its endpoints are
        ``triton_2_grpc`` and ``triton_2_http``, on free ports whatever the pinned ones.

        Without ``load_models`` it starts with none of its repository's models loaded (still
        built, for the registration to upload), leaving them to the orchestrators."""
        self._server_tree = server_tree
        self.name = name
        self._load_models = load_models
        if name != Triton.name:
            self.port_settings = ()

    def start(self, ctx: LaunchContext) -> Started:
        server_root = _install_server(self._server_tree.locate(self.name), ctx.home / "server")
        repository, fill_repository = _model_repository(ctx)
        models = fill_repository() if self._load_models else []
        grpc_port, http_port = (
            (ctx.port("triton_grpc_port"), ctx.port("triton_http_port"))
            if self.port_settings
            else (ctx.free_port(), ctx.free_port())
        )
        key = self.name.replace("-", "_")
        metrics_port = ctx.free_port()
        # Triton's Python backend names its shared-memory regions by this prefix; one per
        # component lets `down` or a restart remove what a killed server left in /dev/shm
        # without touching the regions a replica beside it is using.
        home_digest = hashlib.sha256(str(ctx.home.resolve()).encode()).hexdigest()[:12]
        shm_prefix = f"tensorway_{home_digest}_"
        for region in _SHM_ROOT.glob(f"{shm_prefix}*"):
            region.unlink(missing_ok=True)
        env = {
            **os.environ,
            "LD_LIBRARY_PATH": _join_paths(_wheel_libs(self._server_tree), os.environ.get("LD_LIBRARY_PATH")),
            # The Python backend's stub imports numpy and onnxruntime from the first
            # python on PATH: this environment's.
            "PATH": path_with_venv_first(),
        }
        process = ctx.spawn(
            [
                str(server_root / "bin" / "tritonserver"),
                f"--model-repository={repository}",
                "--model-control-mode=explicit",
                *(f"--load-model={model}" for model in models),
                f"--backend-directory={server_root / 'backends'}",
                f"--cache-directory={server_root / 'caches'}",
                "--grpc-address=127.0.0.1",
                f"--grpc-port={grpc_port}",
                "--http-address=127.0.0.1",
                f"--http-port={http_port}",
                "--metrics-address=127.0.0.1",
                f"--metrics-port={metrics_port}",
                "--allow-gpu-metrics=false",
                "--allow-sagemaker=false",
                "--allow-vertex-ai=false",
                f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
                "--exit-timeout-secs=2",
                *_trace_options(ctx.settings),
            ],
            env=env,
        )
        if not self._load_models:
            # Triton loads none of them at its start, so they are built while it starts.
            fill_repository()
        ctx.wait_ready(
            process,
            lambda: _check_ready(loopback(grpc_port), models),
            what="gRPC ServerReady and ModelReady for " + (", ".join(models) or "no models"),
            timeout=ctx.settings.triton_start_timeout,
        )
        return Started(
            process=process,
            endpoints={
                f"{key}_grpc": Endpoint(address=loopback(grpc_port)),
                f"{key}_http": Endpoint(address=loopback(http_port), url=f"http://{loopback(http_port)}"),
            },
            internal={
                "metrics": f"http://{loopback(metrics_port)}/metrics",
                "model_repository": str(repository),
            },
            cleanup=[str(_SHM_ROOT / f"{shm_prefix}*")],
        )


def _trace_options(settings: DevStackSettings) -> list[str]:
    """Triton's own OpenTelemetry spans, exported over OTLP/HTTP, when a URL is configured.

    Triton joins the trace of a request whose gRPC metadata carries a W3C `traceparent`, so
    its spans (request, model, compute) land under the caller's trace.
    """
    url = settings.triton_otlp_traces_url
    if not url:
        return []
    return [
        "--trace-config=mode=opentelemetry",
        f"--trace-config=opentelemetry,url={url}",
        "--trace-config=opentelemetry,resource=service.name=triton",
        "--trace-config=level=TIMESTAMPS",
        f"--trace-config=rate={settings.triton_trace_rate}",
        "--trace-config=count=-1",
        # Spans reach the collector within a second instead of Triton's default five.
        "--trace-config=opentelemetry,bsp_schedule_delay=1000",
    ]


def _install_server(wheel_tree: Path, target: Path) -> Path:
    """Copy the wheel's server tree to a writable place with the stub where Triton looks.

    Copied once per pytriton version and reused: the tree is ~30 MB.
    """
    version = metadata.version("nvidia-pytriton")
    stamp = target / ".pytriton-version"
    if stamp.exists() and stamp.read_text() == version:
        return target
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(wheel_tree, target, ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__"))
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = wheel_tree / "python_backend_stubs" / python / "triton_python_backend_stub"
    if not stub.exists():
        raise DevStackError(
            "triton",
            f"nvidia-pytriton ships no Python backend stub for Python {python}",
            "run the stack from a Python version pytriton supports (3.8-3.13)",
        )
    shutil.copy2(stub, target / "backends" / "python" / "triton_python_backend_stub")
    stamp.write_text(version)
    return target


def _wheel_libs(server_tree: PackageFile) -> str:
    # auditwheel puts the server's shared libraries beside the package as <dist>.libs.
    package_dir = server_tree.locate("triton").parent
    return str(package_dir.parent / "nvidia_pytriton.libs")


def _join_paths(first: str, rest: str | None) -> str:
    return first if not rest else os.pathsep.join([first, rest])


def model_repository_path(ctx: LaunchContext, triton: str) -> Path:
    """Where the stack's Triton component `triton` keeps its models: the configured repository,
    or its own copy of the demos beside its server. Orchestrators fetch model artifacts into it."""
    configured = ctx.settings.triton_model_repository
    # Every component's home is the state dir's folder of its name.
    return configured.resolve() if configured is not None else ctx.home.parent / triton / "models"


def _model_repository(ctx: LaunchContext) -> tuple[Path, Callable[[], list[str]]]:
    """The repository to serve, and what fills it and names the models in it: a configured one,
    listed, or the demos, built."""
    configured = ctx.settings.triton_model_repository
    if configured is not None:
        if not configured.is_dir():
            raise DevStackError(
                "triton",
                f"the model repository {configured} is not a directory",
                "fix TENSORWAY_DEV_TRITON_MODEL_REPOSITORY",
            )
        return configured.resolve(), lambda: sorted(
            entry.parent.name for entry in configured.glob("*/config.pbtxt")
        )
    repository = ctx.home / "models"
    repository.mkdir(parents=True, exist_ok=True)
    return repository, lambda: _demo_model_builder()(repository)


def _demo_model_builder() -> Callable[[Path], list[str]]:
    try:
        module = importlib.import_module("tensorway.demo_models")
    except ImportError as error:
        raise DevStackError(
            "triton",
            f"the demo models cannot be built: {error}",
            f"{INSTALL_HINT}; or serve your own models with TENSORWAY_DEV_TRITON_MODEL_REPOSITORY",
        ) from error
    return cast(Callable[[Path], list[str]], module.build_repository)


def _check_ready(address: str, models: list[str]) -> None:
    # tritonclient imports gevent and friends: only pay for it when Triton starts.
    import tritonclient.grpc as triton_grpc

    client = triton_grpc.InferenceServerClient(address)
    try:
        if not client.is_server_ready(client_timeout=2):
            raise ConnectionError("ServerReady is false")
        not_ready = [model for model in models if not client.is_model_ready(model, client_timeout=2)]
        if not_ready:
            raise ConnectionError("not ready yet: " + ", ".join(not_ready))
    finally:
        client.close()
