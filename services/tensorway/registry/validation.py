"""Checks on what callers send: names, signatures, weights, filters and update masks.

Each check collects every violation it finds, so one INVALID_ARGUMENT names all bad fields.
"""

from __future__ import annotations

import ipaddress
import math
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from tensorway.registry.domain import (
    Deployment,
    Model,
    ModelFilter,
    ModelStateReport,
    ModelVersion,
    ModelVersionFilter,
    ModelVersionState,
    Pool,
    Stage,
)
from tensorway.runtime import FieldViolation, InvalidArgument
from tensorway.runtime.postgres import parse_filter_terms
from tensorway.tensors.signatures import TensorSpec

DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
# Model ids are the names Triton serves the models by, and Triton's names often carry
# underscores or capitals (resnet50_onnx): so they may too, still safe in a URL path.
MODEL_ID = re.compile(r"[a-zA-Z0-9]([-_a-zA-Z0-9]{0,61}[a-zA-Z0-9])?")
# Label keys and values as Kubernetes has them: short, and safe in a filter without quoting.
LABEL_KEY = re.compile(r"[a-z0-9A-Z]([-a-zA-Z0-9_./]{0,61}[a-zA-Z0-9])?")
LABEL_VALUE = re.compile(r"([a-zA-Z0-9]([-a-zA-Z0-9_.]{0,61}[a-zA-Z0-9])?)?")
V2_DATATYPES = frozenset(
    {
        "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
        "FP16", "FP32", "FP64", "BF16", "BYTES",
    }
)  # fmt: skip
ENDPOINT = re.compile(r"(?P<host>[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>[0-9]{1,5})")
ARTIFACT_URI = re.compile(r"[a-z][a-z0-9+.-]*://\S+")
MAX_DESCRIPTION = 2048
MODEL_MASK_FIELDS = frozenset({"description", "labels"})
# Once a version leaves DRAFT, what it is and where its artifact lives no longer change:
# routers and orchestrators may already serve it.
VERSION_DRAFT_ONLY_FIELDS = frozenset({"platform", "inputs", "outputs", "max_batch_size", "artifact_uri"})
VERSION_MASK_FIELDS = VERSION_DRAFT_ONLY_FIELDS | {"metrics"}
POOL_MASK_FIELDS = frozenset({"endpoints"})
DEPLOYMENT_MASK_FIELDS = frozenset({"pool", "traffic", "aliases", "shadow"})


def raise_if(violations: Sequence[FieldViolation], what: str) -> None:
    if violations:
        raise InvalidArgument(f"invalid {what}: " + "; ".join(v.field for v in violations), violations)


def dns_label(value: str, field: str) -> list[FieldViolation]:
    if DNS_LABEL.fullmatch(value):
        return []
    return [FieldViolation(field, f"{value!r} is not a DNS label (a-z, 0-9 and '-', at most 63)")]


def model_id(value: str, field: str) -> list[FieldViolation]:
    if MODEL_ID.fullmatch(value):
        return []
    return [
        FieldViolation(
            field, f"{value!r} is not a model id (letters, digits, '-' and '_' inside, at most 63)"
        )
    ]


def format_name(collections: Sequence[str], *ids: str) -> str:
    """The resource name of `ids` in `collections`: ("models", "versions"), "digits", "3" →
    "models/digits/versions/3"; what `parse_name` parses."""
    return "/".join(f"{collection}/{id_}" for collection, id_ in zip(collections, ids, strict=True))


def parse_name(name: str, field: str, *collections: str) -> tuple[str, ...]:
    """The ids in a resource name such as "models/digits/versions/3" for ("models", "versions")."""
    parts = name.split("/")
    ids = parts[1::2]
    if len(parts) != 2 * len(collections) or tuple(parts[0::2]) != collections:
        pattern = "/".join(f"{collection}/{{id}}" for collection in collections)
        raise InvalidArgument(f"{field} must look like {pattern}", [FieldViolation(field, f"not {pattern}")])
    raise_if(
        [
            violation
            for collection, part in zip(collections, ids, strict=True)
            for violation in (model_id if collection == "models" else dns_label)(part, field)
        ],
        field,
    )
    return tuple(ids)


def check_model(model: Model, prefix: str = "model") -> None:
    violations = model_id(model.name, f"{prefix}.name")
    if len(model.description) > MAX_DESCRIPTION:
        violations.append(FieldViolation(f"{prefix}.description", f"longer than {MAX_DESCRIPTION}"))
    violations += _labels(sorted(model.labels.items()), f"{prefix}.labels")
    raise_if(violations, "model")


