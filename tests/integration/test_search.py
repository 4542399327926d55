"""Search finds what people type: folded diacritics, punctuation, prefixes, one typo."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
import pytest_asyncio

from edge import keys
from edge.catalog import RECOUNT_SEARCH_WORDS_SQL, Catalog, cursor_kind

Client = Any


async def titles(client: Client, q: str, limit: int = 20) -> list[str]:
    resp = await client.get("/api/v1/search", params={"q": q, "limit": str(limit)})
    body = await resp.json()
    assert resp.status == 200, body
    return [t["title"] for t in body["items"]]


async def artists(client: Client, q: str) -> set[str]:
    resp = await client.get("/api/v1/search", params={"q": q})
    return {t["artist"]["name"] for t in (await resp.json())["items"]}


@pytest.mark.parametrize(
    ("query", "artist"),
    [
        ("dvorak", "Antonín Dvořák"),
        ("Dvořák", "Antonín Dvořák"),
        ("DVORAK", "Antonín Dvořák"),
        ("antonin dvorak", "Antonín Dvořák"),
        ("beyonce", "Beyoncé"),
        ("Beyoncé", "Beyoncé"),
        ("acdc", "AC/DC"),
        ("ac dc", "AC/DC"),
        ("AC/DC", "AC/DC"),
        ("ac/dc", "AC/DC"),
        ("rem", "R.E.M."),
        ("R.E.M.", "R.E.M."),
        ("r.e.m", "R.E.M."),
        ("sigur ros", "Sigur Rós"),
        ("motorhead", "Motörhead"),
    ],
)
async def test_diacritics_and_punctuation(
    client: Client, catalog: dict[str, Any], query: str, artist: str
) -> None:
    assert await artists(client, query) == {artist}


@pytest.mark.parametrize(
    ("query", "title"),
    [
        ("hoppipolla", "Hoppípolla"),
        ("glosoli", "Glósóli"),
        ("losing religion", "Losing My Religion"),
        ("religion losing", "Losing My Religion"),
        ("hell", "Hells Bells"),  # the last word is completed as you type
        ("shiny hap", "Shiny Happy People"),
        ("allegro con fuoco", "Allegro con fuoco"),
    ],
)
async def test_titles(client: Client, catalog: dict[str, Any], query: str, title: str) -> None:
    assert title in await titles(client, query)


@pytest.mark.parametrize(
    ("typo", "title"),
    [
        ("relgion", "Losing My Religion"),  # deletion
        ("religoin", "Losing My Religion"),  # transposition
        ("relixion", "Losing My Religion"),  # substitution
        ("religione", "Losing My Religion"),  # insertion
        ("formaton", "Formation"),
        ("thrll shoot", "Shoot to Thrill"),
        ("beyonse", "Formation"),
        ("dvorek largo", "Largo"),
        ("hoppipola", "Hoppípolla"),
        ("higway to hell", "Highway to Hell"),
    ],
)
async def test_one_typo_in_a_long_word(
    client: Client, catalog: dict[str, Any], typo: str, title: str
) -> None:
    assert title in await titles(client, typo)


@pytest.mark.parametrize("query", ["relgn", "xyzzy", "qqqqqqq", "formulation", "hel bels"])
async def test_what_is_not_there_is_not_found(
    client: Client, catalog: dict[str, Any], query: str
) -> None:
    # Two typos in a word, short words, and real words that only look alike find nothing.
    assert await titles(client, query) == []


async def test_album_titles_are_searched(client: Client, catalog: dict[str, Any]) -> None:
    found = await titles(client, "lemonade")
    assert set(found) == {"Formation", "Hold Up"}


async def test_title_match_ranks_above_album_match(client: Client, catalog: dict[str, Any]) -> None:
    # "Back in Black" is a title and the album of three tracks; the title wins.
    found = await titles(client, "back in black")
    assert found[0] == "Back in Black"
    assert set(found) == {"Back in Black", "Hells Bells", "Shoot to Thrill"}


async def test_popularity_breaks_ties(client: Client, catalog: dict[str, Any]) -> None:
    # All AC/DC tracks match only by artist: most played first.
    assert await titles(client, "acdc") == [
        "Highway to Hell",
        "Back in Black",
        "Hells Bells",
        "Shoot to Thrill",
    ]


async def test_markup_and_sql_are_just_text(client: Client, catalog: dict[str, Any]) -> None:
    for q in ["'; DROP TABLE tracks; --", "a & b | !c", "<script>", "hells:*", "(bells"]:
        resp = await client.get("/api/v1/search", params={"q": q})
        assert resp.status in (200, 400)
    assert "Hells Bells" in await titles(client, "(bells")


async def test_new_tracks_are_searchable_at_once(
    client: Client, catalog: dict[str, Any], db: Any
) -> None:
    await db.execute(
        "INSERT INTO tracks (title, artist_id, duration_ms) VALUES ('Zebrafish Überlied', $1, 1)",
        catalog["artists"]["rem"],
    )
    assert await titles(client, "uberlied") == ["Zebrafish Überlied"]
    # The new word is in the typo vocabulary too.
    assert await titles(client, "zebrafsh") == ["Zebrafish Überlied"]


async def test_renamed_artist_is_searchable_by_the_new_name(
    client: Client, catalog: dict[str, Any], db: Any
) -> None:
    await db.execute(
        "UPDATE artists SET name = 'Ĉepelinoj' WHERE id = $1", catalog["artists"]["sigur"]
    )
    assert set(await titles(client, "cepelinoj")) == {"Hoppípolla", "Glósóli"}


async def test_broad_queries_are_listed_by_popularity(
    make_client: Client, catalog: dict[str, Any], db: Any
) -> None:
    # A word in 60 tracks, with a threshold of 50: a broad query.
    artist = await db.fetchval("INSERT INTO artists (name) VALUES ('Chorus') RETURNING id")
    await db.execute(
        "INSERT INTO tracks (title, artist_id, duration_ms, play_count)"
        " SELECT 'Anthem ' || g, $1, 1000, (g * 7919) % 1000 FROM generate_series(1, 60) g",
        artist,
    )
    await db.execute(
        "UPDATE search_words w SET ndoc = s.ndoc"
        " FROM ts_stat('SELECT search_tsv FROM tracks') s WHERE s.word = w.word"
    )
    client = await make_client(search_broad_matches=50)
    seen: list[dict[str, Any]] = []
    cursor = None
    pages = 0
    for _ in range(10):
        params = {"q": "anthem", "limit": "25"} | ({"cursor": cursor} if cursor else {})
        body = await (await client.get("/api/v1/search", params=params)).json()
        pages += 1
        seen += body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert cursor_kind(cursor) == "search-popular"  # every page, including those after one
    assert len(seen) == 60 and len({t["id"] for t in seen}) == 60
    plays = [t["play_count"] for t in seen]
    assert plays == sorted(plays, reverse=True)
    # Each page is one statement: the plan is made in the same round trip as the page.
    registry = client.app[keys.METRICS].registry
    assert pages == 3
    assert (
        registry.get_sample_value("edge_db_query_duration_seconds_count", {"query": "search"})
        == pages
    )
    for other in ("search_plan", "search_popular"):
        assert not registry.get_sample_value(
            "edge_db_query_duration_seconds_count", {"query": other}
        )
    # A narrow query on the same client is still ranked by relevance.
    assert (await titles(client, "back in black"))[0] == "Back in Black"


# -- the three orders: ranked, tiers, popular ----------------------------------------------------


async def walk_search(
    catalog: Catalog,
    q: str,
    limit: int,
    between_pages: Callable[[], Awaitable[None]] | None = None,
) -> tuple[list[dict[str, Any]], set[str | None]]:
    """Every item of a search, page by page with Catalog.search, and the kinds of its cursors."""
    items: list[dict[str, Any]] = []
    kinds: set[str | None] = set()
    cursor = None
    for _ in range(1000):
        page = await catalog.search(q, limit, cursor)
        items += [orjson.loads(doc) for doc in page.docs]
        if page.next_cursor is None:
            return items, kinds
        kinds.add(cursor_kind(page.next_cursor))
        cursor = page.next_cursor
        if between_pages is not None:
            await between_pages()
    raise AssertionError("pagination did not end")


async def add_tracks(
    db: Any, artist: str, titles_plays: list[tuple[str, int]], album: str | None = None
) -> list[int]:
    artist_id = await db.fetchval("INSERT INTO artists (name) VALUES ($1) RETURNING id", artist)
    album_id = None
    if album is not None:
        album_id = await db.fetchval(
            "INSERT INTO albums (artist_id, title) VALUES ($1, $2) RETURNING id", artist_id, album
        )
    rows = await db.fetch(
        "INSERT INTO tracks (title, artist_id, album_id, duration_ms, play_count)"
        " SELECT u.title, $1, $2, 1000, u.plays FROM unnest($3::text[], $4::bigint[])"
        " AS u(title, plays) RETURNING id",
        artist_id,
        album_id,
        [t for t, _ in titles_plays],
        [p for _, p in titles_plays],
    )
    return [r["id"] for r in rows]


@pytest_asyncio.fixture
async def zephyr(catalog: dict[str, Any], db: Any) -> dict[int, int]:
    """Tracks that match "zephyr" in the title, the artist or only the album; the most played
    ones match only by album and artist, so the title tier is sparse among popular tracks.
    Returns the tier (3 title, 2 artist, 1 album) of each track id."""
    tiers: dict[int, int] = {}
    plays = [(f"Zephyr {i}", i % 4) for i in range(12)]  # many equal counts: the id decides
    for track_id in await add_tracks(db, "Plain Folk", plays):
        tiers[track_id] = 3
    # In the title and the artist: the title tier.
    for track_id in await add_tracks(db, "Zephyr Kids", [("Zephyrs Return", 2)]):
        tiers[track_id] = 3
    plays = [(f"Song {i}", 30_000 + i % 3) for i in range(5)]  # equal counts: the id decides
    for track_id in await add_tracks(db, "Zephyr Band", plays):
        tiers[track_id] = 2
    plays = [(f"Tune {i}", 40_000 + i) for i in range(8)] + [(f"Coda {i}", i) for i in range(4)]
    for track_id in await add_tracks(db, "Nobody Famous", plays, album="Zephyr Sessions"):
        tiers[track_id] = 1
    await db.execute(RECOUNT_SEARCH_WORDS_SQL)  # as a refresh does: the estimate sees them
    return tiers


@pytest.mark.parametrize("walk_entries", [20_000, 12])
async def test_middling_queries_are_listed_by_tier(
    client: Client, db: Any, zephyr: dict[int, int], walk_entries: int
) -> None:
    # Title matches, then artist, then album; each tier by popularity. With 12 entries to walk,
    # no tier has a page among the 12 most played tracks: every tier is read from its own index.
    catalog = Catalog(
        client.app[keys.PG_POOL],
        client.app[keys.METRICS],
        broad_matches=1_000,
        tier_matches=10,
        walk_entries=walk_entries,
    )
    items, kinds = await walk_search(catalog, "zephyr", 4)
    assert kinds == {"search-tier"}
    plays = {r["id"]: r["play_count"] for r in await db.fetch("SELECT id, play_count FROM tracks")}
    expected = sorted(zephyr, key=lambda i: (zephyr[i], plays[i], i), reverse=True)
    assert [t["id"] for t in items] == expected


async def test_tiers_walk_with_concurrent_inserts(
    client: Client, db: Any, zephyr: dict[int, int]
) -> None:
    catalog = Catalog(
        client.app[keys.PG_POOL], client.app[keys.METRICS], broad_matches=1_000, tier_matches=10
    )
    inserted: list[int] = []

    async def insert_more() -> None:
        # Ahead of every cursor: a title match, the most played track of all.
        inserted.extend(await add_tracks(db, "Latecomer", [("Zephyr Again", 10**9)]))

    items, kinds = await walk_search(catalog, "zephyr", 5, insert_more)
    ids = [t["id"] for t in items]
    assert kinds == {"search-tier"}
    assert len(ids) == len(set(ids)), "a track was returned twice"
    assert set(zephyr) <= set(ids), "tracks were lost"
    assert not set(inserted) & set(ids[5:])


async def test_a_broad_estimate_that_finds_few_tracks_is_ranked(
    client: Client, catalog: dict[str, Any], db: Any
) -> None:
    # "alpha" and "beta" are each in 32 tracks (estimate 32, above 20: broad), together in two:
    # no page of 3 among the most played tracks, so the two are ranked.
    await add_tracks(db, "Greek One", [(f"Alpha {i}", 5_000) for i in range(30)])
    await add_tracks(db, "Greek Two", [(f"Beta {i}", 5_000) for i in range(30)])
    await add_tracks(db, "Alpha Beta Band", [("Gamma", 9_000)])  # more played, matched by artist
    await add_tracks(db, "Solo", [("Alpha Beta", 1)])  # the title: the better match
    await db.execute(RECOUNT_SEARCH_WORDS_SQL)
    catalog_ = Catalog(client.app[keys.PG_POOL], client.app[keys.METRICS], broad_matches=20)
    page = await catalog_.search("alpha beta", 2, None)
    # Ranked: the title match first. By popularity, Gamma would be.
    assert [orjson.loads(doc)["title"] for doc in page.docs] == ["Alpha Beta", "Gamma"]
    assert page.next_cursor is None


async def test_a_name_too_long_for_the_walking_index_is_still_listed(
    make_client: Client, catalog: dict[str, Any], db: Any
) -> None:
    await add_tracks(db, "Chorus", [(f"Anthem {i}", 100 * i) for i in range(1, 61)])
    long_title = "Anthem " + " ".join(f"verse{i}" for i in range(300))
    (long_id,) = await add_tracks(db, "Chorus Two", [(long_title, 150)])
    assert not await db.fetchval(
        "SELECT edge_search_tsv_fits(search_tsv) FROM tracks WHERE id = $1", long_id
    )
    await db.execute(RECOUNT_SEARCH_WORDS_SQL)
    client = await make_client(search_broad_matches=50)
    found: list[dict[str, Any]] = []
    cursor = None
    while True:
        params = {"q": "anthem", "limit": "7"} | ({"cursor": cursor} if cursor else {})
        body = await (await client.get("/api/v1/search", params=params)).json()
        found += body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    plays = [t["play_count"] for t in found]
    assert len(found) == 61 and plays == sorted(plays, reverse=True)
    assert [t["id"] for t in found].index(long_id) == 59  # after 6000..200, before 100


async def test_a_common_last_word_is_tested_not_looked_up(
    client: Client, catalog: dict[str, Any], db: Any
) -> None:
    # "hel" completes to 122 tracks, "quokka" is in 2: the index lookup is "quokka" alone and
    # each of its tracks is tested against the whole query.
    await add_tracks(db, "Greeter", [(f"Hello {i}", 10) for i in range(120)])
    await add_tracks(db, "Marsupial", [("Quokka Hello", 5), ("Quokka Goodbye", 50)])
    await db.execute(RECOUNT_SEARCH_WORDS_SQL)
    plan = await db.fetchrow(
        "SELECT tsq::text, index_tsq::text FROM edge_search_plan($1)", "quokka hel"
    )
    assert plan["index_tsq"] == "'quokka'" and plan["tsq"] != plan["index_tsq"]
    assert await titles(client, "quokka hel") == ["Quokka Hello"]
    assert await titles(client, "quokka") == ["Quokka Goodbye", "Quokka Hello"]
