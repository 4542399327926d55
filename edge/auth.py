"""Player tokens (JWT, PyJWT) -> `Principal(user_id, tier)`.

A token comes from `Authorization: Bearer`, `?token=` (for `<audio src>`) or the `edge_token`
cookie; claims `sub`, `tier` (free | premium | hifi) and `exp`. HS256 with EDGE_JWT_SECRET, or
RS256/ES256 with EDGE_JWT_PUBLIC_KEY; the accepted algorithms are fixed by the key, never taken
from the token. Anonymous listeners are tier free, where that is allowed.
"""

from __future__ import annotations

import os
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from edge.errors import ApiError
from edge.logs import TIER, USER_ID

Tier = Literal["free", "premium", "hifi"]
TIERS: tuple[Tier, ...] = ("free", "premium", "hifi")
COOKIE = "edge_token"
MAX_TOKEN_CHARS = 4096


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str
    tier: Tier
    anonymous: bool = False


class TokenError(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(401, "invalid_token", message)


LEEWAY_SECONDS = 5
VERIFIED_CACHE_SIZE = 10_000


class Verifier:
    """Checks player tokens. A player sends the same token with every request for as long as
    it lives, so a token that verified is remembered (by its exact text, with its expiry) and
    not decoded and signature-checked again: that was a seventh of a /play request's CPU. The
    memory is bounded (oldest first out); expiry is checked on every use."""

    def __init__(
        self, secret: str = "", public_key: str = "", cache_size: int = VERIFIED_CACHE_SIZE
    ) -> None:
        self._verified: OrderedDict[str, tuple[Principal, float]] = OrderedDict()
        self._cache_size = cache_size
        self.key: Any
        if public_key:
            # The key's own type fixes the one algorithm accepted (no key confusion).
            try:
                self.key = serialization.load_pem_public_key(public_key.encode())
            except ValueError:
                raise ValueError("EDGE_JWT_PUBLIC_KEY is not a PEM public key") from None
            if isinstance(self.key, rsa.RSAPublicKey):
                self.algorithms = ["RS256"]
            elif isinstance(self.key, ec.EllipticCurvePublicKey):
                self.algorithms = ["ES256"]
            else:
                raise ValueError("EDGE_JWT_PUBLIC_KEY must be an RSA or EC (P-256) key")
        elif secret:
            self.key = secret
            self.algorithms = ["HS256"]
        else:
            self.key = ""
            self.algorithms = []

    def verify(self, token: str, now: float | None = None) -> Principal:
        known = self._verified.get(token)
        if known is not None:
            who, expires = known
            if (time.time() if now is None else now) <= expires + LEEWAY_SECONDS:
                return who
            del self._verified[token]
            raise TokenError("token expired")
        who, expires = self._decode(token)
        if len(self._verified) >= self._cache_size:
            self._verified.popitem(last=False)
        self._verified[token] = (who, expires)
        return who

    def _decode(self, token: str) -> tuple[Principal, float]:
        if not self.algorithms:
            raise TokenError("this edge accepts no tokens (no EDGE_JWT_SECRET or public key)")
        try:
            claims = jwt.decode(
                token,
                self.key,
                algorithms=self.algorithms,
                options={"require": ["sub", "exp"]},
                leeway=LEEWAY_SECONDS,
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("token expired") from None
        except jwt.InvalidAlgorithmError:
            raise TokenError("token algorithm not accepted") from None
        except jwt.PyJWTError as exc:  # InvalidTokenError, InvalidKeyError, ...
            raise TokenError(f"invalid token: {exc}") from None
        sub, tier = claims.get("sub"), claims.get("tier", "free")
        if not isinstance(sub, str) or not 0 < len(sub) <= 128:
            raise TokenError("invalid token: sub must be a non-empty string")
        if tier not in TIERS:
            raise TokenError("invalid token: tier must be free, premium or hifi")
        return Principal(sub, cast(Tier, tier)), float(claims["exp"])


def token_from(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise TokenError("Authorization must be 'Bearer <token>'")
        token = value.strip()
    else:
        token = request.query.get("token") or request.cookies.get(COOKIE) or ""
    if not token:
        return None
    if len(token) > MAX_TOKEN_CHARS:
        raise TokenError("token too long")
    return token


def principal(request: web.Request, verifier: Verifier, allow_anonymous: bool) -> Principal:
    token = token_from(request)
    if token is not None:
        who = verifier.verify(token)
    elif allow_anonymous:
        # Anonymous listeners share limits per client address.
        who = Principal(f"anon:{request.remote or 'unknown'}", "free", anonymous=True)
    else:
        raise ApiError(401, "token_required", "a player token is required")
    # The request's log lines (the access line too) say who asked; never the token.
    USER_ID.set(who.user_id)
    TIER.set(who.tier)
    return who


def issue(secret: str, user_id: str, tier: Tier, ttl: int = 3600, now: float | None = None) -> str:
    issued = int(time.time() if now is None else now)
    claims = {"sub": user_id, "tier": tier, "iat": issued, "exp": issued + ttl}
    return jwt.encode(claims, secret, algorithm="HS256")


def local_secret(data_dir: Path, name: str) -> str:
    """A secret kept under the data dir (0600), made on first use: the zero-config default's
    token and media keys, stable across restarts and shared with `edge token`."""
    path = data_dir / "secrets" / name
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    value = secrets.token_hex(32)
    tmp = path.with_name(f".{name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
    try:
        # link() fails if another process made it first: then theirs is the one.
        os.link(tmp, path)
    except FileExistsError:
        value = path.read_text().strip()
    finally:
        os.unlink(tmp)
    return value
