"""Time from upload to first routed answer: a Triton model directory on disk, uploaded and
registered as `tensorway models register NAME --from DIR` does it, deployed, and asked through the
router until it answers, beside the same directory copied straight into a Triton's repository,
loaded with RepositoryModelLoad and asked directly, in one run.

    .venv/bin/python bench/lifecycle_bench.py [--quick] [--json PATH] [--model simple]
        [--repetitions 5]

It starts the local stack through tensorway.devstack (registry, orchestrator, Triton, router, S3)
and registers the demo models, so the orchestrator has joined its pool and Triton is warm. Each
repetition takes a copy of the demo model's directory under a new name, so nothing is cached:

- mesh: upload to S3 and register the version (its signature read from config.pbtxt), deploy it
  with all of its traffic on the stack's pool, then send the model's request to the router until
  one is answered. The orchestrator fetches the artifact, loads it into its Triton, warms it and
  reports it ready; the registry pushes the route; only then can the router answer. The clock
  runs from the upload's start to that first answer.
- baseline: copy the directory into the Triton's repository, RepositoryModelLoad, one ModelInfer
  straight to Triton: the least any serving stack can do with the same files.

A request the router refuses while the version is not ready is retried after POLL_SECONDS, which
bounds the resolution of the mesh's figure.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
import numpy as np
from benchkit import Cell, Results, mode, percentile_ms
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.grpc import service_pb2 as triton
from tritonclient.grpc import service_pb2_grpc as triton_service

from tensorway.devstack import DevStackSettings, Stack, register_demo_models
from tensorway.devstack._services import LOCAL_POOL
from tensorway.registry.access import admin_metadata
from tensorway.registry.model_directory import CONFIG_FILE, ModelDirectory, s3_client, version_from_config
from tensorway.registry.v1 import registry_service_pb2 as pb
from tensorway.registry.v1 import registry_service_pb2_grpc as pb_grpc

ADMIN = tuple(admin_metadata("bench"))
BASELINE = "Triton: copy, RepositoryModelLoad, first answer"
MESH = "mesh: upload, register, deploy, first routed answer"
POLL_SECONDS = 0.01
# A guard against a version that never gets ready, not a measurement.
PATIENCE_SECONDS = 180.0
REPETITIONS = {"full": 5, "quick": 2}
DTYPES = {
    "TYPE_BOOL": np.bool_,
    "TYPE_INT8": np.int8,
    "TYPE_INT16": np.int16,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_UINT8": np.uint8,
    "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32,
    "TYPE_FP64": np.float64,
}


def renamed_copy(source: Path, name: str, workdir: Path) -> Path:
    """The model directory `source` copied to `workdir/name`, its config naming it `name`."""
    target = workdir / name
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".*", "__pycache__"))
    config = text_format.Parse((target / CONFIG_FILE).read_text(), model_config_pb2.ModelConfig())
    config.name = name
    (target / CONFIG_FILE).write_text(text_format.MessageToString(config))
    return target


def zeros_request(config_text: str, name: str) -> triton.ModelInferRequest:
    """A request of zeros in every input's declared shape, one row where the model batches."""
    config = text_format.Parse(config_text, model_config_pb2.ModelConfig())
    request = triton.ModelInferRequest(model_name=name)
    for tensor in config.input:
        kind = model_config_pb2.DataType.Name(tensor.data_type)
        if kind not in DTYPES:
            raise SystemExit(f"input {tensor.name} is {kind}: this benchmark sends numeric inputs only")
        shape = ([1] if config.max_batch_size > 0 else []) + [max(int(d), 1) for d in tensor.dims]
        request.inputs.add(name=tensor.name, datatype=kind.removeprefix("TYPE_"), shape=shape)
        request.raw_input_contents.append(np.zeros(shape, dtype=DTYPES[kind]).tobytes())
    return request


