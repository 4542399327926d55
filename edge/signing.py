"""Signed media URLs: CloudFront (canned policy URLs, custom policy cookies), the local origin's
HMAC signer, and a cache that keeps a busy edge from signing the same URL over and over.

CloudFront's rules, as its Developer Guide states them ("Create a signed URL using a canned
policy", "Set signed cookies using a custom policy"):
- the policy is `{"Statement":[{"Resource":"<url>","Condition":{"DateLessThan":{"AWS:EpochTime":
  <expires>}}}]}` with no whitespace; a canned policy's Resource is the URL exactly as requested,
  its own query string included; a custom policy may use `*` and `?` wildcards;
- the signature is the policy hashed and signed with the private key of a public key in one of the
  distribution's trusted key groups, then base64 with `+ = /` replaced by `- _ ~`;
- the URL gets `Expires`, `Signature`, `Key-Pair-Id`; the cookies are `CloudFront-Policy`,
  `CloudFront-Signature`, `CloudFront-Key-Pair-Id`;
- the hash is SHA-1 unless `Hash-Algorithm=SHA256` (URLs) or `CloudFront-Hash-Algorithm=SHA256`
  (cookies) says SHA-256.

botocore's `CloudFrontSigner` builds the policy and the URL; this module supplies the key.
"""

from __future__ import annotations

import base64
import hmac
import math
import re
from collections import OrderedDict
from datetime import UTC, datetime
from hashlib import sha256
from typing import Final, Protocol
from urllib.parse import urlsplit

from botocore.signers import CloudFrontSigner as _BotocoreCloudFrontSigner
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

__all__ = [
    "LOCAL_KEY_PAIR_ID",
    "CloudFrontSigner",
    "LocalSigner",
    "SignedUrlCache",
    "Signer",
    "cloudfront_b64decode",
    "cloudfront_b64encode",
]

LOCAL_KEY_PAIR_ID: Final = "local"
MIN_RSA_BITS: Final = 2048
MIN_SECRET_BYTES: Final = 16
# Ten digits reach the year 2286; twelve leave room without letting a huge number through.
MAX_EXPIRES_DIGITS: Final = 12
# A LocalSigner signature is 44 characters; anything much longer is not worth comparing.
MAX_SIGNATURE_CHARS: Final = 128

_TO_CLOUDFRONT: Final = bytes.maketrans(b"+=/", b"-_~")
_FROM_CLOUDFRONT: Final = str.maketrans("-_~", "+=/")
_KEY_PAIR_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,128}")
_SENDABLE_URL: Final = re.compile(r"[!#-\[\]-~]+")  # printable ASCII except space, " and \


class Signer(Protocol):
    def sign(self, url: str, expires: int) -> str:
        """The full signed URL; `url` may already have a query string."""
        ...


def cloudfront_b64encode(data: bytes) -> str:
    """Base64 with the three characters a query string cannot carry replaced: + = / -> - _ ~."""
    return base64.b64encode(data).translate(_TO_CLOUDFRONT).decode("ascii")


def cloudfront_b64decode(text: str) -> bytes:
    """The inverse of `cloudfront_b64encode`; ValueError on anything that is not its output."""
    if any(c in text for c in "+=/"):
        raise ValueError("not CloudFront base64: has one of + = /")
    return base64.b64decode(text.translate(_FROM_CLOUDFRONT).encode("ascii"), validate=True)


def _check_expires(expires: int) -> None:
    if isinstance(expires, bool) or not isinstance(expires, int) or expires < 0:
        raise ValueError(f"expires must be a non-negative epoch second, not {expires!r}")


def _check_url(url: str) -> None:
    # The signing parameters are appended to the URL; after a fragment they would never be sent.
    if "#" in url:
        raise ValueError("a URL to sign must not have a fragment")
    # CloudFront compares the policy with the URL as sent, which is percent-encoded; botocore's
    # JSON would \u-escape anything else and the signature would never verify.
    if not _SENDABLE_URL.fullmatch(url):
        raise ValueError("a URL to sign must be percent-encoded (printable ASCII, no spaces)")


