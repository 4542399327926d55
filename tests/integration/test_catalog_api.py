"""Every catalog endpoint against a real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import orjson
import pytest

from edge import keys

Client = Any


async def get_json(client: Client, url: str, status: int = 200) -> Any:
    resp = await client.get(url)
    body = await resp.json()
    assert resp.status == status, body
    return body


async def test_track_with_renditions(client: Client, catalog: dict[str, Any]) -> None:
    body = await get_json(client, f"/api/v1/tracks/{catalog['tracks']['hells']}")
    assert body["title"] == "Hells Bells"
    assert body["artist"] == {"id": catalog["artists"]["acdc"], "name": "AC/DC"}
    assert body["album"] == {"id": catalog["albums"]["black"], "title": "Back in Black"}
    assert body["genre"] == "rock"
    assert body["track_number"] == 1
    assert [(r["format"], r["bitrate_kbps"]) for r in body["renditions"]] == [
        ("flac", 900),
        ("mp3", 128),
    ]
    assert body["renditions"][1]["object_key"] == "k/a.mp3"
    assert body["renditions"][1]["content_type"] == "audio/mpeg"


async def test_documents_are_compact_json(client: Client, catalog: dict[str, Any]) -> None:
    """PostgreSQL's json text has spaces around every colon; what is cached and sent has none."""
    for url in (
        f"/api/v1/tracks/{catalog['tracks']['hells']}",
        "/api/v1/tracks/popular",
        "/api/v1/search?q=hells",
    ):
        resp = await client.get(url)
        assert resp.status == 200
        body = await resp.read()
        assert body == orjson.dumps(orjson.loads(body)), url


async def test_track_without_renditions_has_empty_list(
    client: Client, catalog: dict[str, Any]
) -> None:
    body = await get_json(client, f"/api/v1/tracks/{catalog['tracks']['largo']}")
    assert body["renditions"] == []


async def test_popular_is_ordered_by_plays(client: Client, catalog: dict[str, Any]) -> None:
    body = await get_json(client, "/api/v1/tracks/popular?limit=3")
    assert [t["title"] for t in body["items"]] == [
        "Losing My Religion",
        "Highway to Hell",
        "Back in Black",
    ]
    assert body["next_cursor"]


async def test_recent_is_newest_first(client: Client, catalog: dict[str, Any], db: Any) -> None:
    newest = catalog["tracks"]["glosoli"]
    await db.execute(
        "UPDATE tracks SET created_at = now() + interval '1 day' WHERE id = $1", newest
    )
    body = await get_json(client, "/api/v1/tracks/recent?limit=2")
    assert body["items"][0]["id"] == newest
    created = [t["created_at"] for t in body["items"]]
    assert created == sorted(created, reverse=True)


async def test_artist(client: Client, catalog: dict[str, Any]) -> None:
    body = await get_json(client, f"/api/v1/artists/{catalog['artists']['acdc']}")
    assert body["name"] == "AC/DC"
    assert body["track_count"] == 4
    assert [a["title"] for a in body["albums"]] == ["Back in Black", "Highway to Hell"]


async def test_artist_tracks_by_popularity(client: Client, catalog: dict[str, Any]) -> None:
    body = await get_json(client, f"/api/v1/artists/{catalog['artists']['acdc']}/tracks")
    assert [t["title"] for t in body["items"]] == [
        "Highway to Hell",
        "Back in Black",
        "Hells Bells",
        "Shoot to Thrill",
    ]
    assert body["next_cursor"] is None


async def test_artist_without_tracks_is_an_empty_list(
    client: Client, catalog: dict[str, Any]
) -> None:
    body = await get_json(client, f"/api/v1/artists/{catalog['artists']['solo']}/tracks")
    assert body == {"items": [], "next_cursor": None}


async def test_album_tracks_in_order(client: Client, catalog: dict[str, Any]) -> None:
    body = await get_json(client, f"/api/v1/albums/{catalog['albums']['black']}")
    assert body["title"] == "Back in Black"
    assert body["artist"]["name"] == "AC/DC"
    assert [t["track_number"] for t in body["tracks"]] == [1, 2, 6]


async def test_genre_tracks(client: Client, catalog: dict[str, Any]) -> None:
    body = await get_json(client, "/api/v1/genres/pop/tracks")
    assert [t["title"] for t in body["items"]] == ["Formation", "Shiny Happy People", "Hold Up"]


