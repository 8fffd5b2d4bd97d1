"""The kustomize overlays render, every object is valid Kubernetes, and the properties that
matter hold: non-root and read-only pods, gRPC probes, resources, HPAs on real targets, and
NetworkPolicies that leave only Envoy open."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tensorway.cli.main import SERVICES
from tensorway.edge.config import load_values

from .manifests import Container, by_kind, containers, settings_class, unknown_settings

# The Kubernetes release whose schemas kubernetes-validate ships (offline) that we target.
KUBERNETES_VERSION = "1.37.0"
# Custom resources kubernetes-validate does not know, checked against schemas written here for the
# fields the manifests use (no network to fetch the operators' CRDs).
CUSTOM_RESOURCE_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): Path(__file__).with_name("schemas") / "keda-scaledobject.json",
}
# Only Envoy may be reached from outside the namespace (besides Prometheus on metrics ports).
PUBLIC = "envoy"
METRICS_PORTS = {9100, 8888, 8002}
# Who calls whom, by app.kubernetes.io/name: the NetworkPolicies must allow exactly this.
CALLERS = {
    "router": {"envoy", "batch-worker"},
    "registry": {"envoy", "router", "orchestrator"},
    "orchestrator": {"router"},
    "batch": {"envoy"},
    "batch-worker": set(),
}


def test_every_object_is_valid_kubernetes(overlay: list[dict[str, Any]]) -> None:
    errors = []
    for obj in overlay:
        custom = CUSTOM_RESOURCE_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
        if custom is not None:
            schema = json.loads(custom.read_text())
            found = jsonschema.Draft202012Validator(schema).iter_errors(obj)
            errors.extend(f"{obj['kind']}/{obj['metadata']['name']}: {error.message}" for error in found)
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {error.message}")
    assert not errors, "\n".join(errors)


def test_the_scaled_object_schema_refuses_what_keda_would() -> None:
    schema = json.loads(CUSTOM_RESOURCE_SCHEMAS[("keda.sh/v1alpha1", "ScaledObject")].read_text())
    broken = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "x"},
        "spec": {
            "scaleTargetRef": {"name": "x"},
            "triggers": [{"type": "kafka", "metadata": {"lagThreshold": 4}}],
        },
    }
    assert list(jsonschema.Draft202012Validator(schema).iter_errors(broken))


def test_every_tensorway_service_is_deployed(overlay: list[dict[str, Any]]) -> None:
    deployed = {c.tensorway_service for c in containers(overlay)} - {None}
    assert deployed == set(SERVICES), f"deployed {sorted(deployed)}, services {sorted(SERVICES)}"


def test_tensorway_variables_are_settings_fields(overlay: list[dict[str, Any]]) -> None:
    for container in containers(overlay):
        service = container.tensorway_service
        if service is None:
            continue
        names = {env["name"] for env in container.spec.get("env", [])}
        assert not unknown_settings(service, names), f"{container.where}: {unknown_settings(service, names)}"


def test_pods_run_as_non_root_with_read_only_roots_and_no_capabilities(overlay: list[dict[str, Any]]) -> None:
    for container in containers(overlay):
        assert container.security("runAsNonRoot") is True, container.where
        # A numeric non-zero user: the kubelet can check runAsNonRoot only against a number.
        assert isinstance(container.security("runAsUser"), int), container.where
        assert container.security("runAsUser") > 0, container.where
        assert container.security("readOnlyRootFilesystem") is True, container.where
        assert container.security("allowPrivilegeEscalation") is False, container.where
        assert container.spec["securityContext"]["capabilities"]["drop"] == ["ALL"], container.where
        assert container.security("seccompProfile") == {"type": "RuntimeDefault"}, container.where
        assert container.pod["automountServiceAccountToken"] is False, container.where
        assert container.pod["serviceAccountName"] == container.workload["metadata"]["name"], container.where


def test_service_accounts_exist(overlay: list[dict[str, Any]]) -> None:
    accounts = by_kind(overlay, "ServiceAccount")
    for container in containers(overlay):
        assert container.pod["serviceAccountName"] in accounts, container.where


def test_tensorway_containers_have_native_grpc_probes(overlay: list[dict[str, Any]]) -> None:
    for container in containers(overlay):
        if container.tensorway_service is None:
            continue
        port = next(p["containerPort"] for p in container.spec["ports"] if p["name"] == "grpc")
        assert container.spec["readinessProbe"]["grpc"]["port"] == port, container.where
        liveness = container.spec["livenessProbe"]
        if container.tensorway_service == "orchestrator":
            # Its health follows its Triton's; a Triton outage must not restart it.
            assert liveness["tcpSocket"]["port"] == port, container.where
        else:
            assert liveness["grpc"]["port"] == port, container.where


def test_every_container_has_probes_and_resources(overlay: list[dict[str, Any]]) -> None:
    for container in containers(overlay):
        assert "readinessProbe" in container.spec, container.where
        assert "livenessProbe" in container.spec, container.where
        resources = container.spec["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), container.where
        assert "memory" in resources["limits"], container.where


def test_autoscalers_target_existing_workloads(overlay: list[dict[str, Any]]) -> None:
    hpas = by_kind(overlay, "HorizontalPodAutoscaler")
    assert hpas
    for name, hpa in hpas.items():
        target = hpa["spec"]["scaleTargetRef"]
        assert target["name"] in by_kind(overlay, target["kind"]), f"HPA {name} targets {target}"
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    scaled_objects = by_kind(overlay, "ScaledObject")
    for name, scaled in scaled_objects.items():
        target = scaled["spec"]["scaleTargetRef"]
        assert target["name"] in by_kind(overlay, target["kind"]), f"ScaledObject {name} targets {target}"
        assert scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    # Every stateless tensorway service scales, by an HPA or by KEDA (which makes the HPA).
    assert {"router", "registry", "batch", "batch-worker", "envoy"} <= set(hpas) | set(scaled_objects)


def test_pdbs_select_existing_workloads(overlay: list[dict[str, Any]]) -> None:
    workload_labels = [
        obj["spec"]["template"]["metadata"]["labels"]
        for obj in overlay
        if obj["kind"] in ("Deployment", "StatefulSet")
    ]
    pdbs = by_kind(overlay, "PodDisruptionBudget")
    for name, pdb in pdbs.items():
        wanted = pdb["spec"]["selector"]["matchLabels"].items()
        assert any(wanted <= labels.items() for labels in workload_labels), f"PDB {name} selects nothing"
    assert {c.workload["metadata"]["name"] for c in containers(overlay)} <= set(pdbs)


def test_orchestrators_have_a_headless_service(overlay: list[dict[str, Any]]) -> None:
    statefulset = by_kind(overlay, "StatefulSet")["orchestrator"]
    service = by_kind(overlay, "Service")[statefulset["spec"]["serviceName"]]
    assert service["spec"]["clusterIP"] == "None"


def test_envoy_runs_the_rendered_image_with_the_jwks_and_certificate_from_secrets(
    overlay: list[dict[str, Any]],
) -> None:
    values = load_values("k8s")
    pod = by_kind(overlay, "Deployment")["envoy"]["spec"]["template"]["spec"]
    (envoy,) = pod["containers"]
    # The overlays map the name to the Dockerfile's `envoy` target, built with this profile.
    assert "tensorway-envoy" in envoy["image"]
    assert envoy["args"][:2] == ["-c", f"{values['files']['dir']}/envoy.yaml"]
    jwks = Path(values["jwt"]["jwks_file"])
    mount = next(m for m in envoy["volumeMounts"] if m["mountPath"] == str(jwks.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "envoy-jwks"
    certificate = Path(values["tls"]["cert_file"])
    assert Path(values["tls"]["key_file"]).parent == certificate.parent
    mount = next(m for m in envoy["volumeMounts"] if m["mountPath"] == str(certificate.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "envoy-tls"


def test_secrets_are_referenced_never_shipped(overlay: list[dict[str, Any]]) -> None:
    assert not by_kind(overlay, "Secret")
    for container in containers(overlay):
        for env in container.spec.get("env", []):
            if any(word in env["name"] for word in ("SECRET", "PASSWORD", "POSTGRES_URL", "REDIS_URL")):
                assert "secretKeyRef" in env.get("valueFrom", {}), f"{container.where}: {env['name']}"


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items()


def _policies(overlay: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return list(by_kind(overlay, "NetworkPolicy").values())


def test_everything_is_denied_by_default(overlay: list[dict[str, Any]]) -> None:
    deny = by_kind(overlay, "NetworkPolicy")["default-deny"]["spec"]
    assert deny["podSelector"] == {}
    assert set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny
    assert "egress" not in deny


def test_only_envoy_is_reachable_from_outside(overlay: list[dict[str, Any]]) -> None:
    for policy in _policies(overlay):
        selected = policy["spec"]["podSelector"]
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from", [])
            ports = {p["port"] for p in rule.get("ports", [])}
            if not peers or any("ipBlock" in peer for peer in peers):
                # Open to any source: only Envoy's listener.
                assert selected == {"matchLabels": {"app.kubernetes.io/name": PUBLIC}}, policy["metadata"]
                assert ports == {8080}, policy["metadata"]
            for peer in peers:
                if "namespaceSelector" in peer:
                    # Another namespace: only Prometheus, only on metrics ports.
                    assert peer["namespaceSelector"] == {
                        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                    }
                    assert ports <= METRICS_PORTS, policy["metadata"]


def test_only_what_must_talks_to_what(overlay: list[dict[str, Any]]) -> None:
    for target, callers in CALLERS.items():
        labels = {"app.kubernetes.io/name": target, "app.kubernetes.io/part-of": "tensorway"}
        allowed: set[str] = set()
        for policy in _policies(overlay):
            if not _selects(policy["spec"]["podSelector"], labels) or policy["spec"]["podSelector"] == {}:
                continue
            for rule in policy["spec"].get("ingress", []):
                for peer in rule.get("from", []):
                    allowed.add(peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"])
        assert allowed == callers, f"{target} accepts {sorted(allowed)}, should accept {sorted(callers)}"


def test_every_pod_has_its_own_policy(overlay: list[dict[str, Any]]) -> None:
    for container in containers(overlay):
        labels = container.workload["spec"]["template"]["metadata"]["labels"]
        own = [
            p
            for p in _policies(overlay)
            if p["spec"]["podSelector"] != {} and _selects(p["spec"]["podSelector"], labels)
        ]
        assert own, f"{container.where} has only the default deny"


@pytest.mark.parametrize("name", ["registry", "router", "batch", "batch-worker", "envoy"])
def test_prod_runs_several_replicas(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    assert by_kind(rendered["prod"], "Deployment")[name]["spec"]["replicas"] >= 3
    scaler = by_kind(rendered["prod"], "HorizontalPodAutoscaler").get(name)
    if scaler is None:
        assert by_kind(rendered["prod"], "ScaledObject")[name]["spec"]["minReplicaCount"] >= 3
    else:
        assert scaler["spec"]["minReplicas"] >= 3


def test_prod_tritons_get_gpus_and_dev_tritons_none(rendered: dict[str, list[dict[str, Any]]]) -> None:
    def triton(objects: list[dict[str, Any]]) -> Container:
        return next(c for c in containers(objects) if c.spec["name"] == "triton")

    prod = triton(rendered["prod"]).spec
    assert prod["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert prod["image"].startswith("nvcr.io/nvidia/tritonserver:")
    assert "nvidia.com/gpu" not in triton(rendered["dev"]).spec["resources"].get("limits", {})


def test_images_are_pinned(overlay: list[dict[str, Any]]) -> None:
    for container in containers(overlay):
        image = container.spec["image"]
        assert ":" in image.rsplit("/", 1)[-1], f"{container.where}: {image} has no tag"
        assert not image.endswith(":latest"), container.where


def _env(workload: dict[str, Any]) -> dict[str, Any]:
    return {env["name"]: env for env in workload["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_orchestrators_join_their_pool_at_a_pod_ip_the_registry_admits(overlay: list[dict[str, Any]]) -> None:
    from tensorway.registry.validation import EndpointAllowList

    orchestrator = _env(by_kind(overlay, "StatefulSet")["orchestrator"])
    assert orchestrator["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert orchestrator["TENSORWAY_ORCHESTRATOR_ADVERTISE_ADDRESS"]["value"] == "$(POD_IP):50053"
    registry = _env(by_kind(overlay, "Deployment")["registry"])
    allow = EndpointAllowList.parse(
        yaml.safe_load(registry["TENSORWAY_REGISTRY_POOL_ENDPOINT_ALLOW"]["value"])
    )
    assert allow.refusal("10.244.3.17") is None
    assert allow.refusal("169.254.169.254") is not None


def test_prod_scales_orchestrators_on_requests_in_flight_that_the_adapter_serves(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    hpa = by_kind(rendered["prod"], "HorizontalPodAutoscaler")["orchestrator"]["spec"]
    assert hpa["scaleTargetRef"]["kind"] == "StatefulSet"
    (metric,) = hpa["metrics"]
    adapter = yaml.safe_load(
        by_kind(rendered["prod"], "ConfigMap")["tensorway-prometheus-adapter"]["data"]["config.yaml"]
    )
    served = {rule["name"]["as"] for rule in adapter["rules"]}
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] in served


def test_prod_scales_batch_workers_on_the_lag_of_their_group_up_to_the_partitions(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    worker = settings_class("batch-worker").model_fields
    prod = rendered["prod"]
    assert "batch-worker" not in by_kind(prod, "HorizontalPodAutoscaler"), "KEDA owns the workers' HPA"
    scaled = by_kind(prod, "ScaledObject")["batch-worker"]["spec"]
    assert scaled["scaleTargetRef"]["name"] in by_kind(prod, "Deployment")
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["consumerGroup"] == worker["consumer_group"].default
    assert trigger["metadata"]["topic"] == worker["shards_topic"].default
    assert scaled["maxReplicaCount"] <= worker["shards_topic_partitions"].default
    endpoints = by_kind(prod, "ConfigMap")
    bootstrap = next(
        cm["data"]["kafka-bootstrap"] for cm in endpoints.values() if "kafka-bootstrap" in cm.get("data", {})
    )
    assert trigger["metadata"]["bootstrapServers"] == bootstrap
