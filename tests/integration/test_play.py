"""`GET /play` against a real PostgreSQL, Redis and the local media origin: player tokens,
streaming sessions and stream limits, the quality choice over HTTP, signed redirects (local and
CloudFront, checked with the public key), preload hints, play counting and the batched flush,
and recommendations built from plays."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

import jwt
import pytest
import redis.asyncio as aioredis
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from edge import keys
from edge import sessions as sessions_module
from edge.auth import issue
from edge.jobs import flush_plays
from edge.sessions import active_key
from edge.settings import Secret
from tests.conftest import JWT_SECRET, bearer, sample, token

Client = Any
MakeClient = Any

# Indexes into each track's rendition files (the ingest ladder order).
LADDER = {
    ("mp3", 128): 0,
    ("mp3", 192): 1,
    ("mp3", 320): 2,
    ("aac", 96): 3,
    ("aac", 160): 4,
    ("aac", 256): 5,
    ("flac", 0): 6,
}


# -- helpers ------------------------------------------------------------------------------------


def rendition(playable: dict[str, Any], track: str, fmt: str, bitrate: int = 0) -> Any:
    return playable["files"][track][LADDER[(fmt, bitrate)]]


def file_bytes(playable: dict[str, Any], track: str, fmt: str, bitrate: int = 0) -> bytes:
    return bytes(rendition(playable, track, fmt, bitrate).path.read_bytes())


async def play(
    client: Client,
    track_id: int,
    *,
    user: str = "alice",
    tier: str = "premium",
    headers: dict[str, str] | None = None,
    auth: bool = True,
    **params: Any,
) -> Any:
    """GET /play (redirects not followed); the body is read, so the response is complete."""
    sent = {**(bearer(user, tier) if auth else {}), **(headers or {})}
    resp = await client.get(f"/play/{track_id}", params=params, headers=sent, allow_redirects=False)
    await resp.read()
    return resp


async def post_events(
    client: Client, events: list[dict[str, Any]], user: str = "alice", tier: str = "premium"
) -> Any:
    resp = await client.post("/api/v1/events", json=events, headers=bearer(user, tier))
    await resp.read()
    return resp


async def drain(client: Client) -> None:
    """What /play does after its answer: the background work, and the session writes it
    queued (choices, transfers)."""
    await client.app[keys.BACKGROUND].drain()
    await client.app[keys.SESSIONS].drain()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_jwt(
    header: dict[str, Any], claims: dict[str, Any], sign: Callable[[bytes], bytes] | None
) -> str:
    """A JWT built by hand, so any header (alg none, HS512 with a short key, HS256 with a PEM)
    can be made without PyJWT's safety checks getting in the way."""
    signing_input = ".".join(
        b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
    )
    signature = b64url(sign(signing_input.encode())) if sign is not None else ""
    return f"{signing_input}.{signature}"


def hs(secret: str | bytes, digest: Any = hashlib.sha256) -> Callable[[bytes], bytes]:
    key = secret.encode() if isinstance(secret, str) else secret
    return lambda message: hmac.new(key, message, digest).digest()


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "alice", "tier": "premium", "iat": now, "exp": now + 3600, **extra}


async def error_of(resp: Any) -> dict[str, str]:
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["message"]
    return dict(body["error"])


