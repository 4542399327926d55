"""Every setting Edge reads, parsed once from the environment into a frozen `Settings`.

The platform's seed names (DB_*, REDIS_*, AWS_*, CDN_DOMAIN, CLOUDFRONT_*, ALERT_*) are kept;
Edge's own settings start with EDGE_. A bad value fails at start with one line naming the
variable (`SettingsError`); secrets are masked in `repr` so they never reach a log line.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class SettingsError(ValueError):
    """A setting has a bad value; the message names the variable and what is wrong."""


class Secret(str):
    """A string that never shows itself in repr or str-formatting of the settings."""

    def __repr__(self) -> str:
        return "Secret('**********')" if self else "Secret('')"


@dataclass(frozen=True, slots=True)
class Settings:
    # PostgreSQL. dsn is None when nothing is configured: the embedded server is used.
    database_url: Secret | None = field(default=None, repr=False)
    db_pool_min: int = 5
    db_pool_max: int = 20
    db_pool_acquire_timeout: float = 30.0
    db_statement_timeout_ms: int = 5000
    # Redis. None when nothing is configured: the embedded server is used.
    redis_url: Secret | None = field(default=None, repr=False)
    redis_timeout: float = 0.5
    # S3 / CloudFront (used by the streaming and ingest work).
    aws_access_key_id: str = ""
    aws_secret_access_key: Secret = field(default=Secret(), repr=False)
    aws_region: str = "us-east-1"
    aws_s3_bucket: str = ""
    aws_endpoint_url: str = ""
    cdn_domain: str = ""
    cloudfront_distribution_id: str = ""
    cloudfront_key_pair_id: str = ""
    cloudfront_private_key: Secret = field(default=Secret(), repr=False)
    # Alert thresholds from the platform's guide.
    alert_response_time_ms: int = 5000
    alert_memory_usage_mb: int = 512
    alert_cache_hit_rate: float = 0.8
    # Edge's own.
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path(".edge-data")
    media_dir: Path | None = None
    demo_seed: bool = True
    log_level: str = "INFO"
    log_format: str = "auto"
    redis_key_prefix: str = ""
    popular_refresh_seconds: float = 900.0
    popular_warm_limits: tuple[int, ...] = (20, 50)
    cache_l1_ttl: float = 5.0
    cache_l1_size: int = 2048
    cache_ttl_jitter: float = 0.1
    redis_retry_seconds: float = 1.0
    max_body_bytes: int = 64 * 1024
    # Players and streaming.
    jwt_secret: Secret = field(default=Secret(), repr=False)
    jwt_public_key: str = ""
    allow_anonymous: bool | None = None  # None: on in the zero-config default, off otherwise
    play_mode: str = "redirect"
    media_secret: Secret = field(default=Secret(), repr=False)
    cdn_url: str = ""
    signed_url_lifetime: int = 3600
    signed_url_window: int = 300
    stream_limits: tuple[tuple[str, int], ...] = (("free", 1), ("premium", 3), ("hifi", 3))
    upstream_connect_timeout: float = 2.0
    upstream_read_timeout: float = 10.0
    plays_flush_seconds: float = 5.0
    upstream_connections: int = 4096
    upstream_buffer: int = 32 * 1024
    stream_kernel_unsent: int = 128 * 1024
    play_threshold_seconds: float = 30.0
    slow_query_ms: float = 100.0
    search_broad_matches: int = 20_000
    observe: bool = True
    alert_interval_seconds: float = 5.0
    alert_window_seconds: float = 60.0
    alert_min_requests: int = 100
    alert_pool_seconds: float = 5.0
    alert_stream_error_rate: float = 0.05
    workers: int = 1
    # Set by `edge serve --workers N` for its workers, never from the environment: where the
    # workers' metrics sockets are, and the servers the supervisor started for them.
    worker_dir: Path | None = None
    supervisor_database_url: str | None = field(default=None, repr=False)
    supervisor_redis_url: str | None = field(default=None, repr=False)

    @property
    def embedded_postgres(self) -> bool:
        return self.database_url is None

    @property
    def embedded_redis(self) -> bool:
        return self.redis_url is None

    @property
    def anonymous_allowed(self) -> bool:
        if self.allow_anonymous is not None:
            return self.allow_anonymous
        return self.embedded_postgres and self.embedded_redis

    def stream_limit(self, tier: str) -> int:
        return dict(self.stream_limits).get(tier, 1)

    @property
    def cdn_base(self) -> str:
        """Where media objects are fetched from: EDGE_CDN_URL, https://CDN_DOMAIN, or "" for
        Edge's own local origin (/media)."""
        if self.cdn_url:
            return self.cdn_url.rstrip("/")
        if self.cdn_domain:
            return f"https://{self.cdn_domain}"
        return ""

    @property
    def media_root(self) -> Path:
        return self.media_dir if self.media_dir is not None else self.data_dir / "media"

    def with_(self, **changes: Any) -> Settings:
        """A copy with some fields replaced (tests, and the embedded servers' addresses)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        e = _Env(os.environ if env is None else env)
        pool_min = e.integer("DB_POOL_MIN", 5, minimum=0)
        pool_max = e.integer("DB_POOL_MAX", 20, minimum=1)
        if pool_min > pool_max:
            raise SettingsError(f"DB_POOL_MIN: {pool_min} is larger than DB_POOL_MAX ({pool_max})")
        log_format = e.choice("EDGE_LOG_FORMAT", "auto", ("auto", "json", "console"))
        log_level = e.choice(
            "EDGE_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR"), upper=True
        )
        media = e.text("EDGE_MEDIA_DIR", "")
        warm = e.text("EDGE_POPULAR_WARM_LIMITS", "20,50")
        try:
            warm_limits = tuple(int(x) for x in warm.split(",") if x.strip())
        except ValueError:
            raise SettingsError(
                f"EDGE_POPULAR_WARM_LIMITS: {warm!r} is not a comma-separated list of integers"
            ) from None
        if any(not 1 <= x <= 100 for x in warm_limits):
            raise SettingsError("EDGE_POPULAR_WARM_LIMITS: each limit must be within 1..100")
        # (A few bytes would make the kernel send a stream a segment at a time.)
        kernel_unsent = e.integer("EDGE_STREAM_KERNEL_UNSENT", 128 * 1024, minimum=0)
        if 0 < kernel_unsent < 16 * 1024 or kernel_unsent > 64 * 1024 * 1024:
            raise SettingsError(
                f"EDGE_STREAM_KERNEL_UNSENT: {kernel_unsent} is not 0 or within 16384..67108864"
            )
        private_key = _private_key(e)
        _refuse_unsigned_cloudfront(e, private_key)
        return cls(
            database_url=_database_url(e),
            db_pool_min=pool_min,
            db_pool_max=pool_max,
            db_pool_acquire_timeout=e.number("DB_POOL_ACQUIRE_TIMEOUT", 30.0, minimum=0.001),
            db_statement_timeout_ms=e.integer("EDGE_DB_STATEMENT_TIMEOUT_MS", 5000, minimum=0),
            redis_url=_redis_url(e),
            redis_timeout=e.number("EDGE_REDIS_TIMEOUT", 0.5, minimum=0.001),
            aws_access_key_id=e.text("AWS_ACCESS_KEY_ID", ""),
            aws_secret_access_key=Secret(e.secret("AWS_SECRET_ACCESS_KEY")),
            aws_region=e.text("AWS_REGION", "us-east-1"),
            aws_s3_bucket=e.text("AWS_S3_BUCKET", ""),
            aws_endpoint_url=e.url("EDGE_S3_ENDPOINT_URL", ""),
            cdn_domain=e.text("CDN_DOMAIN", ""),
            cloudfront_distribution_id=e.text("CLOUDFRONT_DISTRIBUTION_ID", ""),
            cloudfront_key_pair_id=e.text("CLOUDFRONT_KEY_PAIR_ID", ""),
            cloudfront_private_key=Secret(private_key),
            alert_response_time_ms=e.integer("ALERT_RESPONSE_TIME_MS", 5000, minimum=1),
            alert_memory_usage_mb=e.integer("ALERT_MEMORY_USAGE_MB", 512, minimum=1),
            alert_cache_hit_rate=e.number("ALERT_CACHE_HIT_RATE", 0.8, minimum=0.0, maximum=1.0),
            host=e.text("EDGE_HOST", "127.0.0.1"),
            port=e.integer("EDGE_PORT", 8080, minimum=0, maximum=65535),
            data_dir=Path(e.text("EDGE_DATA_DIR", ".edge-data")),
            media_dir=Path(media) if media else None,
            demo_seed=e.flag("EDGE_DEMO_SEED", True),
            log_level=log_level,
            log_format=log_format,
            redis_key_prefix=e.text("EDGE_REDIS_KEY_PREFIX", ""),
            popular_refresh_seconds=e.number("EDGE_POPULAR_REFRESH_SECONDS", 900.0, minimum=1.0),
            popular_warm_limits=warm_limits,
            cache_l1_ttl=e.number("EDGE_CACHE_L1_TTL", 5.0, minimum=0.0),
            cache_l1_size=e.integer("EDGE_CACHE_L1_SIZE", 2048, minimum=0),
            cache_ttl_jitter=e.number("EDGE_CACHE_TTL_JITTER", 0.1, minimum=0.0, maximum=0.5),
            redis_retry_seconds=e.number("EDGE_REDIS_RETRY_SECONDS", 1.0, minimum=0.0),
            jwt_secret=Secret(e.secret("EDGE_JWT_SECRET")),
            jwt_public_key=_public_key(e),
            allow_anonymous=(
                None
                if e.raw("EDGE_ALLOW_ANONYMOUS") is None
                else e.flag("EDGE_ALLOW_ANONYMOUS", False)
            ),
            play_mode=e.choice("EDGE_PLAY_MODE", "redirect", ("redirect", "proxy")),
            media_secret=Secret(e.secret("EDGE_MEDIA_SECRET")),
            cdn_url=e.url("EDGE_CDN_URL", ""),
            signed_url_lifetime=e.integer("EDGE_SIGNED_URL_LIFETIME", 3600, minimum=60),
            signed_url_window=e.integer("EDGE_SIGNED_URL_WINDOW", 300, minimum=1),
            stream_limits=_stream_limits(e.text("EDGE_STREAM_LIMITS", "free=1,premium=3,hifi=3")),
            upstream_connect_timeout=e.number("EDGE_UPSTREAM_CONNECT_TIMEOUT", 2.0, minimum=0.01),
            upstream_read_timeout=e.number("EDGE_UPSTREAM_READ_TIMEOUT", 10.0, minimum=0.01),
            plays_flush_seconds=e.number("EDGE_PLAYS_FLUSH_SECONDS", 5.0, minimum=0.05),
            upstream_connections=e.integer("EDGE_UPSTREAM_CONNECTIONS", 4096, minimum=1),
            upstream_buffer=e.integer(
                "EDGE_UPSTREAM_BUFFER", 32 * 1024, minimum=4096, maximum=16 * 1024 * 1024
            ),
            stream_kernel_unsent=kernel_unsent,
            play_threshold_seconds=e.number("EDGE_PLAY_THRESHOLD_SECONDS", 30.0, minimum=0.0),
            slow_query_ms=e.number("EDGE_SLOW_QUERY_MS", 100.0, minimum=0.0),
            search_broad_matches=e.integer("EDGE_SEARCH_BROAD_MATCHES", 20_000, minimum=1),
            observe=e.flag("EDGE_OBSERVE", True),
            workers=e.integer("EDGE_WORKERS", 1, minimum=1, maximum=64),
            alert_interval_seconds=e.number("EDGE_ALERT_INTERVAL_SECONDS", 5.0, minimum=0.01),
            alert_window_seconds=e.number("EDGE_ALERT_WINDOW_SECONDS", 60.0, minimum=0.1),
            alert_min_requests=e.integer("EDGE_ALERT_MIN_REQUESTS", 100, minimum=1),
            alert_pool_seconds=e.number("EDGE_ALERT_POOL_SECONDS", 5.0, minimum=0.0),
            alert_stream_error_rate=e.number(
                "EDGE_ALERT_STREAM_ERROR_RATE", 0.05, minimum=0.0, maximum=1.0
            ),
        )


class _Env:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def raw(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def secret(self, name: str) -> str:
        """Secrets are taken as they are: spaces may be part of a password."""
        value = self.env.get(name)
        return "" if value is None or value.strip() == "" else value

    def text(self, name: str, default: str) -> str:
        value = self.raw(name)
        return default if value is None else value

    def _number(
        self,
        name: str,
        default: T,
        parse: Callable[[str], T],
        kind: str,
        minimum: float | None,
        maximum: float | None,
    ) -> T:
        value = self.raw(name)
        if value is None:
            return default
        try:
            number = parse(value)
        except ValueError:
            raise SettingsError(f"{name}: {value!r} is not {kind}") from None
        if isinstance(number, float) and not math.isfinite(number):
            raise SettingsError(f"{name}: {value!r} is not a finite number")
        if minimum is not None and number < minimum:  # type: ignore[operator]
            raise SettingsError(f"{name}: {value} is below the minimum {minimum}")
        if maximum is not None and number > maximum:  # type: ignore[operator]
            raise SettingsError(f"{name}: {value} is above the maximum {maximum}")
        return number

    def integer(
        self, name: str, default: int, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        return self._number(name, default, int, "an integer", minimum, maximum)

    def number(
        self,
        name: str,
        default: float,
        minimum: float | None = None,
        maximum: float | None = None,
    ) -> float:
        return self._number(name, default, float, "a number", minimum, maximum)

    def flag(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise SettingsError(f"{name}: {value!r} is not a boolean (use true/false)")

    def choice(self, name: str, default: str, choices: tuple[str, ...], upper: bool = False) -> str:
        value = self.raw(name)
        if value is None:
            return default
        value = value.upper() if upper else value.lower()
        if value not in choices:
            raise SettingsError(f"{name}: {value!r} is not one of {', '.join(choices)}")
        return value

    def url(self, name: str, default: str, schemes: tuple[str, ...] = ("http", "https")) -> str:
        value = self.raw(name)
        if value is None:
            return default
        parts = urlsplit(value)
        if parts.scheme not in schemes or not parts.netloc:
            raise SettingsError(f"{name}: not a URL with scheme {'/'.join(schemes)}")
        return value


def _public_key(e: _Env) -> str:
    pem = e.text("EDGE_JWT_PUBLIC_KEY", "").replace("\\n", "\n")
    if not pem:
        return ""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    try:
        key = serialization.load_pem_public_key(pem.encode())
    except ValueError:
        raise SettingsError("EDGE_JWT_PUBLIC_KEY: not a PEM public key") from None
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise SettingsError("EDGE_JWT_PUBLIC_KEY: must be an RSA or EC (P-256) public key")
    return pem


def _stream_limits(value: str) -> tuple[tuple[str, int], ...]:
    limits = dict((("free", 1), ("premium", 3), ("hifi", 3)))
    for part in value.split(","):
        tier, _, number = part.strip().partition("=")
        if tier not in limits or not number.strip().isdigit() or int(number) < 1:
            raise SettingsError(
                f"EDGE_STREAM_LIMITS: {part.strip()!r} is not tier=N (tiers free, premium, hifi;"
                " N >= 1)"
            )
        limits[tier] = int(number)
    return tuple(limits.items())


def _refuse_unsigned_cloudfront(e: _Env, private_key: str) -> None:
    """CloudFront refuses what is not signed with its key pair: CDN_DOMAIN without it (or half
    of it) would start an Edge whose every redirect and proxied fetch fails. (EDGE_CDN_URL alone
    may be any origin: without a key pair its URLs carry Edge's own HMAC signature, which a
    /media origin with the same EDGE_MEDIA_SECRET checks, and a plain origin ignores.)"""
    pair = {
        "CLOUDFRONT_KEY_PAIR_ID": e.raw("CLOUDFRONT_KEY_PAIR_ID"),
        "CLOUDFRONT_PRIVATE_KEY(_FILE)": private_key or None,
    }
    missing = [name for name, value in pair.items() if value is None]
    if len(missing) == 1:
        given = next(name for name in pair if name not in missing)
        raise SettingsError(f"{missing[0]}: required when {given} is set")
    if missing and e.raw("CDN_DOMAIN") is not None:
        raise SettingsError(
            "CDN_DOMAIN: CloudFront needs signed URLs: set CLOUDFRONT_KEY_PAIR_ID and "
            "CLOUDFRONT_PRIVATE_KEY (or CLOUDFRONT_PRIVATE_KEY_FILE)"
        )


def _refuse_without_host(e: _Env, host: str, others: tuple[str, ...]) -> None:
    """DB_PORT without DB_HOST would silently fall back to the embedded server: refuse."""
    given = [name for name in others if e.raw(name) is not None]
    if given:
        raise SettingsError(f"{host}: required when {', '.join(given)} is set")


def _database_url(e: _Env) -> Secret | None:
    url = e.raw("DATABASE_URL")
    if url is not None:
        if urlsplit(url).scheme not in ("postgres", "postgresql"):
            raise SettingsError("DATABASE_URL: must start with postgresql://")
        return Secret(url)
    host = e.raw("DB_HOST")
    if host is None:
        _refuse_without_host(e, "DB_HOST", ("DB_PORT", "DB_USERNAME", "DB_PASSWORD", "DB_NAME"))
        return None
    host = f"[{host}]" if ":" in host else host
    port = e.integer("DB_PORT", 5432, minimum=1, maximum=65535)
    user = quote(e.text("DB_USERNAME", "postgres"), safe="")
    password = e.secret("DB_PASSWORD")
    auth = f"{user}:{quote(password, safe='')}" if password else user
    name = quote(e.text("DB_NAME", "edge"), safe="")
    return Secret(f"postgresql://{auth}@{host}:{port}/{name}")


def _redis_url(e: _Env) -> Secret | None:
    url = e.raw("REDIS_URL")
    if url is not None:
        if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
            raise SettingsError("REDIS_URL: must start with redis://, rediss:// or unix://")
        return Secret(url)
    host = e.raw("REDIS_HOST")
    if host is None:
        _refuse_without_host(e, "REDIS_HOST", ("REDIS_PORT", "REDIS_PASSWORD", "REDIS_DB"))
        return None
    host = f"[{host}]" if ":" in host else host
    port = e.integer("REDIS_PORT", 6379, minimum=1, maximum=65535)
    db = e.integer("REDIS_DB", 0, minimum=0)
    password = e.secret("REDIS_PASSWORD")
    auth = f":{quote(password, safe='')}@" if password else ""
    return Secret(f"redis://{auth}{host}:{port}/{db}")


def _private_key(e: _Env) -> str:
    key = e.raw("CLOUDFRONT_PRIVATE_KEY")
    path = e.raw("CLOUDFRONT_PRIVATE_KEY_FILE")
    if key is not None:
        return key.replace("\\n", "\n")
    if path is None:
        return ""
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise SettingsError(f"CLOUDFRONT_PRIVATE_KEY_FILE: cannot read {path}: {exc}") from None
