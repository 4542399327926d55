"""One snapshot of the servers under test, taken before and after each wrk run of bench/play.sh:
CPU time of each process (utime + stime from /proc/PID/stat, in clock ticks), and from each
Edge's /metrics the signed-URL counters and the request counters by route and status.

    python bench/play/snap.py a=http://127.0.0.1:P1@PID1 nginx=@PID2 ...

Prints one JSON object: {"hz": 100, "a": {"ticks": .., "signed": .., "cached": ..,
"requests": {"play 302": ..}}, "nginx": {"ticks": ..}}. bench/play/summary.py takes differences.
"""

from __future__ import annotations

import json
import os
import re
import sys
import urllib.request

SIGNED = re.compile(r'^edge_signed_urls_total\{result="(\w+)"\} (\S+)$', re.M)
REQUESTS = re.compile(
    r'^edge_http_requests_total\{method="(\w+)",route="([^"]*)",status="(\d+)"\} (\S+)$', re.M
)


def ticks(pid: str) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)


def edge_counters(base: str) -> dict[str, object]:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, object] = {m.group(1): float(m.group(2)) for m in SIGNED.finditer(text)}
    out["requests"] = {
        f"{m.group(2)} {m.group(3)}": float(m.group(4)) for m in REQUESTS.finditer(text)
    }
    return out


def main() -> None:
    snap: dict[str, object] = {"hz": os.sysconf("SC_CLK_TCK")}
    for arg in sys.argv[1:]:
        name, _, spec = arg.partition("=")
        base, _, pid = spec.partition("@")
        entry: dict[str, object] = {}
        try:
            entry["ticks"] = ticks(pid)
        except (OSError, ValueError, IndexError):
            entry["ticks"] = None
        if base:
            try:
                entry.update(edge_counters(base))
            except OSError as exc:
                entry["error"] = str(exc)
        snap[name] = entry
    print(json.dumps(snap))


if __name__ == "__main__":
    main()
