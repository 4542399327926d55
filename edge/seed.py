"""Catalog data: the demo catalog (real, playable audio) and synthetic catalogs at scale.

The demo catalog is what a newcomer browses and hears on first start. The synthetic catalog is
for benchmarks and search tests on a catalog of a real size: skewed play counts, many genres,
names with accents and punctuation, loaded with binary COPY. Tracks of a synthetic catalog share
`audio` sets of real renditions (track i plays set i mod audio), so every one of them can play.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import structlog

from edge.catalog import RECOUNT_SEARCH_WORDS_SQL
from edge.ingest import RenditionFile, Tags, encode_renditions, synthesize

log = structlog.get_logger(__name__)

# -- the demo catalog ---------------------------------------------------------------------------

DEMO_ARTISTS: tuple[tuple[str, str, tuple[tuple[str, int, tuple[str, ...]], ...]], ...] = (
    (
        "Antonín Dvořák Ensemble",
        "classical",
        (
            (
                "Largo & Other Mornings",
                2019,
                (
                    "Largo for a Slow Sunrise",
                    "Humoresque No. 7",
                    "Song to the Moon",
                    "Slavonic Dance",
                ),
            ),
            (
                "New World Sketches",
                2021,
                ("From the New World", "Goin' Home", "Prairie Lullaby", "Iowa Summer"),
            ),
        ),
    ),
    (
        "Zoë Ångström",
        "electronic",
        (
            (
                "Café Lumière",
                2022,
                ("Crème Brûlée", "Fjällräven Nights", "Über Alles Blue", "Déjà Vu (Club Mix)"),
            ),
            (
                "Polar Signals",
                2024,
                ("Aurora Borealis", "Noël in Tromsø", "Señal Débil", "Zero Kelvin"),
            ),
        ),
    ),
    (
        "M.O.T.H.",
        "rock",
        (
            (
                "Moths & Lanterns",
                2018,
                ("Don't Stop the Static", "R.P.M.", "Rock 'n' Roll Is Dead?!", "Flicker/Fade"),
            ),
            (
                "Live at the Lantern",
                2020,
                ("Overture (Live)", "Static, Again", "Night Bus No. 9", "Encore: Moth Song"),
            ),
        ),
    ),
    (
        "Los Niños del Mañana",
        "latin",
        (
            (
                "Canciones de Otoño",
                2017,
                (
                    "Mañana Será Otro Día",
                    "Corazón de Papel",
                    "Bésame Despacio",
                    "La Última Canción",
                ),
            ),
            (
                "Fiesta en São Paulo",
                2023,
                ("Samba do Avião", "Ação e Reação", "Cumbia Eléctrica", "Adiós, Amigo"),
            ),
        ),
    ),
    (
        "Kō & the Lanterns",
        "jazz",
        (
            (
                "Blue Hour in Kyōto",
                2016,
                (
                    "Take the Ōsaka Train",
                    "Round Midnight-ish",
                    "So What (Really)",
                    "Blue in Green Tea",
                ),
            ),
            (
                "Smoke Rings",
                2019,
                (
                    "Autumn Leaves, Again",
                    "Body & Soul Food",
                    "Night in Tunisia Café",
                    "Señor Blues",
                ),
            ),
        ),
    ),
)

DEMO_PLAYLIST = "Edge Demo Mix"
DEMO_USERS: tuple[tuple[str, str], ...] = (
    ("demo-free", "free"),
    ("demo-premium", "premium"),
    ("demo-hifi", "hifi"),
)


@dataclass(frozen=True, slots=True)
class DemoTrack:
    index: int
    title: str
    artist: str
    album: str
    genre: str
    track_number: int
    duration_s: float


def demo_tracks() -> list[DemoTrack]:
    tracks: list[DemoTrack] = []
    for artist, genre, albums in DEMO_ARTISTS:
        for album, _year, titles in albums:
            for number, title in enumerate(titles, start=1):
                index = len(tracks)
                # Short pieces keep the first start fast; long enough to hear and to seek in.
                duration = 10.0 + (index * 7) % 5
                tracks.append(DemoTrack(index, title, artist, album, genre, number, duration))
    return tracks


def _encode_demo_track(track: DemoTrack, media_root: Path) -> list[RenditionFile]:
    samples = synthesize(seed=track.index + 1, duration_s=track.duration_s)
    tags = Tags(track.title, track.artist, track.album, track.genre, track.track_number)
    return encode_renditions(samples, 44100, tags, media_root, f"demo/{track.index + 1:04d}")


async def encode_all(tracks: Sequence[DemoTrack], media_root: Path) -> list[list[RenditionFile]]:
    """Encode in worker threads (PyAV releases the GIL), never on the event loop."""
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="encode")
    futures = [loop.run_in_executor(pool, _encode_demo_track, t, media_root) for t in tracks]
    try:
        return list(await asyncio.gather(*futures))
    except BaseException:
        # One failure (or a stop) ends the whole seed: drop what has not started yet.
        for f in futures:
            f.cancel()
        raise
    finally:
        # Never wait for running encodes on the event loop.
        pool.shutdown(wait=False, cancel_futures=True)


async def seed_demo_if_empty(conn: asyncpg.Connection, media_root: Path) -> bool:
    if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM tracks)"):
        return False
    started = time.perf_counter()
    tracks = demo_tracks()
    log.info("demo_seed_started", tracks=len(tracks), media=str(media_root))
    files = await encode_all(tracks, media_root)
    rng = random.Random(7)
    async with conn.transaction():
        artist_ids: dict[str, int] = {}
        album_ids: dict[str, int] = {}
        for artist, _genre, albums in DEMO_ARTISTS:
            artist_ids[artist] = await conn.fetchval(
                "INSERT INTO artists (name) VALUES ($1) RETURNING id", artist
            )
            for album, year, _titles in albums:
                album_ids[album] = await conn.fetchval(
                    "INSERT INTO albums (artist_id, title, release_year) VALUES ($1, $2, $3) "
                    "RETURNING id",
                    artist_ids[artist],
                    album,
                    year,
                )
        track_ids = []
        now = datetime.now(UTC)
        for track, renditions in zip(tracks, files, strict=True):
            track_id = await conn.fetchval(
                "INSERT INTO tracks (title, artist_id, album_id, genre, track_number, duration_ms,"
                " play_count, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
                track.title,
                artist_ids[track.artist],
                album_ids[track.album],
                track.genre,
                track.track_number,
                renditions[0].duration_ms,
                int(1000 * rng.paretovariate(1.3)),
                now - timedelta(days=len(tracks) - track.index),
            )
            track_ids.append(track_id)
            await conn.executemany(
                INSERT_RENDITION_SQL, [_rendition_row(track_id, f) for f in renditions]
            )
        for name, tier in DEMO_USERS:
            await conn.execute("INSERT INTO users (name, tier) VALUES ($1, $2)", name, tier)
        playlist_id = await conn.fetchval(
            "INSERT INTO playlists (name, description) VALUES ($1, $2) RETURNING id",
            DEMO_PLAYLIST,
            "A little of everything in the demo catalog.",
        )
        mix = track_ids[::3]
        await conn.executemany(
            "INSERT INTO playlist_entries (playlist_id, position, track_id) VALUES ($1, $2, $3)",
            [(playlist_id, pos, tid) for pos, tid in enumerate(mix)],
        )
    await conn.execute("REFRESH MATERIALIZED VIEW popular_tracks_mv")
    log.info("demo_seed_done", tracks=len(tracks), seconds=round(time.perf_counter() - started, 2))
    return True


INSERT_RENDITION_SQL = """
INSERT INTO renditions (track_id, format, codec, bitrate_kbps, sample_rate, channels, bytes,
                        content_type, object_key, etag)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