def _labels(labels: Iterable[tuple[str, str]], field: str) -> list[FieldViolation]:
    violations = []
    for key, value in labels:
        if not LABEL_KEY.fullmatch(key):
            violations.append(
                FieldViolation(f"{field}[{key!r}]", "not a label key (63 letters, digits, -_./)")
            )
        if not LABEL_VALUE.fullmatch(value):
            violations.append(FieldViolation(f"{field}[{key!r}]", f"{value!r} is not a label value"))
    return violations


def check_model_version(version: ModelVersion, prefix: str = "model_version") -> None:
    """The version's contents; its id is checked where it comes from (name or create request)."""
    violations = []
    if not version.platform:
        violations.append(FieldViolation(f"{prefix}.platform", "required, e.g. onnxruntime_onnx or python"))
    if not ARTIFACT_URI.fullmatch(version.artifact_uri):
        violations.append(
            FieldViolation(f"{prefix}.artifact_uri", "a URI with a scheme, e.g. s3://models/x/1")
        )
    if version.max_batch_size < 0:
        violations.append(FieldViolation(f"{prefix}.max_batch_size", "0 (no batching) or more"))
    if not version.inputs:
        violations.append(FieldViolation(f"{prefix}.inputs", "a model takes at least one input"))
    if not version.outputs:
        violations.append(FieldViolation(f"{prefix}.outputs", "a model returns at least one output"))
    violations += _tensor_specs(version.inputs, f"{prefix}.inputs")
    violations += _tensor_specs(version.outputs, f"{prefix}.outputs")
    for key, value in version.metrics.items():
        if not key or not math.isfinite(value):
            violations.append(FieldViolation(f"{prefix}.metrics[{key!r}]", "a named, finite number"))
    raise_if(violations, "model version")


def _tensor_specs(specs: Sequence[TensorSpec], field: str) -> list[FieldViolation]:
    violations = []
    seen: set[str] = set()
    for index, spec in enumerate(specs):
        at = f"{field}[{index}]"
        if not spec.name:
            violations.append(FieldViolation(f"{at}.name", "required"))
        elif spec.name in seen:
            violations.append(FieldViolation(f"{at}.name", f"{spec.name!r} appears twice"))
        seen.add(spec.name)
        if spec.datatype not in V2_DATATYPES:
            violations.append(
                FieldViolation(
                    f"{at}.datatype",
                    f"{spec.datatype!r} is not a V2 datatype ({', '.join(sorted(V2_DATATYPES))})",
                )
            )
        if any(dim == 0 or dim < -1 for dim in spec.shape):
            violations.append(FieldViolation(f"{at}.shape", "each dimension is -1 (dynamic) or positive"))
    return violations


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Cloud instance metadata services: whoever reaches them may read the node's credentials.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(address)
    for address in ("169.254.169.254", "fd00:ec2::254", "169.254.170.2", "100.100.100.200")
)
METADATA_HOSTS = frozenset(
    {"metadata.google.internal", "metadata", "instance-data", "instance-data.ec2.internal"}
)
# IPv6 forms that carry an IPv4 address a connection may end up at: NAT64's well-known prefix
# and the deprecated IPv4-compatible addresses (mapped and 6to4 addresses ipaddress unpacks).
NAT64 = ipaddress.ip_network("64:ff9b::/96")
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
DEFAULT_POOL_ENDPOINT_ALLOW = ("127.0.0.0/8", "::1/128", "localhost", "*.svc.cluster.local")


