"""`tensorway batch` against the running batch pipeline: submit a local file and wait, then
status, list, download and cancel."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
from minio import Minio
from typer.testing import CliRunner

from tensorway.batch.v1 import batch_service_pb2 as pb
from tensorway.cli.batch import eta_text
from tensorway.cli.main import app

from .conftest import BUCKET, digits_rows


async def test_submit_wait_status_list_download(batch_api: str, s3: Minio, tmp_path: Path) -> None:
    rows = digits_rows(700, seed=9)
    source = tmp_path / "digits.npy"
    np.save(source, rows)
    common = [
        "batch",
        "--api",
        batch_api,
        "--tenant",
        "cli-tenant",
    ]

    def run(*args: str) -> str:
        # The API runs on this test's event loop, so the synchronous CLI runs in a thread.
        result = CliRunner().invoke(app, [*common, *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.stdout

    submitted = await asyncio.to_thread(
        run, "submit", str(source), "--model", "digits", "--shard-size", "300", "--wait"
    )
    name = submitted.split()[0]
    assert name.startswith("jobs/")
    assert "SUCCEEDED" in submitted
    # The file went up through the presigned URL, under the tenant's own prefix.
    uploaded = [o.object_name for o in s3.list_objects(BUCKET, prefix="uploads/cli-tenant/", recursive=True)]
    assert any(name.endswith("/digits.npy") for name in uploaded), uploaded
    assert "manifest" in submitted
    assert "700 done, 0 failed of 700" in await asyncio.to_thread(run, "status", name)
    assert name in await asyncio.to_thread(run, "list", "--filter", "model=digits")

    downloaded = await asyncio.to_thread(run, "download", name.removeprefix("jobs/"), str(tmp_path / "out"))
    assert "manifest.json" in downloaded
    parts = sorted((tmp_path / "out").glob("part-*.jsonl"))
    assert len(parts) == 3
    lines = [json.loads(line) for part in parts for line in part.read_text().splitlines()]
    assert [line["id"] for line in lines] == list(range(700))
    assert "SUCCEEDED" in await asyncio.to_thread(run, "cancel", name)


def without_signature(part: dict[str, Any]) -> dict[str, Any]:
    """A result entry with its presigned URL cut at the query, where the signature is."""
    return {**part, "presigned_url": part["presigned_url"].split("?", 1)[0]}


async def test_json_output_of_every_batch_command(batch_api: str, tmp_path: Path) -> None:
    source = tmp_path / "digits.npy"
    np.save(source, digits_rows(50, seed=4))
    common = ["batch", "--api", batch_api, "--tenant", "cli-json"]

    def as_json(*args: str) -> Any:
        result = CliRunner().invoke(app, [*common, *args, "-o", "json"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    # Without --wait: the created job, and nothing else on stdout.
    created = await asyncio.to_thread(as_json, "submit", str(source), "--model", "digits")
    assert created["name"].startswith("jobs/")
    assert created["state"] in ("JOB_STATE_QUEUED", "JOB_STATE_RUNNING")
    # With --wait: the ended job, every result with its whole presigned URL.
    ended = await asyncio.to_thread(as_json, "submit", str(source), "--model", "digits", "--wait")
    assert ended["state"] == "JOB_STATE_SUCCEEDED"
    assert ended["progress"]["rows_done"] == "50"
    assert ended["manifest"]["presigned_url"].startswith("http")
    assert all(part["presigned_url"].startswith("http") for part in ended["results"])

    status = await asyncio.to_thread(as_json, "status", ended["name"])
    assert status["name"] == ended["name"]
    # The same parts; each call signs its URLs anew (the signature names the second it was made).
    assert [without_signature(part) for part in status["results"]] == [
        without_signature(part) for part in ended["results"]
    ]
    listed = await asyncio.to_thread(as_json, "list")
    assert {created["name"], ended["name"]} <= {job["name"] for job in listed["jobs"]}
    downloaded = await asyncio.to_thread(as_json, "download", ended["name"], str(tmp_path / "out"))
    assert downloaded["job"] == ended["name"]
    stored = [*ended["results"], *([ended["errors"]] if "errors" in ended else []), ended["manifest"]]
    assert sorted(Path(f).name for f in downloaded["files"]) == sorted(
        o["uri"].rsplit("/", 1)[1] for o in stored
    )
    assert all(await asyncio.to_thread(lambda: [Path(f).is_file() for f in downloaded["files"]]))
    cancelled = await asyncio.to_thread(as_json, "cancel", created["name"])
    assert cancelled["name"] == created["name"]


def test_the_progress_bar_shows_the_apis_estimate_of_the_time_left() -> None:
    running = pb.Job(state=pb.JOB_STATE_RUNNING)
    running.progress.eta.FromTimedelta(timedelta(hours=1, minutes=2, seconds=3.4))
    assert eta_text(running) == "eta 1:02:03"
    # No rows finished yet, so no pace: unknown, not zero.
    assert eta_text(pb.Job(state=pb.JOB_STATE_RUNNING)) == "eta -:--:--"
    assert eta_text(pb.Job(state=pb.JOB_STATE_SUCCEEDED)) == ""
