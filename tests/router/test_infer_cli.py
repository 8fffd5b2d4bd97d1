"""`tensorway infer` against a running router."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from tensorway.cli.main import app
from tests.router.conftest import MeshFactory


async def test_infer_prints_the_outputs(mesh: MeshFactory, tmp_path: Path) -> None:
    running = await mesh(real=True)
    second = tmp_path / "b.npy"
    np.save(second, np.full(16, 2, dtype=np.int32))
    arguments = ["infer", "simple", "--router", running.router.address]
    arguments += ["-i", f"INPUT0={json.dumps(list(range(16)))}", "-i", f"INPUT1={second}"]
    # In a thread: the router serves on this test's event loop.
    result = await asyncio.to_thread(CliRunner().invoke, app, arguments)
    assert result.exit_code == 0, result.output
    assert "OUTPUT0" in result.output
    assert "[[ 2  3  4" in result.output  # 0..15 + 2
    assert "[[-2 -1  0" in result.output  # 0..15 - 2


async def test_infer_prints_protobuf_json(mesh: MeshFactory) -> None:
    running = await mesh(real=True)
    arguments = ["infer", "simple", "--router", running.router.address, "-o", "json"]
    arguments += ["-i", f"INPUT0={json.dumps([list(range(16))])}", "-i", f"INPUT1={json.dumps([[1] * 16])}"]
    result = await asyncio.to_thread(CliRunner().invoke, app, arguments)
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    outputs = {tensor["name"]: tensor for tensor in answer["outputs"]}
    # Typed contents, so a script reads numbers, not base64.
    assert outputs["OUTPUT0"]["contents"]["int_contents"] == [i + 1 for i in range(16)]
    assert outputs["OUTPUT1"]["contents"]["int_contents"] == [i - 1 for i in range(16)]
    assert outputs["OUTPUT0"]["shape"] == ["1", "16"]


async def test_infer_reports_errors(mesh: MeshFactory) -> None:
    running = await mesh(real=True)
    result = await asyncio.to_thread(
        CliRunner().invoke, app, ["infer", "nope", "-i", "x=[1]", "--router", running.router.address]
    )
    assert result.exit_code == 2  # a client error
    assert "NOT_FOUND" in result.stderr
