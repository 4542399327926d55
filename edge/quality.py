"""Which rendition of a track to stream: tier, client formats, bandwidth and recent buffering.

This module owns the quality decision of `/play` and the parsing of its inputs (`format=`,
`Accept`, `bw=`, `Downlink`, the session's measured throughput and buffer events). It is pure:
no aiohttp, no I/O, no clock (callers pass `now`, on the same clock as the stored timestamps).

Choices made where the contract leaves room:

* Non-positive rates (`bw=0`, `Downlink: 0`, a measured 0) carry no usable estimate and are
  ignored like garbage, so the next source in the precedence order is used.
* A timestamp slightly in the future (up to `CLOCK_SKEW_S`, clocks of edge nodes sharing a Redis
  session) counts as "just now"; further in the future it is ignored, so a bad value cannot pin
  a measurement or a buffering step-down forever.
* `*/*` and `audio/*` in Accept stand for the default formats (mp3, aac), never for flac. A
  specific media type overrides `audio/*`, which overrides `*/*` (RFC 9110 §12.5.1); when several
  media types name the same format (audio/mp4, audio/aac, audio/x-m4a) the highest q counts.
  An Accept element with an invalid q is ignored.
* When several rules lower the choice, `downgraded` names "tier" if the tier refused what was
  asked (a listener must learn that an upgrade, not the network, gets them more), else the last
  rule that lowered it (format fallback, then bandwidth, then buffering); `reason` lists all.
* Between renditions of equal bitrate the client's format order decides; formats the client
  did not name (only in a fallback) rank after those it named, in `FORMATS` order.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal, NamedTuple

__all__ = [
    "BUFFER_WINDOW_S",
    "CLOCK_SKEW_S",
    "DEFAULT_FORMATS",
    "FORMATS",
    "HEADROOM",
    "MAX_BUFFER_STEP",
    "MEASURED_TTL_S",
    "Choice",
    "NoPlayableRendition",
    "Rendition",
    "Tier",
    "buffer_step",
    "choose",
    "parse_bandwidth",
    "parse_formats",
    "tier_allows",
]

Tier = Literal["free", "premium", "hifi"]
FORMATS: Final = ("mp3", "aac", "flac")
DEFAULT_FORMATS: Final = ("mp3", "aac")

HEADROOM: Final = 1.25  # a rung fits when bitrate * HEADROOM <= bandwidth
MEASURED_TTL_S: Final = 120.0  # a session's measured throughput older than this is stale
BUFFER_WINDOW_S: Final = 60.0  # each clean stretch this long steps quality back up a rung
MAX_BUFFER_STEP: Final = 2
CLOCK_SKEW_S: Final = 5.0

_LOSSY: Final = frozenset({"mp3", "aac"})
_LOSSY_CAP_KBPS: Final[dict[str, float]] = {"free": 128, "premium": 320, "hifi": math.inf}

_FORMAT_NAMES: Final = {
    "mp3": "mp3",
    "mpeg": "mp3",
    "aac": "aac",
    "m4a": "aac",
    "mp4": "aac",
    "flac": "flac",
}
_MEDIA_TYPES: Final = {
    "audio/mpeg": "mp3",
    "audio/mp4": "aac",
    "audio/aac": "aac",
    "audio/x-m4a": "aac",
    "audio/flac": "flac",
    "audio/x-flac": "flac",
}
# OWS in RFC 9110 is SP / HTAB only.
_OWS = " \t"
# qvalue (RFC 9110 §12.4.2): 0 to 1 with at most three decimals.
_QVALUE = re.compile(r"0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?")
# Explicit [0-9]: float() also takes "1e3", "1_0", "inf", "nan" and non-ASCII digits.
_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")


class NoPlayableRendition(ValueError):
    """The tier allows none of the track's renditions (e.g. a flac-only track for a free user)."""


class Rendition(NamedTuple):
    """(A tuple: hashed in C, as a ladder of them is on every /play.)"""

    format: str  # mp3 | aac | flac
    bitrate_kbps: int


