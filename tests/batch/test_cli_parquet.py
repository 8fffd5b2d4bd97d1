"""`tensorway batch submit data.parquet --model digits --wait`: the file goes up through the
presigned URL, and the job's Parquet parts download with their sums checked."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from minio import Minio
from typer.testing import CliRunner

from tensorway.cli.main import app

from .conftest import BUCKET, digits_rows


async def test_submit_a_parquet_file_and_download_parquet_parts(
    batch_api: str, s3: Minio, tmp_path: Path
) -> None:
    rows = digits_rows(500, seed=31)
    source = tmp_path / "data.parquet"
    table = pa.table(
        {
            "key": [f"k{i}" for i in range(len(rows))],
            "image": pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), 64),
        }
    )
    pq.write_table(table, source, row_group_size=100)
    common = ["batch", "--api", batch_api, "--tenant", "cli-parquet"]

    def run(*args: str) -> str:
        # The API runs on this test's event loop, so the synchronous CLI runs in a thread.
        result = CliRunner().invoke(app, [*common, *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.stdout

    submitted = await asyncio.to_thread(
        run,
        "submit",
        str(source),
        "--model",
        "digits",
        "--shard-size",
        "200",
        "--column",
        "input=image",
        "--id-column",
        "key",
        "--wait",
    )
    name = submitted.split()[0]
    assert "SUCCEEDED" in submitted
    uploaded = [o.object_name for o in s3.list_objects(BUCKET, prefix="uploads/cli-parquet/", recursive=True)]
    assert any(key.endswith("/data.parquet") for key in uploaded), uploaded

    await asyncio.to_thread(run, "download", name, str(tmp_path / "out"))
    parts = sorted((tmp_path / "out").glob("part-*.parquet"))
    # Row groups of 100 gathered into shards of up to 200 rows.
    assert len(parts) == 3
    results = pa.concat_tables([pq.read_table(part) for part in parts])
    assert results.column("key").to_pylist() == [f"k{i}" for i in range(len(rows))]
    assert results.column("error").null_count == len(rows)
