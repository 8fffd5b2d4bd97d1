"""Every RegistryService RPC and every error it gives, against real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio

import grpc
import psycopg
from prometheus_client import REGISTRY
from psycopg.rows import dict_row

from tensorway.common.v1 import tensor_pb2
from tensorway.registry import migrations
from tensorway.registry.v1 import registry_service_pb2 as pb
from tensorway.runtime.postgres import migrate
from tests.waiting import PATIENCE

from .conftest import Stub, deploy, failure, mask, unique, version_body

NOT_FOUND = grpc.StatusCode.NOT_FOUND
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


async def create_model(stub: Stub, **fields: object) -> pb.Model:
    name = f"models/{unique('model')}"
    return (await stub.CreateModel(pb.CreateModelRequest(model=pb.Model(name=name, **fields)))).model


async def transition(
    stub: Stub, name: str, stage: pb.Stage.ValueType
) -> pb.TransitionModelVersionStageResponse:
    return await stub.TransitionModelVersionStage(
        pb.TransitionModelVersionStageRequest(name=name, stage=stage)
    )


# Models


async def test_model_create_get_update_delete(stub: Stub) -> None:
    created = await create_model(stub, description="digits", labels={"team": "vision"})
    assert created.etag == "1"
    assert created.HasField("create_time")

    got = (await stub.GetModel(pb.GetModelRequest(name=created.name))).model
    assert got == created

    updated = (
        await stub.UpdateModel(
            pb.UpdateModelRequest(
                model=pb.Model(name=created.name, description="handwritten digits", etag=created.etag),
                update_mask=mask("description"),
            )
        )
    ).model
    assert updated.description == "handwritten digits"
    assert updated.labels == {"team": "vision"}, "fields outside the mask stay"
    assert updated.etag != created.etag
    # The cache was invalidated by the write: a read sees the new value at once.
    assert (await stub.GetModel(pb.GetModelRequest(name=created.name))).model == updated

    await stub.DeleteModel(pb.DeleteModelRequest(name=created.name, etag=updated.etag))
    missing = await failure(stub.GetModel(pb.GetModelRequest(name=created.name)))
    assert missing.code == NOT_FOUND
    assert missing.reason == "NOT_FOUND"
    assert missing.resource == ("tensorway.registry.v1.Model", created.name)


async def test_duplicate_model_is_already_exists(stub: Stub) -> None:
    created = await create_model(stub)
    error = await failure(stub.CreateModel(pb.CreateModelRequest(model=pb.Model(name=created.name))))
    assert error.code == grpc.StatusCode.ALREADY_EXISTS
    assert error.reason == "ALREADY_EXISTS"
    assert error.resource == ("tensorway.registry.v1.Model", created.name)


async def test_model_ids_take_the_names_triton_serves_models_by(stub: Stub) -> None:
    # Underscores and capitals, as in Triton's model names; the same rule holds in resource names.
    name = f"models/Resnet50_onnx_{unique().replace('-', '_')}"
    created = (await stub.CreateModel(pb.CreateModelRequest(model=pb.Model(name=name)))).model
    assert created.name == name
    assert (await stub.GetModel(pb.GetModelRequest(name=name))).model == created


async def test_bad_names_and_labels_are_field_violations(stub: Stub) -> None:
    for bad in ("models/_leading", "models/has space", "models/dot.ted", f"models/{'x' * 64}"):
        error = await failure(stub.CreateModel(pb.CreateModelRequest(model=pb.Model(name=bad))))
        assert error.code == INVALID, bad
        assert error.reason == "INVALID_ARGUMENT"
        assert [field for field, _ in error.violations] == ["model.name"]
    # Pools and other ids stay DNS labels.
    error = await failure(stub.CreatePool(pb.CreatePoolRequest(pool=pb.Pool(name="pools/Not_A_Label"))))
    assert error.code == INVALID
    assert [field for field, _ in error.violations] == ["pool.name"]

    error = await failure(
        stub.CreateModel(
            pb.CreateModelRequest(
                model=pb.Model(name=f"models/{unique()}", labels={"ok": "bad value", "-x": "1"})
            )
        )
    )
    assert [field for field, _ in error.violations] == ["model.labels['-x']", "model.labels['ok']"]

    error = await failure(stub.GetModel(pb.GetModelRequest(name="digits")))
    assert error.code == INVALID
    assert [field for field, _ in error.violations] == ["name"]


async def test_stale_etag_is_aborted(stub: Stub) -> None:
    created = await create_model(stub)
    await stub.UpdateModel(
        pb.UpdateModelRequest(
            model=pb.Model(name=created.name, description="first"), update_mask=mask("description")
        )
    )
    stale = await failure(
        stub.UpdateModel(
            pb.UpdateModelRequest(
                model=pb.Model(name=created.name, description="lost update", etag=created.etag),
                update_mask=mask("description"),
            )
        )
    )
    assert stale.code == grpc.StatusCode.ABORTED
    assert stale.reason == "ETAG_MISMATCH"
    stale = await failure(stub.DeleteModel(pb.DeleteModelRequest(name=created.name, etag=created.etag)))
    assert stale.code == grpc.StatusCode.ABORTED
    assert (await stub.GetModel(pb.GetModelRequest(name=created.name))).model.description == "first"


async def test_concurrent_updates_with_one_etag_let_exactly_one_win(stub: Stub) -> None:
    created = await create_model(stub)

    async def update(text: str) -> grpc.StatusCode:
        try:
            await stub.UpdateModel(
                pb.UpdateModelRequest(
                    model=pb.Model(name=created.name, description=text, etag=created.etag),
                    update_mask=mask("description"),
                )
            )
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    results = await asyncio.gather(*(update(f"writer {i}") for i in range(8)))
    assert sorted(code.name for code in results) == ["ABORTED"] * 7 + ["OK"]


async def test_update_mask_is_required_and_checked(stub: Stub) -> None:
    created = await create_model(stub)
    error = await failure(stub.UpdateModel(pb.UpdateModelRequest(model=pb.Model(name=created.name))))
    assert error.code == INVALID
    assert error.violations[0][0] == "update_mask"
    error = await failure(
        stub.UpdateModel(pb.UpdateModelRequest(model=pb.Model(name=created.name), update_mask=mask("etag")))
    )
    assert error.code == INVALID
    assert error.violations[0][0] == "update_mask.paths[0]"
    every = await stub.UpdateModel(
        pb.UpdateModelRequest(model=pb.Model(name=created.name, labels={"a": "b"}), update_mask=mask("*"))
    )
    assert every.model.labels == {"a": "b"}


async def test_list_models_filters_on_labels_and_pages(stub: Stub) -> None:
    team = unique("team")
    names = sorted([(await create_model(stub, labels={"team": team, "tier": "gold"})).name for _ in range(3)])
    await create_model(stub, labels={"team": team, "tier": "silver"})

    first = await stub.ListModels(pb.ListModelsRequest(filter=f"team={team} AND tier=gold", page_size=2))
    assert [m.name for m in first.models] == names[:2]
    assert first.next_page_token
    second = await stub.ListModels(
        pb.ListModelsRequest(
            filter=f"team={team} AND tier=gold", page_size=2, page_token=first.next_page_token
        )
    )
    assert [m.name for m in second.models] == names[2:]
    assert not second.next_page_token

    for bad in ("team", "team=a OR team=b", "team=a AND team=b", "bad key=x"):
        error = await failure(stub.ListModels(pb.ListModelsRequest(filter=bad)))
        assert (error.code, error.violations[0][0]) == (INVALID, "filter"), bad
    error = await failure(stub.ListModels(pb.ListModelsRequest(page_token="not a token")))
    assert error.code == INVALID
    assert error.violations[0][0] == "page_token"
    # A token only continues the query it came from.
    error = await failure(
        stub.ListModels(pb.ListModelsRequest(filter="tier=gold", page_token=first.next_page_token))
    )
    assert error.code == INVALID
    assert error.violations[0][0] == "page_token"
    error = await failure(stub.ListModels(pb.ListModelsRequest(page_size=-1)))
    assert error.code == INVALID
    assert error.violations[0][0] == "page_size"


async def test_delete_model_takes_its_versions_and_deployments(stub: Stub) -> None:
    deployed = await deploy(stub)
    name = f"models/{deployed.model}"
    await stub.GetModelVersion(pb.GetModelVersionRequest(name=f"{name}/versions/1"))  # now cached
    await stub.DeleteModel(pb.DeleteModelRequest(name=name))
    for call in (
        stub.GetModelVersion(pb.GetModelVersionRequest(name=f"{name}/versions/1")),
        stub.GetDeployment(pb.GetDeploymentRequest(name=f"{name}/deployments/main")),
        stub.ResolveModel(pb.ResolveModelRequest(name=name)),
    ):
        assert (await failure(call)).code == NOT_FOUND


# Versions


async def test_versions_are_numbered_and_listed_by_stage(stub: Stub) -> None:
    model = await create_model(stub)
    first = (
        await stub.CreateModelVersion(
            pb.CreateModelVersionRequest(parent=model.name, model_version=version_body())
        )
    ).model_version
    second = (
        await stub.CreateModelVersion(
            pb.CreateModelVersionRequest(parent=model.name, model_version=version_body())
        )
    ).model_version
    named = (
        await stub.CreateModelVersion(
            pb.CreateModelVersionRequest(
                parent=model.name,
                model_version_id="canary",
                model_version=version_body(stage=pb.STAGE_STAGING),
            )
        )
    ).model_version
    assert [first.name, second.name, named.name] == [
        f"{model.name}/versions/{v}" for v in ("1", "2", "canary")
    ]
    assert first.stage == pb.STAGE_DRAFT
    assert named.stage == pb.STAGE_STAGING
    third = (
        await stub.CreateModelVersion(
            pb.CreateModelVersionRequest(parent=model.name, model_version=version_body())
        )
    ).model_version
    assert third.name.endswith("/versions/3")

    staged = await stub.ListModelVersions(
        pb.ListModelVersionsRequest(parent=model.name, filter="stage=STAGING")
    )
    assert [v.name for v in staged.model_versions] == [named.name]
    paged = await stub.ListModelVersions(pb.ListModelVersionsRequest(parent=model.name, page_size=3))
    rest = await stub.ListModelVersions(
        pb.ListModelVersionsRequest(parent=model.name, page_size=3, page_token=paged.next_page_token)
    )
    assert [v.name for v in (*paged.model_versions, *rest.model_versions)] == [
        first.name, second.name, named.name, third.name
    ]  # fmt: skip
    got = await stub.GetModelVersion(pb.GetModelVersionRequest(name=first.name))
    assert got.model_version == first

    error = await failure(
        stub.ListModelVersions(pb.ListModelVersionsRequest(parent=model.name, filter="stage=LIVE"))
    )
    assert error.code == INVALID
    assert error.violations[0][0] == "filter"
    error = await failure(
        stub.CreateModelVersion(
            pb.CreateModelVersionRequest(
                parent=model.name, model_version_id="canary", model_version=version_body()
            )
        )
    )
    assert error.code == grpc.StatusCode.ALREADY_EXISTS
    assert error.resource == ("tensorway.registry.v1.ModelVersion", named.name)
    error = await failure(
        stub.CreateModelVersion(
            pb.CreateModelVersionRequest(parent="models/no-such-model", model_version=version_body())
        )
    )
    assert error.code == NOT_FOUND
    assert error.resource == (
        "tensorway.registry.v1.Model",
        "models/no-such-model",
    )


async def test_version_signatures_must_be_valid_v2(stub: Stub) -> None:
    model = await create_model(stub)
    body = version_body(
        platform="",
        artifact_uri="no-scheme",
        inputs=[
            tensor_pb2.TensorSpec(name="x", datatype="FLOAT", shape=[-2, 3]),
            tensor_pb2.TensorSpec(name="x", datatype="FP32", shape=[0]),
        ],
        outputs=[],
        max_batch_size=-1,
    )
    error = await failure(
        stub.CreateModelVersion(pb.CreateModelVersionRequest(parent=model.name, model_version=body))
    )
    assert error.code == INVALID
    assert {field for field, _ in error.violations} == {
        "model_version.platform",
        "model_version.artifact_uri",
        "model_version.max_batch_size",
        "model_version.outputs",
        "model_version.inputs[0].datatype",
        "model_version.inputs[0].shape",
        "model_version.inputs[1].name",
        "model_version.inputs[1].shape",
    }
    error = await failure(
        stub.CreateModelVersion(
            pb.CreateModelVersionRequest(
                parent=model.name, model_version=version_body(stage=pb.STAGE_PRODUCTION)
            )
        )
    )
    assert error.code == INVALID
    assert error.violations[0][0] == "model_version.stage"


async def test_version_update_rules(stub: Stub) -> None:
    model = await create_model(stub)
    version = (
        await stub.CreateModelVersion(
            pb.CreateModelVersionRequest(parent=model.name, model_version=version_body())
        )
    ).model_version
    updated = (
        await stub.UpdateModelVersion(
            pb.UpdateModelVersionRequest(
                model_version=pb.ModelVersion(
                    name=version.name, artifact_uri="s3://models/x/2", metrics={"accuracy": 0.97}
                ),
                update_mask=mask("artifact_uri", "metrics"),
            )
        )
    ).model_version
    assert updated.artifact_uri == "s3://models/x/2"
    assert updated.metrics == {"accuracy": 0.97}

    error = await failure(
        stub.UpdateModelVersion(
            pb.UpdateModelVersionRequest(
                model_version=pb.ModelVersion(name=version.name, stage=pb.STAGE_PRODUCTION),
                update_mask=mask("stage"),
            )
        )
    )
    assert error.code == INVALID
    assert error.violations[0][0] == "update_mask"

    await transition(stub, version.name, pb.STAGE_STAGING)
    error = await failure(
        stub.UpdateModelVersion(
            pb.UpdateModelVersionRequest(
                model_version=pb.ModelVersion(name=version.name, artifact_uri="s3://elsewhere/1"),
                update_mask=mask("artifact_uri"),
            )
        )
    )
    assert error.code == PRECONDITION
    assert error.reason == "FAILED_PRECONDITION"
    metrics_only = await stub.UpdateModelVersion(
        pb.UpdateModelVersionRequest(
            model_version=pb.ModelVersion(name=version.name, metrics={"accuracy": 0.98}),
            update_mask=mask("metrics"),
        )
    )
    assert metrics_only.model_version.metrics == {"accuracy": 0.98}
    stale = await failure(
        stub.UpdateModelVersion(
            pb.UpdateModelVersionRequest(
                model_version=pb.ModelVersion(name=version.name, metrics={}, etag=version.etag),
                update_mask=mask("metrics"),
            )
        )
    )
    assert stale.code == grpc.StatusCode.ABORTED


async def test_stage_transitions_follow_the_rules(stub: Stub) -> None:
    deployed = await deploy(stub)
    v1, v2 = (f"models/{deployed.model}/versions/{v}" for v in ("1", "2"))

    skipped = await failure(transition(stub, v2, pb.STAGE_PRODUCTION))
    assert skipped.code == PRECONDITION, "DRAFT goes to STAGING first"
    unset = await failure(transition(stub, v2, pb.STAGE_UNSPECIFIED))
    assert unset.code == INVALID
    assert unset.violations[0][0] == "stage"

    for version in (v1, v2):
        await transition(stub, version, pb.STAGE_STAGING)
    promoted = await transition(stub, v1, pb.STAGE_PRODUCTION)
    assert promoted.model_version.stage == pb.STAGE_PRODUCTION
    assert not promoted.demoted_versions
    # v1 carries the deployment's traffic, so promoting v2 leaves it in PRODUCTION beside v2.
    promoted = await transition(stub, v2, pb.STAGE_PRODUCTION)
    assert not promoted.demoted_versions
    # Once traffic has moved to v2, promoting v2 again... is a no-op; moving v1 out is allowed.
    await stub.UpdateDeployment(
        pb.UpdateDeploymentRequest(
            deployment=pb.Deployment(
                name=deployed.deployment.name,
                traffic=[pb.TrafficSplit(version="2", weight=100)],
                aliases={"production": "2"},
            ),
            update_mask=mask("traffic", "aliases"),
        )
    )
    again = await transition(stub, v2, pb.STAGE_PRODUCTION)
    assert again.model_version.stage == pb.STAGE_PRODUCTION
    assert not again.demoted_versions
    # The production alias pins v2: it may not leave PRODUCTION while the alias names it.
    pinned = await failure(transition(stub, v2, pb.STAGE_STAGING))
    assert pinned.code == PRECONDITION

    # A third version's promotion demotes v1, which nothing routes to any more.
    created = await stub.CreateModelVersion(
        pb.CreateModelVersionRequest(
            parent=f"models/{deployed.model}", model_version=version_body(stage=pb.STAGE_STAGING)
        )
    )
    await stub.UpdateDeployment(
        pb.UpdateDeploymentRequest(
            deployment=pb.Deployment(name=deployed.deployment.name, aliases={}), update_mask=mask("aliases")
        )
    )
    promoted = await transition(stub, created.model_version.name, pb.STAGE_PRODUCTION)
    assert [v.name for v in promoted.demoted_versions] == [v1]
    assert promoted.demoted_versions[0].stage == pb.STAGE_STAGING

    routed = await failure(transition(stub, v2, pb.STAGE_ARCHIVED))
    assert routed.code == PRECONDITION, "v2 still has the traffic"
    archived = await transition(stub, v1, pb.STAGE_ARCHIVED)
    assert archived.model_version.stage == pb.STAGE_ARCHIVED
    stale = await failure(
        stub.TransitionModelVersionStage(
            pb.TransitionModelVersionStageRequest(
                name=v1, stage=pb.STAGE_STAGING, etag=promoted.demoted_versions[0].etag
            )
        )
    )
    assert stale.code == grpc.StatusCode.ABORTED
    missing = await failure(transition(stub, f"models/{deployed.model}/versions/99", pb.STAGE_STAGING))
    assert missing.code == NOT_FOUND


async def test_delete_version_only_when_no_deployment_routes_to_it(stub: Stub) -> None:
    deployed = await deploy(stub)
    v1, v2 = (f"models/{deployed.model}/versions/{v}" for v in ("1", "2"))
    error = await failure(stub.DeleteModelVersion(pb.DeleteModelVersionRequest(name=v1)))
    assert error.code == PRECONDITION
    await stub.DeleteModelVersion(pb.DeleteModelVersionRequest(name=v2))
    error = await failure(stub.GetModelVersion(pb.GetModelVersionRequest(name=v2)))
    assert error.code == NOT_FOUND
    assert error.resource == ("tensorway.registry.v1.ModelVersion", v2)


# Pools


async def test_pools(stub: Stub) -> None:
    names = sorted(f"pools/{unique('pool')}" for _ in range(2))
    for name in names:
        created = (
            await stub.CreatePool(
                pb.CreatePoolRequest(pool=pb.Pool(name=name, endpoints=["127.0.0.21:8001"]))
            )
        ).pool
        assert created.endpoints == ["127.0.0.21:8001"]
    assert (await stub.GetPool(pb.GetPoolRequest(name=names[0]))).pool.name == names[0]
    duplicate = await failure(stub.CreatePool(pb.CreatePoolRequest(pool=pb.Pool(name=names[0]))))
    assert duplicate.code == grpc.StatusCode.ALREADY_EXISTS

    listed: list[str] = []
    token = ""
    while True:
        page = await stub.ListPools(pb.ListPoolsRequest(page_size=50, page_token=token))
        listed += [p.name for p in page.pools]
        token = page.next_page_token
        if not token:
            break
    assert set(names) <= set(listed)
    assert listed == sorted(listed)

    updated = await stub.UpdatePool(
        pb.UpdatePoolRequest(
            pool=pb.Pool(name=names[0], endpoints=["127.0.0.21:8001", "127.0.0.22:8001"]),
            update_mask=mask("endpoints"),
        )
    )
    assert list(updated.pool.endpoints) == ["127.0.0.21:8001", "127.0.0.22:8001"]
    bad = await failure(
        stub.UpdatePool(
            pb.UpdatePoolRequest(
                pool=pb.Pool(name=names[0], endpoints=["nowhere"]), update_mask=mask("endpoints")
            )
        )
    )
    assert bad.code == INVALID
    assert bad.violations[0][0] == "pool.endpoints[0]"
    await stub.DeletePool(pb.DeletePoolRequest(name=names[1]))
    assert (await failure(stub.GetPool(pb.GetPoolRequest(name=names[1])))).code == NOT_FOUND


async def test_pool_in_use_cannot_be_deleted_and_its_endpoints_reach_the_route(stub: Stub) -> None:
    deployed = await deploy(stub)
    error = await failure(stub.DeletePool(pb.DeletePoolRequest(name=f"pools/{deployed.pool}")))
    assert error.code == PRECONDITION
    await stub.UpdatePool(
        pb.UpdatePoolRequest(
            pool=pb.Pool(name=f"pools/{deployed.pool}", endpoints=["127.9.9.9:1"]),
            update_mask=mask("endpoints"),
        )
    )
    resolved = await stub.ResolveModel(pb.ResolveModelRequest(name=f"models/{deployed.model}"))
    assert list(resolved.route.versions[0].endpoints) == ["127.9.9.9:1"]


# Deployments


async def test_deployment_crud_and_validation(stub: Stub) -> None:
    deployed = await deploy(stub)
    name = deployed.deployment.name
    parent = f"models/{deployed.model}"
    assert deployed.deployment.pool == f"pools/{deployed.pool}"
    assert (await stub.GetDeployment(pb.GetDeploymentRequest(name=name))).deployment == deployed.deployment
    listed = await stub.ListDeployments(pb.ListDeploymentsRequest(parent=parent))
    assert [d.name for d in listed.deployments] == [name]

    split = await stub.UpdateDeployment(
        pb.UpdateDeploymentRequest(
            deployment=pb.Deployment(
                name=name,
                traffic=[pb.TrafficSplit(version="1", weight=90), pb.TrafficSplit(version="2", weight=10)],
                aliases={"canary": "2"},
                shadow=pb.ShadowTraffic(version="2", percent=5),
                etag=deployed.deployment.etag,
            ),
            update_mask=mask("traffic", "aliases", "shadow"),
        )
    )
    assert [(t.version, t.weight) for t in split.deployment.traffic] == [("1", 90), ("2", 10)]
    assert split.deployment.shadow.percent == 5

    def body(**fields: object) -> pb.Deployment:
        base: dict[str, object] = {
            "pool": f"pools/{deployed.pool}",
            "traffic": [pb.TrafficSplit(version="1", weight=100)],
        }
        base.update(fields)
        return pb.Deployment(**base)

    async def create(deployment_id: str, deployment: pb.Deployment) -> object:
        return await stub.CreateDeployment(
            pb.CreateDeploymentRequest(parent=parent, deployment_id=deployment_id, deployment=deployment)
        )

    error = await failure(create("main", body()))
    assert error.code == grpc.StatusCode.ALREADY_EXISTS
    error = await failure(create("second", body(traffic=[pb.TrafficSplit(version="1", weight=60)])))
    assert error.code == INVALID
    assert error.violations == [("deployment.traffic", "weights sum to 60, not 100")]
    error = await failure(create("Bad_Id", body()))
    assert error.code == INVALID
    assert error.violations[0][0] == "deployment.name"
    error = await failure(create("second", body(traffic=[pb.TrafficSplit(version="9", weight=100)])))
    assert error.code == NOT_FOUND
    assert error.resource == (
        "tensorway.registry.v1.ModelVersion",
        f"{parent}/versions/9",
    )
    error = await failure(create("second", body(pool="pools/no-such-pool")))
    assert error.code == NOT_FOUND
    assert error.resource == ("tensorway.registry.v1.Pool", "pools/no-such-pool")
    error = await failure(create("second", body(aliases={"canary": "1"})))
    assert error.code == PRECONDITION, "an alias names one version across a model's deployments"
    error = await failure(create("second", body(aliases={"production": "1"})))
    assert error.code == PRECONDITION, "the production alias names a PRODUCTION version"
    error = await failure(create("second", body(shadow=pb.ShadowTraffic(version="1", percent=10))))
    assert error.code == PRECONDITION, "one shadow per model"
    error = await failure(
        stub.CreateDeployment(
            pb.CreateDeploymentRequest(parent="models/no-such-model", deployment_id="x", deployment=body())
        )
    )
    assert error.code == NOT_FOUND

    stale = await failure(
        stub.DeleteDeployment(pb.DeleteDeploymentRequest(name=name, etag=deployed.deployment.etag))
    )
    assert stale.code == grpc.StatusCode.ABORTED
    await stub.DeleteDeployment(pb.DeleteDeploymentRequest(name=name, etag=split.deployment.etag))
    assert (await failure(stub.GetDeployment(pb.GetDeploymentRequest(name=name)))).code == NOT_FOUND


async def test_archived_versions_cannot_be_deployed(stub: Stub) -> None:
    deployed = await deploy(stub)
    v2 = f"models/{deployed.model}/versions/2"
    await transition(stub, v2, pb.STAGE_ARCHIVED)
    error = await failure(
        stub.UpdateDeployment(
            pb.UpdateDeploymentRequest(
                deployment=pb.Deployment(
                    name=deployed.deployment.name, traffic=[pb.TrafficSplit(version="2", weight=100)]
                ),
                update_mask=mask("traffic"),
            )
        )
    )
    assert error.code == PRECONDITION


# Resolving and watching


async def test_resolve_by_weight_version_and_alias(stub: Stub) -> None:
    deployed = await deploy(stub)
    name = f"models/{deployed.model}"
    await stub.UpdateDeployment(
        pb.UpdateDeploymentRequest(
            deployment=pb.Deployment(
                name=deployed.deployment.name,
                traffic=[pb.TrafficSplit(version="1", weight=30), pb.TrafficSplit(version="2", weight=70)],
                aliases={"stable": "1"},
            ),
            update_mask=mask("traffic", "aliases"),
        )
    )
    by_weight = await stub.ResolveModel(pb.ResolveModelRequest(name=name))
    assert by_weight.version == "2"
    route = by_weight.route
    assert route.model == deployed.model
    assert dict(route.aliases) == {"stable": "1"}
    assert [(v.version, v.weight, v.pool) for v in route.versions] == [
        ("1", 30, f"pools/{deployed.pool}"),
        ("2", 70, f"pools/{deployed.pool}"),
    ]
    assert route.versions[0].inputs[0].datatype == "FP32"
    assert route.versions[0].max_batch_size == 256
    assert (await stub.ResolveModel(pb.ResolveModelRequest(name=name, version="1"))).version == "1"
    assert (await stub.ResolveModel(pb.ResolveModelRequest(name=name, version="stable"))).version == "1"

    unknown = await failure(stub.ResolveModel(pb.ResolveModelRequest(name=name, version="nightly")))
    assert unknown.code == NOT_FOUND
    assert unknown.reason == "MODEL_NOT_FOUND"
    undeployed = await create_model(stub)
    missing = await failure(stub.ResolveModel(pb.ResolveModelRequest(name=undeployed.name)))
    assert missing.code == NOT_FOUND
    assert missing.reason == "MODEL_NOT_FOUND"
    assert missing.resource == ("tensorway.registry.v1.Model", undeployed.name)


async def test_watch_routes_sends_a_snapshot_then_changes(stub: Stub) -> None:
    deployed = await deploy(stub)
    other = await deploy(stub)
    call = stub.WatchRoutes(pb.WatchRoutesRequest(models=[deployed.model]))
    snapshot = await call.read()
    assert snapshot.snapshot
    assert [r.model for r in snapshot.routes] == [deployed.model]

    await stub.UpdateDeployment(
        pb.UpdateDeploymentRequest(
            deployment=pb.Deployment(
                name=deployed.deployment.name,
                traffic=[pb.TrafficSplit(version="1", weight=50), pb.TrafficSplit(version="2", weight=50)],
            ),
            update_mask=mask("traffic"),
        )
    )
    change = await asyncio.wait_for(call.read(), timeout=PATIENCE)
    assert not change.snapshot
    assert change.revision > snapshot.revision
    assert [(v.version, v.weight) for v in change.routes[0].versions] == [("1", 50), ("2", 50)]

    # Changes to models outside the filter are not sent; removals are.
    await stub.DeleteDeployment(pb.DeleteDeploymentRequest(name=other.deployment.name))
    await stub.DeleteDeployment(pb.DeleteDeploymentRequest(name=deployed.deployment.name))
    removal = await asyncio.wait_for(call.read(), timeout=PATIENCE)
    assert list(removal.removed_models) == [deployed.model]
    assert not removal.routes
    call.cancel()


async def test_watch_rejects_bad_model_names(stub: Stub) -> None:
    error = await failure(stub.WatchRoutes(pb.WatchRoutesRequest(models=["Bad Name"])).read())
    assert error.code == INVALID
    assert error.violations[0][0] == "models[0]"


async def test_one_postgres_load_per_key_under_a_stampede(stub: Stub) -> None:
    model = await create_model(stub)

    def loads() -> float:
        return (
            REGISTRY.get_sample_value(
                "tensorway_registry_cache_lookups_total", {"kind": "model", "tier": "postgres"}
            )
            or 0.0
        )

    before = loads()
    answers = await asyncio.gather(*(stub.GetModel(pb.GetModelRequest(name=model.name)) for _ in range(50)))
    assert all(answer.model == model for answer in answers)
    assert loads() - before == 1


async def test_migrations_are_safe_to_run_again(stub: Stub, postgres_url: str) -> None:
    # The registry fixture has migrated this database already.
    async with await psycopg.AsyncConnection.connect(
        postgres_url, autocommit=True, row_factory=dict_row
    ) as connection:
        assert await migrate(connection, migrations.SCHEMA) == []
        cursor = await connection.execute("SELECT version FROM registry_schema_migrations ORDER BY version")
        assert [row["version"] for row in await cursor.fetchall()] == [
            m.version for m in migrations.MIGRATIONS
        ]
