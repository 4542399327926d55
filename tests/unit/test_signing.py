"""Signed media URLs: CloudFront signatures checked the way CloudFront checks them (rebuild the
policy, verify with the public key), the local HMAC signer, and the signed-URL cache."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable
from datetime import UTC, datetime
from fractions import Fraction
from urllib.parse import parse_qs, urlsplit

import pytest
from botocore.signers import CloudFrontSigner as BotocoreSigner
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.signing import (
    LOCAL_KEY_PAIR_ID,
    CloudFrontSigner,
    LocalSigner,
    SignedUrlCache,
    cloudfront_b64decode,
    cloudfront_b64encode,
)

quick = settings(database=None, max_examples=200, deadline=None)

KEY_ID = "K2JCJMDEHXQW5F"
URL = "https://cdn.example.com/media/tracks/42/320.mp3"
EXPIRES = 1_767_290_400
SECRET = b"edge-test-secret-0123456789abcdef"

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def canned_policy(resource: str, expires: int) -> bytes:
    """The policy CloudFront rebuilds from a canned-policy URL, byte for byte."""
    return (
        '{"Statement":[{"Resource":"'
        + resource
        + '","Condition":{"DateLessThan":{"AWS:EpochTime":'
        + str(expires)
        + "}}}]}"
    ).encode()


def decode(text: str) -> bytes:
    """CloudFront's decoding, written independently of the module under test."""
    assert not set(text) & set("+=/"), text
    return base64.b64decode(text.replace("-", "+").replace("_", "=").replace("~", "/"))


def cf_verify(key: PrivateKey, signature: bytes, message: bytes) -> None:
    """Raise InvalidSignature unless the PUBLIC key accepts the signature, as CloudFront would."""
    if isinstance(key, rsa.RSAPrivateKey):
        key.public_key().verify(signature, message, padding.PKCS1v15(), hashes.SHA1())
    else:
        key.public_key().verify(signature, message, ec.ECDSA(hashes.SHA256()))


def split_signed(signed: str) -> tuple[str, dict[str, str]]:
    """(the URL as requested without CloudFront's parameters, those parameters)."""
    cut = max(signed.rfind("?Expires="), signed.rfind("&Expires="))
    assert cut > 0, signed
    params = {k: v[0] for k, v in parse_qs(signed[cut + 1 :], keep_blank_values=True).items()}
    return signed[:cut], params


def cf_accepts(key: PrivateKey, signed: str) -> bool:
    base, params = split_signed(signed)
    try:
        cf_verify(
            key,
            decode(params["Signature"]),
            canned_policy(base, int(params["Expires"])),
        )
    except InvalidSignature:
        return False
    return True


# --- CloudFront ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_signed_url_verifies_against_the_canned_policy(
    kind: str, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    key: PrivateKey = rsa_key if kind == "rsa" else ec_key
    signed = CloudFrontSigner(KEY_ID, pem(key)).sign(URL, EXPIRES)

    assert signed.startswith(URL + f"?Expires={EXPIRES}&Signature=")
    base, params = split_signed(signed)
    assert base == URL
    assert params["Key-Pair-Id"] == KEY_ID
    if kind == "rsa":
        # SHA-1 is CloudFront's default: no Hash-Algorithm parameter.
        assert list(params) == ["Expires", "Signature", "Key-Pair-Id"]
        assert len(decode(params["Signature"])) == 256
    else:
        assert list(params) == ["Expires", "Signature", "Key-Pair-Id", "Hash-Algorithm"]
        assert params["Hash-Algorithm"] == "SHA256"
    assert cf_accepts(key, signed)


def test_url_with_a_query_string_is_signed_with_it(rsa_key: rsa.RSAPrivateKey) -> None:
    url = URL + "?format=mp3&bitrate=320"
    signed = CloudFrontSigner(KEY_ID, pem(rsa_key)).sign(url, EXPIRES)

    assert signed.startswith(url + f"&Expires={EXPIRES}&Signature=")
    assert split_signed(signed)[0] == url
    assert cf_accepts(rsa_key, signed)


