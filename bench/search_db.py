"""Search at the database: Edge's own Catalog.search (one statement: the plan and a page that is
ranked, by tier or by popularity), one small pool, no cache, no HTTP.

1. First pages: N distinct queries from bench/queries.py (limit 20, as the API's default), each
   timed once as a prepared statement on a connection set up like Edge's pool (jit off).
   Reports p50/p90/p99/max overall, per kind of query and per order the search chose, the share
   of queries with no result, and the cost by number of matching tracks.
2. Deep pages: for queries with more than 50 pages of results, walk the cursors with the real
   `Catalog.search` to pages 10 and 50, then time page 1, 10 and 50 (median of --repeat runs
   each) with `Catalog.search` and the cursor of that page.

Times are measured by the client around `fetch` on 127.0.0.1, so they include one loopback
round trip and asyncpg's decoding (about 0.1 ms), nothing else.

    python bench/search_db.py --dsn postgresql://postgres@127.0.0.1:5432/edge_bench \
        --queries 2000 --json bench/out/search_db.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from queries import KINDS, Query, load_generator

from edge.catalog import Catalog, cursor_kind, decode_cursor
from edge.metrics import Metrics
from edge.resources import pool_kwargs
from edge.settings import Settings

LIMIT = 20
COUNT_SQL = "SELECT count(*) FROM tracks WHERE search_tsv @@ edge_search_query($1)"
MATCH_BUCKETS = (0, 100, 1_000, 10_000, 100_000, math.inf)
# The sort key each search cursor carries (Catalog.search).
CURSOR_TYPES = {
    "search": (float, int, int),
    "search-tier": (int, int, int),
    "search-popular": (int, int),
}


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": pct(values, 50),
        "p90": pct(values, 90),
        "p99": pct(values, 99),
        "max": max(values) if values else math.nan,
        "mean": statistics.fmean(values) if values else math.nan,
    }


async def timed(catalog: Catalog, query: str, cursor: str | None = None) -> tuple[float, int, str]:
    """Milliseconds, items, and the order of the list ("search", "search-tier",
    "search-popular"; a list of one page has no cursor: "one page")."""
    started = time.perf_counter()
    page = await catalog.search(query, LIMIT, cursor)
    ms = (time.perf_counter() - started) * 1000
    order = str(cursor_kind(page.next_cursor)) if page.next_cursor else "one page"
    return ms, len(page.docs), order


def bucket_name(lo: float, hi: float) -> str:
    return f"{int(lo)}-{int(hi) - 1}" if hi != math.inf else f">={int(lo)}"


def fmt(s: dict[str, float]) -> str:
    return (
        f"n={s['n']:<5} p50={s['p50']:8.2f}  p90={s['p90']:8.2f}  p99={s['p99']:8.2f}"
        f"  max={s['max']:8.2f}  mean={s['mean']:8.2f} ms"
    )


async def first_pages(
    conn: asyncpg.Connection, catalog: Catalog, queries: list[Query]
) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    for q in queries:
        ms, rows, order = await timed(catalog, q.text)
        results.append({"kind": q.kind, "q": q.text, "ms": ms, "rows": rows, "order": order})
    # Counted after the timed pass, untimed: the timed pass must not follow a count of the
    # same query, which would have just read the same pages.
    for r in results:
        r["matches"] = await conn.fetchval(COUNT_SQL, r["q"])
    overall = summary([r["ms"] for r in results])
    by_kind = {
        k: summary([r["ms"] for r in results if r["kind"] == k])
        for k in KINDS
        if any(r["kind"] == k for r in results)
    }
    by_order = {
        o: summary([r["ms"] for r in results if r["order"] == o])
        for o in sorted({r["order"] for r in results})
    }
    by_matches = {}
    for lo, hi in itertools.pairwise(MATCH_BUCKETS):
        chosen = [r["ms"] for r in results if lo <= r["matches"] < hi]
        if chosen:
            by_matches[bucket_name(lo, hi)] = summary(chosen)
    zero = sum(r["rows"] == 0 for r in results)
    zero_by_kind = {
        k: sum(r["rows"] == 0 for r in results if r["kind"] == k)
        / max(1, sum(r["kind"] == k for r in results))
        for k in by_kind
    }
    slowest = sorted(results, key=lambda r: r["ms"], reverse=True)[:15]
    return {
        "overall": overall,
        "by_kind": by_kind,
        "by_order": by_order,
        "by_matches": by_matches,
        "zero_results_share": zero / len(results),
        "zero_results_by_kind": zero_by_kind,
        "slowest": slowest,
        "queries": results,
    }


async def walk(
    catalog: Catalog, query: str, pages: tuple[int, ...]
) -> tuple[dict[int, str], list[str]]:
    """Cursors that fetch page p (1-based) for each p in pages, via the real Catalog.search,
    and what is wrong with the walk (a track seen twice, a page out of order), if anything."""
    cursors: dict[int, str] = {}
    problems: list[str] = []
    seen: set[int] = set()
    last: tuple[Any, ...] | None = None
    cursor: str | None = None
    for page in range(1, max(pages) + 1):
        if page in pages and cursor is not None:
            cursors[page] = cursor
        if page == max(pages):
            break
        result = await catalog.search(query, LIMIT, cursor)
        for doc in result.docs:
            track_id = orjson.loads(doc)["id"]
            if track_id in seen:
                problems.append(f"track {track_id} again on page {page}")
            seen.add(track_id)
        if result.next_cursor is None:
            break
        kind = cursor_kind(result.next_cursor)
        types = CURSOR_TYPES[str(kind)]
        key = decode_cursor(result.next_cursor, str(kind), types)
        if last is not None and not key < last:
            problems.append(f"cursor of page {page} not after page {page - 1}'s")
        last, cursor = key, result.next_cursor
    return cursors, problems


async def deep_pages(
    pool: asyncpg.Pool,
    candidates: list[str],
    *,
    pages: tuple[int, ...],
    repeat: int,
    max_queries: int,
    budget_s: float,
) -> dict[str, Any]:
    catalog = Catalog(pool, Metrics())
    started = time.monotonic()
    per_query: list[dict[str, Any]] = []
    for q in candidates:
        if len(per_query) >= max_queries or time.monotonic() - started > budget_s:
            break
        cursors, problems = await walk(catalog, q, pages)
        if any(p not in cursors for p in pages if p != 1):
            continue
        # Round robin (1, 10, 50, 1, 10, 50, ...): drift in the machine's load hits all alike.
        samples: dict[int, list[float]] = {page: [] for page in pages}
        for _ in range(repeat):
            for page in pages:
                samples[page].append((await timed(catalog, q, cursors.get(page)))[0])
        times = {page: statistics.median(samples[page]) for page in pages}
        per_query.append({"q": q, "ms": times, "problems": problems})
    medians = {
        p: statistics.median([r["ms"][p] for r in per_query]) if per_query else math.nan
        for p in pages
    }
    return {"queries": per_query, "median_ms": medians, "seconds": time.monotonic() - started}


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings()  # Edge's defaults: the same session settings as its pool (jit off)
    kwargs = pool_kwargs(settings) | {"min_size": 1, "max_size": 2}
    # Walking deep pages of a big result may take long: not cut by Edge's statement timeout.
    kwargs["server_settings"] = {**kwargs["server_settings"], "statement_timeout": "0"}  # type: ignore[dict-item]
    pool = await asyncpg.create_pool(args.dsn, **kwargs)
    assert pool is not None
    try:
        async with pool.acquire() as conn:
            tracks = await conn.fetchval("SELECT count(*) FROM tracks")
            gen = await load_generator(conn, args.seed)
            queries = gen.distinct(args.queries + args.warmup)
            warmup, queries = queries[: args.warmup], queries[args.warmup :]
            print(f"catalog: {tracks} tracks; {len(queries)} timed queries, {len(warmup)} warm-up")
            catalog = Catalog(pool, Metrics())
            for q in warmup:
                await catalog.search(q.text, LIMIT, None)
            first = await first_pages(conn, catalog, queries)
        need = 49 * LIMIT + 1  # page 50 exists
        many = [r["q"] for r in first["queries"] if r["matches"] >= need]
        random.Random(args.seed).shuffle(many)
        deep = await deep_pages(
            pool,
            many,
            pages=(1, 10, 50),
            repeat=args.repeat,
            max_queries=args.deep_queries,
            budget_s=args.deep_budget,
        )
    finally:
        await pool.close()
    return {"tracks": tracks, "first_page": first, "deep": deep, "many_pages": len(many)}


def report(result: dict[str, Any], repeat: int) -> None:
    first, deep = result["first_page"], result["deep"]
    counts = {r["q"]: r["matches"] for r in first["queries"]}
    print("\n== first page, limit 20 (ms, at the database) ==")
    print(f"{'all':<12}{fmt(first['overall'])}")
    for kind, s in first["by_kind"].items():
        zero = first["zero_results_by_kind"][kind]
        print(f"{kind:<12}{fmt(s)}  zero results {zero:.0%}")
    print(f"\nqueries with zero results: {first['zero_results_share']:.1%}")
    print("\n== first page by the order the search chose ==")
    for order, s in first["by_order"].items():
        print(f"{order:<15}{fmt(s)}")
    print("\n== first page by number of matching tracks ==")
    for name, s in first["by_matches"].items():
        print(f"{name:<12}{fmt(s)}")
    print(f"\nqueries with more than 50 pages of results: {result['many_pages']}")
    print("\n== slowest first pages ==")
    for r in first["slowest"][:10]:
        print(f"{r['ms']:9.2f} ms  {r['matches']:>8} matches  {r['kind']:<11} {r['q']!r}")
    print(f"\n== deep pages: {len(deep['queries'])} queries, median of {repeat} runs each ==")
    for r in deep["queries"]:
        cells = "  ".join(f"page {k}={v:8.2f}" for k, v in r["ms"].items())
        flag = f"  ORDER BROKEN: {r['problems']}" if r["problems"] else ""
        print(f"{cells} ms  {counts[r['q']]:>8} matches  {r['q']!r}{flag}")
    med = deep["median_ms"]
    print("median over queries: " + "  ".join(f"page {k}: {v:.2f} ms" for k, v in med.items()))
    if med.get(1):
        ratios = "  ".join(f"page {k}: {v / med[1]:.2f}x" for k, v in med.items() if k != 1)
        print(f"ratio to page 1: {ratios}")


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/edge_bench")
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--seed", type=int, default=2, help="differs from catalog.sh's on purpose")
    p.add_argument("--warmup", type=int, default=200, help="untimed queries first")
    p.add_argument("--deep-queries", type=int, default=15)
    p.add_argument("--deep-budget", type=float, default=150.0, help="seconds for deep pages")
    p.add_argument("--repeat", type=int, default=5, help="runs of each deep-page measurement")
    p.add_argument("--json", help="write every measurement here")
    args = p.parse_args()
    result = asyncio.run(measure(args))
    report(result, args.repeat)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({**result, "args": vars(args)}, f, indent=1, ensure_ascii=False)
        print(f"\nraw measurements: {args.json}")


if __name__ == "__main__":
    main()