def first_answer(stub: triton_service.GRPCInferenceServiceStub, request: triton.ModelInferRequest) -> int:
    """Send `request` until it is answered; returns how many were refused first."""
    refused = 0
    deadline = time.monotonic() + PATIENCE_SECONDS
    while True:
        try:
            stub.ModelInfer(request, timeout=30)
            return refused
        except grpc.RpcError as error:
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"{request.model_name}: no answer within {PATIENCE_SECONDS:.0f} s: {error}"
                ) from error
            refused += 1
            time.sleep(POLL_SECONDS)


def through_mesh(
    directory: Path,
    name: str,
    registry: pb_grpc.RegistryServiceStub,
    router: triton_service.GRPCInferenceServiceStub,
    s3: object,
) -> dict[str, float]:
    """Upload, register and deploy `directory` as model `name`; each phase's seconds, cumulative."""
    started = time.perf_counter()
    model = ModelDirectory.read(directory)
    version = version_from_config(model.config_text)
    version.artifact_uri = model.upload(s3, name)
    uploaded = time.perf_counter()
    parent = f"models/{name}"
    registry.CreateModel(pb.CreateModelRequest(model=pb.Model(name=parent)), metadata=ADMIN, timeout=30)
    registry.CreateModelVersion(
        pb.CreateModelVersionRequest(parent=parent, model_version_id="1", model_version=version),
        metadata=ADMIN,
        timeout=30,
    )
    registered = time.perf_counter()
    registry.CreateDeployment(
        pb.CreateDeploymentRequest(
            parent=parent,
            deployment_id="bench",
            deployment=pb.Deployment(
                pool=f"pools/{LOCAL_POOL}", traffic=[pb.TrafficSplit(version="1", weight=100)]
            ),
        ),
        metadata=ADMIN,
        timeout=30,
    )
    deployed = time.perf_counter()
    refused = first_answer(router, zeros_request(model.config_text, name))
    answered = time.perf_counter()
    return {
        "upload": uploaded - started,
        "register": registered - started,
        "deploy": deployed - started,
        "answer": answered - started,
        "refused": float(refused),
    }


def undeploy(registry: pb_grpc.RegistryServiceStub, name: str) -> None:
    """The deployment goes, so the orchestrator unloads the model and the next repetition's Triton
    holds what it held before."""
    registry.DeleteDeployment(
        pb.DeleteDeploymentRequest(name=f"models/{name}/deployments/bench"), metadata=ADMIN, timeout=30
    )


def straight_to_triton(
    directory: Path, name: str, repository: Path, triton_stub: triton_service.GRPCInferenceServiceStub
) -> float:
    """Copy `directory` into the Triton's repository as `name`, load it and ask it once: seconds."""
    started = time.perf_counter()
    shutil.copytree(directory, repository / name)
    triton_stub.RepositoryModelLoad(
        triton.RepositoryModelLoadRequest(model_name=name), timeout=PATIENCE_SECONDS
    )
    model = ModelDirectory.read(repository / name)
    triton_stub.ModelInfer(zeros_request(model.config_text, name), timeout=30)
    return time.perf_counter() - started


def cell(group: str, path: str, seconds: Sequence[float], extra: dict[str, float | None]) -> Cell:
    made = Cell.from_latencies(group, path, 1, sum(seconds), seconds)
    made.throughput = 60 * len(seconds) / sum(seconds)  # models made servable per minute
    made.extra = {"max ms": max(seconds) * 1000, **extra}
    return made