@pytest.mark.parametrize("kind", ["rsa", "ec"])
@pytest.mark.parametrize(
    "tamper",
    [
        lambda s: s.replace("/42/", "/43/"),
        lambda s: s.replace("320.mp3", "320.mp3?x=1"),
        lambda s: s.replace("cdn.example.com", "cdn.example.org"),
        lambda s: s.replace(f"Expires={EXPIRES}", f"Expires={EXPIRES + 1}"),
        lambda s: s.replace(f"Expires={EXPIRES}", f"Expires={EXPIRES + 86_400 * 365}"),
    ],
    ids=["path", "query", "host", "expiry+1", "expiry+1y"],
)
def test_tampered_url_or_expiry_fails_verification(
    kind: str,
    tamper: Callable[[str], str],
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    key: PrivateKey = rsa_key if kind == "rsa" else ec_key
    signed = CloudFrontSigner(KEY_ID, pem(key)).sign(URL, EXPIRES)
    tampered = tamper(signed)

    assert tampered != signed
    assert not cf_accepts(key, tampered)


def test_signatures_use_the_cloudfront_alphabet(rsa_key: rsa.RSAPrivateKey) -> None:
    signer = CloudFrontSigner(KEY_ID, pem(rsa_key))
    signatures = [split_signed(signer.sign(f"{URL}?n={n}", EXPIRES))[1] for n in range(40)]
    text = "".join(p["Signature"] for p in signatures)

    assert not set(text) & set("+=/")
    # 256 bytes encode to 344 characters ending in '==' -> '__'; over 40 signatures the other
    # two replacements show up too.
    assert all(p["Signature"].endswith("__") for p in signatures)
    assert "-" in text and "~" in text


def test_cloudfront_base64_replaces_the_three_characters() -> None:
    assert base64.b64encode(b"\xfb\xff\xbf") == b"+/+/"
    assert cloudfront_b64encode(b"\xfb\xff\xbf") == "-~-~"
    assert cloudfront_b64encode(b"\xfb\xff") == "-~8_"
    assert cloudfront_b64decode("-~8_") == b"\xfb\xff"
    with pytest.raises(ValueError):
        cloudfront_b64decode("+/8=")


@given(st.binary(max_size=300))
@quick
def test_cloudfront_base64_round_trips(data: bytes) -> None:
    text = cloudfront_b64encode(data)
    assert not set(text) & set("+=/")
    assert cloudfront_b64decode(text) == data == decode(text)


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_signed_cookies_carry_a_verifiable_custom_policy(
    kind: str, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    key: PrivateKey = rsa_key if kind == "rsa" else ec_key
    resource = "https://cdn.example.com/media/*"
    cookies = CloudFrontSigner(KEY_ID, pem(key)).signed_cookies(resource, EXPIRES)

    expected_names = {"CloudFront-Policy", "CloudFront-Signature", "CloudFront-Key-Pair-Id"}
    if kind == "ec":
        expected_names.add("CloudFront-Hash-Algorithm")
        assert cookies["CloudFront-Hash-Algorithm"] == "SHA256"
    assert set(cookies) == expected_names
    assert cookies["CloudFront-Key-Pair-Id"] == KEY_ID
    policy = decode(cookies["CloudFront-Policy"])
    assert policy == canned_policy(resource, EXPIRES)  # same shape, wildcard resource
    assert json.loads(policy)["Statement"][0]["Resource"] == resource
    cf_verify(key, decode(cookies["CloudFront-Signature"]), policy)
    with pytest.raises(InvalidSignature):
        cf_verify(
            key, decode(cookies["CloudFront-Signature"]), canned_policy(resource, EXPIRES + 1)
        )


def test_rsa_signature_is_deterministic_and_matches_botocore(rsa_key: rsa.RSAPrivateKey) -> None:
    """Same key, same policy -> the same PKCS#1 v1.5 signature as botocore's documented recipe."""

    def rsa_signer(message: bytes) -> bytes:
        return rsa_key.sign(message, padding.PKCS1v15(), hashes.SHA1())

    reference = BotocoreSigner(KEY_ID, rsa_signer).generate_presigned_url(
        URL, date_less_than=datetime.fromtimestamp(EXPIRES, UTC)
    )
    assert CloudFrontSigner(KEY_ID, pem(rsa_key)).sign(URL, EXPIRES) == reference


def _encrypted_pem(key: rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pass"),
    ).decode()


@pytest.mark.parametrize(
    ("make_pem", "message"),
    [
        (lambda: pem(rsa.generate_private_key(65537, 1024)), "RSA 1024"),
        (lambda: pem(ed25519.Ed25519PrivateKey.generate()), "Ed25519PrivateKey"),
        (lambda: pem(ec.generate_private_key(ec.SECP384R1())), "secp384r1"),
        (lambda: _encrypted_pem(rsa.generate_private_key(65537, 2048)), "unencrypted PEM"),
        (lambda: "not a key", "unencrypted PEM"),
        (lambda: "", "unencrypted PEM"),
    ],
    ids=["rsa1024", "ed25519", "p384", "encrypted", "garbage", "empty"],
)
def test_unsupported_keys_are_refused_with_a_clear_message(
    make_pem: Callable[[], str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        CloudFrontSigner(KEY_ID, make_pem())


def test_error_never_echoes_the_key() -> None:
    secret_looking = "-----BEGIN PRIVATE KEY-----\nTOPSECRETBYTES\n-----END PRIVATE KEY-----\n"
    with pytest.raises(ValueError) as info:
        CloudFrontSigner(KEY_ID, secret_looking)
    assert "TOPSECRET" not in str(info.value)


@pytest.mark.parametrize("key_pair_id", ["", "K 1", "K1&Signature=x", "K" * 129])
def test_bad_key_pair_id_is_refused(key_pair_id: str, rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ValueError, match="key pair id"):
        CloudFrontSigner(key_pair_id, pem(rsa_key))


def test_private_key_is_loaded_once(
    rsa_key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[bytes] = []
    real_load = serialization.load_pem_private_key

    def counting_load(data: bytes, password: bytes | None) -> object:
        loads.append(data)
        return real_load(data, password)

    monkeypatch.setattr("edge.signing.load_pem_private_key", counting_load)
    signer = CloudFrontSigner(KEY_ID, pem(rsa_key))
    for n in range(5):
        signer.sign(f"{URL}?n={n}", EXPIRES)
    signer.signed_cookies("https://cdn.example.com/media/*", EXPIRES)

    assert len(loads) == 1


@pytest.mark.parametrize(
    ("url", "expires"),
    [
        (URL + "#t=10", EXPIRES),
        (URL, -1),
        (URL.replace("320", "320 kbps"), EXPIRES),
        (URL.replace("tracks", "tr\u00e4cks"), EXPIRES),
        (URL + '?q="', EXPIRES),
        ("", EXPIRES),
    ],
    ids=["fragment", "negative-expiry", "space", "non-ascii", "quote", "empty"],
)
def test_unsignable_input_is_refused(url: str, expires: int, rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ValueError):
        CloudFrontSigner(KEY_ID, pem(rsa_key)).sign(url, expires)


# --- LocalSigner --------------------------------------------------------------------------

LOCAL_URL = "http://127.0.0.1:8080/media/tracks/42/320%20kbps.mp3"
LOCAL_PATH = "/media/tracks/42/320%20kbps.mp3"


def local_params(signed: str) -> tuple[str, str, str]:
    """(path, Expires, Signature) as the origin's handler reads them."""
    parts = urlsplit(signed)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert query["Key-Pair-Id"] == LOCAL_KEY_PAIR_ID
    return parts.path, query["Expires"], query["Signature"]


def test_local_round_trip() -> None:
    signer = LocalSigner(SECRET)
    signed = signer.sign(LOCAL_URL, EXPIRES)

    assert signed.startswith(LOCAL_URL + f"?Expires={EXPIRES}&Signature=")
    assert signed.endswith("&Key-Pair-Id=local")
    path, expires, signature = local_params(signed)
    assert path == LOCAL_PATH
    assert not set(signature) & set("+=/")
    assert signer.verify(path, expires, signature, now=EXPIRES - 1) is None


def test_local_signature_ignores_host_and_keeps_query() -> None:
    signer = LocalSigner(SECRET)
    a = signer.sign(LOCAL_URL, EXPIRES)
    b = signer.sign("https://edge.example.com" + LOCAL_PATH, EXPIRES)
    c = signer.sign(LOCAL_URL + "?download=1", EXPIRES)

    assert local_params(a)[2] == local_params(b)[2] == local_params(c)[2]
    assert c.startswith(LOCAL_URL + "?download=1&Expires=")


def test_local_expiry_is_strict() -> None:
    signer = LocalSigner(SECRET)
    path, expires, signature = local_params(signer.sign(LOCAL_URL, EXPIRES))

    assert signer.verify(path, expires, signature, now=EXPIRES - 0.001) is None
    assert signer.verify(path, expires, signature, now=EXPIRES) == "expired"
    assert signer.verify(path, expires, signature, now=EXPIRES + 3600) == "expired"


def test_local_tampering_is_a_bad_signature() -> None:
    signer = LocalSigner(SECRET)
    path, expires, signature = local_params(signer.sign(LOCAL_URL, EXPIRES))
    now = EXPIRES - 60

    assert signer.verify(path.replace("/42/", "/43/"), expires, signature, now) == "bad signature"
    assert signer.verify(path + "x", expires, signature, now) == "bad signature"
    assert signer.verify(path, str(EXPIRES + 1), signature, now) == "bad signature"
    # A longer life is not for sale either, and is reported as forged, not as unexpired.
    assert signer.verify(path, str(EXPIRES + 10**6), signature, now) == "bad signature"
    assert signer.verify(path, expires, signature, now) is None


def test_local_other_secret_is_a_bad_signature() -> None:
    path, expires, signature = local_params(LocalSigner(SECRET).sign(LOCAL_URL, EXPIRES))

    assert LocalSigner(b"another-secret-of-edge-32-bytes!").verify(
        path, expires, signature, EXPIRES - 1
    ) == ("bad signature")


@pytest.mark.parametrize(
    ("expires", "signature"),
    [(None, "sig"), (str(EXPIRES), None), (None, None), ("", "sig"), (str(EXPIRES), "")],
)
def test_local_missing_params(expires: str | None, signature: str | None) -> None:
    assert LocalSigner(SECRET).verify(LOCAL_PATH, expires, signature, 0) == "missing"


@pytest.mark.parametrize(
    "expires",
    ["12a", "-5", "+5", "1e9", " 123", "123 ", "1_000", "1.5", "\u0661\u0662\u0663", "9" * 13],
)
def test_local_malformed_expires(expires: str) -> None:
    signer = LocalSigner(SECRET)
    _, _, signature = local_params(signer.sign(LOCAL_URL, EXPIRES))

    assert signer.verify(LOCAL_PATH, expires, signature, 0) == "malformed"


@pytest.mark.parametrize(
    ("signature", "reason"),
    [
        ("garbage", "bad signature"),
        ("A" * 44, "bad signature"),
        ("%00%ff", "bad signature"),
        ("\u00ff" * 44, "malformed"),
        ("A" * 10_000, "malformed"),
    ],
)
def test_local_garbage_signature(signature: str, reason: str) -> None:
    assert LocalSigner(SECRET).verify(LOCAL_PATH, str(EXPIRES), signature, 0) == reason


def test_local_secret_must_not_be_trivial() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        LocalSigner(b"short")


@given(
    path=st.text(
        # What a URL path can hold as sent: printable ASCII, everything else percent-encoded.
        alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters='?#"\\'),
        max_size=60,
    ).map(lambda p: "/media/" + p),
    expires=st.integers(min_value=1, max_value=10**11),
)
@quick
def test_local_round_trip_property(path: str, expires: int) -> None:
    signer = LocalSigner(SECRET)
    signed = signer.sign("http://h" + path, expires)
    got_path, got_expires, signature = local_params(signed)

    assert got_path == path
    assert got_expires == str(expires)
    assert signer.verify(path, got_expires, signature, expires - 1) is None
    assert signer.verify(path + "/", got_expires, signature, expires - 1) == "bad signature"


# --- SignedUrlCache -----------------------------------------------------------------------


class CountingSigner:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def sign(self, url: str, expires: int) -> str:
        self.calls.append((url, expires))
        return f"{url}?Expires={expires}&Signature=s{len(self.calls)}"


@given(
    now=st.one_of(
        st.integers(min_value=0, max_value=4_000_000_000),
        st.floats(min_value=0, max_value=4e9, allow_nan=False, allow_infinity=False),
    ),
    min_lifetime=st.integers(min_value=0, max_value=7 * 86_400),
    window=st.integers(min_value=1, max_value=86_400),
)
@quick
def test_expiry_rounding(now: float, min_lifetime: int, window: int) -> None:
    cache = SignedUrlCache(CountingSigner(), min_lifetime=min_lifetime, window=window)
    signed, expires = cache.get(URL, now)

    lifetime = expires - Fraction(now)  # exact: float subtraction would round
    assert isinstance(expires, int)
    assert expires % window == 0
    assert min_lifetime <= lifetime < min_lifetime + window
    # ... so it is the smallest such multiple.
    assert signed.startswith(f"{URL}?Expires={expires}&")


def test_expiry_examples() -> None:
    cache = SignedUrlCache(CountingSigner(), min_lifetime=3600, window=300)

    assert cache.expires_for(0) == 3600
    assert cache.expires_for(0.001) == 3900
    assert cache.expires_for(299.5) == 3900
    assert cache.expires_for(300) == 3900
    assert cache.expires_for(300.25) == 4200


def test_one_signature_per_url_per_window() -> None:
    signer = CountingSigner()
    cache = SignedUrlCache(signer, min_lifetime=3600, window=300)
    start = 1_000_000_200  # a window boundary: (start, start + 300] all expire at start + 3900
    results = [cache.get(URL, start + 0.5 + t / 10) for t in range(2995)]

    assert signer.calls == [(URL, start + 3900)]
    assert len(set(results)) == 1
    assert cache.signatures == 1
    assert cache.hits == 2994


def test_new_window_signs_again_and_drops_past_windows() -> None:
    signer = CountingSigner()
    cache = SignedUrlCache(signer, min_lifetime=60, window=100)
    other = URL.replace("42", "43")

    first, e1 = cache.get(URL, 0)
    cache.get(other, 39)
    assert len(cache) == 2
    second, e2 = cache.get(URL, 40.5)  # 100.5 rounds up to the next window

    assert (e1, e2) == (100, 200)
    assert first != second
    assert len(cache) == 1  # the previous window's entries are gone
    assert cache.signatures == 3
    assert cache.hits == 0
    assert cache.get(URL, 139) == (second, 200)
    assert cache.hits == 1


def test_an_older_clock_is_served_but_not_cached() -> None:
    signer = CountingSigner()
    cache = SignedUrlCache(signer, min_lifetime=60, window=100)
    cache.get(URL, 100)  # window 200

    signed, expires = cache.get(URL, 30)  # window 100: a caller with a stale `now`

    assert expires == 100
    assert "Expires=100&" in signed
    assert cache.signatures == 2
    assert cache.get(URL, 100)[1] == 200
    assert cache.hits == 1


def test_lru_bound() -> None:
    signer = CountingSigner()
    cache = SignedUrlCache(signer, min_lifetime=60, window=3600, max_entries=3)
    urls = [f"{URL}?n={n}" for n in range(5)]

    for url in urls[:3]:
        cache.get(url, 0)
    cache.get(urls[0], 1)  # urls[0] is now the most recently used
    cache.get(urls[3], 2)  # evicts urls[1], the least recently used
    assert len(cache) == 3
    assert cache.signatures == 4 and cache.hits == 1

    cache.get(urls[0], 3)
    cache.get(urls[2], 3)
    cache.get(urls[3], 3)
    assert cache.signatures == 4 and cache.hits == 4
    cache.get(urls[1], 4)  # evicted: signed again
    assert cache.signatures == 5
    assert len(cache) == 3

    for n in range(1000):
        cache.get(f"{URL}?m={n}", 5)
    assert len(cache) == 3


def test_cache_with_the_real_local_signer() -> None:
    signer = LocalSigner(SECRET)
    cache = SignedUrlCache(signer, min_lifetime=600, window=60)
    now = 1_700_000_000.5

    signed, expires = cache.get(LOCAL_URL, now)
    path, got_expires, signature = local_params(signed)

    assert got_expires == str(expires)
    assert signer.verify(path, got_expires, signature, now) is None
    assert signer.verify(path, got_expires, signature, now + 600) is None
    assert signer.verify(path, got_expires, signature, expires) == "expired"
    assert cache.get(LOCAL_URL, now + 30)[0] == signed


@pytest.mark.parametrize(
    ("min_lifetime", "window", "max_entries"),
    [(-1, 60, 10), (60, 0, 10), (60, 60, 0)],
)
def test_cache_arguments_are_checked(min_lifetime: int, window: int, max_entries: int) -> None:
    with pytest.raises(ValueError):
        SignedUrlCache(CountingSigner(), min_lifetime, window, max_entries)


def test_cache_rejects_a_clock_that_is_not_a_number() -> None:
    cache = SignedUrlCache(CountingSigner(), min_lifetime=60, window=60)
    with pytest.raises(ValueError):
        cache.get(URL, math.nan)