@dataclass(frozen=True, slots=True)
class Choice:
    """The rendition to stream and why.

    `downgraded` is None, "tier" (asked for more than the tier allows), "bandwidth" (the network
    can't carry the best allowed), "buffering" (stepped down for recent buffer events) or
    "format" (none of the accepted formats exists for this track: fell back to another format).
    """

    rendition: Rendition
    downgraded: str | None
    reason: str


def tier_allows(tier: Tier, r: Rendition) -> bool:
    """free: lossy up to 128 kbit/s; premium: lossy up to 320; hifi: any lossy and flac."""
    cap = _LOSSY_CAP_KBPS.get(tier)
    if cap is None:
        raise ValueError(f"unknown tier {tier!r}")
    if r.format == "flac":
        return tier == "hifi"
    return r.format in _LOSSY and r.bitrate_kbps <= cap


def parse_formats(format_param: str | None, accept: str | None) -> tuple[str, ...]:
    """The formats the client takes, best first; never empty.

    The `format=` query (comma list, in preference order) wins when it names a known format;
    else the Accept header by q-value; else `DEFAULT_FORMATS`.
    """
    if len(format_param or "") + len(accept or "") <= MAX_REMEMBERED_FORMATS:
        return _remembered_formats(format_param, accept)  # (players repeat theirs)
    return _parse_formats(format_param, accept)


def _parse_formats(format_param: str | None, accept: str | None) -> tuple[str, ...]:
    if format_param is not None and (names := _formats_from_query(format_param)):
        return names
    if accept is not None and (names := _formats_from_accept(accept)):
        return names
    return DEFAULT_FORMATS


MAX_REMEMBERED_FORMATS = 256
_remembered_formats = functools.lru_cache(maxsize=1024)(_parse_formats)


def _formats_from_query(value: str) -> tuple[str, ...]:
    names = (_FORMAT_NAMES.get(part.strip(_OWS).lower()) for part in value.split(","))
    return tuple(dict.fromkeys(name for name in names if name is not None))


def _formats_from_accept(value: str) -> tuple[str, ...]:
    # Per format: (q, position in the header) of the most specific media range naming it.
    explicit: dict[str, tuple[float, int]] = {}
    audio_any: tuple[float, int] | None = None
    any_any: tuple[float, int] | None = None
    for position, element in enumerate(_split_unquoted(value, ",")):
        media_range, *params = _split_unquoted(element, ";")
        q = _weight(params)
        if q is None:
            continue
        weight = (q, position)
        media_range = media_range.strip(_OWS).lower()
        if media_range == "audio/*":
            audio_any = _higher(audio_any, weight)
        elif media_range == "*/*":
            any_any = _higher(any_any, weight)
        elif (name := _MEDIA_TYPES.get(media_range)) is not None:
            explicit[name] = _higher(explicit.get(name), weight)
    wildcard = audio_any if audio_any is not None else any_any
    ranked: list[tuple[float, int, int, str]] = []
    for name in FORMATS:
        if name in explicit:
            q, position = explicit[name]
            ranked.append((q, position, 0, name))
        elif wildcard is not None and name in DEFAULT_FORMATS:
            q, position = wildcard
            ranked.append((q, position, DEFAULT_FORMATS.index(name), name))
    ranked.sort(key=lambda item: (-item[0], item[1], item[2]))
    return tuple(name for q, _, _, name in ranked if q > 0)


def _weight(params: Iterable[str]) -> float | None:
    """The q parameter (1 when absent); None when it is not a valid qvalue."""
    for param in params:
        name, _, value = param.partition("=")
        if name.strip(_OWS).lower() == "q":
            value = value.strip(_OWS)
            return float(value) if _QVALUE.fullmatch(value) else None
    return 1.0


def _higher(current: tuple[float, int] | None, new: tuple[float, int]) -> tuple[float, int]:
    # Highest q wins; on equal q the earlier position (current) stays.
    return new if current is None or new[0] > current[0] else current


def _split_unquoted(value: str, separator: str) -> list[str]:
    """Split on `separator` outside quoted-strings (a parameter value may contain commas)."""
    parts: list[str] = []
    start = 0
    quoted = escaped = False
    for index, char in enumerate(value):
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append(value[start:index])
            start = index + 1
    parts.append(value[start:])
    return parts


