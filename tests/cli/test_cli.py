"""The CLI's own parts, without servers: the config file and its contexts, exit codes, and tables
that never cut a value."""

from __future__ import annotations

import io
import json
from pathlib import Path

import grpc
import jwt
import pytest
import yaml
from rich.console import Console
from rich.table import Table
from typer.testing import CliRunner

from tensorway.cli import contexts
from tensorway.cli.dev import _endpoint_table
from tensorway.cli.errors import ExitCode, exit_code
from tensorway.cli.main import app
from tensorway.cli.output import key_column, print_table
from tensorway.devstack import ComponentRecord, Endpoint, StackState
from tensorway.edge.keys import ensure_key_pair
from tensorway.edge.tls import ensure_local_certificates

LONG_URL = "https://edge.tensorway.example.com:8443/v1/models/digits/versions/12345678901234567890"


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "config.yaml"
    monkeypatch.setenv("TENSORWAY_CONFIG", str(path))
    monkeypatch.delenv("TENSORWAY_CONTEXT", raising=False)
    return path


def test_the_config_file_is_in_the_users_config_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("TENSORWAY_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert contexts.config_path() == tmp_path / "tensorway" / "config.yaml"
    monkeypatch.setenv("TENSORWAY_CONFIG", str(tmp_path / "elsewhere.yaml"))
    assert contexts.config_path() == tmp_path / "elsewhere.yaml"


def test_set_use_and_delete_contexts(config: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    token = tmp_path / "token"
    token.write_text("a.b.c\n")
    made = runner.invoke(
        app,
        [
            "config",
            "set-context",
            "prod",
            "--endpoint",
            "https://mesh.example.com",
            "--token-file",
            str(token),
        ],
    )
    assert made.exit_code == 0, made.output
    # A context is not current until it is chosen.
    assert runner.invoke(app, ["config", "current-context"]).exit_code == 2
    assert runner.invoke(app, ["config", "use-context", "prod"]).exit_code == 0
    assert runner.invoke(app, ["config", "current-context"]).stdout == "prod\n"
    saved = yaml.safe_load(config.read_text())
    assert saved == {
        "current-context": "prod",
        "contexts": {"prod": {"endpoint": "https://mesh.example.com:443", "token-file": str(token)}},
    }
    assert config.stat().st_mode & 0o077 == 0
    name, context = contexts.active_context() or ("", None)
    assert name == "prod"
    assert context is not None
    assert context.address == "mesh.example.com:443"
    assert context.token() == "a.b.c"  # read on use, without its newline

    # Changing one field keeps the others.
    assert (
        runner.invoke(app, ["config", "set-context", "prod", "--endpoint", "https://other:9443"]).exit_code
        == 0
    )
    assert yaml.safe_load(config.read_text())["contexts"]["prod"]["token-file"] == str(token)

    refused = runner.invoke(app, ["config", "set-context", "plain", "--endpoint", "http://mesh:80"])
    assert refused.exit_code == 2
    assert runner.invoke(app, ["config", "use-context", "absent"]).exit_code == 2
    assert runner.invoke(app, ["config", "delete-context", "prod"]).exit_code == 0
    assert json.loads(runner.invoke(app, ["config", "get-contexts", "-o", "json"]).stdout) == {
        "current-context": "",
        "contexts": {},
    }


def test_the_local_context_mints_an_admin_token_per_command(config: Path, tmp_path: Path) -> None:
    key = ensure_key_pair(tmp_path / "jwt").private_key
    ca = ensure_local_certificates(tmp_path / "tls").ca
    contexts.save_local_context(
        "https://127.0.0.1:8080", ca, key, issuer="tensorway-local", audience="tensorway"
    )
    active = contexts.active_context()
    assert active is not None
    name, context = active
    assert name == contexts.LOCAL_CONTEXT
    assert context.token_file is None
    token = context.token()
    assert token is not None
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["tenant"] == "default"
    assert "models.write" in claims["scope"].split()
    assert claims["exp"] - claims["iat"] <= 24 * 3600
    assert context.credentials() is not None


def test_exit_codes_tell_client_errors_from_unavailability() -> None:
    assert exit_code(grpc.StatusCode.INVALID_ARGUMENT) == ExitCode.CLIENT_ERROR == 2
    assert exit_code(grpc.StatusCode.NOT_FOUND) == 2
    assert exit_code(grpc.StatusCode.PERMISSION_DENIED) == 2
    assert exit_code(grpc.StatusCode.UNAVAILABLE) == ExitCode.UNAVAILABLE == 3
    assert exit_code(grpc.StatusCode.DEADLINE_EXCEEDED) == 3
    assert exit_code(grpc.StatusCode.RESOURCE_EXHAUSTED) == 3
    assert exit_code(grpc.StatusCode.INTERNAL) == ExitCode.FAILED == 1
    assert "Exit codes" in CliRunner().invoke(app, ["--help"]).stdout


def _printed(*, terminal: bool, width: int) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, force_terminal=terminal, color_system=None)
    table = Table(key_column("name"), key_column("url"), "note")
    table.add_row("jobs/0123456789abcdef", LONG_URL, "words that may wrap at will")
    print_table(console, table)
    return buffer.getvalue()


@pytest.mark.parametrize("terminal", [True, False])
def test_tables_never_cut_an_id_or_a_url(terminal: bool) -> None:
    printed = _printed(terminal=terminal, width=60)
    assert LONG_URL in printed
    assert "jobs/0123456789abcdef" in printed
    assert "…" not in printed
    if not terminal:  # into a file: every value whole, nothing wrapped
        assert "words that may wrap at will" in printed


def test_the_endpoint_table_keeps_urls_on_one_line() -> None:
    state = StackState(
        components={
            "envoy": ComponentRecord(
                pid=1, start_ticks=1, log="envoy.log",
                endpoints={"envoy": Endpoint(address="127.0.0.1:8443", url=LONG_URL)},
            )
        }
    )  # fmt: skip
    buffer = io.StringIO()
    print_table(
        Console(file=buffer, width=80, force_terminal=True, color_system=None), _endpoint_table(state)
    )
    assert LONG_URL in buffer.getvalue()
