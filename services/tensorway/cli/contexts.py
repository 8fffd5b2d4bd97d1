"""`tensorway config`: named contexts, each a mesh's Envoy (`https://HOST:PORT`), the CA that signed
its certificate and where the token comes from, in one YAML file:

    current-context: local
    contexts:
      local:                      # written by `tensorway dev up`
        endpoint: https://127.0.0.1:8080
        ca: /home/me/project/.tensorway/tls/ca.crt
        mint-token: {key: /home/me/project/.tensorway/jwt/jwt-private.pem, tenant: default,
                     admin: true, issuer: tensorway-local, audience: tensorway}
      prod:
        endpoint: https://mesh.example.com:443
        token-file: /home/me/.secrets/tensorway-token

The file is TENSORWAY_CONFIG, else `config.yaml` in the user's config directory (platformdirs; on
Linux $XDG_CONFIG_HOME/tensorway, by default ~/.config/tensorway). A token file is read on every
command, so whatever refreshes it is seen at once. The local stack's context holds no token: Envoy
caps tokens at 24 hours and a stack may run longer, so each command mints a short-lived one with
the stack's signing key, as `tensorway dev token --admin` would.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import grpc
import typer
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tensorway.cli.errors import usage_error
from tensorway.cli.output import OutputFormat, OutputOption, emit, key_column, print_table
from tensorway.edge.keys import mint_token
from tensorway.runtime.context import ADMIN_SCOPES, DEFAULT_TENANT, TENANT_SCOPES

CONFIG_ENV = "TENSORWAY_CONFIG"
CONTEXT_ENV = "TENSORWAY_CONTEXT"
LOCAL_CONTEXT = "local"
"""The context `tensorway dev up` writes for the local stack."""
MINTED_TOKEN_TTL = timedelta(hours=1)
"""Long enough for any one command (a batch job followed with --wait), far under Envoy's cap."""


class TokenMint(BaseModel):
    """Sign a fresh token on every command with a key this machine holds (the local stack's)."""

    model_config = ConfigDict(extra="forbid")

    key: Path
    """The private key, PEM."""
    tenant: str
    admin: bool = False
    """Adds the models.write scope (registry writes)."""
    issuer: str
    audience: str


class Context(BaseModel):
    """One mesh as the CLI reaches it: its Envoy over TLS, with a bearer token."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    endpoint: str
    """``https://HOST:PORT`` of Envoy's public listener."""
    ca: Path | None = None
    """The CA bundle that signed Envoy's certificate; none: the system's roots."""
    token_file: Path | None = Field(default=None, alias="token-file")
    """A file holding the token (a JWT), read on every command."""
    mint_token: TokenMint | None = Field(default=None, alias="mint-token")

    @property
    def address(self) -> str:
        """``HOST:PORT``, what a gRPC channel dials."""
        return urlsplit(self.endpoint).netloc

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca.read_bytes() if self.ca else None)

    def token(self) -> str | None:
        """The bearer token for one command; none when the context has no credentials."""
        if self.token_file is not None:
            try:
                return self.token_file.read_text().strip()
            except OSError as error:
                problem = escape(str(error))
                raise usage_error(f"[red]the context's token file is unreadable[/red]: {problem}") from None
        if self.mint_token is not None:
            mint = self.mint_token
            return mint_token(
                mint.key,
                tenant=mint.tenant,
                scopes=ADMIN_SCOPES if mint.admin else TENANT_SCOPES,
                issuer=mint.issuer,
                audience=mint.audience,
                ttl=MINTED_TOKEN_TTL,
            )
        return None

    def describe_token(self) -> str:
        if self.token_file is not None:
            return f"file {self.token_file}"
        if self.mint_token is not None:
            admin = ", admin" if self.mint_token.admin else ""
            return f"minted per command for tenant {self.mint_token.tenant}{admin}"
        return "none"


