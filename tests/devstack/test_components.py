"""Each component of the local stack answers a real request (the session fixtures)."""

from __future__ import annotations

import io
import json
import ssl
import urllib.error
import urllib.request
import uuid

import psycopg
import pytest
import redis
import tritonclient.grpc as grpcclient
import urllib3
from minio import Minio
from typer.testing import CliRunner

from tensorway.cli.dev import dev_app
from tensorway.devstack import S3Credentials, Stack
from tensorway.devstack._kafka import api_versions


def test_postgres_serves_the_tensorway_database(postgres_url: str) -> None:
    with psycopg.connect(postgres_url) as connection:
        row = connection.execute("SELECT current_database(), 1 + 1").fetchone()
    assert row == ("tensorway", 2)


def test_redis_answers_ping_and_keeps_a_value(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.ping()
        client.set("devstack-test", b"value")
        assert client.get("devstack-test") == b"value"
    finally:
        client.close()


def test_kafka_lists_its_api_versions(kafka_bootstrap: str) -> None:
    host, _, port = kafka_bootstrap.partition(":")
    assert api_versions(host, int(port)) > 10


def test_s3_stores_and_returns_an_object(s3_endpoint: str, s3_credentials: S3Credentials) -> None:
    connections = urllib3.PoolManager()
    client = Minio(
        s3_endpoint.removeprefix("http://"),
        access_key=s3_credentials.access_key,
        secret_key=s3_credentials.secret_key,
        secure=False,
        http_client=connections,
    )
    bucket = f"devstack-{uuid.uuid4().hex[:8]}"
    client.make_bucket(bucket)
    client.put_object(bucket, "hello.txt", io.BytesIO(b"hello"), length=5)
    response = client.get_object(bucket, "hello.txt")
    try:
        assert response.read() == b"hello"
    finally:
        response.close()
        response.release_conn()
    assert bucket in {found.name for found in client.list_buckets()}
    connections.clear()


def test_triton_is_ready_with_the_demo_models(triton_grpc: str) -> None:
    with grpcclient.InferenceServerClient(triton_grpc) as client:
        assert client.is_server_ready()
        for model in ("simple", "simple_string", "digits", "iris"):
            assert client.is_model_ready(model), model


def test_envoy_answers_for_the_router_cluster_and_asks_for_a_token(
    envoy_url: str, envoy_tls: ssl.SSLContext
) -> None:
    # No router runs yet, so Envoy's health check says the router cluster is down.
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(f"{envoy_url}/healthz", timeout=5, context=envoy_tls)
    with raised.value:
        assert raised.value.code == 503
        assert raised.value.headers.get("server") == "envoy"
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(f"{envoy_url}/v1/models", timeout=5, context=envoy_tls)
    with raised.value:
        assert raised.value.code == 401


def test_status_json_maps_running_components_to_addresses(dev_stack: Stack, redis_url: str) -> None:
    result = CliRunner().invoke(dev_app, ["status", "--json", "--state-dir", str(dev_stack.state_dir)])
    assert result.exit_code == 0, result.output
    addresses = json.loads(result.output)
    assert addresses["redis"] == redis_url.removeprefix("redis://").removesuffix("/0")
    assert all(address.startswith("127.0.0.1:") for address in addresses.values())