class CloudFrontSigner:
    """Signs CloudFront URLs (canned policy) and cookies (custom policy) with one key pair.

    Keys: CloudFront "supports signed URLs and signed cookies with RSA 2048 or ECDSA 256 key
    signatures" (CloudFront API Reference, PublicKey / PublicKeyConfig; Developer Guide, "Use
    signed URLs"). RSA keys sign with RSA-SHA1 PKCS#1 v1.5, CloudFront's default hash, so the URL
    carries no Hash-Algorithm parameter. The guide ties no hash to ECDSA: it accepts SHA1
    (default) or SHA256 named by `Hash-Algorithm`. P-256 keys therefore sign with ECDSA-SHA256
    (the DER signature `openssl dgst -sha256 -sign` gives, the guide's own recipe) and say so with
    `Hash-Algorithm=SHA256` / `CloudFront-Hash-Algorithm=SHA256`, never leaving CloudFront to
    assume SHA-1.
    """

    def __init__(self, key_pair_id: str, private_key_pem: str) -> None:
        if not _KEY_PAIR_ID.fullmatch(key_pair_id):
            raise ValueError(
                "CloudFront key pair id must be 1-128 letters, digits, '-' or '_' "
                "(the public key's ID, e.g. K2JCJMDEHXQW5F)"
            )
        self.key_pair_id = key_pair_id
        self._key = _load_private_key(private_key_pem)
        # None: CloudFront's default (SHA1), so no parameter is sent.
        self.hash_algorithm: str | None = (
            "SHA256" if isinstance(self._key, ec.EllipticCurvePrivateKey) else None
        )
        self._signer = _BotocoreCloudFrontSigner(key_pair_id, self._sign_bytes)

    def _sign_bytes(self, message: bytes) -> bytes:
        if isinstance(self._key, rsa.RSAPrivateKey):
            return self._key.sign(message, padding.PKCS1v15(), hashes.SHA1())
        return self._key.sign(message, ec.ECDSA(hashes.SHA256()))

    def sign(self, url: str, expires: int) -> str:
        """`url` with `Expires`, `Signature`, `Key-Pair-Id` (and `Hash-Algorithm` for ECDSA)."""
        _check_url(url)
        _check_expires(expires)
        signed = str(
            self._signer.generate_presigned_url(
                url, date_less_than=datetime.fromtimestamp(expires, UTC)
            )
        )
        if self.hash_algorithm is not None:
            signed += f"&Hash-Algorithm={self.hash_algorithm}"
        return signed

    def signed_cookies(self, resource: str, expires: int) -> dict[str, str]:
        """Cookies granting `resource` (wildcards allowed, e.g. "https://cdn.example.com/media/*")
        until `expires`; send each as its own Set-Cookie with Secure and HttpOnly."""
        _check_url(resource)
        _check_expires(expires)
        policy = str(
            self._signer.build_policy(resource, datetime.fromtimestamp(expires, UTC))
        ).encode("utf-8")
        cookies = {
            "CloudFront-Policy": cloudfront_b64encode(policy),
            "CloudFront-Signature": cloudfront_b64encode(self._sign_bytes(policy)),
            "CloudFront-Key-Pair-Id": self.key_pair_id,
        }
        if self.hash_algorithm is not None:
            cookies["CloudFront-Hash-Algorithm"] = self.hash_algorithm
        return cookies


