"""Where a tenant's objects may live, on its own: the URI rules, the upload keys and the
settings' templates."""

from __future__ import annotations

import pytest

from tensorway.batch.domain import ObjectRef
from tensorway.batch.tenancy import ObjectOutsidePrefix, TenantStorage, parse_uri, safe_file_name
from tensorway.runtime import InvalidArgument, PermissionDenied

STORAGE = TenantStorage(
    uploads="s3://tw-batch/uploads/{tenant}/",
    results="s3://tw-batch/results/{tenant}/{job}/",
    extra_inputs={"acme": ["s3://acme-lake/exports/"]},
)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://tw-batch/uploads/acme/a/rows.jsonl", ObjectRef("tw-batch", "uploads/acme/a/rows.jsonl")),
        ("s3://tw-batch/uploads/acme/a..b.npy", ObjectRef("tw-batch", "uploads/acme/a..b.npy")),
        ("s3://tw-batch/uploads/acme/.hidden", ObjectRef("tw-batch", "uploads/acme/.hidden")),
    ],
)
def test_a_plain_uri_is_taken_literally(uri: str, expected: ObjectRef) -> None:
    assert parse_uri(uri, "job.input_uri", prefix=False) == expected


@pytest.mark.parametrize(
    "uri",
    [
        "s3://tw-batch/uploads/acme/../globex/x",
        "s3://tw-batch/uploads/acme/./x",
        "s3://tw-batch/uploads/acme//x",
        "s3://tw-batch//uploads/acme/x",
        "s3://tw-batch/uploads/acme/%2e%2e/x",
        "s3://tw-batch/uploads/acme/..\\x",
        "s3://tw-batch/uploads/acme/x\r",
        "s3://tw-batch/uploads/acme/x\u202e",
        "s3://tw-batch/uploads/acme/x/",
        "s3://tw-batch/",
        "s3://tw-batch",
        "s3://TW-batch/x",
        "s3://tw.batch/x",
        "s3://-tw/x",
        "s3:/tw-batch/x",
        "S3://tw-batch/x",
        "https://tw-batch/x",
        "s3://tw-batch/" + "k" * 1025,
        "",
    ],
)
def test_anything_a_store_might_read_otherwise_is_invalid(uri: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_uri(uri, "job.input_uri", prefix=False)
    assert [v.field for v in caught.value.violations] == ["job.input_uri"]


def test_inputs_are_the_tenants_uploads_or_its_extra_prefixes() -> None:
    assert STORAGE.input("acme", "s3://tw-batch/uploads/acme/x.npy").key == "uploads/acme/x.npy"
    assert STORAGE.input("acme", "s3://acme-lake/exports/x.npy").bucket == "acme-lake"
    for tenant, uri in (
        ("globex", "s3://tw-batch/uploads/acme/x.npy"),
        ("globex", "s3://acme-lake/exports/x.npy"),
        ("acme", "s3://tw-batch/uploads/acme-corp/x.npy"),
        ("acme", "s3://tw-batch/results/acme/j/parts/part-00000.jsonl"),
        ("acme", "s3://acme-lake/other/x.npy"),
    ):
        with pytest.raises(ObjectOutsidePrefix) as caught:
            STORAGE.input(tenant, uri)
        assert [v.field for v in caught.value.violations] == ["job.input_uri"]


def test_outputs_are_the_jobs_results_prefix() -> None:
    assert STORAGE.output("acme", "j1", "").uri == "s3://tw-batch/results/acme/j1/"
    assert STORAGE.output("acme", "j1", "s3://tw-batch/results/acme/j1/sub/").key == "results/acme/j1/sub/"
    for uri in (
        "s3://tw-batch/results/acme/j2/",
        "s3://tw-batch/results/acme/",
        "s3://other/results/acme/j1/",
    ):
        with pytest.raises(ObjectOutsidePrefix):
            STORAGE.output("acme", "j1", uri)


@pytest.mark.parametrize("tenant", ["../acme", "a/b", ".", "..", "", "-x", "a\\b", "a b", "t" * 129])
def test_a_tenant_id_that_is_not_one_safe_segment_owns_nothing(tenant: str) -> None:
    with pytest.raises(PermissionDenied):
        STORAGE.uploads_prefix(tenant)


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        ("rows.jsonl", "rows.jsonl"),
        ("../../etc/passwd", "passwd"),
        ("C:\\data\\rows.npy", "rows.npy"),
        ("my rows (1).jsonl", "my_rows_1_.jsonl"),
        ("%2e%2e.jsonl", "_2e_2e.jsonl"),
        ("..", "upload"),
        ("", "upload"),
        ("é.npy", "_.npy"),
        ("x" * 300 + ".jsonl", "x" * 122 + ".jsonl"),
    ],
)
def test_an_uploads_file_name_is_kept_in_safe_characters(name: str, safe: str) -> None:
    assert safe_file_name(name) == safe


def test_an_upload_key_is_fresh_and_under_the_tenants_prefix() -> None:
    first = STORAGE.new_upload("acme", "../globex/rows.jsonl")
    second = STORAGE.new_upload("acme", "../globex/rows.jsonl")
    assert first != second
    for ref in (first, second):
        assert ref.bucket == "tw-batch"
        assert ref.key.startswith("uploads/acme/")
        assert ref.key.endswith("/rows.jsonl")
        assert STORAGE.input("acme", ref.uri) == ref


@pytest.mark.parametrize(
    ("uploads", "results"),
    [
        ("s3://tw-batch/uploads/", "s3://tw-batch/results/{tenant}/{job}/"),
        ("s3://tw-batch/uploads/{tenant}/", "s3://tw-batch/results/{job}/"),
        ("s3://tw-batch/uploads/{tenant}", "s3://tw-batch/results/{tenant}/{job}/"),
        ("s3://tw-batch/../{tenant}/", "s3://tw-batch/results/{tenant}/{job}/"),
    ],
)
def test_templates_that_cannot_confine_a_tenant_fail_at_start(uploads: str, results: str) -> None:
    with pytest.raises((ValueError, InvalidArgument)):
        TenantStorage(uploads=uploads, results=results)