def parse_bandwidth(
    bw_param: str | None,
    downlink_header: str | None,
    measured_kbps: float | None,
    measured_at: float | None,
    now: float,
) -> float | None:
    """The client's bandwidth in kbit/s, or None when nothing usable is known.

    Precedence: `bw=` (kbit/s) of this request, then the `Downlink` client hint (Mbit/s; Chrome
    rounds it to 25 kbit/s and caps it at 10 Mbit/s), then the session's measured throughput if
    it is at most `MEASURED_TTL_S` old. Unusable values are skipped, never an error.
    """
    if (bw := _parse_rate(bw_param)) is not None:
        return bw
    if (downlink := _parse_rate(downlink_header)) is not None:
        return downlink * 1000
    if (
        measured_kbps is not None
        and _usable_rate(measured_kbps)
        and measured_at is not None
        and _within(measured_at, now, MEASURED_TTL_S)
    ):
        return float(measured_kbps)
    return None


def _parse_rate(value: str | None) -> float | None:
    if value is None:
        return None
    value = value.strip(_OWS)
    if not _DECIMAL.fullmatch(value):
        return None
    rate = float(value)  # overlong digit strings become inf, rejected below
    return rate if _usable_rate(rate) else None


def _usable_rate(rate: float) -> bool:
    return math.isfinite(rate) and rate > 0


def _within(then: float, now: float, window_s: float) -> bool:
    """`then` is at most `window_s` before `now` (a little after it: clock skew). False for NaN."""
    return -CLOCK_SKEW_S <= now - then <= window_s


def buffer_step(buffer_events: int, last_buffer_at: float | None, now: float) -> int:
    """Rungs to step down: the buffer events that still count, `MAX_BUFFER_STEP` at most (more
    would keep quality down for minutes after the buffering stopped). All of them while the
    last was at most `BUFFER_WINDOW_S` ago, then one fewer for each further clean
    `BUFFER_WINDOW_S` (quality comes back a rung at a time, as it went down). 0 for a time far
    in the future or NaN."""
    if last_buffer_at is None:
        return 0
    age = now - last_buffer_at
    if not -CLOCK_SKEW_S <= age < math.inf:
        return 0
    count = max(0, min(buffer_events, MAX_BUFFER_STEP))
    if age > BUFFER_WINDOW_S:
        count -= math.ceil(age / BUFFER_WINDOW_S) - 1
    return max(0, count)


# Choices made, by all of choose's arguments: players repeat theirs (a tier, a track's ladder, a
# format list, mostly no bandwidth estimate), and a choice costs more than the rest of a
# redirect's handler. Oldest out first past the size.
_CHOSEN: dict[tuple[object, ...], Choice] = {}
CHOSEN_SIZE: Final = 4096


def choose(
    tier: Tier,
    available: Sequence[Rendition],
    accepted: Sequence[str],
    bandwidth_kbps: float | None = None,
    step_down: int = 0,
    requested_bitrate: int | None = None,
) -> Choice:
    """Pick the rendition to stream. Raises `NoPlayableRendition` if the tier allows none.

    Candidates are the tier-allowed renditions in accepted formats, else (flagged "tier" when the
    track has an accepted format the tier forbids, "format" otherwise) the tier-allowed ones in
    any format. An explicit `requested_bitrate` is honoured as far as the tier allows and ignores
    bandwidth and buffering. Otherwise the highest rung whose bitrate * `HEADROOM` fits the
    bandwidth (the lowest if none does), then `step_down` rungs lower.
    """
    if type(available) is not tuple or type(accepted) is not tuple:
        return _choose(tier, available, accepted, bandwidth_kbps, step_down, requested_bitrate)
    key = (tier, available, accepted, bandwidth_kbps, step_down, requested_bitrate)
    found = _CHOSEN.get(key)
    if found is None:
        found = _choose(tier, available, accepted, bandwidth_kbps, step_down, requested_bitrate)
        if len(_CHOSEN) >= CHOSEN_SIZE:
            del _CHOSEN[next(iter(_CHOSEN))]
        _CHOSEN[key] = found
    return found