"""


def _rendition_row(track_id: int, f: RenditionFile) -> tuple[object, ...]:
    return (
        track_id,
        f.spec.format,
        f.spec.codec,
        f.bitrate_kbps,
        f.sample_rate,
        f.channels,
        f.bytes,
        f.spec.content_type,
        f.object_key,
        f.etag,
    )


# -- synthetic catalogs at scale ----------------------------------------------------------------

GENRES = (
    "pop",
    "rock",
    "hip-hop",
    "r&b",
    "jazz",
    "classical",
    "electronic",
    "house",
    "techno",
    "ambient",
    "folk",
    "country",
    "blues",
    "metal",
    "punk",
    "indie",
    "latin",
    "reggaeton",
    "k-pop",
    "j-pop",
    "afrobeats",
    "soul",
    "funk",
    "disco",
    "gospel",
    "soundtrack",
    "world",
    "bossa nova",
    "samba",
    "flamenco",
    "fado",
    "chanson",
    "schlager",
    "drum & bass",
    "dubstep",
    "trance",
    "lo-fi",
    "synthwave",
    "grunge",
    "ska",
)
_SYLLABLES = (
    "ka",
    "lo",
    "mi",
    "ra",
    "ve",
    "no",
    "su",
    "ti",
    "ber",
    "dan",
    "el",
    "fa",
    "gri",
    "hu",
    "jo",
    "ké",
    "lü",
    "ña",
    "ør",
    "sa",
    "to",
    "an",
    "re",
    "mo",
    "li",
    "za",
    "ché",
    "bo",
    "du",
    "wen",
    "ya",
    "ro",
    "mé",
    "zi",
    "ta",
    "kö",
    "ís",
    "vå",
    "pa",
    "ne",
)
_WORDS = (
    "love",
    "night",
    "heart",
    "fire",
    "rain",
    "dream",
    "summer",
    "blue",
    "light",
    "dance",
    "river",
    "moon",
    "home",
    "road",
    "gold",
    "shadow",
    "city",
    "ocean",
    "wild",
    "time",
    "forever",
    "midnight",
    "sunrise",
    "electric",
    "paradise",
    "thunder",
    "velvet",
    "silver",
    "broken",
    "golden",
    "echo",
    "storm",
    "angel",
    "ghost",
    "mirror",
    "neon",
    "crystal",
    "sky",
    "corazón",
    "noche",
    "mañana",
    "amour",
    "été",
    "Straße",
    "fjord",
    "sakura",
    "señorita",
    "café",
    "naïve",
    "fiancé",
    "déjà",
    "über",
    "smörgåsbord",
    "piñata",
    "jalapeño",
)
_DECOR = (
    "",
    "",
    "",
    "",
    " (Remix)",
    " (Live)",
    " - Radio Edit",
    " (feat. {a})",
    "!",
    "?",
    " (Acoustic)",
    " Pt. 2",
    " No. {n}",
)


class _Names:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        # A few thousand made-up words plus common ones, drawn with a skew like real titles.
        made_up = {
            "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(6000)
        }
        self.vocabulary = list(_WORDS) + sorted(made_up)
        weights = [1.0 / (i + 1) ** 0.8 for i in range(len(self.vocabulary))]
        self.cum = list(_accumulate(weights))

    def word(self) -> str:
        w = self.rng.choices(self.vocabulary, cum_weights=self.cum)[0]
        return w

    def title(self, artist_hint: str) -> str:
        words = " ".join(self.word() for _ in range(self.rng.choice((1, 2, 2, 3, 3, 4))))
        title = words[0].upper() + words[1:]
        decor = self.rng.choice(_DECOR).format(a=artist_hint, n=self.rng.randint(1, 9))
        return title + decor

    def artist(self) -> str:
        r = self.rng.random()
        w1, w2 = self.word().capitalize(), self.word().capitalize()
        if r < 0.3:
            return f"{w1} {w2}"
        if r < 0.45:
            return f"The {w1}s"
        if r < 0.55:
            return f"{w1[:2].upper()}/{w2[:2].upper()}"
        if r < 0.65:
            return ".".join(c.upper() for c in w1[:3]) + "."
        if r < 0.75:
            return f"DJ {w1}"
        if r < 0.85:
            return f"{w1} & the {w2}s"
        return f"{w1} {w2}é"


def _accumulate(values: Sequence[float]) -> list[float]:
    total, out = 0.0, []
    for v in values:
        total += v
        out.append(total)
    return out


BULK_ROWS = 50_000

SECONDARY_INDEXES_SQL = """
SELECT i.indexname, i.indexdef
FROM pg_indexes i
WHERE i.schemaname = current_schema() AND i.tablename = $1
  AND NOT EXISTS (SELECT 1 FROM pg_constraint c
                  WHERE c.conindid = format('%I.%I', i.schemaname, i.indexname)::regclass)
