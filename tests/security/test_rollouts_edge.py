"""Measured rollouts as the edge meets them: an admin's and a tenant's real tokens through Envoy,
over REST and gRPC, and a careless client's requests.

Each model here is deployed on a pool of its own that no orchestrator joins, so its rollout stays
at its first step (no version answers anything for the registry to judge) and every refusal can
be checked against a rollout and a traffic split that hold still.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tensorway.common.v1 import tensor_pb2
from tensorway.registry.v1 import registry_service_pb2 as pb
from tensorway.registry.v1 import registry_service_pb2_grpc as registry_grpc

if TYPE_CHECKING:
    from tests.edge_mesh import Edge

# Long enough that no step of a rollout here is judged while a test runs.
HOUR = duration_pb2.Duration(seconds=3600)
BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"


@dataclass(frozen=True)
class Model:
    """A model with versions 1 and 2 and one deployment, `main`, all of its traffic on version 1."""

    name: str
    pool: str

    @property
    def resource(self) -> str:
        return f"models/{self.name}"

    @property
    def deployment(self) -> str:
        return f"{self.resource}/deployments/main"


def _metadata(edge: Edge, tenant: str = "ops", *, admin: bool = True) -> tuple[tuple[str, str], ...]:
    return tuple(edge.headers(tenant, admin=admin).items())


@pytest.fixture
def registry(edge: Edge) -> Iterator[registry_grpc.RegistryServiceStub]:
    with edge.channel() as channel:
        yield registry_grpc.RegistryServiceStub(channel)


@pytest.fixture
def model(edge: Edge, registry: registry_grpc.RegistryServiceStub) -> Model:
    return create_model(edge, registry)


def create_model(edge: Edge, registry: registry_grpc.RegistryServiceStub) -> Model:
    """A new model on a new pool, as an admin makes them through Envoy."""
    made = Model(name=f"ro-{uuid.uuid4().hex[:8]}", pool=f"pools/ro-{uuid.uuid4().hex[:8]}")
    admin = _metadata(edge)
    registry.CreatePool(
        pb.CreatePoolRequest(pool=pb.Pool(name=made.pool, endpoints=[])), metadata=admin, timeout=10
    )
    registry.CreateModel(
        pb.CreateModelRequest(model=pb.Model(name=made.resource)), metadata=admin, timeout=10
    )
    for version in ("1", "2"):
        registry.CreateModelVersion(
            pb.CreateModelVersionRequest(
                parent=made.resource,
                model_version_id=version,
                model_version=pb.ModelVersion(
                    platform="python",
                    artifact_uri=f"s3://models/{made.name}/{version}/",
                    inputs=[tensor_pb2.TensorSpec(name="x", datatype="FP32", shape=[4])],
                    outputs=[tensor_pb2.TensorSpec(name="y", datatype="FP32", shape=[4])],
                ),
            ),
            metadata=admin,
            timeout=10,
        )
    registry.CreateDeployment(
        pb.CreateDeploymentRequest(
            parent=made.resource,
            deployment_id="main",
            deployment=pb.Deployment(pool=made.pool, traffic=[pb.TrafficSplit(version="1", weight=100)]),
        ),
        metadata=admin,
        timeout=10,
    )
    return made


def traffic(edge: Edge, model: Model) -> dict[str, int]:
    reply = edge.http.get(
        f"{edge.url}/v1/{model.deployment}", headers=edge.headers("ops", admin=True), timeout=10
    )
    assert reply.status_code == 200, reply.text
    return {split["version"]: split.get("weight", 0) for split in reply.json()["deployment"]["traffic"]}


def rollouts(edge: Edge, model: Model) -> list[dict[str, Any]]:
    reply = edge.http.get(
        f"{edge.url}/v1/{model.resource}/rollouts", headers=edge.headers("ops", admin=True), timeout=10
    )
    assert reply.status_code == 200, reply.text
    return list(reply.json().get("rollouts", []))


def start_over_rest(edge: Edge, model: Model, **rollout: Any) -> dict[str, Any]:
    body = {"to_version": "2", "steps": [10, 50, 100], "interval": "3600s", **rollout}
    reply = edge.http.post(
        f"{edge.url}/v1/{model.resource}/rollouts",
        json=body,
        headers=edge.headers("ops", admin=True),
        timeout=10,
    )
    assert reply.status_code == 200, reply.text
    return dict(reply.json()["rollout"])


def test_an_admin_starts_a_rollout_over_rest_and_reads_it_back_over_grpc(
    edge: Edge, model: Model, registry: registry_grpc.RegistryServiceStub
) -> None:
    started = start_over_rest(edge, model)
    assert started["name"].startswith(f"{model.resource}/rollouts/")
    assert started["state"] == "ROLLOUT_STATE_RUNNING"
    assert started["from_version"] == "1"
    assert traffic(edge, model) == {"1": 90, "2": 10}

    read = registry.GetRollout(
        pb.GetRolloutRequest(name=started["name"]), metadata=_metadata(edge), timeout=10
    )
    assert read.rollout.to_version == "2"
    assert list(read.rollout.steps) == [10, 50, 100]
    assert read.rollout.deployment == model.deployment
    # A tenant may read what it may not change.
    as_tenant = edge.http.get(f"{edge.url}/v1/{started['name']}", headers=edge.headers("mallory"), timeout=10)
    assert as_tenant.status_code == 200, as_tenant.text
    assert as_tenant.json()["rollout"]["name"] == started["name"]


def test_an_admin_starts_pauses_resumes_and_aborts_a_rollout_over_grpc(
    edge: Edge, model: Model, registry: registry_grpc.RegistryServiceStub
) -> None:
    admin = _metadata(edge)
    started = registry.StartRollout(
        pb.StartRolloutRequest(
            parent=model.resource, rollout=pb.Rollout(to_version="2", steps=[25, 100], interval=HOUR)
        ),
        metadata=admin,
        timeout=10,
    ).rollout
    assert started.state == pb.ROLLOUT_STATE_RUNNING
    assert traffic(edge, model) == {"1": 75, "2": 25}
    assert [r["name"] for r in rollouts(edge, model)] == [started.name]

    paused = registry.PauseRollout(pb.PauseRolloutRequest(name=started.name), metadata=admin, timeout=10)
    assert paused.rollout.state == pb.ROLLOUT_STATE_PAUSED
    resumed = registry.ResumeRollout(pb.ResumeRolloutRequest(name=started.name), metadata=admin, timeout=10)
    assert resumed.rollout.state == pb.ROLLOUT_STATE_RUNNING
    aborted = registry.AbortRollout(pb.AbortRolloutRequest(name=started.name), metadata=admin, timeout=10)
    assert aborted.rollout.state == pb.ROLLOUT_STATE_ABORTED
    assert traffic(edge, model) == {"1": 100, "2": 0}


def test_a_tenant_token_cannot_start_pause_resume_or_abort_a_rollout(
    edge: Edge, model: Model, registry: registry_grpc.RegistryServiceStub
) -> None:
    tenant_rest = edge.headers("mallory")
    tenant_grpc = _metadata(edge, "mallory", admin=False)

    def refused_over_rest(path: str, body: dict[str, Any]) -> None:
        reply = edge.http.post(f"{edge.url}{path}", json=body, headers=tenant_rest, timeout=10)
        assert reply.status_code == 403, (path, reply.status_code, reply.text)
        assert reply.json()["code"] == grpc.StatusCode.PERMISSION_DENIED.value[0]

    def refused_over_grpc(method: Any, request: Any) -> None:
        with pytest.raises(grpc.RpcError) as refused:
            method(request, metadata=tenant_grpc, timeout=10)
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED, refused.value

    # Start, with no rollout yet: nothing is created and the traffic stays on version 1.
    refused_over_rest(f"/v1/{model.resource}/rollouts", {"to_version": "2", "steps": [100]})
    refused_over_grpc(
        registry.StartRollout,
        pb.StartRolloutRequest(parent=model.resource, rollout=pb.Rollout(to_version="2", steps=[100])),
    )
    assert rollouts(edge, model) == []
    assert traffic(edge, model) == {"1": 100}

    # Pause and abort a running rollout.
    started = start_over_rest(edge, model)
    name = started["name"]
    running = rollouts(edge, model)
    for path in (f"/v1/{name}:pause", f"/v1/{name}:abort"):
        refused_over_rest(path, {})
    refused_over_grpc(registry.PauseRollout, pb.PauseRolloutRequest(name=name))
    refused_over_grpc(registry.AbortRollout, pb.AbortRolloutRequest(name=name))
    assert rollouts(edge, model) == running
    assert running[0]["state"] == "ROLLOUT_STATE_RUNNING"
    assert traffic(edge, model) == {"1": 90, "2": 10}

    # Resume a paused one.
    pause = edge.http.post(
        f"{edge.url}/v1/{name}:pause", json={}, headers=edge.headers("ops", admin=True), timeout=10
    )
    assert pause.status_code == 200, pause.text
    paused = rollouts(edge, model)
    assert paused[0]["state"] == "ROLLOUT_STATE_PAUSED"
    refused_over_rest(f"/v1/{name}:resume", {})
    refused_over_grpc(registry.ResumeRollout, pb.ResumeRolloutRequest(name=name))
    assert rollouts(edge, model) == paused
    assert traffic(edge, model) == {"1": 90, "2": 10}


def test_internal_registry_calls_are_refused_even_to_the_admin(edge: Edge, model: Model) -> None:
    admin = edge.headers("ops", admin=True)
    report: dict[str, Any] = {
        "router": "forged",
        "versions": [{"model": model.name, "version": "2", "requests": "1000", "server_errors": "1000"}],
    }
    members_before = edge.http.get(f"{edge.url}/v1/{model.pool}", headers=admin, timeout=10).json()
    for path, body in (
        ("/v1/traffic:report", report),
        (f"/v1/{model.pool}:join", {"endpoint": "127.0.0.1:9", "lease_duration": "60s"}),
        (f"/v1/{model.pool}:leave", {"endpoint": "127.0.0.1:9"}),
    ):
        reply = edge.http.post(f"{edge.url}{path}", json=body, headers=admin, timeout=10)
        assert reply.status_code == 403, (path, reply.status_code, reply.text)
        assert reply.json()["code"] == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert edge.http.get(f"{edge.url}/v1/{model.pool}", headers=admin, timeout=10).json() == members_before

    with edge.channel() as channel:
        stub = registry_grpc.RegistryServiceStub(channel)
        calls: list[tuple[Any, Any]] = [
            (stub.ReportTraffic, pb.ReportTrafficRequest(router="forged")),
            (stub.JoinPool, pb.JoinPoolRequest(pool=model.pool, endpoint="127.0.0.1:9")),
            (stub.LeavePool, pb.LeavePoolRequest(pool=model.pool, endpoint="127.0.0.1:9")),
        ]
        for method, request in calls:
            with pytest.raises(grpc.RpcError) as refused:
                method(request, metadata=_metadata(edge), timeout=10)
            assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED, refused.value


def _field_violations(body: dict[str, Any]) -> list[str]:
    return [
        violation["field"]
        for detail in body.get("details", [])
        if detail["@type"] == BAD_REQUEST
        for violation in detail["field_violations"]
    ]


@pytest.mark.parametrize(
    ("case", "body", "status", "field"),
    [
        ("steps not rising", {"to_version": "2", "steps": [50, 25, 100]}, 400, "rollout.steps"),
        ("steps not ending at 100", {"to_version": "2", "steps": [10, 50]}, 400, "rollout.steps"),
        ("a step over 100", {"to_version": "2", "steps": [50, 150]}, 400, "rollout.steps"),
        ("an interval of 0", {"to_version": "2", "interval": "0s"}, 400, "rollout.interval"),
        ("no version", {"steps": [100]}, 400, "rollout.to_version"),
        (
            "a ratio below 1",
            {"to_version": "2", "bounds": {"max_p99_ratio": 0.5}},
            400,
            "rollout.bounds.max_p99_ratio",
        ),
        ("a version that does not exist", {"to_version": "7"}, 404, None),
    ],
)
def test_a_careless_rollout_is_refused_with_details_and_creates_nothing(
    edge: Edge, model: Model, case: str, body: dict[str, Any], status: int, field: str | None
) -> None:
    reply = edge.http.post(
        f"{edge.url}/v1/{model.resource}/rollouts",
        json={"interval": "3600s", **body},
        headers=edge.headers("ops", admin=True),
        timeout=10,
    )
    assert reply.status_code == status, (case, reply.status_code, reply.text)
    answer = reply.json()
    if field is not None:
        assert answer["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert field in _field_violations(answer), (case, answer)
    else:
        assert answer["code"] == grpc.StatusCode.NOT_FOUND.value[0]
        assert answer["details"], answer
    assert rollouts(edge, model) == []
    assert traffic(edge, model) == {"1": 100}


def test_malformed_json_and_an_unknown_model_are_refused_and_create_nothing(
    edge: Edge, model: Model, registry: registry_grpc.RegistryServiceStub
) -> None:
    admin = edge.headers("ops", admin=True)
    malformed = edge.http.post(
        f"{edge.url}/v1/{model.resource}/rollouts",
        data='{"to_version": "2", "steps": [',
        headers={**admin, "content-type": "application/json"},
        timeout=10,
    )
    assert malformed.status_code == 400, malformed.text
    assert malformed.json()["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    mistyped = edge.http.post(
        f"{edge.url}/v1/{model.resource}/rollouts",
        json={"to_version": "2", "steps": "ten"},
        headers=admin,
        timeout=10,
    )
    assert mistyped.status_code == 400, mistyped.text
    assert rollouts(edge, model) == []
    assert traffic(edge, model) == {"1": 100}

    unknown = f"no-such-{uuid.uuid4().hex[:8]}"
    over_rest = edge.http.post(
        f"{edge.url}/v1/models/{unknown}/rollouts", json={"to_version": "2"}, headers=admin, timeout=10
    )
    assert over_rest.status_code == 404, over_rest.text
    assert over_rest.json()["details"], over_rest.text
    with pytest.raises(grpc.RpcError) as missing:
        registry.StartRollout(
            pb.StartRolloutRequest(
                parent=f"models/{unknown}", rollout=pb.Rollout(to_version="2", interval=HOUR)
            ),
            metadata=_metadata(edge),
            timeout=10,
        )
    assert missing.value.code() is grpc.StatusCode.NOT_FOUND
    status = rpc_status.from_call(missing.value)
    assert status is not None
    assert any(
        detail.Is(error_details_pb2.ResourceInfo.DESCRIPTOR)
        or detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)
        for detail in status.details
    )
    listed = edge.http.get(f"{edge.url}/v1/models/{unknown}/rollouts", headers=admin, timeout=10)
    assert listed.status_code == 404, listed.text
