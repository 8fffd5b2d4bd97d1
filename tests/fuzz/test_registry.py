"""The registry's RegistryService fed malformed and extreme messages: every RPC answers or refuses
with a client error, and a refused write leaves what it aimed at exactly as it was. Writes are
fuzzed as an admin, so they reach the checks behind the scope check; a tenant's writes, whatever
they hold, are PERMISSION_DENIED and change nothing."""

from __future__ import annotations

import base64
import ipaddress
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.protobuf.message import Message
from hypothesis import given
from hypothesis import strategies as st

from tensorway.common.v1 import tensor_pb2
from tensorway.registry.access import admin_channel
from tensorway.registry.v1 import registry_service_pb2 as pb
from tensorway.registry.v1 import registry_service_pb2_grpc as pb_grpc
from tensorway.runtime.context import TENANT_SCOPES, identity_metadata
from tests.fuzz.budget import fuzz_budget
from tests.fuzz.calls import REGISTRY_ADMIN, call, call_raw
from tests.fuzz.conftest import FuzzMesh
from tests.fuzz.outcomes import assert_client_error, assert_mesh_serves
from tests.fuzz.strategies import DATATYPES, HUGE_DIMS, edgy_text, messages, request_metadata, wire_garbage

REGISTRY = pb.DESCRIPTOR.services_by_name["RegistryService"]
READS = frozenset(
    {
        "GetModel", "ListModels", "GetModelVersion", "ListModelVersions", "GetPool", "ListPools",
        "GetDeployment", "ListDeployments", "ResolveModel", "WatchRoutes", "GetRollout", "ListRollouts",
    }
)  # fmt: skip
TENANT = tuple(identity_metadata("fuzz-tenant", TENANT_SCOPES))


def callers() -> st.SearchStrategy[tuple[tuple[str, str], ...]]:
    """An admin, a tenant, or no identity at all."""
    return st.sampled_from([REGISTRY_ADMIN, TENANT, ()])


@pytest.mark.parametrize("method", list(REGISTRY.methods), ids=lambda m: m.name)
@fuzz_budget(max_examples=20)
@given(data=st.data())
def test_any_message_to_any_registry_rpc_gets_an_answer_or_a_client_error(
    fuzz_mesh: FuzzMesh, method: object, data: st.DataObject
) -> None:
    call(fuzz_mesh, "registry", method, [data.draw(messages(method.input_type))], data.draw(callers()))


@pytest.mark.parametrize("method", list(REGISTRY.methods), ids=lambda m: m.name)
@fuzz_budget(max_examples=10)
@given(data=st.data())
def test_bytes_that_are_no_request_get_a_client_error(
    fuzz_mesh: FuzzMesh, method: object, data: st.DataObject
) -> None:
    call_raw(
        fuzz_mesh, "registry", method, [data.draw(wire_garbage(method.input_type))], data.draw(callers())
    )


@dataclass(frozen=True)
class Target:
    """A model with a version, a pool and a deployment, for fuzzed writes to aim at."""

    model: str
    version: str
    pool: str
    deployment: str
    stub: pb_grpc.RegistryServiceStub


@pytest.fixture(scope="module")
def target(fuzz_mesh: FuzzMesh) -> Iterator[Target]:
    model, pool = f"models/fuzz-{uuid.uuid4().hex[:8]}", f"pools/fuzz-{uuid.uuid4().hex[:8]}"
    with fuzz_mesh.channel("registry") as channel:
        stub = pb_grpc.RegistryServiceStub(admin_channel(channel, "fuzz-admin"))
        stub.CreateModel(pb.CreateModelRequest(model=pb.Model(name=model)))
        version = stub.CreateModelVersion(
            pb.CreateModelVersionRequest(
                parent=model,
                model_version=pb.ModelVersion(
                    platform="onnxruntime_onnx",
                    inputs=[tensor_pb2.TensorSpec(name="input", datatype="FP32", shape=[4])],
                    outputs=[tensor_pb2.TensorSpec(name="label", datatype="INT64", shape=[1])],
                    max_batch_size=8,
                    artifact_uri="s3://models/fuzz/1",
                ),
            )
        ).model_version
        # An address nothing listens on: the route exists, no request of another test goes there.
        stub.CreatePool(pb.CreatePoolRequest(pool=pb.Pool(name=pool, endpoints=["127.0.0.1:9"])))
        deployment = stub.CreateDeployment(
            pb.CreateDeploymentRequest(
                parent=model,
                deployment_id="main",
                deployment=pb.Deployment(
                    pool=pool, traffic=[pb.TrafficSplit(version=version.name.rsplit("/", 1)[1], weight=100)]
                ),
            )
        ).deployment
        yield Target(model, version.name, pool, deployment.name, stub)