def _load_private_key(pem: str) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    try:
        key = load_pem_private_key(pem.encode("utf-8"), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # TypeError: the key is encrypted. Never echo the PEM (it is a secret) or the detail.
        raise ValueError(
            f"CloudFront private key is not an unencrypted PEM private key ({type(exc).__name__})"
        ) from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(
                f"CloudFront private key is RSA {key.key_size}; CloudFront needs RSA 2048 "
                "(or ECDSA P-256)"
            )
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError(
                f"CloudFront private key is ECDSA on {key.curve.name}; CloudFront accepts only "
                "P-256 (secp256r1/prime256v1) or RSA 2048"
            )
        return key
    raise ValueError(
        f"CloudFront private key is {type(key).__name__}; CloudFront accepts RSA 2048 or "
        "ECDSA P-256 keys"
    )


class LocalSigner:
    """HMAC-SHA256 signatures for the local media origin, shaped like CloudFront's.

    The MAC covers the URL path (percent-encoded, as sent: aiohttp's `request.url.raw_path`) and
    Expires, not the host, so a URL stays valid behind any host or proxy. The URL's own query
    parameters are not covered.
    """

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"local signing secret must be at least {MIN_SECRET_BYTES} bytes")
        self._secret = secret

    def _signature(self, path: str, expires: str) -> str:
        # The newline cannot occur in a path or in the digits, so (path, expires) is unambiguous.
        message = f"{path}\n{expires}".encode()
        return cloudfront_b64encode(hmac.new(self._secret, message, sha256).digest())

    def sign(self, url: str, expires: int) -> str:
        _check_url(url)
        _check_expires(expires)
        path = urlsplit(url).path or "/"
        signature = self._signature(path, str(expires))
        separator = "&" if "?" in url else "?"
        return (
            f"{url}{separator}Expires={expires}&Signature={signature}"
            f"&Key-Pair-Id={LOCAL_KEY_PAIR_ID}"
        )

    def verify(
        self, path: str, expires: str | None, signature: str | None, now: float
    ) -> str | None:
        """None when the signature is good and unexpired; else "missing", "malformed",
        "bad signature" or "expired". Expiry is reported only for genuine signatures."""
        if not expires or not signature:
            return "missing"
        if not (expires.isascii() and expires.isdigit() and len(expires) <= MAX_EXPIRES_DIGITS):
            return "malformed"
        if not signature.isascii() or len(signature) > MAX_SIGNATURE_CHARS:
            return "malformed"
        expected = self._signature(path or "/", expires)
        if not hmac.compare_digest(expected.encode("ascii"), signature.encode("ascii")):
            return "bad signature"
        # CloudFront's DateLessThan: valid strictly before the expiry second.
        if now >= int(expires):
            return "expired"
        return None


class SignedUrlCache:
    """A signature costs ~0.2 ms of CPU (RSA): round expiries up to a window and cache the signed
    URL per (url, window), so a busy edge signs almost never."""

    def __init__(
        self, signer: Signer, min_lifetime: int, window: int, max_entries: int = 100_000
    ) -> None:
        if min_lifetime < 0:
            raise ValueError("min_lifetime must be >= 0 seconds")
        if window < 1:
            raise ValueError("window must be >= 1 second")
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self._signer = signer
        self.min_lifetime = min_lifetime
        self.window = window
        self.max_entries = max_entries
        self._entries: OrderedDict[str, str] = OrderedDict()
        self._expires = 0  # the window every cached entry belongs to
        self.signatures = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    def expires_for(self, now: float) -> int:
        """The smallest multiple of `window` that is >= now + min_lifetime."""
        # Multiples of the window are whole seconds, so rounding `now` up first changes nothing
        # and keeps the rest in exact integer arithmetic.
        earliest = math.ceil(now) + self.min_lifetime
        return -(-earliest // self.window) * self.window

    def get(self, url: str, now: float) -> tuple[str, int]:
        """(signed url, expires) for `url`, signed at most once per window."""
        expires = self.expires_for(now)
        if expires > self._expires:
            # A new window: every cached URL belongs to a past one.
            self._entries.clear()
            self._expires = expires
        elif expires < self._expires:
            # A caller with an older clock reading; serve it without caching.
            self.signatures += 1
            return self._signer.sign(url, expires), expires
        signed = self._entries.get(url)
        if signed is not None:
            self._entries.move_to_end(url)
            self.hits += 1
            return signed, expires
        signed = self._signer.sign(url, expires)
        self.signatures += 1
        self._entries[url] = signed
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return signed, expires