async def test_playlist_entries_in_order(client: Client, catalog: dict[str, Any]) -> None:
    body = await get_json(client, f"/api/v1/playlists/{catalog['playlist']}?limit=3")
    assert body["name"] == "Road Trip"
    assert body["track_count"] == 5
    assert [e["position"] for e in body["items"]] == [0, 1, 2]
    assert [e["track"]["id"] for e in body["items"]] == catalog["playlist_order"][:3]
    rest = await get_json(
        client, f"/api/v1/playlists/{catalog['playlist']}?limit=3&cursor={body['next_cursor']}"
    )
    assert [e["track"]["id"] for e in rest["items"]] == catalog["playlist_order"][3:]
    assert rest["next_cursor"] is None


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/tracks/999999",
        "/api/v1/artists/999999",
        "/api/v1/artists/999999/tracks",
        "/api/v1/albums/999999",
        "/api/v1/playlists/999999",
        "/api/v1/genres/polka/tracks",
    ],
)
async def test_unknown_ids_are_404(client: Client, path: str) -> None:
    body = await get_json(client, path, 404)
    assert body["error"]["code"] == "not_found"
    assert body["error"]["message"]


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/tracks/abc",
        "/api/v1/tracks/-1",
        "/api/v1/tracks/0",
        "/api/v1/tracks/99999999999999999999999",
        "/api/v1/tracks/%D9%A3",  # an Arabic-Indic digit: isdigit() but not an id
        "/api/v1/tracks/popular?limit=0",
        "/api/v1/tracks/popular?limit=101",
        "/api/v1/tracks/popular?limit=ten",
        "/api/v1/tracks/popular?cursor=garbage!",
        "/api/v1/tracks/recent?cursor=WyJwb3B1bGFyIiwyXQ",  # a popular cursor on recent
        "/api/v1/search?q=",
        "/api/v1/search?q=%20%21%3F",
        "/api/v1/search?q=" + "a" * 201,
        "/api/v1/search?q=love&limit=1000",
        "/api/v1/artists/1/tracks?cursor=" + "x" * 600,
    ],
)
async def test_bad_parameters_are_400(client: Client, path: str) -> None:
    body = await get_json(client, path, 400)
    assert body["error"]["code"] in {"bad_request", "bad_cursor"}


async def test_unknown_route_is_json_404(client: Client) -> None:
    resp = await client.get("/api/v1/nope")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "not_found"


async def test_wrong_method_is_json_405(client: Client, catalog: dict[str, Any]) -> None:
    resp = await client.post(f"/api/v1/tracks/{catalog['tracks']['hells']}")
    assert resp.status == 405
    assert (await resp.json())["error"]["code"] == "method_not_allowed"
    assert "GET" in resp.headers["Allow"]


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/tracks/{hells}",
        "/api/v1/tracks/popular",
        "/api/v1/search?q=hell",
        "/api/v1/artists/{acdc}",
        "/api/v1/playlists/{playlist}",
    ],
)
async def test_etag_and_304(client: Client, catalog: dict[str, Any], path: str) -> None:
    url = path.format(
        hells=catalog["tracks"]["hells"],
        acdc=catalog["artists"]["acdc"],
        playlist=catalog["playlist"],
    )
    first = await client.get(url)
    etag = first.headers["ETag"]
    assert etag.startswith('"') and etag.endswith('"')
    again = await client.get(url, headers={"If-None-Match": etag})
    assert again.status == 304
    assert await again.read() == b""
    assert again.headers["ETag"] == etag
    other = await client.get(url, headers={"If-None-Match": '"something-else"'})
    assert other.status == 200
    listed = await client.get(url, headers={"If-None-Match": f'"x", W/{etag}'})
    assert listed.status == 304


async def test_request_id_is_echoed_or_generated(client: Client) -> None:
    resp = await client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert resp.headers["X-Request-ID"] == "abc-123"
    resp = await client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
    assert resp.headers["X-Request-ID"] != "bad id\twith spaces"
    assert len(resp.headers["X-Request-ID"]) == 32


async def test_readyz(client: Client) -> None:
    body = await get_json(client, "/readyz")
    assert body == {"status": "ready", "checks": {"postgres": "ok", "redis": "ok"}}


async def test_statement_whose_connection_dies_is_run_again(
    make_client: Any, catalog: dict[str, Any], database_url: str
) -> None:
    """A backend terminated while it runs a catalog read: the read runs again on a new
    connection and the listener gets their answer, not an error."""
    client = await make_client(db_pool_min=1, db_pool_max=2)
    locker = await asyncpg.connect(database_url)
    admin = await asyncpg.connect(database_url)

    async def lock_waiter() -> int:
        """The pid of an Edge backend queued behind the lock (polled for up to 10 s)."""
        for _ in range(1000):
            pid = await admin.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND application_name = 'edge'"
            )
            if pid is not None:
                return int(pid)
            await asyncio.sleep(0.01)
        raise AssertionError("Edge's statement never queued behind the lock")

    try:
        blocker = locker.transaction()
        await blocker.start()
        await locker.execute("LOCK TABLE artists IN ACCESS EXCLUSIVE MODE")
        request = asyncio.ensure_future(
            client.get(f"/api/v1/artists/{catalog['artists']['beyonce']}")
        )
        # Edge's statement queues behind the lock; terminate the backend running it.
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", await lock_waiter())
        # The retry queues behind the same lock on another backend; then let it through.
        await lock_waiter()
        await blocker.rollback()
        resp = await request
    finally:
        await locker.close()
        await admin.close()
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["name"] == "Beyoncé"
    registry = client.app[keys.METRICS].registry
    assert registry.get_sample_value("edge_db_retries_total", {"query": "artist"}) == 1.0


async def test_database_outage_is_503_and_recovers(
    make_client: Any, catalog: dict[str, Any], database_url: str
) -> None:
    client = await make_client()
    track = catalog["tracks"]["largo"]
    admin = await asyncpg.connect(database_url)
    try:
        # Kill every connection of Edge's pool: the next queries fail, the pool reconnects.
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await admin.close()
    statuses = []
    for _ in range(3):
        resp = await client.get(f"/api/v1/artists/{catalog['artists']['rem']}")
        statuses.append(resp.status)
        if resp.status == 503:
            assert (await resp.json())["error"]["code"] == "database_unavailable"
    assert set(statuses) <= {200, 503}
    assert statuses[-1] == 200
    assert (await client.get(f"/api/v1/tracks/{track}")).status == 200
