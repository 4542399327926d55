"""Search queries for the benchmarks, generated from the catalog's own words.

One generator shared by `catalog.sh` (wrk, over HTTP) and `search_db.py` (at the database), so
both measure the same mix. Every query is distinct after Edge's own normalisation (whitespace
collapsed, casefolded: the search cache key), so a run of wrk almost never hits the cache.

Kinds of query (weights in KINDS):
  word        one word drawn uniformly from `search_words` (mostly rare made-up words)
  title_word  one word of a random track's title, artist or album, as written (accents, case);
              drawing from tracks makes frequent words frequent, as in real traffic
  two_words   two words of one random track (title + artist or two of its words)
  pair        two unrelated words from `search_words` (usually no result)
  typo        a title_word or two_words query with one edit in a word of 5+ letters
  unaccented  a word of a track written with diacritics, typed without them (cafe, noel)
  prefix      the first 3-5 letters of a title word (search as you type)

    python bench/queries.py --dsn postgresql://.../edge_bench --count 60000 --out FILE [--urlencode]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import unicodedata
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

KINDS: dict[str, int] = {
    "word": 20,
    "title_word": 20,
    "two_words": 20,
    "pair": 5,
    "typo": 15,
    "unaccented": 10,
    "prefix": 10,
}
SAMPLE_TRACKS = 20_000

SAMPLE_SQL = """
SELECT t.title, ar.name, al.title
FROM tracks t
JOIN artists ar ON ar.id = t.artist_id
LEFT JOIN albums al ON al.id = t.album_id
WHERE t.id = ANY($1::bigint[])
"""


@dataclass(frozen=True, slots=True)
class Query:
    kind: str
    text: str


def cache_key(text: str) -> str:
    """What Edge keys the search cache by (views/api.py: whitespace collapsed, casefolded)."""
    return " ".join(text.split()).casefold()


def strip_accents(text: str) -> str:
    return (
        "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
        .replace("ø", "o")
        .replace("Ø", "O")
        .replace("ß", "ss")
    )


def tokens(text: str | None) -> list[str]:
    """Words as a person would type them: split on spaces, surrounding punctuation dropped
    ("(Remix)" -> "Remix"), inner punctuation kept ("AC/DC", "R.E.M.")."""
    out = []
    for raw in (text or "").split():
        word = raw.strip("()[]!?,;:\"'-")
        if any(c.isalnum() for c in word):
            out.append(word)
    return out


def typo(word: str, rng: random.Random) -> str:
    """One edit: substitute, delete, insert, or swap two neighbours (Edge corrects one)."""
    i = rng.randrange(1, len(word) - 1)  # keep the first letter, as most typos do
    op = rng.randrange(4)
    letter = rng.choice("abcdefghijklmnopqrstuvwxyz")
    if op == 0:
        return word[:i] + letter + word[i + 1 :]
    if op == 1:
        return word[:i] + word[i + 1 :]
    if op == 2:
        return word[:i] + letter + word[i:]
    return word[: i - 1] + word[i] + word[i - 1] + word[i + 1 :]


class Generator:
    def __init__(
        self, search_words: Sequence[str], samples: Sequence[tuple[str, str, str | None]], seed: int
    ) -> None:
        self.rng = random.Random(seed)
        self.search_words = list(search_words)
        self.tracks = [
            (tokens(title), tokens(artist), tokens(album)) for title, artist, album in samples
        ]
        self.tracks = [t for t in self.tracks if t[0] or t[1]]
        self.accented = sorted(
            {w for t in self.tracks for part in t for w in part if strip_accents(w) != w}
        )
        self.kinds = list(KINDS)
        self.weights = [KINDS[k] for k in self.kinds]

    def _track_word(self) -> str:
        title, artist, album = self.rng.choice(self.tracks)
        part = self.rng.choices((title, artist, album), weights=(5, 3, 2))[0] or title or artist
        return self.rng.choice(part)

    def _two_words(self) -> str:
        title, artist, album = self.rng.choice(self.tracks)
        if len(title) >= 2 and self.rng.random() < 0.5:
            a, b = self.rng.sample(title, 2)
        else:
            a = self.rng.choice(title or album or artist)
            b = self.rng.choice(artist or album or title)
        return f"{a} {b}"

    def one(self) -> Query:
        kind = self.rng.choices(self.kinds, weights=self.weights)[0]
        rng = self.rng
        if kind == "word":
            text = rng.choice(self.search_words)
        elif kind == "title_word":
            text = self._track_word()
        elif kind == "two_words":
            text = self._two_words()
        elif kind == "pair":
            text = f"{rng.choice(self.search_words)} {rng.choice(self.search_words)}"
        elif kind == "typo":
            words = (self._two_words() if rng.random() < 0.5 else self._track_word()).split()
            long = [i for i, w in enumerate(words) if len(w) >= 5 and w.isalpha()]
            if not long:
                return self.one()
            i = rng.choice(long)
            words[i] = typo(words[i], rng)
            text = " ".join(words)
        elif kind == "unaccented":
            if not self.accented:
                return self.one()
            word = strip_accents(rng.choice(self.accented))
            text = word if rng.random() < 0.6 else f"{word} {strip_accents(self._track_word())}"
        else:  # prefix
            word = self._track_word()
            if len(word) < 4:
                return self.one()
            text = word[: rng.randint(3, min(5, len(word) - 1))]
        return Query(kind, text)

    def distinct(self, count: int) -> list[Query]:
        """`count` queries with distinct cache keys (fewer if the catalog cannot give them)."""
        seen: set[str] = set()
        out: list[Query] = []
        attempts = 0
        while len(out) < count and attempts < count * 20:
            attempts += 1
            q = self.one()
            key = cache_key(q.text)
            if key in seen or not any(c.isalnum() for c in key) or len(key) > 200:
                continue
            seen.add(key)
            out.append(q)
        return out


async def load_generator(conn: asyncpg.Connection, seed: int) -> Generator:
    """Read the catalog's words: all of `search_words`, and the names of a random sample of
    tracks (random ids, so no full scan)."""
    words = [r[0] for r in await conn.fetch("SELECT word FROM search_words ORDER BY word")]
    lo, hi = await conn.fetchrow("SELECT min(id), max(id) FROM tracks")
    if lo is None:
        raise SystemExit("the catalog is empty: run `edge seed` first")
    rng = random.Random(seed ^ 0x5EED)
    ids = [rng.randint(lo, hi) for _ in range(SAMPLE_TRACKS)]
    rows = await conn.fetch(SAMPLE_SQL, ids)
    return Generator(words, [(r[0], r[1], r[2]) for r in rows], seed)


async def _generate(dsn: str, seed: int, count: int) -> list[Query]:
    conn = await asyncpg.connect(dsn)
    try:
        gen = await load_generator(conn, seed)
    finally:
        await conn.close()
    return gen.distinct(count)


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--dsn", required=True)
    p.add_argument("--count", type=int, default=60_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", required=True, help="one query a line")
    p.add_argument("--urlencode", action="store_true", help="write q= values, URL-encoded")
    args = p.parse_args()
    queries = asyncio.run(_generate(args.dsn, args.seed, args.count))
    with open(args.out, "w", encoding="utf-8") as f:
        for q in queries:
            text = urllib.parse.quote(q.text, safe="") if args.urlencode else q.text
            f.write(text + "\n")
    kinds = {k: sum(q.kind == k for q in queries) for k in KINDS}
    print(f"{len(queries)} distinct queries -> {args.out} {kinds}", file=sys.stderr)


if __name__ == "__main__":
    main()