def _ip_literal(host: str) -> IPAddress | None:
    """The address a host names literally, as a resolver would read it: dotted IPv4 in any of
    the legacy forms inet_aton takes (2852039166, 0xa9fea9fe, 169.254.43518), or IPv6."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def _addresses_behind(address: IPAddress) -> list[IPAddress]:
    """The address and any IPv4 address it carries inside."""
    found: list[IPAddress] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        for inner in (address.ipv4_mapped, address.sixtofour):
            if inner is not None:
                found.append(inner)
        if address in NAT64 or (address in IPV4_COMPATIBLE and int(address) > 1):
            found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


def _never_a_pool(address: IPAddress) -> str | None:
    for inner in _addresses_behind(address):
        if inner in METADATA_ADDRESSES:
            return f"{inner} is a cloud metadata service"
        if inner.is_link_local:
            return f"{inner} is link-local"
        if inner.is_unspecified or inner.is_multicast:
            return f"{inner} is not the address of one server"
    return None


@dataclass(frozen=True)
class EndpointAllowList:
    """Where pool endpoints may point: CIDRs ("10.0.0.0/8") for addresses and host patterns
    ("*.svc.cluster.local", fnmatch style, case-insensitive) for names.

    Link-local and cloud metadata addresses and names are refused whatever the list says: a
    pool endpoint is where routers send every tenant's tensors, and an orchestrator never lives
    there. A name is trusted to resolve where the pattern that admits it means; the list
    should admit only names the operator's DNS controls.
    """

    networks: tuple[IPNetwork, ...]
    host_patterns: tuple[str, ...]

    @classmethod
    def parse(cls, entries: Iterable[str]) -> EndpointAllowList:
        """The list from settings entries; ValueError names an entry that is neither a CIDR nor
        a host pattern."""
        networks: list[IPNetwork] = []
        patterns: list[str] = []
        for given in entries:
            entry = given.strip()
            if not entry:
                continue
            if "/" in entry or _ip_literal(entry) is not None:
                networks.append(ipaddress.ip_network(entry, strict=False))
            elif re.fullmatch(r"[A-Za-z0-9*?.-]+", entry):
                patterns.append(entry.lower().rstrip("."))
            else:
                raise ValueError(f"{entry!r} is neither a CIDR nor a host pattern (letters, digits, -.*?)")
        return cls(tuple(networks), tuple(patterns))

    def refusal(self, host: str) -> str | None:
        """Why an endpoint at `host` (a name, an IPv4 address or a bracketed IPv6 one) is
        refused, or None when a pool may live there."""
        if host.startswith("["):
            address: IPAddress | None = _ip_literal(host[1:-1])
            if address is None:
                return "not an IPv6 address"
        else:
            name = host.lower().removesuffix(".")
            address = _ip_literal(name)
            if address is None:
                if name in METADATA_HOSTS:
                    return f"{name} is a cloud metadata service"
                if not name or not any(fnmatchcase(name, pattern) for pattern in self.host_patterns):
                    return f"{host} matches no allowed host pattern ({', '.join(self.host_patterns)})"
                return None
        never = _never_a_pool(address)
        if never is not None:
            return never
        if not any(address in network for network in self.networks):
            allowed = ", ".join(str(network) for network in self.networks)
            return f"{address} is in no allowed network ({allowed})"
        return None


DEFAULT_ENDPOINT_ALLOW_LIST = EndpointAllowList.parse(DEFAULT_POOL_ENDPOINT_ALLOW)


def check_pool(
    pool: Pool, prefix: str = "pool", allow: EndpointAllowList = DEFAULT_ENDPOINT_ALLOW_LIST
) -> None:
    """The pool's name and endpoints: each host:port, once, where `allow` lets pools live."""
    violations = dns_label(pool.name, f"{prefix}.name")
    for index, endpoint in enumerate(pool.endpoints):
        field = f"{prefix}.endpoints[{index}]"
        match = ENDPOINT.fullmatch(endpoint)
        if match is None or not 0 < int(match["port"]) < 65536:
            violations.append(FieldViolation(field, f"{endpoint!r} is not host:port"))
            continue
        refused = allow.refusal(match["host"])
        if refused is not None:
            violations.append(FieldViolation(field, f"{endpoint!r} is not where a pool may live: {refused}"))
    if len(set(pool.endpoints)) != len(pool.endpoints):
        violations.append(FieldViolation(f"{prefix}.endpoints", "an endpoint appears twice"))
    raise_if(violations, "pool")


MAX_STATE_REASON = 4096
MAX_STATE_REPORTS = 10000


