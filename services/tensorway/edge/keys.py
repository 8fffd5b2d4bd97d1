"""RS256 signing keys for the edge: a key pair, its JWKS for Envoy, and tokens signed with it."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from tensorway.runtime.context import TENANT_SCOPES, Scope

PRIVATE_KEY_FILE = "jwt-private.pem"
JWKS_FILE = "jwks.json"
KEY_ID = "tensorway-local"
TENANT_CLAIM = "tenant"
SCOPE_CLAIM = "scope"


@dataclass(frozen=True)
class SigningKey:
    """Where a key pair lives: the private key (PEM, owner-only) and the public JWKS."""

    private_key: Path
    jwks: Path


def ensure_key_pair(directory: Path) -> SigningKey:
    """The key pair in ``directory``, generated on first use and kept after.

    Keeping it means tokens minted before a restart of the stack stay valid.
    """
    key = SigningKey(directory / PRIVATE_KEY_FILE, directory / JWKS_FILE)
    if key.private_key.exists() and key.jwks.exists():
        return key
    directory.mkdir(parents=True, exist_ok=True)
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    descriptor = os.open(key.private_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as out:
        out.write(pem)
    public: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(private.public_key()))
    public.update(kid=KEY_ID, alg="RS256", use="sig")
    key.jwks.write_text(json.dumps({"keys": [public]}, indent=2) + "\n")
    return key


def mint_token(
    private_key: Path,
    *,
    tenant: str,
    issuer: str,
    audience: str,
    scopes: Iterable[Scope] = TENANT_SCOPES,
    ttl: timedelta = timedelta(hours=12),
    subject: str | None = None,
) -> str:
    """An RS256 token Envoy's JWT filter accepts, carrying the tenant and its scopes."""
    now = int(time.time())
    claims = {
        "iss": issuer,
        "aud": audience,
        "sub": subject or f"{tenant}-developer",
        TENANT_CLAIM: tenant,
        SCOPE_CLAIM: " ".join(scope.value for scope in scopes),
        "iat": now,
        "exp": now + int(ttl.total_seconds()),
    }
    return jwt.encode(claims, private_key.read_bytes(), algorithm="RS256", headers={"kid": KEY_ID})
