"""Verifier: tokens that verified are remembered, never past their expiry, never forged ones."""

from __future__ import annotations

import time

import jwt
import pytest

from edge.auth import LEEWAY_SECONDS, Principal, TokenError, Verifier, issue

SECRET = "unit-test-secret-0123456789abcdef"


def test_a_verified_token_is_remembered_until_it_expires() -> None:
    verifier = Verifier(SECRET)
    now = float(int(time.time()))  # tokens carry whole seconds
    token = issue(SECRET, "alice", "premium", ttl=60, now=now)
    assert verifier.verify(token, now) == Principal("alice", "premium")
    assert token in verifier._verified
    assert verifier.verify(token, now + 30) == Principal("alice", "premium")
    # Remembered or not, an expired token is refused (after the same leeway PyJWT allows).
    assert verifier.verify(token, now + 60 + LEEWAY_SECONDS) == Principal("alice", "premium")
    with pytest.raises(TokenError, match="expired"):
        verifier.verify(token, now + 61 + LEEWAY_SECONDS)
    assert token not in verifier._verified


def test_forged_and_expired_tokens_are_not_remembered() -> None:
    verifier = Verifier(SECRET)
    forged = issue("another-secret-0123456789abcdef0", "mallory", "hifi")
    for _ in range(2):
        with pytest.raises(TokenError, match="invalid token"):
            verifier.verify(forged)
    expired = issue(SECRET, "alice", "free", ttl=1, now=time.time() - 3600)
    with pytest.raises(TokenError, match="expired"):
        verifier.verify(expired)
    assert verifier._verified == {}


def test_a_remembered_token_is_the_exact_text() -> None:
    verifier = Verifier(SECRET)
    token = issue(SECRET, "alice", "hifi")
    verifier.verify(token)
    header, _payload, signature = token.split(".")
    tampered_claims = jwt.utils.base64url_encode(
        b'{"sub":"mallory","tier":"hifi","exp":9999999999}'
    )
    with pytest.raises(TokenError):
        verifier.verify(f"{header}.{tampered_claims.decode()}.{signature}")


def test_memory_is_bounded_oldest_first_out() -> None:
    verifier = Verifier(SECRET, cache_size=3)
    tokens = [issue(SECRET, f"u{i}", "free") for i in range(5)]
    for token in tokens:
        verifier.verify(token)
    assert list(verifier._verified) == tokens[2:]
    # A forgotten token still verifies: it is only decoded again.
    assert verifier.verify(tokens[0]) == Principal("u0", "free")