def median_ms(values: Sequence[float]) -> float | None:
    return statistics.median(values) * 1000 if values else None


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="CI-size run: fewer repetitions, to prove it runs"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results to PATH")
    parser.add_argument("--model", default="simple", help="the demo model whose directory is copied")
    parser.add_argument("--repetitions", type=int, help="new models per path (default: full 5, quick 2)")
    args = parser.parse_args()
    repetitions = args.repetitions or REPETITIONS[mode(args)]
    results = Results(
        benchmark="lifecycle",
        title="Lifecycle: time from a model directory on disk to its first routed answer",
        mode=mode(args),
        baseline=BASELINE,
        throughput_unit="models/min",
        settings={
            "model directory": f"demo model {args.model}, copied under a new name each time",
            "repetitions": repetitions,
            "poll interval while not ready": f"{POLL_SECONDS * 1000:g} ms",
        },
    )
    workdir = Path(tempfile.mkdtemp(prefix="tensorway-lifecycle-bench-"))
    workdir.chmod(0o755)  # PostgreSQL runs as an unprivileged user when this runs as root
    settings = DevStackSettings(state_dir=workdir / "stack").without_pinned_ports()
    stack = Stack(settings, state_dir=workdir / "stack", die_with_parent=True)
    try:
        state = stack.up(["router", "s3"])
        register_demo_models(state)
        addresses = state.addresses()
        endpoints = stack.ensure(["s3", "triton"]).endpoints()
        repository = Path(stack.status().components["triton"].internal["model_repository"])
        source = repository / args.model
        s3 = s3_client(endpoints["s3"].url or "", settings.s3_access_key, settings.s3_secret_key)
        copies = workdir / "copies"
        copies.mkdir()
        run = uuid.uuid4().hex[:6]
        with (
            grpc.insecure_channel(addresses["registry"]) as registry_channel,
            grpc.insecure_channel(addresses["router"]) as router_channel,
            grpc.insecure_channel(endpoints["triton_grpc"].address) as triton_channel,
        ):
            registry = pb_grpc.RegistryServiceStub(registry_channel)
            router = triton_service.GRPCInferenceServiceStub(router_channel)
            triton_stub = triton_service.GRPCInferenceServiceStub(triton_channel)
            results.versions["Triton"] = triton_stub.ServerMetadata(
                triton.ServerMetadataRequest(), timeout=10
            ).version
            baseline: list[float] = []
            mesh: list[dict[str, float]] = []
            # Alternated, so a machine that grows busier mid-run weighs on both paths alike.
            for index in range(repetitions):
                direct = f"lc-direct-{run}-{index}"
                baseline.append(
                    straight_to_triton(renamed_copy(source, direct, copies), direct, repository, triton_stub)
                )
                triton_stub.RepositoryModelUnload(
                    triton.RepositoryModelUnloadRequest(model_name=direct), timeout=60
                )
                shutil.rmtree(repository / direct, ignore_errors=True)
                name = f"lc-mesh-{run}-{index}"
                mesh.append(through_mesh(renamed_copy(source, name, copies), name, registry, router, s3))
                undeploy(registry, name)
                print(
                    f"{index + 1}/{repetitions}: Triton {baseline[-1] * 1000:.0f} ms,"
                    f" mesh {mesh[-1]['answer'] * 1000:.0f} ms"
                    f" (uploaded {mesh[-1]['upload'] * 1000:.0f},"
                    f" registered {mesh[-1]['register'] * 1000:.0f},"
                    f" deployed {mesh[-1]['deploy'] * 1000:.0f}; {mesh[-1]['refused']:.0f} requests refused"
                    " before the first answer)",
                    flush=True,
                )
    finally:
        stack.down()
        shutil.rmtree(workdir, ignore_errors=True)

    group = args.model
    results.cells.append(cell(group, BASELINE, baseline, {}))

    def phase(key: str) -> Callable[[dict[str, float]], float]:
        return lambda figures: figures[key]

    answers = [figures["answer"] for figures in mesh]
    results.cells.append(
        cell(
            group,
            MESH,
            answers,
            {
                "upload p50 ms": median_ms([*map(phase("upload"), mesh)]),
                "deploy→answer p50 ms": median_ms([f["answer"] - f["deploy"] for f in mesh]),
            },
        )
    )
    mesh_p50 = percentile_ms(answers, 50) or 0.0
    base_p50 = percentile_ms(baseline, 50) or 0.0
    results.notes.append(
        f"p50 {mesh_p50:.0f} ms through the mesh against {base_p50:.0f} ms straight into Triton"
        f" ({mesh_p50 / base_p50:.1f}x); max {max(answers) * 1000:.0f} ms"
        f" against {max(baseline) * 1000:.0f} ms."
        " The mesh's time includes the S3 upload, the registry writes, the orchestrator's fetch,"
        " load and warm-up, its readiness report and the route reaching the router."
    )
    results.write(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