def public_pem(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def private_pem(key: rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def session_key(prefix: str, sid: str) -> str:
    return f"{prefix}streaming:session:{sid}"


async def session_hash(redis: aioredis.Redis, prefix: str, sid: str) -> dict[str, str]:
    raw: dict[Any, Any] = dict(await redis.hgetall(session_key(prefix, sid)))
    return {bytes(k).decode(): bytes(v).decode() for k, v in raw.items()}


async def queued_plays(redis: aioredis.Redis, prefix: str) -> list[dict[str, Any]]:
    return [json.loads(r) for r in await redis.lrange(f"{prefix}plays:queue", 0, -1)]


SID_A = "sessionAAAAAAAAAAAAAAA"
SID_B = "sessionBBBBBBBBBBBBBBBB"
SID_C = "sessionCCCCCCCCCCCCCCCC"
SID_D = "sessionDDDDDDDDDDDDDDDD"


# -- who is asking ------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["bearer", "query", "cookie"])
async def test_token_sources(make_client: MakeClient, playable: dict[str, Any], where: str) -> None:
    client = await make_client()
    tok = token("alice", "hifi")
    headers: dict[str, str] = {}
    params: dict[str, str] = {"format": "flac"}
    if where == "bearer":
        headers["Authorization"] = f"Bearer {tok}"
    elif where == "query":
        params["token"] = tok
    else:
        headers["Cookie"] = f"edge_token={tok}"
    resp = await play(client, playable["tracks"]["hells"], headers=headers, auth=False, **params)
    assert resp.status == 302
    # The tier came from the token: only hifi gets flac.
    assert resp.headers["X-Stream-Format"] == "flac"
    assert resp.headers["X-Stream-Session"]


async def test_session_replies_are_read_from_hiredis_directly(
    make_client: MakeClient, playable: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Edge's Redis client speaks RESP2, so /play's session batches read their replies straight
    from hiredis (sessions._read_replies), and the session they answer is the right one."""
    client = await make_client()
    app = client.app
    assert app is not None
    reads = 0
    real = sessions_module._read_replies

    async def counted(*args: Any) -> None:
        nonlocal reads
        reads += 1
        await real(*args)

    monkeypatch.setattr(sessions_module, "_read_replies", counted)
    first = await play(client, playable["tracks"]["hells"], user="resp2")
    again = await play(client, playable["tracks"]["hells"], user="resp2")
    assert first.status == again.status == 302
    assert again.headers["X-Stream-Session"] == first.headers["X-Stream-Session"]
    assert reads >= 2
    connection = await app[keys.REDIS].connection_pool.get_connection()
    try:
        assert connection.protocol == 2
    finally:
        await app[keys.REDIS].connection_pool.release(connection)


async def test_missing_token_is_401(make_client: MakeClient, playable: dict[str, Any]) -> None:
    client = await make_client()
    resp = await play(client, playable["tracks"]["hells"], auth=False)
    assert resp.status == 401
    assert (await error_of(resp))["code"] == "token_required"


def _bad_tokens() -> dict[str, Callable[[rsa.RSAPrivateKey], str]]:
    other = "another-secret-that-is-not-edges-0123456789"
    return {
        "forged": lambda k: raw_jwt({"alg": "HS256", "typ": "JWT"}, claims(), hs(other)),
        "expired": lambda k: issue(JWT_SECRET, "alice", "premium", 3600, now=time.time() - 7200),
        "alg_none": lambda k: raw_jwt({"alg": "none", "typ": "JWT"}, claims(), None),
        "alg_none_signed": lambda k: raw_jwt({"alg": "none"}, claims(), hs(JWT_SECRET)),
        "hs512_same_secret": lambda k: raw_jwt(
            {"alg": "HS512", "typ": "JWT"}, claims(), hs(JWT_SECRET, hashlib.sha512)
        ),
        "rs256": lambda k: jwt.encode(claims(), k, algorithm="RS256"),
        "bad_tier": lambda k: raw_jwt({"alg": "HS256"}, claims(tier="platinum"), hs(JWT_SECRET)),
        "tier_not_a_string": lambda k: raw_jwt(
            {"alg": "HS256"}, claims(tier=["hifi"]), hs(JWT_SECRET)
        ),
        "no_sub": lambda k: raw_jwt(
            {"alg": "HS256"}, {"tier": "free", "exp": int(time.time()) + 60}, hs(JWT_SECRET)
        ),
        "empty_sub": lambda k: raw_jwt({"alg": "HS256"}, claims(sub=""), hs(JWT_SECRET)),
        "no_exp": lambda k: raw_jwt(
            {"alg": "HS256"}, {"sub": "alice", "tier": "free"}, hs(JWT_SECRET)
        ),
        "garbage": lambda k: "garbage",
        "three_garbage_parts": lambda k: "a.b.c",
        "payload_not_json": lambda k: "eyJhbGciOiJIUzI1NiJ9.bm90IGpzb24." + b64url(b"x" * 32),
    }


@pytest.mark.parametrize("kind", sorted(_bad_tokens()))
async def test_bad_tokens_are_401_json(
    make_client: MakeClient, playable: dict[str, Any], rsa_key: rsa.RSAPrivateKey, kind: str
) -> None:
    client = await make_client()
    bad = _bad_tokens()[kind](rsa_key)
    for headers, params in (
        ({"Authorization": f"Bearer {bad}"}, {}),
        ({}, {"token": bad}),
        ({"Cookie": f"edge_token={bad}"}, {}),
    ):
        resp = await play(
            client, playable["tracks"]["hells"], headers=headers, auth=False, **params
        )
        assert resp.status == 401, (kind, headers, params)
        assert (await error_of(resp))["code"] == "invalid_token"
        assert "X-Stream-Session" not in resp.headers


async def test_authorization_must_be_bearer(
    make_client: MakeClient, playable: dict[str, Any]
) -> None:
    client = await make_client(allow_anonymous=True)
    for value in (f"Basic {token()}", "Bearer ", "Bearer"):
        resp = await play(
            client, playable["tracks"]["hells"], headers={"Authorization": value}, auth=False
        )
        assert resp.status == 401, value
        assert (await error_of(resp))["code"] == "invalid_token"


async def test_public_key_mode_rs256_works_and_key_confusion_is_refused(
    make_client: MakeClient, playable: dict[str, Any], rsa_key: rsa.RSAPrivateKey
) -> None:
    pem = public_pem(rsa_key)
    client = await make_client(jwt_public_key=pem)
    track = playable["tracks"]["hells"]

    good = jwt.encode(claims(sub="rsa-user", tier="hifi"), rsa_key, algorithm="RS256")
    resp = await play(
        client, track, headers={"Authorization": f"Bearer {good}"}, auth=False, format="flac"
    )
    assert resp.status == 302
    assert resp.headers["X-Stream-Format"] == "flac"

    # The classic confusion: an HS256 token whose HMAC key is the public key's PEM text.
    for key_text in (pem, pem.strip(), pem.encode()):
        confused = raw_jwt({"alg": "HS256", "typ": "JWT"}, claims(tier="hifi"), hs(key_text))
        resp = await play(
            client, track, headers={"Authorization": f"Bearer {confused}"}, auth=False
        )
        assert resp.status == 401
        assert (await error_of(resp))["code"] == "invalid_token"
    # The HS256 secret is not accepted once a public key is configured.
    resp = await play(client, track)
    assert resp.status == 401
    assert (await error_of(resp))["code"] == "invalid_token"


async def test_public_key_mode_token_for_another_key_type_is_401(
    make_client: MakeClient, playable: dict[str, Any], rsa_key: rsa.RSAPrivateKey
) -> None:
    """RS256 and ES256 are both accepted with EDGE_JWT_PUBLIC_KEY; a token whose header names the
    algorithm of the other key type (here ES256 against an RSA key) is an invalid token: 401,
    never a server error. Anyone can make such a token: the signature is never checked."""
    client = await make_client(jwt_public_key=public_pem(rsa_key))
    attacker = ec.generate_private_key(ec.SECP256R1())
    es256 = jwt.encode(claims(), attacker, algorithm="ES256")
    unsigned = raw_jwt({"alg": "ES256", "typ": "JWT"}, claims(), lambda m: b"\x00" * 64)
    for bad in (es256, unsigned):
        resp = await play(
            client,
            playable["tracks"]["hells"],
            headers={"Authorization": f"Bearer {bad}"},
            auth=False,
        )
        assert resp.status == 401
        assert (await error_of(resp))["code"] == "invalid_token"


async def test_anonymous_plays_as_free_when_allowed(
    make_client: MakeClient, playable: dict[str, Any]
) -> None:
    client = await make_client(allow_anonymous=True)
    track = playable["tracks"]["hells"]
    resp = await play(client, track, auth=False)
    assert resp.status == 302
    assert (resp.headers["X-Stream-Format"], resp.headers["X-Stream-Bitrate"]) == ("mp3", "128")
    resp = await play(client, track, auth=False, format="flac", bitrate="900")
    assert resp.status == 302
    assert resp.headers["X-Stream-Format"] == "mp3"
    assert int(resp.headers["X-Stream-Bitrate"]) <= 128
    assert resp.headers["X-Stream-Downgraded"] == "tier"
    # A bad token is still refused: it does not fall back to anonymous.
    resp = await play(client, track, auth=False, headers={"Authorization": "Bearer nope"})
    assert resp.status == 401


# -- streaming sessions -------------------------------------------------------------------------


async def test_session_lives_in_redis_and_is_renewed(
    make_client: MakeClient,
    playable: dict[str, Any],
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    client = await make_client()
    hells, shoot = playable["tracks"]["hells"], playable["tracks"]["shoot"]
    resp = await play(client, hells)
    assert resp.status == 302
    sid = resp.headers["X-Stream-Session"]
    key = session_key(redis_prefix, sid)
    state = await session_hash(redis_client, redis_prefix, sid)
    assert state["user"] == "alice"
    assert state["track"] == str(hells)
    assert 0 < await redis_client.ttl(key) <= 3600

    await redis_client.expire(key, 100)
    resp = await play(client, shoot, sid=sid)
    assert resp.status == 302
    assert resp.headers["X-Stream-Session"] == sid
    assert 100 < await redis_client.ttl(key) <= 3600
    assert (await session_hash(redis_client, redis_prefix, sid))["track"] == str(shoot)


async def test_player_without_sid_continues_one_session(
    make_client: MakeClient, playable: dict[str, Any]
) -> None:
    client = await make_client()
    first = await play(client, playable["tracks"]["hells"], tier="free")
    second = await play(client, playable["tracks"]["shoot"], tier="free")
    assert first.status == second.status == 302
    assert first.headers["X-Stream-Session"] == second.headers["X-Stream-Session"]
    other = await play(client, playable["tracks"]["hells"], user="bob", tier="free")
    assert other.headers["X-Stream-Session"] != first.headers["X-Stream-Session"]


async def test_a_device_is_its_user_agent_also_when_that_is_long(
    make_client: MakeClient, playable: dict[str, Any]
) -> None:
    """Devices with short User-Agents are remembered (no HMAC per request), long ones are not:
    either way a device keeps its session and two devices have two."""
    client = await make_client()
    sids = {}
    for agent in ("player/1", "p" * 2000, "q" * 2000):  # (premium: 3 streams at once)
        first = await play(client, playable["tracks"]["hells"], headers={"User-Agent": agent})
        again = await play(client, playable["tracks"]["shoot"], headers={"User-Agent": agent})
        assert first.status == again.status == 302
        assert first.headers["X-Stream-Session"] == again.headers["X-Stream-Session"]
        sids[agent] = first.headers["X-Stream-Session"]
    assert len(set(sids.values())) == 3


async def test_another_users_sid_is_403(
    make_client: MakeClient,
    playable: dict[str, Any],
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    client = await make_client()
    resp = await play(client, playable["tracks"]["hells"], sid=SID_A)
    assert resp.status == 302
    assert resp.headers["X-Stream-Session"] == SID_A
    before = await session_hash(redis_client, redis_prefix, SID_A)
    resp = await play(client, playable["tracks"]["shoot"], user="mallory", sid=SID_A)
    assert resp.status == 403
    assert (await error_of(resp))["code"] == "session_forbidden"
    assert await session_hash(redis_client, redis_prefix, SID_A) == before


@pytest.mark.parametrize("sid", ["short", "x" * 65, "has space in it 1234", "bad/slash/1234567"])
async def test_malformed_sid_is_400(
    make_client: MakeClient, playable: dict[str, Any], sid: str
) -> None:
    client = await make_client()
    resp = await play(client, playable["tracks"]["hells"], sid=sid)
    assert resp.status == 400
    assert (await error_of(resp))["code"] == "bad_session"


async def test_free_tier_allows_one_stream(
    make_client: MakeClient, playable: dict[str, Any]
) -> None:
    client = await make_client()
    hells = playable["tracks"]["hells"]
    assert (await play(client, hells, tier="free", sid=SID_A)).status == 302
    resp = await play(client, hells, tier="free", sid=SID_B)
    assert resp.status == 429
    error = await error_of(resp)
    assert error["code"] == "stream_limit"
    assert "free" in error["message"]
    assert "1 concurrent stream" in error["message"]
    # The stream that holds the slot goes on; another user is not affected.
    assert (await play(client, hells, tier="free", sid=SID_A)).status == 302
    assert (await play(client, hells, user="bob", tier="free", sid=SID_B)).status == 302
    assert sample(client, "edge_stream_rejections_total", reason="limit") == 1


async def test_premium_allows_three_streams(
    make_client: MakeClient, playable: dict[str, Any]
) -> None:
    client = await make_client()
    hells = playable["tracks"]["hells"]
    for sid in (SID_A, SID_B, SID_C):
        assert (await play(client, hells, sid=sid)).status == 302
    resp = await play(client, hells, sid=SID_D)
    assert resp.status == 429
    assert "3 concurrent streams" in (await error_of(resp))["message"]


async def test_stream_limits_are_configurable(
    make_client: MakeClient, playable: dict[str, Any]
) -> None:
    client = await make_client(stream_limits=(("free", 2), ("premium", 1), ("hifi", 3)))
    hells = playable["tracks"]["hells"]
    assert (await play(client, hells, tier="free", sid=SID_A)).status == 302
    assert (await play(client, hells, tier="free", sid=SID_B)).status == 302
    assert (await play(client, hells, tier="free", sid=SID_C)).status == 429
    assert (await play(client, hells, user="bob", sid=SID_D)).status == 302
    resp = await play(client, hells, user="bob", sid=SID_C)
    assert resp.status == 429
    assert "premium allows 1 concurrent stream;" in (await error_of(resp))["message"]


@pytest.mark.parametrize("event", ["paused", "ended"])
async def test_paused_or_ended_frees_the_slot(
    make_client: MakeClient, playable: dict[str, Any], event: str
) -> None:
    client = await make_client()
    hells = playable["tracks"]["hells"]
    assert (await play(client, hells, tier="free", sid=SID_A)).status == 302
    assert (await play(client, hells, tier="free", sid=SID_B)).status == 429
    resp = await post_events(client, [{"sid": SID_A, "type": event, "position": 1.5}], tier="free")
    assert resp.status == 202
    assert (await play(client, hells, tier="free", sid=SID_B)).status == 302
    # ...and now B holds the only slot.
    assert (await play(client, hells, tier="free", sid=SID_A)).status == 429


async def test_two_edge_processes_share_sessions(
    make_client: MakeClient,
    playable: dict[str, Any],
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    first, second = await make_client(), await make_client()
    hells, shoot = playable["tracks"]["hells"], playable["tracks"]["shoot"]
    resp = await play(first, hells, tier="free", sid=SID_A)
    assert resp.status == 302
    await first.close()  # the process that started the session is gone
    resp = await play(second, shoot, tier="free", sid=SID_A)
    assert resp.status == 302
    assert resp.headers["X-Stream-Session"] == SID_A
    assert (await session_hash(redis_client, redis_prefix, SID_A))["track"] == str(shoot)
    # The stream limit is shared too: the slot is still held by SID_A.
    assert (await play(second, hells, tier="free", sid=SID_B)).status == 429
    # Another user's session is refused by the other process as well.
    assert (await play(second, hells, user="mallory", sid=SID_A)).status == 403


@pytest.mark.parametrize("how", ["query", "sec-purpose", "purpose"])
async def test_preload_keeps_the_track_and_takes_a_slot_only_for_a_new_session(
    make_client: MakeClient,
    playable: dict[str, Any],
    redis_client: aioredis.Redis,
    redis_prefix: str,
    how: str,
) -> None:
    client = await make_client()
    hells, shoot = playable["tracks"]["hells"], playable["tracks"]["shoot"]
    params: dict[str, Any] = {"preload": "1"} if how == "query" else {}
    headers = {"sec-purpose": {"Sec-Purpose": "prefetch"}, "purpose": {"Purpose": "prefetch"}}
    extra = headers.get(how, {})
    assert (await play(client, hells, tier="free", sid=SID_A)).status == 302
    active = redis_prefix + active_key("alice")
    assert await redis_client.zrange(active, 0, -1) == [SID_A.encode()]

    # A preload of the next track in the same session: no slot, the track stays.
    resp = await play(client, shoot, tier="free", sid=SID_A, headers=extra, **params)
    assert resp.status == 302
    assert (await session_hash(redis_client, redis_prefix, SID_A))["track"] == str(hells)
    assert await redis_client.zrange(active, 0, -1) == [SID_A.encode()]
    # A preload that would open another session streams bytes of its own (proxy mode): it
    # takes a slot like any stream (else preloads would get round the limit), so at the free
    # tier's one it is refused, and nothing of that session is made.
    resp = await play(client, shoot, tier="free", sid=SID_B, headers=extra, **params)
    assert resp.status == 429
    assert await session_hash(redis_client, redis_prefix, SID_B) == {}
    assert await redis_client.zrange(active, 0, -1) == [SID_A.encode()]
    assert (await play(client, shoot, tier="free", sid=SID_B)).status == 429
    # Where the tier has room, it opens the session and takes the slot, but shows no track
    # playing, and counts nothing.
    resp = await play(client, shoot, tier="premium", sid=SID_B, headers=extra, **params)
    assert resp.status == 302
    state = await session_hash(redis_client, redis_prefix, SID_B)
    assert state["user"] == "alice" and "track" not in state and "counted" not in state
    assert sorted(await redis_client.zrange(active, 0, -1)) == sorted(
        [SID_A.encode(), SID_B.encode()]
    )


# -- quality through HTTP ----------------------------------------------------------------------

QUALITY_CASES = [
    # tier, query, headers, (format, bitrate), downgraded
    ("free", {}, {}, ("mp3", 128), None),
    ("free", {"format": "aac"}, {}, ("aac", 96), None),
    ("free", {"format": "flac"}, {}, ("mp3", 128), "tier"),
    ("free", {"format": "flac", "bw": "100000"}, {}, ("mp3", 128), "tier"),
    ("free", {"format": "flac", "bw": "100"}, {}, ("aac", 96), "tier"),  # not "bandwidth"
    ("free", {"bitrate": "320"}, {}, ("mp3", 128), "tier"),
    ("free", {"bw": "100"}, {}, ("aac", 96), "bandwidth"),
    ("free", {"bw": "5000"}, {}, ("mp3", 128), None),
    ("premium", {}, {}, ("mp3", 320), None),
    ("premium", {"bitrate": "320"}, {}, ("mp3", 320), None),
    ("premium", {"bitrate": "192", "bw": "50"}, {}, ("mp3", 192), None),
    ("premium", {"bitrate": "1000"}, {}, ("mp3", 320), "tier"),
    ("premium", {"format": "flac"}, {}, ("mp3", 320), "tier"),
    ("premium", {"format": "aac"}, {}, ("aac", 256), None),
    ("premium", {}, {"Accept": "audio/mp4"}, ("aac", 256), None),
    ("premium", {"bw": "50"}, {}, ("aac", 96), "bandwidth"),
    ("premium", {"bw": "250"}, {}, ("mp3", 192), "bandwidth"),
    ("premium", {"bw": "399"}, {}, ("aac", 256), "bandwidth"),
    ("premium", {"bw": "400"}, {}, ("mp3", 320), None),
    ("premium", {}, {"Downlink": "0.3"}, ("mp3", 192), "bandwidth"),
    ("premium", {}, {"Downlink": "10"}, ("mp3", 320), None),
    ("premium", {"bw": "1000"}, {"Downlink": "0.1"}, ("mp3", 320), None),
    ("premium", {"bw": "junk"}, {"Downlink": "0.2"}, ("aac", 160), "bandwidth"),
    ("hifi", {}, {}, ("mp3", 320), None),
    ("hifi", {"format": "flac"}, {}, ("flac", 0), None),
    ("hifi", {"format": "flac", "bw": "100000"}, {}, ("flac", 0), None),
    ("hifi", {"format": "flac,mp3", "bw": "700"}, {}, ("mp3", 320), "bandwidth"),
    ("hifi", {}, {"Accept": "audio/flac, audio/mpeg;q=0.5"}, ("flac", 0), None),
]


@pytest.mark.parametrize(("tier", "query", "headers", "expected", "downgraded"), QUALITY_CASES)
async def test_quality_choice(
    make_client: MakeClient,
    playable: dict[str, Any],
    tier: str,
    query: dict[str, Any],
    headers: dict[str, str],
    expected: tuple[str, int],
    downgraded: str | None,
) -> None:
    client = await make_client()
    resp = await play(client, playable["tracks"]["hells"], tier=tier, headers=headers, **query)
    assert resp.status == 302
    chosen = rendition(playable, "hells", *expected)
    assert resp.headers["X-Stream-Format"] == expected[0]
    assert resp.headers["X-Stream-Bitrate"] == str(chosen.bitrate_kbps)
    assert resp.headers.get("X-Stream-Downgraded") == downgraded
    # The redirect goes to exactly that rendition's object.
    assert urlsplit(resp.headers["Location"]).path == f"/media/{chosen.object_key}"
    if tier == "free":
        assert int(resp.headers["X-Stream-Bitrate"]) <= 128
        assert resp.headers["X-Stream-Format"] != "flac"


async def test_buffer_events_step_the_next_choice_down(
    make_client: MakeClient, playable: dict[str, Any]
) -> None:
    client = await make_client()
    hells = playable["tracks"]["hells"]

    def chosen(resp: Any) -> tuple[str, str, str | None]:
        h = resp.headers
        return h["X-Stream-Format"], h["X-Stream-Bitrate"], h.get("X-Stream-Downgraded")

    assert chosen(await play(client, hells, sid=SID_A)) == ("mp3", "320", None)
    assert chosen(await play(client, hells, sid=SID_B)) == ("mp3", "320", None)
    resp = await post_events(client, [{"sid": SID_A, "type": "waiting", "position": 3.0}])
    assert resp.status == 202
    assert chosen(await play(client, hells, sid=SID_A)) == ("aac", "256", "buffering")
    resp = await post_events(client, [{"sid": SID_A, "type": "stalled", "position": 3.5}])
    assert resp.status == 202
    assert chosen(await play(client, hells, sid=SID_A)) == ("mp3", "192", "buffering")
    # Two rungs at most.
    resp = await post_events(
        client, [{"sid": SID_A, "type": "waiting"}, {"sid": SID_A, "type": "stalled"}]
    )
    assert resp.status == 202
    assert chosen(await play(client, hells, sid=SID_A)) == ("mp3", "192", "buffering")
    # Only that session steps down.
    assert chosen(await play(client, hells, sid=SID_B)) == ("mp3", "320", None)
    # An explicit bitrate is honoured whatever the buffering.
    assert chosen(await play(client, hells, sid=SID_A, bitrate="320"))[:2] == ("mp3", "320")
    # Non-buffer events do not step down.
    resp = await post_events(client, [{"sid": SID_B, "type": t} for t in ("seek", "buffer_end")])
    assert resp.status == 202
    assert chosen(await play(client, hells, sid=SID_B)) == ("mp3", "320", None)


async def test_a_clean_stretch_steps_quality_back_up_a_rung_at_a_time(
    make_client: MakeClient,
    playable: dict[str, Any],
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    """Down a rung per buffer event (two at most), back up a rung per clean minute; a buffer
    event on the way up steps down again from where the player is, not from the top."""
    client = await make_client()
    hells = playable["tracks"]["hells"]
    key = f"{redis_prefix}streaming:session:{SID_A}"

    async def chosen() -> tuple[str, str]:
        h = (await play(client, hells, sid=SID_A)).headers
        return h["X-Stream-Format"], h["X-Stream-Bitrate"]

    async def last_buffering(seconds_ago: float) -> None:
        await redis_client.hset(key, "buf_at", f"{time.time() - seconds_ago:.3f}")

    assert await chosen() == ("mp3", "320")
    assert (await post_events(client, [{"sid": SID_A, "type": "waiting"}])).status == 202
    assert await chosen() == ("aac", "256")  # one rung down: 320 -> 256
    await last_buffering(61)
    assert await chosen() == ("mp3", "320")  # a clean minute: back up
    # Many buffer events: two rungs down at most, and they keep it down no longer than two.
    events = [{"sid": SID_A, "type": t} for t in ("waiting", "stalled")] * 50
    assert (await post_events(client, events)).status == 202
    assert await chosen() == ("mp3", "192")  # 320 -> 256 -> 192
    await last_buffering(61)
    assert await chosen() == ("aac", "256")  # one rung back up
    # Buffering on the way up steps down from there (256 -> 192), where a count that a clean
    # minute had reset would have said one rung from the top (256).
    assert (await post_events(client, [{"sid": SID_A, "type": "waiting"}])).status == 202
    assert await chosen() == ("mp3", "192")
    await last_buffering(61)
    assert await chosen() == ("aac", "256")
    await last_buffering(121)
    assert await chosen() == ("mp3", "320")  # clean for two minutes: the top again


async def test_a_seek_stays_on_the_rendition_of_the_track(
    make_client: MakeClient, playable: dict[str, Any]
) -> None:
    """Buffering steps the next choice down, but a range from the middle of the track being
    played comes from the same file: bytes of two renditions never mix within one track."""
    client = await make_client()
    hells = playable["tracks"]["hells"]
    first = await play(client, hells, sid=SID_A, mode="proxy")
    assert (first.headers["X-Stream-Format"], first.headers["X-Stream-Bitrate"]) == ("mp3", "320")
    await first.read()
    await drain(client)
    resp = await post_events(client, [{"sid": SID_A, "type": "waiting", "position": 1.0}])
    assert resp.status == 202
    seek = await play(client, hells, sid=SID_A, mode="proxy", headers={"Range": "bytes=4000-4999"})
    assert seek.status == 206
    assert (seek.headers["X-Stream-Format"], seek.headers["X-Stream-Bitrate"]) == ("mp3", "320")
    assert await seek.read() == file_bytes(playable, "hells", "mp3", 320)[4000:5000]
    # Starting the track again (from byte 0) chooses afresh: now a rung lower.
    restart = await play(client, hells, sid=SID_A, mode="proxy", headers={"Range": "bytes=0-"})
    assert restart.headers["X-Stream-Downgraded"] == "buffering"
    await restart.read()


async def test_measured_throughput_is_recorded_and_used(
    make_client: MakeClient,
    playable: dict[str, Any],
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    client = await make_client()
    hells = playable["tracks"]["hells"]
    resp = await play(client, hells, sid=SID_A, mode="proxy")
    assert resp.status == 200
    assert await resp.read() == file_bytes(playable, "hells", "mp3", 320)
    await drain(client)
    state = await session_hash(redis_client, redis_prefix, SID_A)
    assert int(state["bytes"]) == rendition(playable, "hells", "mp3", 320).bytes
    assert float(state["tput"]) > 0
    assert float(state["tput_at"]) > 0
    assert (state["format"], state["bitrate"]) == ("mp3", "320")

    # Pretend the measured network was slow just now: the next choice follows it...
    await redis_client.hset(
        session_key(redis_prefix, SID_A),
        mapping={"tput": "150.0", "tput_at": f"{time.time():.3f}"},
    )
    resp = await play(client, hells, sid=SID_A)
    assert (resp.headers["X-Stream-Format"], resp.headers["X-Stream-Bitrate"]) == ("aac", "96")
    assert resp.headers["X-Stream-Downgraded"] == "bandwidth"
    # ...unless the request says better (bw= and Downlink are fresher than a measurement).
    resp = await play(client, hells, sid=SID_A, bw="1000")
    assert resp.headers["X-Stream-Bitrate"] == "320"
    resp = await play(client, hells, sid=SID_A, headers={"Downlink": "2"})
    assert resp.headers["X-Stream-Bitrate"] == "320"
    # A stale measurement is ignored.
    await redis_client.hset(
        session_key(redis_prefix, SID_A), mapping={"tput_at": f"{time.time() - 3600:.3f}"}
    )
    resp = await play(client, hells, sid=SID_A)
    assert resp.headers["X-Stream-Bitrate"] == "320"


# -- redirect mode ------------------------------------------------------------------------------


async def test_redirect_to_the_local_origin(
    make_client: MakeClient, playable: dict[str, Any]
) -> None:
    client = await make_client()
    resp = await play(client, playable["tracks"]["shoot"], tier="free")
    assert resp.status == 302
    assert resp.headers["Cache-Control"] == "private, no-store"
    location = resp.headers["Location"]
    chosen = rendition(playable, "shoot", "mp3", 128)
    parts = urlsplit(location)
    assert parts.path == f"/media/{chosen.object_key}"
    assert [k for k, _ in parse_qsl(parts.query)] == ["Expires", "Signature", "Key-Pair-Id"]

    media = await client.get(location)
    assert media.status == 200
    assert await media.read() == file_bytes(playable, "shoot", "mp3", 128)
    assert media.headers["Content-Type"] == "audio/mpeg"
    ranged = await client.get(location, headers={"Range": "bytes=100-199"})
    assert ranged.status == 206
    assert await ranged.read() == file_bytes(playable, "shoot", "mp3", 128)[100:200]
    # The signature is checked: another object with the same parameters is refused.
    other = location.replace("mp3-128", "mp3-320")
    refused = await client.get(other)
    assert refused.status == 403


def _cf_decode(text: str) -> bytes:
    assert not set(text) & set("+=/"), text
    return base64.b64decode(text.replace("-", "+").replace("_", "=").replace("~", "/"))


def _canned_policy(resource: str, expires: int) -> bytes:
    return (
        '{"Statement":[{"Resource":"'
        + resource
        + '","Condition":{"DateLessThan":{"AWS:EpochTime":'
        + str(expires)
        + "}}}]}"
    ).encode()


def _cloudfront(rsa_key: rsa.RSAPrivateKey, **extra: Any) -> dict[str, Any]:
    return {
        "cdn_url": "https://cdn.example.com",
        "cloudfront_key_pair_id": "K123",
        "cloudfront_private_key": Secret(private_pem(rsa_key)),
        **extra,
    }


async def test_cloudfront_signed_redirect_verifies_with_the_public_key(
    make_client: MakeClient, playable: dict[str, Any], rsa_key: rsa.RSAPrivateKey
) -> None:
    client = await make_client(**_cloudfront(rsa_key))
    before = time.time()
    resp = await play(client, playable["tracks"]["backinblack"])
    after = time.time()
    assert resp.status == 302
    assert resp.headers["Cache-Control"] == "private, no-store"
    location = resp.headers["Location"]
    chosen = rendition(playable, "backinblack", "mp3", 320)
    resource, _, query = location.partition("?")
    assert resource == f"https://cdn.example.com/{chosen.object_key}"
    pairs = parse_qsl(query, keep_blank_values=True)
    assert [k for k, _ in pairs] == ["Expires", "Signature", "Key-Pair-Id"]
    params = dict(pairs)
    assert params["Key-Pair-Id"] == "K123"
    expires = int(params["Expires"])
    assert expires % 300 == 0
    assert before + 3600 <= expires < after + 3600 + 300

    signature = _cf_decode(params["Signature"])
    rsa_key.public_key().verify(
        signature, _canned_policy(resource, expires), padding.PKCS1v15(), hashes.SHA1()
    )
    # ...and the same signature is worthless for another object or another expiry.
    for policy in (
        _canned_policy(resource.replace("mp3-320", "mp3-128"), expires),
        _canned_policy(resource, expires + 300),
    ):
        with pytest.raises(InvalidSignature):
            rsa_key.public_key().verify(signature, policy, padding.PKCS1v15(), hashes.SHA1())


async def test_cloudfront_window_and_lifetime_are_settings(
    make_client: MakeClient, playable: dict[str, Any], rsa_key: rsa.RSAPrivateKey
) -> None:
    client = await make_client(
        **_cloudfront(rsa_key, signed_url_lifetime=600, signed_url_window=60)
    )
    before = time.time()
    resp = await play(client, playable["tracks"]["hells"])
    after = time.time()
    expires = int(parse_qs(urlsplit(resp.headers["Location"]).query)["Expires"][0])
    assert expires % 60 == 0
    assert before + 600 <= expires < after + 600 + 60


async def test_signed_urls_are_cached_per_object_and_window(
    make_client: MakeClient, playable: dict[str, Any], rsa_key: rsa.RSAPrivateKey
) -> None:
    # A day-long window, so the 200 requests cannot straddle a window boundary.
    client = await make_client(**_cloudfront(rsa_key, signed_url_window=86400))
    track = playable["tracks"]["hells"]
    locations = set()
    for _ in range(200):
        resp = await play(client, track)
        assert resp.status == 302
        locations.add(resp.headers["Location"])
    assert len(locations) == 1
    assert sample(client, "edge_signed_urls_total", result="signed") == 1
    assert sample(client, "edge_signed_urls_total", result="cached") == 199
    # Another object is signed once more.
    await play(client, track, format="aac")
    assert sample(client, "edge_signed_urls_total", result="signed") == 2


# -- preload hints ------------------------------------------------------------------------------


def link_url(resp: Any) -> str:
    link: str = resp.headers["Link"]
    assert link.startswith("<")
    url, _, rest = link[1:].partition(">")
    assert [p.strip() for p in rest.split(";") if p.strip()] == ["rel=preload", "as=audio"]
    return url


async def test_album_hint_in_redirect_mode_is_the_next_tracks_signed_url(
    make_client: MakeClient, playable: dict[str, Any]
) -> None:
    client = await make_client()
    album = str(playable["albums"]["black"])
    resp = await play(client, playable["tracks"]["hells"], album=album)
    assert resp.status == 302
    url = link_url(resp)
    chosen = rendition(playable, "shoot", "mp3", 320)
    assert urlsplit(url).path == f"/media/{chosen.object_key}"
    assert "Signature=" in url
    media = await client.get(url)
    assert media.status == 200
    assert await media.read() == file_bytes(playable, "shoot", "mp3", 320)
    # The hint is for the next track's own rendition for this client (free -> 128, aac asked).
    resp = await play(client, playable["tracks"]["shoot"], tier="free", format="aac", album=album)
    nxt = rendition(playable, "backinblack", "aac", 96)
    assert urlsplit(link_url(resp)).path == f"/media/{nxt.object_key}"


async def test_no_hint_after_the_last_track_or_for_unknown_ids(
    make_client: MakeClient, playable: dict[str, Any]
) -> None:
    client = await make_client()
    album = str(playable["albums"]["black"])
    backinblack = playable["tracks"]["backinblack"]
    cases: tuple[dict[str, Any], ...] = (
        {"album": album},  # the last track of the album
        {"next": "987654321"},  # no such track
        {"album": "987654321"},  # no such album
        {"album": str(playable["albums"]["oot"])},  # a track not on that album
        {"playlist": "987654321", "pos": "0"},
        {"next": str(playable["tracks"]["largo"])},  # exists, but has no renditions
    )
    for params in cases:
        resp = await play(client, backinblack, **params)
        assert resp.status == 302, params
        assert "Link" not in resp.headers, params


async def test_next_hint(make_client: MakeClient, playable: dict[str, Any]) -> None:
    client = await make_client()
    resp = await play(
        client, playable["tracks"]["backinblack"], next=str(playable["tracks"]["hells"])
    )
    chosen = rendition(playable, "hells", "mp3", 320)
    assert urlsplit(link_url(resp)).path == f"/media/{chosen.object_key}"


async def test_playlist_hint_in_proxy_mode_is_a_preload_play_url(
    make_client: MakeClient,
    playable: dict[str, Any],
    db: Any,
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    client = await make_client()
    hells, backinblack = playable["tracks"]["hells"], playable["tracks"]["backinblack"]
    playlist = await db.fetchval("INSERT INTO playlists (name) VALUES ('Hints') RETURNING id")
    for pos, track in ((0, backinblack), (7, hells)):
        await db.execute(
            "INSERT INTO playlist_entries (playlist_id, position, track_id) VALUES ($1, $2, $3)",
            playlist,
            pos,
            track,
        )
    resp = await play(client, backinblack, sid=SID_A, mode="proxy", playlist=str(playlist), pos="0")
    assert resp.status == 200
    url = link_url(resp)
    parts = urlsplit(url)
    assert parts.path == f"/play/{hells}"
    query = dict(parse_qsl(parts.query))
    assert query["preload"] == "1"
    assert query["mode"] == "proxy"
    assert query["sid"] == SID_A
    assert (query["playlist"], query["pos"]) == (str(playlist), "7")
    await drain(client)
    plays_before = await queued_plays(redis_client, redis_prefix)
    bytes_before = (await session_hash(redis_client, redis_prefix, SID_A))["bytes"]

    # Following the hint preloads the next track: the bytes, but no play and no track change.
    preload = await client.get(url, headers=bearer("alice", "premium"))
    assert preload.status == 200
    assert await preload.read() == file_bytes(playable, "hells", "mp3", 320)
    await drain(client)
    state = await session_hash(redis_client, redis_prefix, SID_A)
    assert state["track"] == str(backinblack)
    assert state["bytes"] == bytes_before
    assert await queued_plays(redis_client, redis_prefix) == plays_before
    # The last entry of the playlist has no next.
    resp = await play(client, hells, sid=SID_A, mode="proxy", playlist=str(playlist), pos="7")
    assert "Link" not in resp.headers


async def test_album_hint_in_proxy_mode_keeps_format(
    make_client: MakeClient, playable: dict[str, Any]
) -> None:
    client = await make_client()
    album = str(playable["albums"]["black"])
    resp = await play(client, playable["tracks"]["shoot"], mode="proxy", format="aac", album=album)
    assert resp.status == 200
    parts = urlsplit(link_url(resp))
    assert parts.path == f"/play/{playable['tracks']['backinblack']}"
    query = dict(parse_qsl(parts.query))
    assert query["format"] == "aac"
    assert query["preload"] == "1"
    assert query["album"] == album
    following = await client.get(f"{parts.path}?{parts.query}", headers=bearer("alice", "premium"))
    assert following.status == 200
    assert following.headers["X-Stream-Format"] == "aac"
    assert await following.read() == file_bytes(playable, "backinblack", "aac", 256)


# -- play counting ------------------------------------------------------------------------------


async def test_whole_file_in_proxy_mode_counts_once_per_session(
    make_client: MakeClient,
    playable: dict[str, Any],
    db: Any,
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    client = await make_client()
    hells = playable["tracks"]["hells"]
    for _ in range(2):
        resp = await play(client, hells, sid=SID_A, mode="proxy")
        assert resp.status == 200
        assert await resp.read() == file_bytes(playable, "hells", "mp3", 320)
        await drain(client)
    queued = await queued_plays(redis_client, redis_prefix)
    assert [(p["track_id"], p["session_id"], p["user_id"]) for p in queued] == [
        (hells, SID_A, "alice")
    ]
    assert sample(client, "edge_plays_counted_total", via="bytes") == 1

    before = await db.fetchval("SELECT play_count FROM tracks WHERE id = $1", hells)
    assert await flush_plays(client.app) == 1
    assert await db.fetchval("SELECT play_count FROM tracks WHERE id = $1", hells) == before + 1
    rows = await db.fetch(
        "SELECT track_id, user_id, session_id, format, bitrate_kbps FROM plays ORDER BY id"
    )
    assert [tuple(r) for r in rows] == [(hells, "alice", SID_A, "mp3", 320)]
    assert await queued_plays(redis_client, redis_prefix) == []
    # Another session playing the same track is another play.
    resp = await play(client, hells, sid=SID_B, mode="proxy", format="aac")
    assert resp.status == 200
    await drain(client)
    assert [p["session_id"] for p in await queued_plays(redis_client, redis_prefix)] == [SID_B]


@pytest.mark.parametrize(
    "range_header", ["bytes=1000-", "bytes=0-999", "bytes=-2000", "bytes=500-1500"]
)
async def test_partial_reads_do_not_count(
    make_client: MakeClient,
    playable: dict[str, Any],
    redis_client: aioredis.Redis,
    redis_prefix: str,
    range_header: str,
) -> None:
    client = await make_client()
    hells = playable["tracks"]["hells"]
    resp = await play(client, hells, sid=SID_A, mode="proxy", headers={"Range": range_header})
    assert resp.status == 206
    await drain(client)
    assert await queued_plays(redis_client, redis_prefix) == []
    # The transfer itself is recorded.
    state = await session_hash(redis_client, redis_prefix, SID_A)
    assert int(state["bytes"]) == len(await resp.read())


async def test_enough_bytes_from_the_start_count(
    make_client: MakeClient,
    playable: dict[str, Any],
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    # One second of audio is enough here: 320 kbit/s -> 40,000 bytes.
    client = await make_client(play_threshold_seconds=1.0)
    hells = playable["tracks"]["hells"]
    resp = await play(client, hells, sid=SID_A, mode="proxy", headers={"Range": "bytes=0-39998"})
    assert resp.status == 206
    await drain(client)
    assert await queued_plays(redis_client, redis_prefix) == []
    resp = await play(client, hells, sid=SID_A, mode="proxy", headers={"Range": "bytes=0-39999"})
    assert resp.status == 206
    await drain(client)
    assert len(await queued_plays(redis_client, redis_prefix)) == 1
    # The same amount from the middle of the file is not a play.
    resp = await play(client, hells, sid=SID_B, mode="proxy", headers={"Range": "bytes=80000-"})
    assert resp.status == 206
    await drain(client)
    assert len(await queued_plays(redis_client, redis_prefix)) == 1


async def test_consecutive_ranges_from_the_start_count_once(
    make_client: MakeClient,
    playable: dict[str, Any],
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    """A player that reads the file a range at a time plays it as much as one that reads it in
    one response: ranges that continue what the session played from byte 0 (of the same
    rendition) add up; a range past a gap, or of another rendition, does not."""
    client = await make_client(play_threshold_seconds=1.0)  # 320 kbit/s: 40,000 bytes
    hells = playable["tracks"]["hells"]

    async def ranged(sid: str, rng: str, **params: str) -> None:
        resp = await play(client, hells, sid=sid, mode="proxy", headers={"Range": rng}, **params)
        assert resp.status == 206
        await resp.read()
        await drain(client)

    # Past a gap: 0-9999, then 20000-59999 (nothing between 10000 and 19999 was sent).
    await ranged(SID_B, "bytes=0-9999")
    await ranged(SID_B, "bytes=20000-59999")
    assert await queued_plays(redis_client, redis_prefix) == []
    # Another rendition's bytes do not continue this one's (a seek there, then back).
    # (AAC 256: 32,000 bytes make a play.)
    await ranged(SID_C, "bytes=0-19999", format="mp3", bitrate="320")
    await ranged(SID_C, "bytes=0-29999", format="aac", bitrate="256")
    await ranged(SID_C, "bytes=20000-49999", format="mp3", bitrate="320")
    assert await queued_plays(redis_client, redis_prefix) == []
    # Consecutive, and overlapping, ranges from byte 0: counted when they reach 40,000.
    for rng in ("bytes=0-15999", "bytes=16000-31999", "bytes=30000-39998"):
        await ranged(SID_A, rng)
    assert await queued_plays(redis_client, redis_prefix) == []
    await ranged(SID_A, "bytes=39999-47999")
    assert [
        (p["track_id"], p["format"], p["bitrate_kbps"], p["session_id"])
        for p in await queued_plays(redis_client, redis_prefix)
    ] == [(hells, "mp3", 320, SID_A)]
    assert sample(client, "edge_plays_counted_total", via="bytes") == 1
    # Once per session and track.
    await ranged(SID_A, "bytes=48000-")
    await ranged(SID_A, "bytes=0-")
    assert len(await queued_plays(redis_client, redis_prefix)) == 1
    assert sample(client, "edge_plays_counted_total", via="bytes") == 1


async def test_multirange_from_the_middle_does_not_count(
    make_client: MakeClient,
    playable: dict[str, Any],
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    """One byte from the start plus a range from the middle is a read from the middle: only one
    byte was played from the start, whatever the size of the later part."""
    client = await make_client(play_threshold_seconds=1.0)
    hells = playable["tracks"]["hells"]
    resp = await play(client, hells, sid=SID_A, mode="proxy", headers={"Range": "bytes=0-0,80000-"})
    assert resp.status == 206
    assert resp.headers["Content-Type"].startswith("multipart/byteranges")
    await drain(client)
    assert await queued_plays(redis_client, redis_prefix) == []


@pytest.mark.parametrize("how", ["query", "header"])
async def test_preload_never_counts(
    make_client: MakeClient,
    playable: dict[str, Any],
    redis_client: aioredis.Redis,
    redis_prefix: str,
    how: str,
) -> None:
    client = await make_client()
    hells = playable["tracks"]["hells"]
    params: dict[str, Any] = {"preload": "1"} if how == "query" else {}
    headers = {"Sec-Purpose": "prefetch"} if how == "header" else {}
    for _ in range(2):
        resp = await play(client, hells, sid=SID_A, mode="proxy", headers=headers, **params)
        assert resp.status == 200
        assert await resp.read() == file_bytes(playable, "hells", "mp3", 320)
        await drain(client)
    assert await queued_plays(redis_client, redis_prefix) == []
    state = await session_hash(redis_client, redis_prefix, SID_A)
    assert "track" not in state
    assert state["bytes"] == "0"
    # A `playing` event has no track to count in a preload-only session.
    resp = await post_events(client, [{"sid": SID_A, "type": "playing"}])
    assert resp.status == 202
    assert await queued_plays(redis_client, redis_prefix) == []


async def test_head_does_not_count(
    make_client: MakeClient,
    playable: dict[str, Any],
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    client = await make_client()
    resp = await client.head(
        f"/play/{playable['tracks']['hells']}",
        params={"mode": "proxy", "sid": SID_A},
        headers=bearer(),
    )
    assert resp.status == 200
    assert int(resp.headers["Content-Length"]) == rendition(playable, "hells", "mp3", 320).bytes
    await drain(client)
    assert await queued_plays(redis_client, redis_prefix) == []


async def test_flush_writes_all_queued_plays_in_one_batch(
    make_client: MakeClient,
    playable: dict[str, Any],
    db: Any,
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    client = await make_client()
    hells, shoot = playable["tracks"]["hells"], playable["tracks"]["shoot"]
    counts = {
        t: await db.fetchval("SELECT play_count FROM tracks WHERE id = $1", t)
        for t in (hells, shoot)
    }
    plan: list[tuple[str, str, str, int, dict[str, Any]]] = [
        ("alice", "premium", SID_A, hells, {}),
        ("alice", "premium", SID_B, hells, {"format": "aac"}),
        ("bob", "free", SID_C, hells, {}),
        ("bob", "free", SID_C, shoot, {}),
    ]
    for user, tier, sid, track, params in plan:
        resp = await play(client, track, user=user, tier=tier, sid=sid, mode="proxy", **params)
        assert resp.status == 200
        await drain(client)
    assert len(await queued_plays(redis_client, redis_prefix)) == 4
    assert await db.fetchval("SELECT count(*) FROM plays") == 0

    assert await flush_plays(client.app) == 4
    assert await db.fetchval("SELECT play_count FROM tracks WHERE id = $1", hells) == (
        counts[hells] + 3
    )
    assert await db.fetchval("SELECT play_count FROM tracks WHERE id = $1", shoot) == (
        counts[shoot] + 1
    )
    rows = await db.fetch(
        "SELECT track_id, user_id, session_id, format, bitrate_kbps FROM plays"
        " ORDER BY track_id, user_id, session_id"
    )
    assert sorted(tuple(r) for r in rows) == sorted(
        [
            (hells, "alice", SID_A, "mp3", 320),
            (hells, "alice", SID_B, "aac", 256),
            (hells, "bob", SID_C, "mp3", 128),
            (shoot, "bob", SID_C, "mp3", 128),
        ]
    )
    assert sample(client, "edge_plays_flushed_total") == 4
    assert await queued_plays(redis_client, redis_prefix) == []
    assert await flush_plays(client.app) == 0


async def test_queued_plays_reach_postgresql_on_the_timer_and_at_shutdown(
    make_client: MakeClient,
    playable: dict[str, Any],
    db: Any,
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    """The flush job runs by itself every EDGE_PLAYS_FLUSH_SECONDS, and a process that stops
    writes what is still queued before it goes: no play waits for a next process."""
    hells, shoot = playable["tracks"]["hells"], playable["tracks"]["shoot"]
    timed = await make_client(plays_flush_seconds=0.1)
    assert (await play(timed, hells, sid=SID_A, mode="proxy")).status == 200
    deadline = time.monotonic() + 10
    while await db.fetchval("SELECT count(*) FROM plays") < 1:
        assert time.monotonic() < deadline, "the timed flush never ran"
        await asyncio.sleep(0.02)  # (polling PostgreSQL for the job's effect)
    assert await queued_plays(redis_client, redis_prefix) == []

    stopping = await make_client()  # (the tests' default: no timed flush within the test)
    assert (await play(stopping, shoot, user="bob", sid=SID_C, mode="proxy")).status == 200
    await drain(stopping)
    assert len(await queued_plays(redis_client, redis_prefix)) == 1
    assert await db.fetchval("SELECT count(*) FROM plays WHERE user_id = 'bob'") == 0
    await stopping.close()  # the app's shutdown
    rows = await db.fetch("SELECT track_id, user_id, session_id FROM plays ORDER BY user_id")
    assert [tuple(r) for r in rows] == [(hells, "alice", SID_A), (shoot, "bob", SID_C)]
    assert await queued_plays(redis_client, redis_prefix) == []


# -- recommendations ----------------------------------------------------------------------------


async def _add_plays(db: Any, catalog: dict[str, Any], user: str, plays: dict[str, int]) -> None:
    rows = [(user, catalog["tracks"][key]) for key, n in plays.items() for _ in range(n)]
    await db.executemany("INSERT INTO plays (user_id, track_id) VALUES ($1, $2)", rows)


async def _recommended(client: Client, user: str, **params: str) -> Any:
    resp = await client.get(
        f"/api/v1/users/{user}/recommendations", params=params, headers=bearer(user)
    )
    assert resp.status == 200, await resp.text()
    return resp


async def test_recommendations_favour_the_users_artist_and_genre(
    make_client: MakeClient, catalog: dict[str, Any], db: Any
) -> None:
    played = {"hells": 3, "shoot": 2, "formation": 1}
    await _add_plays(db, catalog, "alice", played)
    client = await make_client()
    body = await (await _recommended(client, "alice")).json()
    ids = [item["id"] for item in body["items"]]
    t = catalog["tracks"]
    # Unheard AC/DC first (the favourite artist), most played first; then rock (favourite genre).
    assert ids[:2] == [t["highway"], t["backinblack"]]
    assert ids[2] == t["religion"]
    assert not {t[k] for k in played} & set(ids)
    assert body["next_cursor"] is None


async def test_recommendations_never_include_played_tracks(
    make_client: MakeClient, catalog: dict[str, Any], db: Any
) -> None:
    """Carol played everything of her favourite artist and genre (Dvořák, classical): what she
    is recommended must still be tracks she has not heard."""
    await _add_plays(db, catalog, "carol", {"largo": 2, "allegro": 1})
    client = await make_client()
    body = await (await _recommended(client, "carol")).json()
    ids = {item["id"] for item in body["items"]}
    assert ids  # something to listen to
    assert catalog["tracks"]["largo"] not in ids
    assert catalog["tracks"]["allegro"] not in ids


async def test_recommendations_never_include_tracks_heard_long_ago(
    make_client: MakeClient, catalog: dict[str, Any], db: Any
) -> None:
    """A heavy listener's old plays still count as heard."""
    await db.execute(
        "INSERT INTO plays (user_id, track_id, played_at)"
        " VALUES ($1, $2, now() - interval '1 day')",
        "dave",
        catalog["tracks"]["highway"],
    )
    await _add_plays(db, catalog, "dave", {"hells": 300, "shoot": 300})
    client = await make_client()
    body = await (await _recommended(client, "dave")).json()
    ids = {item["id"] for item in body["items"]}
    assert catalog["tracks"]["backinblack"] in ids
    assert catalog["tracks"]["highway"] not in ids


async def test_cold_start_gets_the_popular_list(
    make_client: MakeClient, catalog: dict[str, Any]
) -> None:
    client = await make_client()
    body = await (await _recommended(client, "newcomer", limit="5")).json()
    popular = await (await client.get("/api/v1/tracks/popular", params={"limit": "5"})).json()
    assert [i["id"] for i in body["items"]] == [i["id"] for i in popular["items"]]
    assert len(body["items"]) == 5


async def test_recommendations_are_the_users_own(
    make_client: MakeClient, catalog: dict[str, Any], db: Any
) -> None:
    await _add_plays(db, catalog, "bob", {"largo": 1})
    client = await make_client()
    resp = await client.get("/api/v1/users/bob/recommendations", headers=bearer("alice"))
    assert resp.status == 403
    assert (await error_of(resp))["code"] == "forbidden"
    resp = await client.get("/api/v1/users/bob/recommendations")
    assert resp.status == 401
    anonymous = await make_client(allow_anonymous=True)
    resp = await anonymous.get("/api/v1/users/anon:127.0.0.1/recommendations")
    assert resp.status == 403


async def test_recommendations_are_cached_per_user_and_limit(
    make_client: MakeClient,
    catalog: dict[str, Any],
    db: Any,
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    await _add_plays(db, catalog, "alice", {"hells": 2})
    client = await make_client()
    resp = await _recommended(client, "alice", limit="3")
    body = await resp.read()
    key = f"{redis_prefix}recommendations:alice:3"
    assert await redis_client.get(key) == body
    assert 0 < await redis_client.ttl(key) <= 1800
    # Cached: new plays do not change the answer within the TTL.
    await _add_plays(db, catalog, "alice", {"largo": 50})
    assert await (await _recommended(client, "alice", limit="3")).read() == body
    # Another limit is another key.
    await _recommended(client, "alice", limit="4")
    assert await redis_client.exists(f"{redis_prefix}recommendations:alice:4")


async def test_recommendations_are_not_publicly_cacheable(
    make_client: MakeClient, catalog: dict[str, Any], db: Any
) -> None:
    """They are one user's, read with that user's token: a shared cache must never store them
    (`public` would let a CDN serve Alice's list to anyone asking for the URL)."""
    await _add_plays(db, catalog, "alice", {"hells": 2})
    client = await make_client()
    resp = await _recommended(client, "alice")
    directives = {d.strip() for d in resp.headers.get("Cache-Control", "").split(",")}
    assert "public" not in directives
    assert "private" in directives or "no-store" in directives
