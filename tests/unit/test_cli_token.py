"""`edge token`: the token it prints is one `edge serve` with the same settings accepts (the same
Verifier), and where that Edge could accept none it says why and prints nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edge.auth import TokenError, Verifier, local_secret

SECRET = "cli-token-secret-0123456789abcdef"


def edge_token(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The real command, in a process of its own, with only these settings."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("EDGE_", "DB_", "CDN_", "CLOUDFRONT_"))
    }
    clean.pop("DATABASE_URL", None)
    clean.pop("REDIS_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "edge", "token", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_token_signed_with_the_secret_is_accepted(tmp_path: Path) -> None:
    env = {
        "EDGE_JWT_SECRET": SECRET,
        "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "EDGE_DATA_DIR": str(tmp_path),
    }
    done = edge_token(env, "--user", "u42", "--tier", "hifi", "--ttl", "120")
    assert done.returncode == 0, done.stderr
    who = Verifier(SECRET).verify(done.stdout.strip())
    assert (who.user_id, who.tier) == ("u42", "hifi")
    with pytest.raises(TokenError, match="invalid token"):
        Verifier("another-secret-0123456789abcdef-0").verify(done.stdout.strip())


def test_the_zero_config_default_signs_with_its_own_key(tmp_path: Path) -> None:
    done = edge_token({"EDGE_DATA_DIR": str(tmp_path)}, "--user", "me", "--tier", "free")
    assert done.returncode == 0, done.stderr
    # The key edge serve makes and uses under the same data dir.
    who = Verifier(local_secret(tmp_path, "jwt")).verify(done.stdout.strip())
    assert (who.user_id, who.tier) == ("me", "free")


def test_an_edge_that_only_verifies_or_accepts_no_tokens_prints_none(tmp_path: Path) -> None:
    public = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    real = {
        "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "EDGE_DATA_DIR": str(tmp_path),
    }
    for env, why in (
        ({**real, "EDGE_JWT_PUBLIC_KEY": public}, "EDGE_JWT_PUBLIC_KEY is set"),
        ({**real, "EDGE_JWT_PUBLIC_KEY": public, "EDGE_JWT_SECRET": SECRET}, "EDGE_JWT_PUBLIC_KEY"),
        (real, "no EDGE_JWT_SECRET"),
    ):
        done = edge_token(env, "--user", "u", "--tier", "premium")
        assert done.returncode == 2, done
        assert done.stdout == ""
        assert why in done.stderr
    assert not (tmp_path / "secrets").exists()  # no key of its own was made