"""


async def _drop_secondary_indexes(conn: asyncpg.Connection, table: str) -> list[str]:
    """Drop the indexes of `table` that back no constraint; return their definitions."""
    rows = await conn.fetch(SECONDARY_INDEXES_SQL, table)
    for row in rows:
        await conn.execute(f"DROP INDEX {_ident(row['indexname'])}")
    return [row["indexdef"] for row in rows]


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True, slots=True)
class SeedReport:
    tracks: int
    artists: int
    albums: int
    renditions: int
    seconds: float


async def seed_synthetic(
    conn: asyncpg.Connection,
    tracks: int,
    *,
    audio: int = 0,
    media_root: Path | None = None,
    seed: int = 42,
) -> SeedReport:
    """Append a synthetic catalog of `tracks` tracks; `audio` sets of real renditions if > 0."""
    started = time.perf_counter()
    rng = random.Random(seed)
    names = _Names(rng)
    n_artists = max(1, tracks // 10)
    n_albums = max(1, tracks // 8)
    base_artist = await conn.fetchval("SELECT coalesce(max(id), 0) FROM artists")
    base_album = await conn.fetchval("SELECT coalesce(max(id), 0) FROM albums")
    base_track = await conn.fetchval("SELECT coalesce(max(id), 0) FROM tracks")

    artists = [(base_artist + i + 1, names.artist()) for i in range(n_artists)]
    albums = []
    for i in range(n_albums):
        artist_id = base_artist + 1 + rng.randrange(n_artists)
        albums.append((base_album + i + 1, artist_id, names.title(""), rng.randint(1960, 2026)))
    now = datetime.now(UTC)
    genre_weights = [1.0 / (i + 1) for i in range(len(GENRES))]
    track_rows = []
    for i in range(tracks):
        album = albums[rng.randrange(n_albums)]
        artist_name = artists[album[1] - base_artist - 1][1]
        track_rows.append(
            (
                base_track + i + 1,
                names.title(artist_name),
                album[1],
                album[0],
                rng.choices(GENRES, weights=genre_weights)[0],
                rng.randint(1, 14),
                rng.randint(90_000, 420_000),
                # Pareto: a few tracks get most of the plays, as on every real service.
                min(int(10 * rng.paretovariate(0.9)), 2**40),
                now - timedelta(seconds=rng.randint(0, 5 * 365 * 86400)),
            )
        )
    log.info("synthetic_generated", tracks=tracks, seconds=round(time.perf_counter() - started, 1))

    sets: list[list[RenditionFile]] = []
    if audio > 0:
        if media_root is None:
            raise ValueError("media_root is required to generate audio")
        demo = [
            DemoTrack(10_000 + k, f"Synthetic {k}", "Edge", "Synthetic", "electronic", 1, 20.0)
            for k in range(audio)
        ]
        sets = await encode_all(demo, media_root)

    async with conn.transaction():
        await conn.execute("SET LOCAL maintenance_work_mem = '512MB'")
        # Building an index once after a bulk load is several times faster than maintaining it
        # row by row; the definitions are read back from the catalog, so they stay the
        # migrations' own.
        rebuild = []
        if tracks >= BULK_ROWS:
            for table in ("tracks", "renditions"):
                rebuild += await _drop_secondary_indexes(conn, table)
        await conn.copy_records_to_table("artists", records=artists, columns=["id", "name"])
        await conn.copy_records_to_table(
            "albums", records=albums, columns=["id", "artist_id", "title", "release_year"]
        )
        await conn.execute(
            "CREATE TEMP TABLE seed_tracks (id bigint, title text, artist_id bigint,"
            " album_id bigint, genre text, track_number int, duration_ms int, play_count bigint,"
            " created_at timestamptz) ON COMMIT DROP"
        )
        await conn.copy_records_to_table("seed_tracks", records=track_rows)
        # The search vector is computed here in one pass; the per-row trigger only runs for
        # rows inserted without one.
        await conn.execute(
            """
            INSERT INTO tracks (id, title, artist_id, album_id, genre, track_number,
                                duration_ms, play_count, created_at, updated_at, search_tsv)
            SELECT s.id, s.title, s.artist_id, s.album_id, s.genre, s.track_number,
                   s.duration_ms, s.play_count, s.created_at, s.created_at,
                   edge_track_tsv(s.title, ar.name, al.title)
            FROM seed_tracks s
            JOIN artists ar ON ar.id = s.artist_id
            JOIN albums al ON al.id = s.album_id
            """
        )
        renditions = 0
        if sets:
            rows = []
            for tid, *_ in track_rows:
                for f in sets[tid % len(sets)]:
                    rows.append((*_rendition_row(tid, f)[1:], tid))
            await conn.copy_records_to_table(
                "renditions",
                records=rows,
                columns=[
                    "format",
                    "codec",
                    "bitrate_kbps",
                    "sample_rate",
                    "channels",
                    "bytes",
                    "content_type",
                    "object_key",
                    "etag",
                    "track_id",
                ],
            )
            renditions = len(rows)
        for indexdef in rebuild:
            await conn.execute(indexdef)
        await conn.execute(RECOUNT_SEARCH_WORDS_SQL)
        for table in ("artists", "albums", "tracks"):
            await conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                f" (SELECT max(id) FROM {table}))"
            )
    # VACUUM, not only ANALYZE: search walks tracks by popularity in an index-only scan
    # (idx_tracks_play_count_search), which reads the heap for every entry until the visibility
    # map says the pages are all visible, and autovacuum may be late or off.
    await conn.execute("VACUUM (ANALYZE) artists, albums, tracks, renditions, search_words")
    await conn.execute("REFRESH MATERIALIZED VIEW popular_tracks_mv")
    seconds = time.perf_counter() - started
    log.info("synthetic_seeded", tracks=tracks, seconds=round(seconds, 1))
    return SeedReport(tracks, n_artists, n_albums, renditions, seconds)
