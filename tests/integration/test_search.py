"""Search finds what people type: folded diacritics, punctuation, prefixes, one typo."""

from __future__ import annotations

from typing import Any

import pytest

from edge import keys

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
    for _ in range(10):
        params = {"q": "anthem", "limit": "25"} | ({"cursor": cursor} if cursor else {})
        body = await (await client.get("/api/v1/search", params=params)).json()
        seen += body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 60 and len({t["id"] for t in seen}) == 60
    plays = [t["play_count"] for t in seen]
    assert plays == sorted(plays, reverse=True)
    registry = client.app[keys.METRICS].registry
    popular_pages = registry.get_sample_value(
        "edge_db_query_duration_seconds_count", {"query": "search_popular"}
    )
    assert popular_pages == 3  # every page, including those after a cursor
    assert not registry.get_sample_value(
        "edge_db_query_duration_seconds_count", {"query": "search"}
    )
    # A narrow query on the same client is still ranked by relevance.
    assert (await titles(client, "back in black"))[0] == "Back in Black"
