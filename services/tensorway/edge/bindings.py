"""The REST bindings of the public services, as the transcoder will serve them.

Envoy's transcoder drops both bindings when two methods bind the same verb and path pattern
(the registry's `GET /v1/{name=models/*}` and the router's `GET /v1/models/{model_name}`, say),
so neither would answer. The edge settles it by service order: the first service keeps the
binding, later ones lose it from the descriptor set Envoy reads and from the OpenAPI document,
and stay reachable over gRPC.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2

VARIABLE = re.compile(r"\{([^}=]+)(?:=([^}]*))?\}")


@dataclass(frozen=True)
class HttpBinding:
    """One verb and path of a method: the primary HTTP rule or one of its additional bindings."""

    service: str
    method: descriptor_pb2.MethodDescriptorProto
    verb: str
    template: str
    body: str
    response_body: str

    @property
    def shape(self) -> tuple[str, str]:
        """The verb and the path pattern with variables reduced to what they match."""

        def pattern(match: re.Match[str]) -> str:
            return match.group(2) or "*"

        return self.verb, VARIABLE.sub(pattern, self.template)


def _services(
    files: Sequence[descriptor_pb2.FileDescriptorProto], services: Sequence[str]
) -> Iterator[tuple[str, descriptor_pb2.ServiceDescriptorProto]]:
    by_name = {f"{file.package}.{service.name}": service for file in files for service in file.service}
    for name in services:
        yield name, by_name[name]


def _rules(method: descriptor_pb2.MethodDescriptorProto) -> list[http_pb2.HttpRule]:
    if not method.options.HasExtension(annotations_pb2.http):
        return []
    rule: http_pb2.HttpRule = method.options.Extensions[annotations_pb2.http]
    return [rule, *rule.additional_bindings]


def http_bindings(
    files: Sequence[descriptor_pb2.FileDescriptorProto], services: Sequence[str]
) -> tuple[list[HttpBinding], list[HttpBinding]]:
    """The bindings served, in service order, and those shadowed by an earlier service's."""
    served: list[HttpBinding] = []
    shadowed: list[HttpBinding] = []
    taken: set[tuple[str, str]] = set()
    for service_name, service in _services(files, services):
        for method in service.method:
            for rule in _rules(method):
                verb = rule.WhichOneof("pattern")
                if verb is None or verb == "custom":
                    continue
                binding = HttpBinding(
                    service_name, method, verb, getattr(rule, verb), rule.body, rule.response_body
                )
                (shadowed if binding.shape in taken else served).append(binding)
                taken.add(binding.shape)
    return served, shadowed


def transcoder_descriptor_set(
    descriptor_set: bytes, services: Sequence[str]
) -> tuple[bytes, list[HttpBinding]]:
    """The descriptor set without the shadowed bindings, and those bindings."""
    parsed = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set)
    _, shadowed = http_bindings(parsed.file, services)
    dropped = {(b.service, b.method.name, b.verb, b.template) for b in shadowed}
    for service_name, service in _services(parsed.file, services):
        for method in service.method:
            rules = _rules(method)
            kept = [
                rule
                for rule in rules
                if (service_name, method.name, rule.WhichOneof("pattern"), _template(rule)) not in dropped
            ]
            if len(kept) == len(rules):
                continue
            method.options.ClearExtension(annotations_pb2.http)
            if kept:
                primary = method.options.Extensions[annotations_pb2.http]
                primary.CopyFrom(kept[0])
                del primary.additional_bindings[:]
                for rule in kept[1:]:
                    extra = primary.additional_bindings.add()
                    extra.CopyFrom(rule)
                    del extra.additional_bindings[:]
    return parsed.SerializeToString(), shadowed


def _template(rule: http_pb2.HttpRule) -> str:
    verb = rule.WhichOneof("pattern")
    return "" if verb is None or verb == "custom" else str(getattr(rule, verb))