def names(target: Target) -> st.SearchStrategy[str]:
    """The target's real names, names next to them, and anything at all."""
    return st.one_of(
        st.sampled_from([target.model, target.version, target.pool, target.deployment]),
        st.sampled_from(
            [f"{target.model}/versions/999", f"{target.model}/deployments/none", f"{target.model}/"]
        ),
        edgy_text(),
    )


def specs() -> st.SearchStrategy[list[tensor_pb2.TensorSpec]]:
    return st.lists(
        st.builds(
            tensor_pb2.TensorSpec,
            name=st.one_of(st.sampled_from(["input", "label"]), edgy_text()),
            datatype=st.one_of(st.sampled_from(DATATYPES), edgy_text()),
            shape=st.lists(st.one_of(st.integers(-3, 100), st.sampled_from(HUGE_DIMS)), max_size=6),
        ),
        max_size=4,
    )


def masks() -> st.SearchStrategy[field_mask_pb2.FieldMask]:
    paths = [
        "description",
        "labels",
        "endpoints",
        "traffic",
        "aliases",
        "shadow",
        "pool",
        "stage",
        "metrics",
        "artifact_uri",
        "inputs",
        "name",
        "etag",
        "*",
        "",
        "labels.x",
        "nope",
    ]
    return st.builds(
        field_mask_pb2.FieldMask, paths=st.lists(st.one_of(st.sampled_from(paths), edgy_text()), max_size=4)
    )


def traffic() -> st.SearchStrategy[list[pb.TrafficSplit]]:
    weights = st.one_of(st.integers(-1, 101), st.sampled_from([-(2**31), 2**31 - 1]))
    versions = st.one_of(st.sampled_from(["1", "2", "999", "", "production"]), edgy_text())
    return st.lists(st.builds(pb.TrafficSplit, version=versions, weight=weights), max_size=4)


def endpoints() -> st.SearchStrategy[str]:
    """host:port where the host is an address or name in any spelling a resolver reads."""
    ipv4 = st.integers(0, 2**32 - 1)
    hosts = st.one_of(
        ipv4.map(lambda n: ".".join(str(n >> shift & 255) for shift in (24, 16, 8, 0))),
        ipv4.map(str),
        ipv4.map(hex),
        st.integers(0, 2**128 - 1).map(lambda n: f"[{ipaddress.IPv6Address(n)}]"),
        ipv4.map(lambda n: f"[::ffff:{ipaddress.IPv4Address(n)}]"),
        st.sampled_from(
            [
                "169.254.169.254", "[fd00:ec2::254]", "metadata.google.internal", "METADATA", "[fe80::1]",
                "0xa9fea9fe", "2852039166", "169.254.43518", "0251.0376.0251.0376", "localhost",
                "a.svc.cluster.local", "svc.cluster.local.", "[64:ff9b::a9fe:a9fe]", "[2002:a9fe:a9fe::1]",
            ]
        ),
    )  # fmt: skip
    return st.builds("{}:{}".format, hosts, st.integers(0, 70_000))


def page_tokens() -> st.SearchStrategy[str]:
    """Base64 JSON in the shape of a page token, holding anything."""
    after = st.one_of(
        st.integers(-(2**70), 2**70),
        st.text(max_size=300),
        st.booleans(),
        st.none(),
        st.floats(),
        st.lists(st.integers()),
    )
    query = st.one_of(st.text(alphabet="0123456789abcdef", min_size=32, max_size=32), st.text(max_size=40))
    payload = st.one_of(
        st.fixed_dictionaries({"after": after, "query": query}),
        st.dictionaries(st.text(max_size=8), after, max_size=3),
        after,
    )
    return payload.map(lambda value: base64.urlsafe_b64encode(json.dumps(value).encode()).decode())