def _choose(
    tier: Tier,
    available: Sequence[Rendition],
    accepted: Sequence[str],
    bandwidth_kbps: float | None,
    step_down: int,
    requested_bitrate: int | None,
) -> Choice:
    allowed = [r for r in available if tier_allows(tier, r)]
    if not allowed:
        raise NoPlayableRendition(f"no rendition of this track is allowed for tier {tier}")
    accepted = tuple(accepted)
    downgraded: str | None = None
    tier_refused = False
    notes: list[str] = []
    candidates = [r for r in allowed if r.format in accepted]
    if not candidates:
        candidates = allowed
        asked = "/".join(accepted) or "no format"
        # A rendition in an unknown format is no tier's to allow: that is a format fallback.
        if any(r.format in accepted and r.format in FORMATS for r in available):
            downgraded = "tier"
            tier_refused = True
            notes.append(f"{asked} not allowed for {tier}")
        else:
            downgraded = "format"
            notes.append(f"no {asked} rendition")
    ladder = _ladder(candidates, accepted)

    if requested_bitrate is not None:
        if any(r.bitrate_kbps == requested_bitrate for r in ladder):
            index = next(i for i, r in enumerate(ladder) if r.bitrate_kbps == requested_bitrate)
            notes.append(f"requested {requested_bitrate}")
        elif requested_bitrate > _LOSSY_CAP_KBPS[tier]:
            index = len(ladder) - 1
            downgraded = "tier"
            notes.append(f"requested {requested_bitrate} above {tier} cap")
        else:
            below = [i for i, r in enumerate(ladder) if r.bitrate_kbps <= requested_bitrate]
            index = below[-1] if below else 0
            notes.append(f"nearest to requested {requested_bitrate}")
        return _choice(ladder[index], downgraded, notes)

    top = len(ladder) - 1
    if bandwidth_kbps is None or not _usable_rate(bandwidth_kbps):
        index = top
        notes.append(f"best for {tier}")
    else:
        fitting = [i for i, r in enumerate(ladder) if r.bitrate_kbps * HEADROOM <= bandwidth_kbps]
        index = fitting[-1] if fitting else 0
        if not fitting:
            downgraded = "bandwidth"
            notes.append(f"{bandwidth_kbps:.0f} kbit/s fits no rung")
        elif index < top:
            downgraded = "bandwidth"
            notes.append(f"{bandwidth_kbps:.0f} kbit/s fits up to {ladder[index].bitrate_kbps}")
        else:
            notes.append(f"best for {tier}, fits {bandwidth_kbps:.0f} kbit/s")

    stepped = max(0, index - max(0, step_down))
    if stepped != index:
        downgraded = "buffering"
        notes.append(f"down {index - stepped} for buffering")
    elif step_down > 0:
        notes.append("buffering, already lowest")
    if tier_refused:
        # What the listener asked for is not in their tier: that is what they must be told
        # (X-Stream-Downgraded: tier), whatever the network then took off it.
        downgraded = "tier"
    return _choice(ladder[stepped], downgraded, notes)


def _ladder(candidates: Iterable[Rendition], accepted: tuple[str, ...]) -> list[Rendition]:
    """One rendition per bitrate, ascending; on equal bitrate the preferred format."""

    def rank(r: Rendition) -> int:
        if r.format in accepted:
            return accepted.index(r.format)
        return len(accepted) + FORMATS.index(r.format)  # candidates are all tier-allowed formats

    by_bitrate: dict[int, Rendition] = {}
    for r in candidates:
        best = by_bitrate.get(r.bitrate_kbps)
        if best is None or rank(r) < rank(best):
            by_bitrate[r.bitrate_kbps] = r
    return [by_bitrate[bitrate] for bitrate in sorted(by_bitrate)]


def _choice(r: Rendition, downgraded: str | None, notes: list[str]) -> Choice:
    return Choice(r, downgraded, f"{r.format} {r.bitrate_kbps}: " + "; ".join(notes))
