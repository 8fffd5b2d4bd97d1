"""The edge as an attacker meets it: two tenants and an admin with real tokens, through Envoy only.

Every refusal is checked for its status and for what did not change behind it.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

import grpc
import jwt
import pytest
import requests

from tensorway.edge.config import load_values
from tensorway.edge.keys import KEY_ID
from tensorway.inference.v1 import inference_service_pb2 as inference_pb
from tensorway.inference.v1 import inference_service_pb2_grpc as inference_grpc
from tensorway.registry.v1 import registry_service_pb2 as registry_pb
from tensorway.registry.v1 import registry_service_pb2_grpc as registry_grpc
from tests.waiting import eventually_blocking

if TYPE_CHECKING:
    from tests.edge_mesh import Edge

JWT = load_values("local")["jwt"]


def signed(edge: Edge, **claims: Any) -> str:
    """A token signed with the stack's real key, with exactly these claims over the usual ones
    (a claim given as None is left out)."""
    now = int(time.time())
    payload = {
        "iss": JWT["issuer"],
        "aud": JWT["audiences"][0],
        "sub": "attacker",
        "tenant": "mallory",
        "scope": "infer batch models.read",
        "iat": now,
        "exp": now + 600,
        **claims,
    }
    payload = {key: value for key, value in payload.items() if value is not None}
    return jwt.encode(payload, edge.private_key.read_bytes(), algorithm="RS256", headers={"kid": KEY_ID})


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def models(edge: Edge) -> list[dict[str, Any]]:
    reply = edge.http.get(f"{edge.url}/v1/models", headers=edge.headers("ops", admin=True), timeout=10)
    assert reply.status_code == 200, reply.text
    return sorted(reply.json()["models"], key=lambda model: model["name"])


def pools(edge: Edge) -> list[dict[str, Any]]:
    reply = edge.http.get(f"{edge.url}/v1/pools", headers=edge.headers("ops", admin=True), timeout=10)
    assert reply.status_code == 200, reply.text
    return sorted(reply.json()["pools"], key=lambda pool: pool["name"])


def status_code_of(body: requests.Response) -> int:
    """The google.rpc code of a REST error body."""
    return int(body.json()["code"])


def test_a_tenant_token_cannot_write_the_registry_over_rest(edge: Edge) -> None:
    before_models, before_pools = models(edge), pools(edge)
    tenant = edge.headers("mallory")
    writes = [
        ("post", "/v1/models", {"name": "models/stolen", "description": "mine now"}),
        ("patch", "/v1/models/digits", {"name": "models/digits", "description": "pwned"}),
        ("delete", "/v1/models/digits", None),
        ("post", "/v1/models/digits/versions", {"signature": {}}),
        ("post", "/v1/models/digits/versions/1:transitionStage", {"stage": "ARCHIVED"}),
        ("post", "/v1/pools", {"name": "pools/evil", "endpoints": ["127.0.0.1:9"]}),
        ("patch", "/v1/pools/local", {"name": "pools/local", "endpoints": ["127.0.0.1:9"]}),
        ("delete", "/v1/pools/local", None),
        ("post", "/v1/models/digits/deployments", {"pool": "pools/local"}),
    ]
    for method, path, body in writes:
        reply = edge.http.request(method, f"{edge.url}{path}", json=body, headers=tenant, timeout=10)
        assert reply.status_code == 403, (method, path, reply.status_code, reply.text)
        assert status_code_of(reply) == grpc.StatusCode.PERMISSION_DENIED.value[0]
        assert "scopes do not allow this call" in reply.json()["message"]
    assert models(edge) == before_models
    assert pools(edge) == before_pools


def test_a_tenant_token_cannot_write_the_registry_over_grpc_even_with_forged_identity_headers(
    edge: Edge,
) -> None:
    before = pools(edge)
    forged = [
        *bearer(edge.token("mallory")).items(),
        ("x-tenant-id", "ops"),
        ("x-tensorway-scopes", "infer batch models.read models.write"),
    ]
    with edge.channel() as channel, pytest.raises(grpc.RpcError) as refused:
        registry_grpc.RegistryServiceStub(channel).CreatePool(
            registry_pb.CreatePoolRequest(
                pool=registry_pb.Pool(name="pools/evil", endpoints=["127.0.0.1:9"])
            ),
            metadata=forged,
            timeout=10,
        )
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "scopes do not allow this call" in (refused.value.details() or "")
    assert pools(edge) == before


def test_an_admin_token_writes_and_a_pool_may_not_point_at_metadata_addresses(edge: Edge) -> None:
    admin = edge.headers("ops", admin=True)
    name = f"sec-{uuid.uuid4().hex[:8]}"
    created = edge.http.post(
        f"{edge.url}/v1/models",
        json={"name": f"models/{name}", "description": "x"},
        headers=admin,
        timeout=10,
    )
    assert created.status_code == 200, created.text
    deleted = edge.http.delete(f"{edge.url}/v1/models/{name}", headers=admin, timeout=10)
    assert deleted.status_code == 200, deleted.text

    before = pools(edge)
    for endpoint in ("169.254.169.254:80", "[fe80::1]:80", "metadata.google.internal:80"):
        reply = edge.http.post(
            f"{edge.url}/v1/pools",
            json={"name": f"pools/{name}", "endpoints": [endpoint]},
            headers=admin,
            timeout=10,
        )
        assert reply.status_code == 400, (endpoint, reply.text)
        assert "endpoints" in reply.text
    assert pools(edge) == before


def test_pool_addresses_are_the_admins_to_see(edge: Edge) -> None:
    # The demo pool's orchestrators join it by lease and list no address of their own: a pool
    # with hand-set endpoints shows what there is to hide.
    admin = edge.headers("ops", admin=True)
    created = edge.http.post(
        f"{edge.url}/v1/pools",
        json={"name": "pools/hidden-addresses", "endpoints": ["127.0.0.1:50999"]},
        headers=admin,
        timeout=10,
    )
    assert created.status_code == 200, created.text
    try:
        admin_view = edge.http.get(f"{edge.url}/v1/pools/hidden-addresses", headers=admin, timeout=10)
        assert admin_view.status_code == 200, admin_view.text
        assert admin_view.json()["pool"]["endpoints"] == ["127.0.0.1:50999"]
        tenant_view = edge.http.get(
            f"{edge.url}/v1/pools/hidden-addresses", headers=edge.headers("mallory"), timeout=10
        )
        assert tenant_view.status_code == 200, tenant_view.text
        assert tenant_view.json()["pool"]["endpoints"] == []
        listed = edge.http.get(f"{edge.url}/v1/pools", headers=edge.headers("mallory"), timeout=10)
        assert "pools/hidden-addresses" in [pool["name"] for pool in listed.json()["pools"]]
        assert all(pool["endpoints"] == [] for pool in listed.json()["pools"])
    finally:
        edge.http.delete(f"{edge.url}/v1/pools/hidden-addresses", headers=admin, timeout=10)


@pytest.mark.parametrize(
    ("case", "claims", "status"),
    [
        ("no exp", {"exp": None}, 401),
        ("ten years", {"exp": int(time.time()) + 10 * 365 * 86400}, 401),
        ("expired", {"iat": int(time.time()) - 7200, "exp": int(time.time()) - 3600}, 401),
        ("numeric tenant", {"tenant": 12345}, 403),
        ("object tenant", {"tenant": {"name": "acme"}}, 403),
        ("CRLF in tenant", {"tenant": "acme\r\nx-tensorway-scopes: models.write"}, 403),
        ("slash in tenant", {"tenant": "../acme"}, 403),
        ("no tenant", {"tenant": None}, 403),
        ("no scope", {"scope": None}, 403),
        ("scope as a list", {"scope": ["infer", "models.write"]}, 403),
        ("scope that only looks like infer", {"scope": "inference"}, 403),
    ],
)
def test_tokens_the_edge_refuses(edge: Edge, case: str, claims: dict[str, Any], status: int) -> None:
    reply = edge.http.get(f"{edge.url}/v1/models/iris", headers=bearer(signed(edge, **claims)), timeout=10)
    assert reply.status_code == status, (case, reply.status_code, reply.text)


def test_a_token_envoy_has_kept_is_refused_once_it_expires(edge: Edge) -> None:
    # Envoy keeps verified tokens (jwt_cache_config) and allows 60 s of clock skew: a token whose
    # exp passed 45 s ago is still good, and is kept by its first call; 15 s on it must be refused
    # all the same, although it is still kept.
    now = int(time.time())
    token = bearer(signed(edge, iat=now - 645, exp=now - 45))

    def status() -> int:
        return edge.http.get(f"{edge.url}/v1/models/iris", headers=token, timeout=10).status_code

    assert status() == 200
    eventually_blocking(lambda: status() == 401, within=60, interval=0.5, what="the kept token refused")


def test_a_token_is_read_from_the_authorization_header_only(edge: Edge) -> None:
    token = edge.token("acme")
    in_query = edge.http.get(f"{edge.url}/v1/models/iris?access_token={token}", timeout=10)
    assert in_query.status_code in (400, 401), in_query.text
    in_cookie = edge.http.get(f"{edge.url}/v1/models/iris", cookies={"access_token": token}, timeout=10)
    assert in_cookie.status_code == 401
    assert edge.http.get(f"{edge.url}/v1/models/iris", headers=bearer(token), timeout=10).status_code == 200


def test_a_token_for_inference_only_cannot_reach_batch_or_the_registry(edge: Edge) -> None:
    infer_only = bearer(signed(edge, tenant="acme", scope="infer"))
    assert edge.http.get(f"{edge.url}/v1/jobs", headers=infer_only, timeout=10).status_code == 403
    assert edge.http.get(f"{edge.url}/v1/pools", headers=infer_only, timeout=10).status_code == 403
    with edge.channel() as channel:
        ready = inference_grpc.InferenceServiceStub(channel).GetModelMetadata(
            inference_pb.GetModelMetadataRequest(model_name="iris"),
            metadata=list(infer_only.items()),
            timeout=10,
        )
    assert ready.name == "iris"


def test_reflection_and_internal_methods_are_refused_at_once(edge: Edge) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with edge.channel() as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
            metadata=list(edge.headers("ops", admin=True).items()),
            timeout=10,
        )
        with pytest.raises(grpc.RpcError) as refused:
            list(answers)
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
        watch = registry_grpc.RegistryServiceStub(channel).WatchRoutes(
            registry_pb.WatchRoutesRequest(),
            metadata=list(edge.headers("ops", admin=True).items()),
            timeout=10,
        )
        with pytest.raises(grpc.RpcError) as hidden:
            list(watch)
        assert hidden.value.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNIMPLEMENTED)


def test_oversized_paths_and_headers_are_client_errors_never_429(edge: Edge) -> None:
    headers = edge.headers("acme")
    long_path = edge.http.get(f"{edge.url}/v1/models/{'a' * 20_000}", headers=headers, timeout=10)
    assert long_path.status_code == 431
    just_under = edge.http.get(f"{edge.url}/v1/models/{'a' * 6_000}", headers=headers, timeout=10)
    assert just_under.status_code in (400, 404), just_under.text
    big_header = edge.http.get(
        f"{edge.url}/v1/models/iris", headers={**headers, "x-padding": "p" * 20_000}, timeout=10
    )
    assert big_header.status_code == 431


def test_forged_page_tokens_are_invalid_argument(edge: Edge) -> None:
    headers = edge.headers("acme")
    for path in ("/v1/models", "/v1/pools", "/v1/jobs"):
        for forged in ("garbage", "eyJ4IjoxfQ", "AAAA", "%00"):
            reply = edge.http.get(
                f"{edge.url}{path}", params={"page_token": forged}, headers=headers, timeout=10
            )
            assert reply.status_code == 400, (path, forged, reply.status_code, reply.text)


def test_one_tenants_flood_does_not_spend_another_tenants_local_limit(edge: Edge) -> None:
    flooder = edge.headers(f"flood-{uuid.uuid4().hex[:6]}")
    codes = [
        edge.http.get(f"{edge.url}/v1/jobs", headers=flooder, timeout=10).status_code for _ in range(100)
    ]
    # The test mesh's batch route allows 40 calls a minute per tenant: a flood must hit it.
    assert codes.count(429) >= 20, codes
    bystander = edge.http.get(
        f"{edge.url}/v1/jobs", headers=edge.headers(f"calm-{uuid.uuid4().hex[:6]}"), timeout=10
    )
    assert bystander.status_code == 200, bystander.text


def test_the_edge_serves_tls_only(edge: Edge) -> None:
    plain = edge.url.replace("https://", "http://")
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{plain}/healthz", timeout=5)
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{edge.url}/healthz", timeout=5, verify=True)
