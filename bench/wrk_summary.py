"""Summarise the wrk runs of one bench/catalog.sh run: the median over rounds per endpoint.

Reads OUT/r<round>-<endpoint>.txt (the `BENCH_RESULT {...}` line that bench/wrk/report.lua
prints), OUT/metrics.txt (Edge's /metrics after the runs) and OUT/seed.txt, and writes
OUT/summary.md and OUT/summary.json.

    python bench/wrk_summary.py bench/out/catalog-<timestamp>
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

ENDPOINTS = ("healthz", "popular", "track", "search")
LABELS = {
    "healthz": "`/healthz`",
    "popular": "`/api/v1/tracks/popular?limit=20` (warm)",
    "track": "`/api/v1/tracks/{id}` (1000 hot ids, warm)",
    "search": "`/api/v1/search?q=` (distinct queries, cache misses)",
}
RESULT = re.compile(r"^BENCH_RESULT (\{.*\})$", re.M)
CPU = re.compile(r"^EDGE_CPU (\{.*\})$", re.M)
RUN = re.compile(r"^r(\d+)-(\w+)\.txt$")
METRIC = re.compile(
    r'^edge_cache_requests_total\{cache="(\w+)",level="(\w+)",result="(\w+)"\} (\S+)$'
)


def load_runs(out: Path) -> dict[str, dict[int, dict[str, Any]]]:
    runs: dict[str, dict[int, dict[str, Any]]] = {e: {} for e in ENDPOINTS}
    for path in sorted(out.iterdir()):
        m = RUN.match(path.name)
        if not m or m.group(2) not in runs:
            continue
        text = path.read_text()
        found = RESULT.search(text)
        if not found:
            continue
        run = json.loads(found.group(1))
        cpu = CPU.search(text)
        if cpu and run["requests"]:
            c = json.loads(cpu.group(1))
            cpu_s = c["ticks"] / c["hz"]
            run["cpu_us"] = cpu_s * 1e6 / run["requests"]  # Edge CPU per request
            run["cpu_busy"] = cpu_s / run["seconds"]  # share of one core Edge got
        runs[m.group(2)][int(m.group(1))] = run
    return runs


def cache_counts(out: Path) -> dict[str, float]:
    counts: dict[str, float] = {}
    path = out / "metrics.txt"
    if path.exists():
        for line in path.read_text().splitlines():
            m = METRIC.match(line)
            if m:
                counts[f"{m.group(1)}/{m.group(2)}/{m.group(3)}"] = float(m.group(4))
    return counts


def summarise(out: Path) -> dict[str, Any]:
    runs = load_runs(out)
    health = runs["healthz"]
    table: dict[str, Any] = {}
    for ep in ENDPOINTS:
        rounds = runs[ep]
        if not rounds:
            continue
        # Ratio per round (same minute, same noise), then the median of those ratios.
        ratios = [r["rps"] / health[n]["rps"] for n, r in rounds.items() if n in health]
        cpu_ratios = [
            health[n]["cpu_us"] / r["cpu_us"]
            for n, r in rounds.items()
            if n in health and "cpu_us" in r and "cpu_us" in health[n]
        ]
        with_cpu = [r for r in rounds.values() if "cpu_us" in r]
        table[ep] = {
            "rounds": len(rounds),
            "rps": statistics.median(r["rps"] for r in rounds.values()),
            "rps_each": [round(r["rps"]) for _, r in sorted(rounds.items())],
            "p50_ms": statistics.median(r["p50_ms"] for r in rounds.values()),
            "p99_ms": statistics.median(r["p99_ms"] for r in rounds.values()),
            "ratio": statistics.median(ratios) if ratios else None,
            "cpu_us": statistics.median(r["cpu_us"] for r in with_cpu) if with_cpu else None,
            "cpu_busy": statistics.median(r["cpu_busy"] for r in with_cpu) if with_cpu else None,
            "cpu_ratio": statistics.median(cpu_ratios) if cpu_ratios else None,
            "errors": sum(
                r["non2xx"]
                + r["connect_errors"]
                + r["read_errors"]
                + r["write_errors"]
                + r["timeouts"]
                for r in rounds.values()
            ),
            "requests": sum(r["requests"] for r in rounds.values()),
            "wrapped": sum(r.get("wrapped", 0) for r in rounds.values()),
        }
    seed = (out / "seed.txt").read_text().strip() if (out / "seed.txt").exists() else ""
    return {"endpoints": table, "cache": cache_counts(out), "seed": seed}


def _pct(x: float | None) -> str:
    return f"{x:.0%}" if x is not None else "-"


def markdown(s: dict[str, Any]) -> str:
    lines = [
        "| endpoint | req/s (median) | req/s per round | vs /healthz (req/s) | p50 ms | p99 ms"
        " | Edge CPU µs/req | vs /healthz (CPU/req) | Edge busy | errors |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for ep, r in s["endpoints"].items():
        each = ", ".join(str(x) for x in r["rps_each"])
        cpu = f"{r['cpu_us']:.0f}" if r["cpu_us"] is not None else "-"
        lines.append(
            f"| {LABELS[ep]} | {r['rps']:.0f} | {each} | {_pct(r['ratio'])} | {r['p50_ms']:.2f}"
            f" | {r['p99_ms']:.2f} | {cpu} | {_pct(r['cpu_ratio'])} | {_pct(r['cpu_busy'])}"
            f" | {r['errors']} |"
        )
    lines += [
        "",
        "Ratios are medians of per-round ratios. `vs /healthz (CPU/req)` is /healthz's CPU per"
        " request over the endpoint's: the throughput ratio Edge would show with a core of its"
        " own. `Edge busy`: CPU time of edge serve over the run's wall time (1 core = 100%).",
    ]
    cache = s["cache"]
    if cache:
        lines += ["", "Edge's cache counters after the runs (`edge_cache_requests_total`):", ""]
        for key, value in sorted(cache.items()):
            if value:
                lines.append(f"- `{key}`: {value:.0f}")
    search = s["endpoints"].get("search")
    if search:
        lines += [
            "",
            f"Search requests sent: {search['requests']}; query lists wrapped around"
            f" {search['wrapped']} times (0: every request was a distinct query).",
        ]
    if s["seed"]:
        lines += ["", f"Seed: {s['seed']}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    out = Path(sys.argv[1])
    s = summarise(out)
    (out / "summary.json").write_text(json.dumps(s, indent=1))
    text = markdown(s)
    (out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
