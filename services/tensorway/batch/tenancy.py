"""Where a tenant's objects live: the one place that decides which objects a job may read and
write, and which key a new upload gets.

A tenant's inputs lie under its uploads prefix (`s3://tensorway-batch/uploads/{tenant}/` by
default) or under extra prefixes the settings allow that tenant; a job's results always go under
the results prefix of its tenant and job (`s3://tensorway-batch/results/{tenant}/{job}/`). A URI
is read literally, never normalised: anything a store or proxy might resolve differently from
how it reads here (`.` and `..` segments, empty segments, percent escapes, backslashes, control
characters) is refused as malformed before its place is judged.
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from google.protobuf.message import Message

from tensorway.batch.domain import ObjectRef
from tensorway.runtime import FieldViolation, InvalidArgument, PermissionDenied
from tensorway.runtime.errors import bad_request

# S3's rules for bucket names (no dots, so a name is never an IP address or a dotted host).
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
# A tenant whose id is one safe path segment: "a/b" or ".." would reach into another's prefix.
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")
MAX_KEY_BYTES = 1024
MAX_FILE_NAME_CHARS = 128
UNSAFE_FILE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


class ObjectOutsidePrefix(PermissionDenied):
    """A URI that is well formed but names an object the caller may not use; `violations`
    name the field (google.rpc.BadRequest), as INVALID_ARGUMENT's do."""

    def __init__(self, message: str, violations: Sequence[FieldViolation]) -> None:
        super().__init__(message)
        self.violations = list(violations)

    def details(self) -> list[Message]:
        return [bad_request(self.violations)]


def _key_problem(key: str, *, prefix: bool) -> str | None:
    """Why `key` is not a plain object key (or, with `prefix`, a plain prefix ending in '/')."""
    if not key:
        return "names no object key"
    if len(key.encode()) > MAX_KEY_BYTES:
        return f"has a key longer than {MAX_KEY_BYTES} bytes"
    if "%" in key:
        return "has a percent sign: keys are literal, never percent-encoded"
    if "\\" in key:
        return "has a backslash"
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in key):
        return "has a control character"
    segments = key.split("/")
    if prefix:
        if segments[-1]:
            return "must end in '/'"
        segments = segments[:-1]
    for segment in segments:
        if segment == "":
            return "has an empty path segment ('//' or a leading '/')"
        if segment in (".", ".."):
            return f"has a {segment!r} path segment"
    return None


def parse_uri(uri: str, field: str, *, prefix: bool) -> ObjectRef:
    """`s3://bucket/key` (with `prefix`, `s3://bucket/prefix/`) as an ObjectRef, or
    INVALID_ARGUMENT naming `field` when it is not a plain one."""
    shape = "s3://bucket/prefix/" if prefix else "s3://bucket/key"
    scheme, separator, rest = uri.partition("://")
    bucket, _, key = rest.partition("/")
    if scheme != "s3" or not separator:
        problem: str | None = "is not an s3:// URI"
    elif not BUCKET_NAME.match(bucket):
        problem = "has no valid bucket name (3-63 of a-z, 0-9 and '-')"
    else:
        problem = _key_problem(key, prefix=prefix)
    if problem is not None:
        raise InvalidArgument(f"{field} {problem}", [FieldViolation(field, f"{shape}: {problem}")])
    return ObjectRef(bucket, key)


def _inside(ref: ObjectRef, prefix: ObjectRef) -> bool:
    return ref.bucket == prefix.bucket and ref.key.startswith(prefix.key)


def safe_file_name(name: str) -> str:
    """The last part of a client's file name, in characters safe in any key, extension kept."""
    base = re.split(r"[/\\]", name)[-1]
    cleaned = UNSAFE_FILE_NAME_CHARS.sub("_", base).lstrip(".")
    if len(cleaned) > MAX_FILE_NAME_CHARS:
        _, dot, extension = cleaned.rpartition(".")
        keep = extension[:16] if dot else ""
        cleaned = cleaned[: MAX_FILE_NAME_CHARS - len(keep) - 1] + ("." + keep if keep else "")
    return cleaned or "upload"


