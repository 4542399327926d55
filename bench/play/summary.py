"""Summarise one bench/play.sh run: medians over interleaved rounds, per-round ratios, signature
counts, slow-client memory and /metrics scrape times, with a verdict per target of issue 3.

Reads OUT/r<round>-<run>.txt (wrk's `BENCH_RESULT` line from bench/play/wrk/rotate.lua, and the
`SNAP_BEFORE`/`SNAP_AFTER` lines of bench/play/snap.py), OUT/slow-*.json, OUT/sessions.json,
OUT/startup.json and OUT/sign-cost.json; writes OUT/summary.md and OUT/summary.json.

    python bench/play/summary.py bench/out/play-<timestamp>
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

MiB = 1048576
# run name -> (label, processes whose CPU is the server side of the run, Edge whose counters apply)
RUNS: dict[str, tuple[str, tuple[str, ...], str | None]] = {
    "healthz-local": ("`/healthz` (Edge, local signer)", ("a",), "a"),
    "redirect-local": ("`/play/{id}` redirect, local signer", ("a",), "a"),
    "healthz-cloudfront": ("`/healthz` (Edge, CloudFront key)", ("b",), "b"),
    "redirect-cloudfront": ("`/play/{id}` redirect, CloudFront RSA-2048", ("b",), "b"),
    "proxy-local": ("`/play/{id}?mode=proxy`, origin = Edge's own `/media`", ("a",), "a"),
    "media": ("Edge's local origin `/media/<signed>` directly", ("a",), "a"),
    "nginx": ("nginx directly (sendfile, 1 worker)", ("nginx",), None),
    "proxy-nginx": ("`/play/{id}?mode=proxy`, origin = nginx (EDGE_CDN_URL)", ("c", "nginx"), "c"),
    "proxy-nginx-baseline": (
        "the same, BASELINE's edge (server d)",
        ("d", "nginx"),
        "d",
    ),
    "proxy-local-baseline": (
        "`/play/{id}?mode=proxy`, own `/media`, BASELINE's edge (server e)",
        ("e",),
        "e",
    ),
    "media-baseline": ("`/media` directly, BASELINE's edge (server e)", ("e",), "e"),
}
RUN_FILE = re.compile(r"^r(\d+)-([\w-]+)\.txt$")


def _json_line(text: str, tag: str) -> dict[str, Any] | None:
    m = re.search(rf"^{tag} (\{{.*\}})$", text, re.M)
    return json.loads(m.group(1)) if m else None


def _delta_requests(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    b, a = before.get("requests", {}), after.get("requests", {})
    return {k: v - b.get(k, 0.0) for k, v in a.items() if v - b.get(k, 0.0)}


def load_runs(out: Path) -> dict[str, dict[int, dict[str, Any]]]:
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for path in sorted(out.iterdir()):
        m = RUN_FILE.match(path.name)
        if not m or m.group(2) not in RUNS:
            continue
        text = path.read_text()
        run = _json_line(text, "BENCH_RESULT")
        before, after = _json_line(text, "SNAP_BEFORE"), _json_line(text, "SNAP_AFTER")
        if run is None:
            continue
        name = m.group(2)
        _, procs, edge = RUNS[name]
        if before and after and run["requests"]:
            hz = before["hz"]
            ticks = [
                after[p]["ticks"] - before[p]["ticks"]
                for p in procs
                if before.get(p, {}).get("ticks") is not None
                and after.get(p, {}).get("ticks") is not None
            ]
            if len(ticks) == len(procs):
                cpu_s = sum(ticks) / hz
                run["cpu_us"] = cpu_s * 1e6 / run["requests"]
                run["cpu_busy"] = cpu_s / run["seconds"]
            if edge:
                run["edge_requests"] = _delta_requests(before[edge], after[edge])
                run["signed"] = after[edge].get("signed", 0) - before[edge].get("signed", 0)
                run["cached"] = after[edge].get("cached", 0) - before[edge].get("cached", 0)
        run["bytes_per_req"] = run["bytes"] / run["requests"] if run["requests"] else 0
        run["errors"] = sum(
            run[k] for k in ("non2xx", "connect_errors", "read_errors", "write_errors", "timeouts")
        )
        runs.setdefault(name, {})[int(m.group(1))] = run
    return runs


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(runs: dict[str, dict[int, dict[str, Any]]], num: str, den: str, key: str = "rps"):
    """Median of per-round ratios (same round: minutes apart at most), and the list."""
    a, b = runs.get(num, {}), runs.get(den, {})
    each = [a[r][key] / b[r][key] for r in sorted(a) if r in b and b[r][key]]
    return _median(each), each


def cpu_ratio(runs: dict[str, dict[int, dict[str, Any]]], num: str, den: str) -> float | None:
    """Throughput ratio implied by CPU per request (den's CPU/req over num's)."""
    a, b = runs.get(num, {}), runs.get(den, {})
    each = [
        b[r]["cpu_us"] / a[r]["cpu_us"]
        for r in sorted(a)
        if r in b and "cpu_us" in a[r] and "cpu_us" in b[r]
    ]
    return _median(each)


def summarise(out: Path) -> dict[str, Any]:
    runs = load_runs(out)
    table: dict[str, Any] = {}
    for name, rounds in runs.items():
        rs = list(rounds.values())
        with_cpu = [r for r in rs if "cpu_us" in r]
        table[name] = {
            "rounds": len(rs),
            "rps": _median([r["rps"] for r in rs]),
            "rps_each": [round(rounds[k]["rps"]) for k in sorted(rounds)],
            "mib_per_s": _median([r["mib_per_s"] for r in rs]),
            "mib_each": [round(rounds[k]["mib_per_s"]) for k in sorted(rounds)],
            "p50_ms": _median([r["p50_ms"] for r in rs]),
            "p99_ms": _median([r["p99_ms"] for r in rs]),
            "cpu_us": _median([r["cpu_us"] for r in with_cpu]),
            "cpu_busy": _median([r["cpu_busy"] for r in with_cpu]),
            "bytes_per_req": _median([r["bytes_per_req"] for r in rs]),
            "errors": sum(r["errors"] for r in rs),
            "requests": sum(r["requests"] for r in rs),
            "signed": sum(r.get("signed", 0) for r in rs),
            "cached": sum(r.get("cached", 0) for r in rs),
            "edge_requests": _sum_dicts([r.get("edge_requests", {}) for r in rs]),
        }
    ratios = {}
    for key, num, den in (
        ("redirect_local_vs_healthz", "redirect-local", "healthz-local"),
        ("redirect_cloudfront_vs_healthz", "redirect-cloudfront", "healthz-cloudfront"),
        ("redirect_cloudfront_vs_local", "redirect-cloudfront", "redirect-local"),
        ("proxy_local_vs_nginx", "proxy-local", "nginx"),
        ("proxy_local_vs_media", "proxy-local", "media"),
        ("proxy_nginx_vs_nginx", "proxy-nginx", "nginx"),
        ("media_vs_nginx", "media", "nginx"),
        ("proxy_nginx_vs_baseline", "proxy-nginx", "proxy-nginx-baseline"),
        ("proxy_local_vs_baseline", "proxy-local", "proxy-local-baseline"),
        ("media_vs_baseline", "media", "media-baseline"),
    ):
        med, each = ratio(runs, num, den)
        ratios[key] = {
            "median": med,
            "each": [round(x, 3) for x in each],
            "cpu": cpu_ratio(runs, num, den),
        }
    extra: dict[str, Any] = {}
    for name in ("slow-local", "slow-nginx", "sessions", "startup", "sign-cost"):
        path = out / f"{name}.json"
        if path.exists():
            extra[name] = json.loads(path.read_text().strip().splitlines()[-1])
    return {"runs": table, "ratios": ratios, **extra}


def _sum_dicts(ds: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for d in ds:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def _f(x: float | None, fmt: str = "{:.0f}") -> str:
    return fmt.format(x) if x is not None else "-"


def _pct(x: float | None) -> str:
    return f"{x:.0%}" if x is not None else "-"


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("**met**" if ok else "**not met**")


def markdown(s: dict[str, Any]) -> str:
    runs, ratios = s["runs"], s["ratios"]
    L: list[str] = []
    L += ["### 1. Redirect mode vs /healthz", ""]
    L += [
        "| run | req/s (median) | req/s per round | p50 ms | p99 ms | server CPU µs/req"
        " | server busy | errors |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for name in ("healthz-local", "redirect-local", "healthz-cloudfront", "redirect-cloudfront"):
        r = runs.get(name)
        if r:
            L.append(
                f"| {RUNS[name][0]} | {_f(r['rps'])} | {', '.join(map(str, r['rps_each']))}"
                f" | {_f(r['p50_ms'], '{:.2f}')} | {_f(r['p99_ms'], '{:.2f}')}"
                f" | {_f(r['cpu_us'])} | {_pct(r['cpu_busy'])} | {r['errors']} |"
            )
    L.append("")
    for key, label in (
        ("redirect_local_vs_healthz", "redirect (local signer) / /healthz"),
        ("redirect_cloudfront_vs_healthz", "redirect (CloudFront) / /healthz"),
        ("redirect_cloudfront_vs_local", "redirect CloudFront / redirect local"),
    ):
        q = ratios[key]
        L.append(
            f"- {label}: **{_pct(q['median'])}** (rounds: {', '.join(_pct(x) for x in q['each'])});"
            f" by CPU per request: {_pct(q['cpu'])}"
        )
    L.append("")
    for name, label in (("redirect-local", "local signer"), ("redirect-cloudfront", "CloudFront")):
        r = runs.get(name)
        if r:
            total = r["signed"] + r["cached"]
            share = r["signed"] / total if total else None
            statuses = ", ".join(
                f"{k}: {v:.0f}" for k, v in sorted(r["edge_requests"].items()) if "play" in k
            )
            L.append(
                f"- signatures once warm, {label}: {r['signed']:.0f} signed, {r['cached']:.0f}"
                f" from the cache over {r['requests']} requests (wrk) = "
                f"**{_f(share * 100 if share is not None else None, '{:.4f}')}%** signed;"
                f" Edge's /play statuses over the rounds: {statuses}"
            )
    cost = s.get("sign-cost")
    if cost:
        L.append(
            f"- one signature, measured alone: CloudFront RSA-2048 {cost['cloudfront_us']:.0f} µs,"
            f" local HMAC {cost['local_us']:.1f} µs"
        )
    L += ["", "### 2. Proxy mode, 1 MiB ranges, 32 connections", ""]
    L += [
        "| run | MiB/s (median) | MiB/s per round | req/s | p50 ms | p99 ms | bytes/req"
        " | server CPU ms/MiB | server busy | errors |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in (
        "proxy-local",
        "media",
        "nginx",
        "proxy-nginx",
        "proxy-nginx-baseline",
        "proxy-local-baseline",
        "media-baseline",
    ):
        r = runs.get(name)
        if r:
            cpu_ms_mib = r["cpu_us"] / 1000 / (r["bytes_per_req"] / MiB) if r["cpu_us"] else None
            L.append(
                f"| {RUNS[name][0]} | {_f(r['mib_per_s'])} | {', '.join(map(str, r['mib_each']))}"
                f" | {_f(r['rps'])} | {_f(r['p50_ms'], '{:.1f}')} | {_f(r['p99_ms'], '{:.1f}')}"
                f" | {_f(r['bytes_per_req'])} | {_f(cpu_ms_mib, '{:.2f}')}"
                f" | {_pct(r['cpu_busy'])} | {r['errors']} |"
            )
    L.append("")
    L.append(
        "Statuses Edge counted over the rounds (`edge_http_requests_total`, route and status):"
    )
    for name in ("proxy-local", "media", "proxy-nginx"):
        r = runs.get(name)
        if r:
            statuses = ", ".join(f"{k}: {v:.0f}" for k, v in sorted(r["edge_requests"].items()))
            L.append(f"- {name}: {statuses}")
    L.append("")
    for key, label in (
        ("proxy_local_vs_nginx", "proxy (own origin) / nginx"),
        ("proxy_local_vs_media", "proxy (own origin) / local origin"),
        ("proxy_nginx_vs_nginx", "proxy (nginx origin) / nginx"),
        ("media_vs_nginx", "local origin / nginx"),
        ("proxy_nginx_vs_baseline", "proxy (nginx origin) / the same on BASELINE"),
        ("proxy_local_vs_baseline", "proxy (own origin) / the same on BASELINE"),
        ("media_vs_baseline", "local origin / the same on BASELINE"),
    ):
        q = ratios[key]
        if q["median"] is None:
            continue
        L.append(
            f"- {label}: **{_pct(q['median'])}** (rounds: {', '.join(_pct(x) for x in q['each'])});"
            f" by CPU per request: {_pct(q['cpu'])}"
        )
    startup = s.get("startup")
    L += ["", "### 3. Memory: slow clients in proxy mode", ""]
    if startup:
        L.append(
            "RSS right after start: "
            + ", ".join(f"{k} {v:.0f} MB" for k, v in startup.items())
            + " (a: local origin, b: CloudFront key, c: nginx origin)"
        )
        L.append("")
    L += [
        "",
        "| origin | clients | RSS before (VmRSS / metric) | RSS, all connected (max) | streaming"
        " (min) | in flight (min) | established (min) | statuses | RSS after close |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, label in (("slow-local", "Edge's own /media"), ("slow-nginx", "nginx")):
        r = s.get(name)
        if r:
            b = r["before"]
            L.append(
                f"| {label} | {r['count']} | {b['vmrss_mb']:.0f} / "
                f"{b['process_resident_memory_mb']:.0f} MB | {r['max_rss_mb']:.0f} / "
                f"{r['max_process_resident_memory_mb']:.0f} MB | {r['min_streaming']}"
                f" | {r['min_in_flight']:.0f} | {r['min_established']}"
                f" | {json.dumps(r['statuses'])} | {r['after_close']['vmrss_mb']:.0f} MB |"
            )
    for name, label in (("slow-local", "own /media"), ("slow-nginx", "nginx origin")):
        r = s.get(name)
        if r and r["min_streaming"]:
            per = (r["max_rss_mb"] - r["before"]["vmrss_mb"]) / r["min_streaming"]
            L.append(
                f"- {label}: {per * 1024:.0f} KiB of RSS per open stream; time to the status"
                f" line (median, s): {json.dumps(r.get('seconds_to_status_median', {}))};"
                f" kernel send queues of Edge's connections (max):"
                f" {r.get('max_kernel_send_queues_mb', '-')} MB"
            )
    sess = s.get("sessions")
    L += ["", "### 4. /metrics scrape time", ""]
    if sess:
        b, a = sess["before"], sess["after"]
        L += [
            "| active sessions (gauge) | scrapes | p50 ms | p90 ms | max ms | body bytes |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {sess['gauge_before']:.0f} | {b['n']} | {b['p50_ms']} | {b['p90_ms']}"
            f" | {b['max_ms']} | {b['bytes']} |",
            f"| {sess['gauge_after']:.0f} | {a['n']} | {a['p50_ms']} | {a['p90_ms']}"
            f" | {a['max_ms']} | {a['bytes']} |",
            "",
            f"{sess['sessions']} new sessions opened in {sess['create_seconds']} s"
            f" ({sess['create_rps']} /play req/s, each a new sid), statuses {sess['statuses']}.",
        ]

    # Verdicts
    L += ["", "### Targets", "", "| target | measured | verdict |", "|---|---|---|"]
    for key, label in (
        ("redirect_local_vs_healthz", "redirect >= 60% of /healthz (local signer)"),
        ("redirect_cloudfront_vs_healthz", "redirect >= 60% of /healthz (CloudFront key)"),
    ):
        q = ratios[key]["median"]
        L.append(f"| {label} | {_pct(q)} | {_verdict(None if q is None else q >= 0.6)} |")
    for name, label in (("redirect-local", "local"), ("redirect-cloudfront", "CloudFront")):
        r = runs.get(name)
        if r and r["signed"] + r["cached"]:
            share = r["signed"] / (r["signed"] + r["cached"])
            L.append(
                f"| signatures per request < 1% once warm ({label}) | {share:.4%}"
                f" | {_verdict(share < 0.01)} |"
            )
    for key, label, target in (
        ("proxy_local_vs_nginx", "proxy >= 60% of nginx", 0.6),
        ("proxy_local_vs_media", "proxy >= 90% of the local origin", 0.9),
    ):
        q = ratios[key]["median"]
        L.append(f"| {label} | {_pct(q)} | {_verdict(None if q is None else q >= target)} |")
    for name, label in (("slow-local", "own /media"), ("slow-nginx", "nginx origin")):
        r = s.get(name)
        if r:
            all_there = r["min_streaming"] >= r["count"]
            ok = all_there and r["max_rss_mb"] < 200
            L.append(
                f"| {r['count']} slow clients < 200 MB RSS ({label}) | {r['max_rss_mb']:.0f} MB"
                f" with {r['min_streaming']} of {r['count']} streaming | {_verdict(ok)} |"
            )
    if sess:
        ok = sess["gauge_after"] >= sess["sessions"] and sess["after"]["p50_ms"] < 50
        L.append(
            f"| /metrics p50 < 50 ms with {sess['sessions']} sessions"
            f" | {sess['after']['p50_ms']} ms ({sess['gauge_after']:.0f} active) | {_verdict(ok)} |"
        )
    return "\n".join(L) + "\n"


def main() -> None:
    out = Path(sys.argv[1])
    s = summarise(out)
    (out / "summary.json").write_text(json.dumps(s, indent=1))
    text = markdown(s)
    (out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