def check_model_state_report(endpoint: str, reports: Sequence[ModelStateReport]) -> None:
    """A state report: the endpoint is host:port, each line names a model, version and Triton
    once, with a state; reasons are bounded."""
    violations = []
    if ENDPOINT.fullmatch(endpoint) is None:
        violations.append(FieldViolation("endpoint", f"{endpoint!r} is not host:port"))
    if len(reports) > MAX_STATE_REPORTS:
        violations.append(FieldViolation("states", f"at most {MAX_STATE_REPORTS} lines"))
    seen: set[tuple[str, str, str]] = set()
    for index, report in enumerate(reports):
        field = f"states[{index}]"
        violations += model_id(report.model, f"{field}.model")
        violations += dns_label(report.version, f"{field}.version")
        if not report.triton or len(report.triton) > 255:
            violations.append(FieldViolation(f"{field}.triton", "the Triton's address, 1 to 255 characters"))
        if report.state is ModelVersionState.UNSPECIFIED:
            violations.append(FieldViolation(f"{field}.state", "LOADING, WARMING, READY or FAILED"))
        if len(report.reason) > MAX_STATE_REASON:
            violations.append(FieldViolation(f"{field}.reason", f"at most {MAX_STATE_REASON} characters"))
        key = (report.model, report.version, report.triton)
        if key in seen:
            violations.append(FieldViolation(field, "this model, version and Triton appear twice"))
        seen.add(key)
    raise_if(violations, "state report")


def check_deployment(deployment: Deployment, prefix: str = "deployment") -> None:
    """Shape only; that the pool and versions exist and may be routed to is checked in a transaction."""
    violations = dns_label(deployment.name, f"{prefix}.name")
    violations += dns_label(deployment.pool, f"{prefix}.pool")
    if not deployment.traffic:
        violations.append(FieldViolation(f"{prefix}.traffic", "at least one version with a weight"))
    versions = [split.version for split in deployment.traffic]
    if len(set(versions)) != len(versions):
        violations.append(FieldViolation(f"{prefix}.traffic", "a version appears twice"))
    for index, split in enumerate(deployment.traffic):
        violations += dns_label(split.version, f"{prefix}.traffic[{index}].version")
        if not 0 <= split.weight <= 100:
            violations.append(FieldViolation(f"{prefix}.traffic[{index}].weight", "0..100"))
    total = sum(split.weight for split in deployment.traffic)
    if deployment.traffic and total != 100:
        violations.append(FieldViolation(f"{prefix}.traffic", f"weights sum to {total}, not 100"))
    for alias, version in deployment.aliases.items():
        violations += dns_label(alias, f"{prefix}.aliases[{alias!r}]")
        violations += dns_label(version, f"{prefix}.aliases[{alias!r}]")
        if alias.isdigit():
            violations.append(
                FieldViolation(f"{prefix}.aliases[{alias!r}]", "an alias is not a number: versions are")
            )
    if deployment.shadow is not None:
        violations += dns_label(deployment.shadow.version, f"{prefix}.shadow.version")
        if not 0 < deployment.shadow.percent <= 100:
            violations.append(FieldViolation(f"{prefix}.shadow.percent", "1..100"))
    raise_if(violations, "deployment")


def check_mask(paths: Sequence[str], allowed: frozenset[str], field: str = "update_mask") -> frozenset[str]:
    """The fields an update changes; "*" means every updatable field. An empty mask is refused
    rather than guessed, so an update never wipes fields its caller did not mean to touch."""
    if not paths:
        raise InvalidArgument(
            "update_mask is required",
            [FieldViolation(field, f"name the fields to change: {', '.join(sorted(allowed))} or *")],
        )
    if list(paths) == ["*"]:
        return allowed
    violations = [
        FieldViolation(
            f"{field}.paths[{index}]", f"{path!r} cannot be updated; updatable: {', '.join(sorted(allowed))}"
        )
        for index, path in enumerate(paths)
        if path not in allowed
    ]
    raise_if(violations, "update mask")
    return frozenset(paths)


def parse_model_filter(text: str) -> ModelFilter:
    terms = parse_filter_terms(text)
    raise_if([FieldViolation("filter", v.description) for v in _labels(terms, "filter")], "filter")
    labels: dict[str, str] = {}
    for key, value in terms:
        if labels.setdefault(key, value) != value:
            raise InvalidArgument("contradictory filter", [FieldViolation("filter", f"{key} is given twice")])
    return ModelFilter(labels=labels)


def parse_model_version_filter(text: str) -> ModelVersionFilter:
    stage: Stage | None = None
    platform: str | None = None
    for key, value in parse_filter_terms(text):
        if key == "stage" and stage is None and value.upper() in Stage.__members__:
            stage = Stage[value.upper()]
        elif key == "platform" and platform is None and value:
            platform = value
        else:
            stages = "|".join(Stage.__members__)
            raise InvalidArgument(
                f"bad filter term {key}={value}",
                [
                    FieldViolation(
                        "filter", f"{key}={value!r}: filter on stage={stages} and platform=NAME, once each"
                    )
                ],
            )
    return ModelVersionFilter(stage=stage, platform=platform)
