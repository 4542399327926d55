"""`Settings.from_env`: defaults, URL composition, validation, masked secrets, and the CLI's
configuration-error path (one stderr line, exit 2) and `--help`.

Every test passes its own environment mapping, so the machine's environment never leaks in; the
CLI tests run `python -m edge` as a real subprocess with a scrubbed environment.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from importlib.metadata import entry_points
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from redis.connection import parse_url

import edge
from edge.settings import Secret, Settings, SettingsError

REPO = Path(edge.__file__).resolve().parent.parent
COMMANDS = ("serve", "migrate", "seed", "refresh")
CLI_DEADLINE = 60.0  # seconds; a guard against a hung child, not a performance bound


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without anything that configures Edge, plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DATABASE_URL", "REDIS_URL"}
        and not k.startswith(("DB_", "REDIS_", "EDGE_", "AWS_", "CLOUDFRONT_", "ALERT_", "CDN_"))
    }
    # The child runs the same checkout as these tests, installed or not.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run_edge(
    args: list[str], env: Mapping[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge", *args],
        env=dict(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=CLI_DEADLINE,
        stdin=subprocess.DEVNULL,
        check=False,
    )


# -- defaults -----------------------------------------------------------------------------------


def test_defaults() -> None:
    s = Settings.from_env({})
    assert s == Settings()
    assert (s.db_pool_min, s.db_pool_max, s.db_pool_acquire_timeout) == (5, 20, 30.0)
    assert s.db_statement_timeout_ms == 5000
    assert (s.alert_response_time_ms, s.alert_memory_usage_mb) == (5000, 512)
    assert s.alert_cache_hit_rate == 0.8
    assert (s.host, s.port) == ("127.0.0.1", 8080)
    assert s.data_dir == Path(".edge-data")
    assert s.media_root == Path(".edge-data") / "media"
    assert s.demo_seed is True
    assert (s.log_level, s.log_format) == ("INFO", "auto")
    assert s.aws_region == "us-east-1"
    assert s.redis_timeout == 0.5
    assert s.redis_retry_seconds == 1.0
    assert s.redis_key_prefix == ""
    assert s.popular_refresh_seconds == 900.0
    assert s.popular_warm_limits == (20, 50)
    assert (s.cache_l1_ttl, s.cache_l1_size, s.cache_ttl_jitter) == (5.0, 2048, 0.1)
    assert s.database_url is None and s.redis_url is None
    assert s.aws_secret_access_key == "" and s.cloudfront_private_key == ""


def test_empty_and_blank_values_mean_unset() -> None:
    env = {"DB_POOL_MAX": "", "EDGE_PORT": "   ", "DATABASE_URL": "", "REDIS_HOST": " "}
    assert Settings.from_env(env) == Settings()


def test_values_are_parsed() -> None:
    s = Settings.from_env(
        {
            "DB_POOL_MIN": "2",
            "DB_POOL_MAX": "2",
            "DB_POOL_ACQUIRE_TIMEOUT": "2.5",
            "ALERT_CACHE_HIT_RATE": "1",
            "EDGE_PORT": " 9000 ",
            "EDGE_DATA_DIR": "/srv/edge",
            "EDGE_LOG_LEVEL": "debug",
            "EDGE_LOG_FORMAT": "JSON",
            "EDGE_POPULAR_WARM_LIMITS": "10, 30,100",
        }
    )
    assert (s.db_pool_min, s.db_pool_max, s.db_pool_acquire_timeout) == (2, 2, 2.5)
    assert s.alert_cache_hit_rate == 1.0
    assert s.port == 9000
    assert s.media_root == Path("/srv/edge/media")
    assert (s.log_level, s.log_format) == ("DEBUG", "json")
    assert s.popular_warm_limits == (10, 30, 100)


def test_media_dir_overrides_the_data_dir() -> None:
    s = Settings.from_env({"EDGE_DATA_DIR": "/srv/edge", "EDGE_MEDIA_DIR": "/mnt/media"})
    assert s.media_root == Path("/mnt/media")


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes", "on"])
def test_true_flags(value: str) -> None:
    assert Settings.from_env({"EDGE_DEMO_SEED": value}).demo_seed is True


@pytest.mark.parametrize("value", ["0", "false", "False", "no", "off"])
def test_false_flags(value: str) -> None:
    assert Settings.from_env({"EDGE_DEMO_SEED": value}).demo_seed is False


# -- PostgreSQL and Redis addresses -------------------------------------------------------------


def test_nothing_configured_means_embedded_servers() -> None:
    s = Settings.from_env({})
    assert s.embedded_postgres and s.embedded_redis


def test_database_url_wins_over_db_variables() -> None:
    url = "postgresql://edge:secret@db.internal:5432/edge"
    s = Settings.from_env({"DATABASE_URL": url, "DB_HOST": "other", "DB_PORT": "1"})
    assert s.database_url == url
    assert not s.embedded_postgres
    assert s.embedded_redis


def test_postgres_scheme_alias_is_accepted() -> None:
    url = "postgres://edge@db.internal/edge"
    assert Settings.from_env({"DATABASE_URL": url}).database_url == url


def test_db_variables_compose_a_url_with_quoted_credentials() -> None:
    password = "p@ss:w/rd%#?& ü"
    s = Settings.from_env(
        {
            "DB_HOST": "db.internal",
            "DB_PORT": "6543",
            "DB_USERNAME": "edge@app",
            "DB_PASSWORD": password,
            "DB_NAME": "catalog",
        }
    )
    assert s.database_url is not None
    assert not s.embedded_postgres
    parts = urlsplit(s.database_url)
    assert parts.scheme == "postgresql"
    assert (parts.hostname, parts.port) == ("db.internal", 6543)
    assert parts.username is not None and unquote(parts.username) == "edge@app"
    assert parts.password is not None and unquote(parts.password) == password
    assert parts.path == "/catalog"
    assert not parts.query and not parts.fragment


def test_db_variable_defaults() -> None:
    s = Settings.from_env({"DB_HOST": "db.internal"})
    assert s.database_url == "postgresql://postgres@db.internal:5432/edge"


def test_redis_url_wins_over_redis_variables() -> None:
    url = "redis://cache.internal:6379/2"
    s = Settings.from_env({"REDIS_URL": url, "REDIS_HOST": "other", "REDIS_PASSWORD": "x"})
    assert s.redis_url == url
    assert not s.embedded_redis
    assert s.embedded_postgres


def test_redis_variables_compose_a_url_redis_py_reads_back() -> None:
    password = "a:b@c/d%e#f"
    s = Settings.from_env(
        {
            "REDIS_HOST": "cache.internal",
            "REDIS_PORT": "6380",
            "REDIS_DB": "3",
            "REDIS_PASSWORD": password,
        }
    )
    assert s.redis_url is not None
    assert not s.embedded_redis
    parsed = parse_url(s.redis_url)  # type: ignore[no-untyped-call]
    assert parsed["host"] == "cache.internal"
    assert parsed["port"] == 6380
    assert parsed["db"] == 3
    assert parsed["password"] == password


def test_redis_variable_defaults() -> None:
    s = Settings.from_env({"REDIS_HOST": "cache.internal"})
    assert s.redis_url == "redis://cache.internal:6379/0"


# -- bad values ---------------------------------------------------------------------------------

BAD_VALUES: list[tuple[str, dict[str, str]]] = [
    ("DB_PORT", {"DB_HOST": "db.internal", "DB_PORT": "five"}),
    ("DB_PORT", {"DB_HOST": "db.internal", "DB_PORT": "70000"}),
    ("DB_POOL_MIN", {"DB_POOL_MIN": "30"}),
    ("DB_POOL_MIN", {"DB_POOL_MIN": "10", "DB_POOL_MAX": "5"}),
    ("DB_POOL_MIN", {"DB_POOL_MIN": "-1"}),
    ("DB_POOL_MAX", {"DB_POOL_MAX": "0"}),
    ("DB_POOL_ACQUIRE_TIMEOUT", {"DB_POOL_ACQUIRE_TIMEOUT": "soon"}),
    ("ALERT_CACHE_HIT_RATE", {"ALERT_CACHE_HIT_RATE": "1.5"}),
    ("ALERT_CACHE_HIT_RATE", {"ALERT_CACHE_HIT_RATE": "-0.1"}),
    ("ALERT_CACHE_HIT_RATE", {"ALERT_CACHE_HIT_RATE": "80%"}),
    ("ALERT_RESPONSE_TIME_MS", {"ALERT_RESPONSE_TIME_MS": "0"}),
    ("ALERT_MEMORY_USAGE_MB", {"ALERT_MEMORY_USAGE_MB": "1.5"}),
    ("EDGE_LOG_FORMAT", {"EDGE_LOG_FORMAT": "xml"}),
    ("EDGE_UPSTREAM_BUFFER", {"EDGE_UPSTREAM_BUFFER": "1024"}),
    ("EDGE_UPSTREAM_BUFFER", {"EDGE_UPSTREAM_BUFFER": "64k"}),
    ("EDGE_STREAM_KERNEL_UNSENT", {"EDGE_STREAM_KERNEL_UNSENT": "-1"}),
    ("EDGE_STREAM_KERNEL_UNSENT", {"EDGE_STREAM_KERNEL_UNSENT": "128k"}),
    ("EDGE_STREAM_KERNEL_UNSENT", {"EDGE_STREAM_KERNEL_UNSENT": "1"}),
    ("EDGE_WORKERS", {"EDGE_WORKERS": "0"}),
    ("EDGE_WORKERS", {"EDGE_WORKERS": "65"}),
    ("EDGE_LOG_LEVEL", {"EDGE_LOG_LEVEL": "verbose"}),
    ("EDGE_DEMO_SEED", {"EDGE_DEMO_SEED": "maybe"}),
    ("EDGE_PORT", {"EDGE_PORT": "http"}),
    ("EDGE_PORT", {"EDGE_PORT": "65536"}),
    ("DATABASE_URL", {"DATABASE_URL": "mysql://edge@db.internal/edge"}),
    ("DATABASE_URL", {"DATABASE_URL": "db.internal:5432"}),
    ("REDIS_URL", {"REDIS_URL": "http://cache.internal"}),
    ("REDIS_PORT", {"REDIS_HOST": "cache.internal", "REDIS_PORT": "x"}),
    ("REDIS_DB", {"REDIS_HOST": "cache.internal", "REDIS_DB": "-1"}),
    ("EDGE_S3_ENDPOINT_URL", {"EDGE_S3_ENDPOINT_URL": "localhost:9000"}),
    ("EDGE_POPULAR_WARM_LIMITS", {"EDGE_POPULAR_WARM_LIMITS": "0"}),
    ("EDGE_POPULAR_WARM_LIMITS", {"EDGE_POPULAR_WARM_LIMITS": "20,101"}),
    ("EDGE_POPULAR_WARM_LIMITS", {"EDGE_POPULAR_WARM_LIMITS": "20,fifty"}),
    ("EDGE_CACHE_TTL_JITTER", {"EDGE_CACHE_TTL_JITTER": "0.9"}),
    ("EDGE_REDIS_TIMEOUT", {"EDGE_REDIS_TIMEOUT": "0"}),
]


@pytest.mark.parametrize(
    ("variable", "env"),
    BAD_VALUES,
    ids=[f"{v}={next(reversed(e.values()))}" for v, e in BAD_VALUES],
)
def test_bad_value_names_the_variable(variable: str, env: dict[str, str]) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    message = str(caught.value)
    # The README's format: "<VARIABLE>: <what is wrong>", on one line.
    assert message.startswith(f"{variable}: "), message
    assert "\n" not in message


def test_pool_error_names_both_bounds() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"DB_POOL_MIN": "30"})
    assert str(caught.value) == "DB_POOL_MIN: 30 is larger than DB_POOL_MAX (20)"


def test_unreadable_private_key_file(tmp_path: Path) -> None:
    for path in (tmp_path / "missing.pem", tmp_path):  # absent, and a directory
        with pytest.raises(SettingsError) as caught:
            Settings.from_env({"CLOUDFRONT_PRIVATE_KEY_FILE": str(path)})
        assert str(caught.value).startswith("CLOUDFRONT_PRIVATE_KEY_FILE: "), caught.value
        assert str(path) in str(caught.value)


PEM = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----"


def test_private_key_from_file_and_inline(tmp_path: Path) -> None:
    pem = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    key_file = tmp_path / "cf.pem"
    key_file.write_text(pem)
    pair = {"CLOUDFRONT_KEY_PAIR_ID": "K2EXAMPLE"}
    from_file = Settings.from_env({**pair, "CLOUDFRONT_PRIVATE_KEY_FILE": str(key_file)})
    assert from_file.cloudfront_private_key == pem
    inline = Settings.from_env({**pair, "CLOUDFRONT_PRIVATE_KEY": pem.strip().replace("\n", "\\n")})
    assert inline.cloudfront_private_key == pem.strip()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CDN_DOMAIN": "d111.cloudfront.net"}, "CDN_DOMAIN: CloudFront needs signed URLs"),
        (
            {"CDN_DOMAIN": "d111.cloudfront.net", "CLOUDFRONT_KEY_PAIR_ID": "K2EXAMPLE"},
            "CLOUDFRONT_PRIVATE_KEY(_FILE): required when CLOUDFRONT_KEY_PAIR_ID is set",
        ),
        (
            {"CLOUDFRONT_PRIVATE_KEY": PEM},
            "CLOUDFRONT_KEY_PAIR_ID: required when CLOUDFRONT_PRIVATE_KEY(_FILE) is set",
        ),
    ],
)
def test_cloudfront_without_its_key_pair_is_refused_at_start(
    env: dict[str, str], message: str
) -> None:
    """CloudFront refuses unsigned URLs: an Edge that would sign none must not start."""
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    assert str(caught.value).startswith(message), caught.value


def test_a_plain_origin_needs_no_cloudfront_key() -> None:
    settings = Settings.from_env({"EDGE_CDN_URL": "http://origin.internal:8080"})
    assert settings.cdn_base == "http://origin.internal:8080"
    assert not settings.cloudfront_key_pair_id
    with_pair = Settings.from_env(
        {
            "CDN_DOMAIN": "d111.cloudfront.net",
            "CLOUDFRONT_KEY_PAIR_ID": "K2",
            "CLOUDFRONT_PRIVATE_KEY": PEM,
        }
    )
    assert with_pair.cdn_base == "https://d111.cloudfront.net"


def test_url_errors_do_not_echo_credentials() -> None:
    for name, url in (
        ("DATABASE_URL", "mysql://edge:hunter2-db@db.internal/edge"),
        ("REDIS_URL", "http://:hunter2-redis@cache.internal/0"),
    ):
        with pytest.raises(SettingsError) as caught:
            Settings.from_env({name: url})
        assert str(caught.value).startswith(f"{name}: ")
        assert "hunter2" not in str(caught.value)


# -- secrets ------------------------------------------------------------------------------------

PG_PASSWORD = "pg-Pa55-in-url"
DB_PASSWORD = "db-Pa55-composed"
REDIS_PASSWORD = "redis-Pa55"
AWS_SECRET = "aws-Secret-Key-0123456789"
CF_KEY_BODY = "cfPrivateKeyBodyMIIEvQ"


def rendered(s: Settings) -> list[str]:
    return [repr(s), str(s), f"{s}", f"{s!r}", repr(dataclasses.asdict(s))]


def test_secrets_never_appear_in_repr_or_str() -> None:
    s = Settings.from_env(
        {
            "DATABASE_URL": f"postgresql://edge:{PG_PASSWORD}@db.internal:5432/edge",
            "REDIS_HOST": "cache.internal",
            "REDIS_PASSWORD": REDIS_PASSWORD,
            "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
            "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
            "CLOUDFRONT_KEY_PAIR_ID": "K2EXAMPLE",
            "CLOUDFRONT_PRIVATE_KEY": f"-----BEGIN PRIVATE KEY-----\\n{CF_KEY_BODY}\\n-----END",
        }
    )
    # The values are there for the code that needs them...
    assert s.database_url is not None and PG_PASSWORD in s.database_url
    assert s.redis_url is not None and REDIS_PASSWORD in s.redis_url
    assert s.aws_secret_access_key == AWS_SECRET
    assert CF_KEY_BODY in s.cloudfront_private_key
    # ...and never in what a log line or a traceback would show.
    for text in [*rendered(s), *rendered(s.with_(port=1))]:
        for secret in (PG_PASSWORD, REDIS_PASSWORD, AWS_SECRET, CF_KEY_BODY):
            assert secret not in text, f"{secret!r} leaks into {text!r}"
    # Settings that are not secret stay visible, so the repr is still useful.
    assert "AKIAEXAMPLE" in repr(s) and "K2EXAMPLE" in repr(s)


def test_composed_database_password_is_masked() -> None:
    s = Settings.from_env({"DB_HOST": "db.internal", "DB_PASSWORD": DB_PASSWORD})
    assert s.database_url is not None and DB_PASSWORD in s.database_url
    for text in rendered(s):
        assert DB_PASSWORD not in text


def test_every_secret_field_is_masked() -> None:
    """Whatever secret fields Settings grows, none shows in its repr."""
    secret_fields = [f.name for f in dataclasses.fields(Settings) if "Secret" in str(f.type)]
    assert {"database_url", "redis_url", "aws_secret_access_key", "cloudfront_private_key"} <= set(
        secret_fields
    )
    values = {name: Secret(f"leak-{name}-0xC0FFEE") for name in secret_fields}
    s = Settings().with_(**values)
    for text in rendered(s):
        for value in values.values():
            assert value not in text, f"{value} leaks into {text!r}"


def test_secret_repr_is_masked() -> None:
    assert repr(Secret("x")) == "Secret('**********')"
    assert repr(Secret()) == "Secret('')"
    assert "x" not in repr([Secret("x")])


# -- the command line ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command", [["serve"], ["migrate"], ["refresh"], ["seed", "--tracks", "1"]]
)
def test_configuration_error_is_one_line_and_exit_2(command: list[str], tmp_path: Path) -> None:
    result = run_edge(command, clean_env(DB_POOL_MIN="30"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert lines == ["edge: configuration error: DB_POOL_MIN: 30 is larger than DB_POOL_MAX (20)"]
    assert result.stdout == ""
    # It failed before starting anything: no embedded data dir was created.
    assert list(tmp_path.iterdir()) == []


def test_help(tmp_path: Path) -> None:
    # Help needs no configuration, not even a valid one.
    env = clean_env(DB_POOL_MIN="30")
    top = run_edge(["--help"], env, cwd=tmp_path)
    assert top.returncode == 0, top.stderr
    # "usage: edge [-h] {serve,migrate,...} ...": every command the CLI has, new ones included.
    listed = re.search(r"\{([\w,-]+)\}", top.stdout)
    assert top.stdout.startswith("usage: edge") and listed, top.stdout
    commands = listed.group(1).split(",")
    assert set(COMMANDS) <= set(commands)
    for command in commands:
        sub = run_edge([command, "--help"], env, cwd=tmp_path)
        assert sub.returncode == 0, sub.stderr
        assert sub.stdout.startswith(f"usage: edge {command}"), sub.stdout
    assert list(tmp_path.iterdir()) == []


def test_unknown_command_is_a_usage_error(tmp_path: Path) -> None:
    result = run_edge(["launch"], clean_env(), cwd=tmp_path)
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_console_script_is_the_cli() -> None:
    (script,) = entry_points(group="console_scripts", name="edge")
    assert script.value == "edge.cli:main"
    from edge.cli import main

    assert script.load() is main