def snapshot(target: Target) -> list[bytes]:
    """What the target's resources are now, byte for byte."""
    stub = target.stub
    return [
        stub.GetModel(pb.GetModelRequest(name=target.model)).SerializeToString(),
        stub.ListModelVersions(
            pb.ListModelVersionsRequest(parent=target.model, page_size=1000)
        ).SerializeToString(),
        stub.GetPool(pb.GetPoolRequest(name=target.pool)).SerializeToString(),
        stub.ListDeployments(
            pb.ListDeploymentsRequest(parent=target.model, page_size=1000)
        ).SerializeToString(),
    ]


def write_or_refuse(
    fuzz_mesh: FuzzMesh, target: Target, rpc: Callable[[Message], Message], request: Message
) -> None:
    """Call a write: it succeeds, or it is refused with a client error and changes nothing."""
    before = snapshot(target)
    try:
        rpc(request, timeout=30)
    except grpc.RpcError as error:
        assert_client_error(error)
        assert snapshot(target) == before, "a refused write changed the registry"
    assert not fuzz_mesh.dead_processes()


@fuzz_budget(max_examples=60)
@given(data=st.data())
def test_versions_with_odd_signatures_are_created_whole_or_not_at_all(
    fuzz_mesh: FuzzMesh, target: Target, data: st.DataObject
) -> None:
    version = data.draw(messages(pb.ModelVersion.DESCRIPTOR, depth=2))
    if data.draw(st.booleans()):
        del version.inputs[:]
        version.inputs.extend(data.draw(specs()))
    request = pb.CreateModelVersionRequest(
        parent=data.draw(names(target)),
        model_version_id=data.draw(st.one_of(st.just(""), st.integers(-5, 2**63 - 1).map(str), edgy_text())),
        model_version=version,
    )
    write_or_refuse(fuzz_mesh, target, target.stub.CreateModelVersion, request)


@fuzz_budget(max_examples=60)
@given(data=st.data())
def test_odd_deployments_are_written_whole_or_not_at_all(
    fuzz_mesh: FuzzMesh, target: Target, data: st.DataObject
) -> None:
    deployment = pb.Deployment(
        name=data.draw(names(target)),
        pool=data.draw(names(target)),
        traffic=data.draw(traffic()),
        aliases=data.draw(st.dictionaries(edgy_text(), st.one_of(st.just("1"), edgy_text()), max_size=3)),
        shadow=pb.ShadowTraffic(
            version=data.draw(st.sampled_from(["", "1", "999"])),
            percent=data.draw(st.one_of(st.integers(-1, 101), st.just(2**31 - 1))),
        ),
        etag=data.draw(st.one_of(st.just(""), edgy_text())),
    )
    if data.draw(st.booleans()):
        request: Message = pb.UpdateDeploymentRequest(deployment=deployment, update_mask=data.draw(masks()))
        write_or_refuse(fuzz_mesh, target, target.stub.UpdateDeployment, request)
    else:
        request = pb.CreateDeploymentRequest(
            parent=data.draw(names(target)),
            deployment_id=data.draw(st.one_of(st.just("canary"), edgy_text())),
            deployment=deployment,
        )
        write_or_refuse(fuzz_mesh, target, target.stub.CreateDeployment, request)


