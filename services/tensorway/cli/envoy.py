"""`tensorway envoy render`: write an Envoy config and the files it reads for a profile;
`tensorway envoy keys`: a signing key pair and its JWKS; `tensorway envoy certs`: a CA and a
certificate for Envoy; and `tensorway dev token`: a signed token for the local stack's Envoy."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tensorway.devstack import DevStackSettings
from tensorway.devstack._envoy import jwt_key_dir
from tensorway.edge.config import UnknownProfileError, load_values, profiles, render_profile
from tensorway.edge.keys import PRIVATE_KEY_FILE, ensure_key_pair, mint_token
from tensorway.edge.tls import ensure_local_certificates
from tensorway.runtime.context import ADMIN_SCOPES, TENANT_SCOPES

envoy_app = typer.Typer(
    name="envoy",
    help="The edge: render Envoy's config for a profile (local, compose, k8s).",
    no_args_is_help=True,
)
_err = Console(stderr=True)


@envoy_app.command("render")
def render_command(
    profile: Annotated[str, typer.Option(help=f"Values file under envoy/values: {', '.join(profiles())}.")],
    out: Annotated[
        Path | None,
        typer.Option(help="Directory for envoy.yaml and its files; default .build/envoy/<profile>."),
    ] = None,
) -> None:
    """Write envoy.yaml, the descriptor set, the OpenAPI document and the docs page.

    A profile that reads its files from a mount (compose, k8s) expects this directory there.
    """
    target = out or Path(".build") / "envoy" / profile
    try:
        config = render_profile(profile, target)
    except UnknownProfileError as error:
        _err.print(f"[red]{error}[/red]; profiles: {', '.join(profiles())}")
        raise typer.Exit(2) from None
    typer.echo(str(config))


@envoy_app.command("keys")
def keys_command(
    out: Annotated[Path, typer.Option(help="Directory for jwt-private.pem and jwks.json.")],
) -> None:
    """Make a token signing key pair in OUT (kept if it exists) and print the JWKS's path.

    For a deployment without an identity provider, e.g. docker-compose's `jwt-keys` volume:
    Envoy reads the JWKS, `tensorway dev token --key OUT/jwt-private.pem` signs tokens.
    """
    typer.echo(str(ensure_key_pair(out).jwks))


@envoy_app.command("certs")
def certs_command(
    out: Annotated[Path, typer.Option(help="Directory for ca.crt, server.crt and server.key.")],
) -> None:
    """Make a CA and a certificate it signed for localhost in OUT (kept if they exist) and print
    the CA's path, which clients trust.

    For a deployment without certificates of its own, e.g. docker-compose's `edge-tls` volume;
    Kubernetes takes them from the `envoy-tls` Secret instead.
    """
    typer.echo(str(ensure_local_certificates(out).ca))


def token_command(
    tenant: Annotated[str, typer.Option(help="The tenant the token speaks for.")] = "default",
    admin: Annotated[
        bool,
        typer.Option("--admin", help="Also allow registry writes (models.write)."),
    ] = False,
    hours: Annotated[float, typer.Option(help="How long the token is valid (Envoy caps it at 24).")] = 12.0,
    key: Annotated[
        Path | None,
        typer.Option(
            help="Private key to sign with; default the local stack's (made by `tensorway dev up`)."
        ),
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            "--state-dir", help="State dir of the stack; default TENSORWAY_DEV_STATE_DIR or .tensorway."
        ),
    ] = None,
) -> None:
    """Print a token for the local stack's Envoy: `-H "authorization: Bearer $(tensorway dev token)"`.

    A tenant token may infer, run batch jobs and read the registry; `--admin` adds registry writes.
    """
    settings = DevStackSettings()
    private_key = key or jwt_key_dir(state_dir or settings.state_dir) / PRIVATE_KEY_FILE
    if not private_key.exists():
        _err.print(f"[red]no signing key at {private_key}[/red]; start Envoy first: tensorway dev up envoy")
        raise typer.Exit(1)
    jwt = load_values(settings.envoy_profile)["jwt"]
    typer.echo(
        mint_token(
            private_key,
            tenant=tenant,
            scopes=ADMIN_SCOPES if admin else TENANT_SCOPES,
            issuer=jwt["issuer"],
            audience=jwt["audiences"][0],
            ttl=timedelta(hours=hours),
        )
    )
