"""Add long tracks (one long FLAC rendition each, shared) to the bench catalog, for the slow-client
memory test: the seed's renditions are 20 s (a FLAC is ~1.3 MB), which fits in one loopback
socket's send buffer (tcp_wmem max, 4 MiB by default), so Edge would hand a slow client the
whole file at once and finish its handler; a long file keeps every proxied stream really open.

Uses Edge's own encoder (edge.ingest.synthesize + encode_renditions, FLAC rung only) and the
seed's rendition row layout. Prints the new track ids, one a line.

    python bench/play/long_track.py --dsn postgresql://.../edge_play_bench --media DIR \
        --seconds 240 --tracks 4 > long_ids.txt
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import asyncpg

from edge.ingest import LADDER, Tags, encode_renditions, synthesize
from edge.seed import INSERT_RENDITION_SQL, _rendition_row


async def main_async(a: argparse.Namespace) -> None:
    flac = [spec for spec in LADDER if spec.format == "flac"]
    samples = synthesize(seed=424242, duration_s=a.seconds)
    tags = Tags("Bench long track", "Edge", "Bench", "electronic", 1)
    [rendition] = await asyncio.to_thread(
        encode_renditions, samples, 44100, tags, a.media, "bench/long", flac
    )
    del samples
    print(
        f"long FLAC: {rendition.object_key}, {rendition.bytes} bytes, "
        f"{rendition.duration_ms / 1000:.0f} s",
        file=sys.stderr,
    )
    conn = await asyncpg.connect(a.dsn)
    try:
        async with conn.transaction():
            artist = await conn.fetchval("SELECT min(id) FROM artists")
            ids = []
            for k in range(a.tracks):
                ids.append(
                    await conn.fetchval(
                        "INSERT INTO tracks (title, artist_id, genre, track_number, duration_ms)"
                        " VALUES ($1, $2, 'electronic', 1, $3) RETURNING id",
                        f"Bench long track {k}",
                        artist,
                        rendition.duration_ms,
                    )
                )
            await conn.executemany(
                INSERT_RENDITION_SQL, [_rendition_row(i, rendition) for i in ids]
            )
    finally:
        await conn.close()
    for i in ids:
        print(i)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dsn", required=True)
    p.add_argument("--media", type=Path, required=True, help="Edge's media folder")
    p.add_argument("--seconds", type=float, default=240.0)
    p.add_argument("--tracks", type=int, default=4)
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