@dataclass(frozen=True)
class TenantStorage:
    """The prefixes of every tenant, from the settings' templates.

    `uploads` has a `{tenant}` field, `results` a `{tenant}` and a `{job}` field; both are
    s3:// prefixes ending in '/'. `extra_inputs` maps a tenant to further prefixes it may read.
    """

    uploads: str
    results: str
    extra_inputs: Mapping[str, Sequence[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A template that cannot hold a tenant (and job) fails the service's start, not a call.
        for name, template, fields in (
            ("uploads", self.uploads, ("{tenant}",)),
            ("results", self.results, ("{tenant}", "{job}")),
        ):
            if not all(f in template for f in fields):
                raise ValueError(f"the {name} prefix {template!r} must contain {' and '.join(fields)}")
            parse_uri(template.format(tenant="tenant", job="job"), name, prefix=True)
        for tenant, prefixes in self.extra_inputs.items():
            for extra in prefixes:
                parse_uri(extra, f"extra input prefix of {tenant}", prefix=True)

    @property
    def buckets(self) -> frozenset[str]:
        """The buckets the service itself writes to: the uploads' and the results'."""
        return frozenset(
            parse_uri(t.format(tenant="tenant", job="job"), "prefix", prefix=True).bucket
            for t in (self.uploads, self.results)
        )

    def uploads_prefix(self, tenant: str) -> ObjectRef:
        return ObjectRef.parse(self.uploads.format(tenant=check_tenant(tenant)))

    def results_prefix(self, tenant: str, job_id: str) -> ObjectRef:
        return ObjectRef.parse(self.results.format(tenant=check_tenant(tenant), job=job_id))

    def input(self, tenant: str, uri: str, field: str = "job.input_uri") -> ObjectRef:
        """The object a job of `tenant` reads, or the prefix (ending in '/') whose objects it
        reads; INVALID_ARGUMENT when `uri` is malformed, PERMISSION_DENIED when it lies outside
        the tenant's prefixes."""
        ref = parse_uri(uri, field, prefix=uri.endswith("/"))
        extra = self.extra_inputs.get(tenant, ())
        allowed = [self.uploads_prefix(tenant), *(ObjectRef.parse(p) for p in extra)]
        if not any(_inside(ref, prefix) for prefix in allowed):
            raise ObjectOutsidePrefix(
                f"{field} is outside the caller's prefixes",
                [FieldViolation(field, f"an object under {allowed[0].uri} (CreateUpload puts one there)")],
            )
        return ref

    def output(self, tenant: str, job_id: str, uri: str, field: str = "job.output_prefix") -> ObjectRef:
        """Where a job's results go: the job's results prefix, or `uri` when it is inside it."""
        results = self.results_prefix(tenant, job_id)
        if not uri:
            return results
        ref = parse_uri(uri, field, prefix=True)
        if not _inside(ref, results):
            raise ObjectOutsidePrefix(
                f"{field} is outside the job's results prefix",
                [FieldViolation(field, "leave it empty: results go under the server's prefix for the job")],
            )
        return ref

    def new_upload(self, tenant: str, file_name: str) -> ObjectRef:
        """A fresh key for an upload: under the tenant's prefix, a new id, the file's safe name."""
        return self.uploads_prefix(tenant).child(f"{uuid.uuid4().hex}/{safe_file_name(file_name)}")


def check_tenant(tenant: str) -> str:
    """`tenant`, or PERMISSION_DENIED when its id cannot name a prefix of its own."""
    if not TENANT_NAME.match(tenant):
        raise PermissionDenied(
            "the caller's tenant id cannot own objects: letters, digits, '_', '.', '@', '-', "
            "starting with a letter or digit"
        )
    return tenant