@fuzz_budget(max_examples=60)
@given(data=st.data())
def test_odd_updates_and_transitions_are_applied_whole_or_not_at_all(
    fuzz_mesh: FuzzMesh, target: Target, data: st.DataObject
) -> None:
    kind = data.draw(st.sampled_from(["model", "version", "pool", "stage"]))
    stub = target.stub
    if kind == "model":
        model = data.draw(messages(pb.Model.DESCRIPTOR, depth=1))
        model.name = data.draw(names(target))
        write_or_refuse(
            fuzz_mesh,
            target,
            stub.UpdateModel,
            pb.UpdateModelRequest(model=model, update_mask=data.draw(masks())),
        )
    elif kind == "version":
        version = data.draw(messages(pb.ModelVersion.DESCRIPTOR, depth=2))
        version.name = data.draw(names(target))
        request: Message = pb.UpdateModelVersionRequest(model_version=version, update_mask=data.draw(masks()))
        write_or_refuse(fuzz_mesh, target, stub.UpdateModelVersion, request)
    elif kind == "pool":
        pool = pb.Pool(
            name=data.draw(names(target)),
            endpoints=data.draw(
                st.lists(st.one_of(st.just("127.0.0.1:9"), endpoints(), edgy_text()), max_size=4)
            ),
        )
        write_or_refuse(
            fuzz_mesh,
            target,
            stub.UpdatePool,
            pb.UpdatePoolRequest(pool=pool, update_mask=data.draw(masks())),
        )
    else:
        request = pb.TransitionModelVersionStageRequest(
            name=data.draw(names(target)),
            stage=data.draw(st.one_of(st.integers(0, 5), st.sampled_from([-1, 2**31 - 1]))),
            etag=data.draw(st.one_of(st.just(""), edgy_text())),
        )
        write_or_refuse(fuzz_mesh, target, stub.TransitionModelVersionStage, request)


@fuzz_budget(max_examples=60)
@given(data=st.data())
def test_odd_lists_and_lookups_answer_or_refuse(
    fuzz_mesh: FuzzMesh, target: Target, data: st.DataObject
) -> None:
    method = data.draw(
        st.sampled_from(["ListModels", "ListModelVersions", "ListDeployments", "ListPools", "ResolveModel"])
    )
    request = messages(REGISTRY.methods_by_name[method].input_type, depth=1)
    message = data.draw(request)
    for field, value in (
        ("parent", names(target)),
        ("name", names(target)),
        (
            "filter",
            st.one_of(
                st.sampled_from(
                    [
                        'stage = "STAGE_PRODUCTION"',
                        "name = models/*",
                        "labels.x:*",
                        "(((",
                        "a = 1 OR",
                        'stage = ""',
                    ]
                ),
                edgy_text(),
            ),
        ),
        ("page_token", st.one_of(st.just("AAAA"), page_tokens(), edgy_text())),
        ("page_size", st.sampled_from([-1, 0, 1, 2**31 - 1])),
    ):
        if field in message.DESCRIPTOR.fields_by_name and data.draw(st.booleans()):
            setattr(message, field, data.draw(value))
    call(fuzz_mesh, "registry", REGISTRY.methods_by_name[method], [message])


@pytest.mark.parametrize("method", sorted(set(REGISTRY.methods_by_name) - READS))
@fuzz_budget(max_examples=10)
@given(data=st.data())
def test_a_tenants_writes_are_refused_whatever_they_hold(
    fuzz_mesh: FuzzMesh, target: Target, method: str, data: st.DataObject
) -> None:
    request = data.draw(messages(REGISTRY.methods_by_name[method].input_type, depth=2))
    for field in ("name", "parent"):
        if field in request.DESCRIPTOR.fields_by_name and data.draw(st.booleans()):
            setattr(request, field, data.draw(names(target)))
    before = snapshot(target)
    path = f"/{REGISTRY.full_name}/{method}"
    with fuzz_mesh.channel("registry") as channel, pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary(path)(request.SerializeToString(), timeout=30, metadata=TENANT)
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    assert_client_error(caught.value)
    assert snapshot(target) == before


@fuzz_budget(max_examples=20)
@given(metadata=request_metadata(), request=messages(pb.ListModelsRequest.DESCRIPTOR))
def test_odd_request_headers_are_tolerated(
    fuzz_mesh: FuzzMesh, metadata: list[tuple[str, str]], request: pb.ListModelsRequest
) -> None:
    call(fuzz_mesh, "registry", REGISTRY.methods_by_name["ListModels"], [request], metadata)


def test_the_registry_still_serves_after_the_fuzzing(fuzz_mesh: FuzzMesh) -> None:
    assert_mesh_serves(fuzz_mesh)