class ConfigFile(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    current_context: str = Field(default="", alias="current-context")
    contexts: dict[str, Context] = Field(default_factory=dict)


def config_path() -> Path:
    """TENSORWAY_CONFIG, else config.yaml in the user's config directory."""
    given = os.environ.get(CONFIG_ENV)
    if given:
        return Path(given).expanduser()
    try:
        import platformdirs
    except ImportError:  # pragma: no cover - platformdirs comes with the project's dependencies
        base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "tensorway"
    else:
        base = platformdirs.user_config_path("tensorway")
    return base / "config.yaml"


def load_config(path: Path | None = None) -> ConfigFile:
    """The config file; empty when there is none."""
    path = path or config_path()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        return ConfigFile.model_validate(raw)
    except FileNotFoundError:
        return ConfigFile()
    except (yaml.YAMLError, ValidationError) as error:
        where, problem = escape(str(path)), escape(str(error))
        raise usage_error(f"[red]the config file {where} is unreadable[/red]: {problem}") from None


def save_config(config: ConfigFile, path: Path | None = None) -> Path:
    """Write the config file atomically, readable by its owner only."""
    path = path or config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    document = config.model_dump(mode="json", by_alias=True, exclude_none=True)
    partial.write_text(yaml.safe_dump(document, sort_keys=False))
    partial.chmod(0o600)
    os.replace(partial, path)
    return path


@dataclass
class _Selection:
    name: str = ""


_selected = _Selection()


def select_context(name: str) -> None:
    """The context this command uses (the root `--context` option), over the file's current one."""
    _selected.name = name


def active_context() -> tuple[str, Context] | None:
    """The context in use: `--context`, TENSORWAY_CONTEXT, else the file's current context; none
    when no context is configured."""
    config = load_config()
    name = _selected.name or os.environ.get(CONTEXT_ENV, "") or config.current_context
    if not name:
        return None
    if name not in config.contexts:
        raise usage_error(
            f"[red]no context {escape(name)!r}[/red] in {escape(str(config_path()))}; "
            "see `tensorway config get-contexts`"
        )
    return name, config.contexts[name]


def save_local_context(envoy_url: str, ca: Path, signing_key: Path, *, issuer: str, audience: str) -> Path:
    """Write the local stack's context and make it the current one, as `tensorway dev up` does."""
    config = load_config()
    context = Context(endpoint=envoy_url, ca=ca.absolute())
    context.mint_token = TokenMint(
        key=signing_key.absolute(), tenant=DEFAULT_TENANT, admin=True, issuer=issuer, audience=audience
    )
    config.contexts[LOCAL_CONTEXT] = context
    config.current_context = LOCAL_CONTEXT
    return save_config(config)


def _endpoint(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname or parts.path not in ("", "/"):
        raise typer.BadParameter(f"{value!r} is not https://HOST:PORT", param_hint="--endpoint")
    netloc = parts.netloc if parts.port else f"{parts.netloc}:443"
    return f"https://{netloc}"


def _existing(path: Path, option: str) -> Path:
    path = path.expanduser().absolute()
    if not path.is_file():
        raise typer.BadParameter(f"{str(path)!r} is not a file", param_hint=option)
    return path


config_app = typer.Typer(
    name="config",
    help="Named contexts: which mesh (Envoy, CA, token) the commands talk to.",
    no_args_is_help=True,
)
_out = Console()
_err = Console(stderr=True, highlight=False)


@config_app.command("set-context")
def set_context_command(
    name: Annotated[str, typer.Argument(help="The context's name.")],
    endpoint: Annotated[str | None, typer.Option(help="Envoy's public address, https://HOST:PORT.")] = None,
    token_file: Annotated[
        Path | None, typer.Option("--token-file", help="A file holding the token, read on every command.")
    ] = None,
    ca: Annotated[
        Path | None, typer.Option(help="The CA that signed Envoy's certificate; default the system's.")
    ] = None,
) -> None:
    """Create a context, or change the fields given of an existing one."""
    config = load_config()
    existing = config.contexts.get(name)
    if existing is None and endpoint is None:
        raise typer.BadParameter("a new context needs an endpoint", param_hint="--endpoint")
    context = existing.model_copy() if existing is not None else Context(endpoint=_endpoint(endpoint or ""))
    if endpoint is not None:
        context.endpoint = _endpoint(endpoint)
    if ca is not None:
        context.ca = _existing(ca, "--ca")
    if token_file is not None:
        context.token_file, context.mint_token = _existing(token_file, "--token-file"), None
    config.contexts[name] = context
    path = save_config(config)
    _err.print(f"context {escape(name)} saved in {escape(str(path))}")


@config_app.command("use-context")
def use_context_command(name: Annotated[str, typer.Argument(help="The context's name.")]) -> None:
    """Make a context the current one."""
    config = load_config()
    if name not in config.contexts:
        raise usage_error(f"[red]no context {escape(name)!r}[/red]; see `tensorway config get-contexts`")
    config.current_context = name
    save_config(config)
    _err.print(f"switched to context {escape(name)}")


@config_app.command("current-context")
def current_context_command() -> None:
    """Print the current context's name."""
    current = load_config().current_context
    if not current:
        raise usage_error("no current context: `tensorway config use-context NAME` or `tensorway dev up`")
    typer.echo(current)


@config_app.command("delete-context")
def delete_context_command(name: Annotated[str, typer.Argument(help="The context's name.")]) -> None:
    """Remove a context (and unset it if it is the current one)."""
    config = load_config()
    if config.contexts.pop(name, None) is None:
        raise usage_error(f"[red]no context {escape(name)!r}[/red]")
    if config.current_context == name:
        config.current_context = ""
    save_config(config)
    _err.print(f"deleted context {escape(name)}")


@config_app.command("get-contexts")
def get_contexts_command(output: OutputOption = OutputFormat.TABLE) -> None:
    """List the contexts; the current one is marked with *."""
    config = load_config()

    def table() -> None:
        rows = Table("current", key_column("name"), key_column("endpoint"), key_column("ca"), "token")
        for name, context in config.contexts.items():
            rows.add_row(
                "*" if name == config.current_context else "",
                escape(name),
                escape(context.endpoint),
                escape(str(context.ca or "system roots")),
                escape(context.describe_token()),
            )
        print_table(_out, rows)

    emit(output, config.model_dump(mode="json", by_alias=True, exclude_none=True), table)
