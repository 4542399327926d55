"""RFC 9110 byte ranges: parsing `Range` and `If-Range`, deciding 200/206/416, multipart framing.

This module owns the whole range decision for a GET of a representation of known size and the
exact framing of a `multipart/byteranges` body. It is pure: no aiohttp, no I/O, no clock except
for the two-digit years of obsolete RFC 850 dates. Handlers call `resolve()` and then stream the
bytes of the ranges it returns.

Choices made where RFC 9110 leaves room (mostly the MAYs of §14.2 and §14.6):

* An invalid `Range` (bad syntax, `a-b` with `b < a`, `bytes=` with no range) and a `Range` in a
  unit other than `bytes` are ignored: the answer is 200 with the whole representation.
* More than `max_ranges` range-specs (counted as written, satisfiable or not) is treated as a
  denial-of-service attempt and ignored: 200.
* With `coalesce=True` (the default) satisfiable ranges are sorted and overlapping or adjacent
  ones merged, so the parts are disjoint, ascending and never add up to more than the file.
* With `coalesce=False` the ranges keep request order (§14.2's SHOULD); if their lengths add up to
  more than the representation (overlaps used to amplify the response) the Range is ignored: 200.
* Any range on a zero-length representation gets 416: no byte range can describe it.
* `If-Range` uses strong comparison only; an HTTP-date matches when it equals Last-Modified to
  the second (the resolution of the header we send). Anything unparseable does not match, so a
  client holding a stale or odd validator gets the full representation, never a spliced 206.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = [
    "ByteRange",
    "RangeDecision",
    "if_range_matches",
    "multipart_boundary",
    "multipart_content_type",
    "multipart_length",
    "multipart_parts",
    "multipart_trailer",
    "parse_http_date",
    "parse_range_header",
    "resolve",
]

# OWS in RFC 9110 is SP / HTAB only; str.strip() would also eat CR, LF and Unicode spaces.
_OWS = " \t"
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Explicit [0-9]: \d and int() also accept non-ASCII (e.g. Arabic-Indic) digits, and int()
# accepts "1_0".
_INT_RANGE = re.compile(r"([0-9]+)-([0-9]*)")
_SUFFIX_RANGE = re.compile(r"-([0-9]+)")
# Positions longer than this are far beyond any representation; saturating them keeps int()
# cheap (it is quadratic, and refuses > 4300 digits by default) without changing any decision.
_MAX_DIGITS = 64
_SATURATED: int = 10**_MAX_DIGITS

# entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE ; etagc = %x21 / %x23-7E / obs-text
_STRONG_ETAG = re.compile(r'"[\x21\x23-\x7e\x80-\xff]*"')
# RFC 2046 §5.1.1 allows 1-70 bchars; we keep to those that are also tchars, so the boundary
# goes into the Content-Type parameter unquoted.
_BOUNDARY = re.compile(r"[0-9A-Za-z'+_\-.]{1,70}")

_MONTHS = {
    name: number
    for number, name in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"),
        start=1,
    )
}
_TIME = r"(\d\d):(\d\d):(\d\d)"
_MONTH = r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
# HTTP-date is case-sensitive (RFC 9110 §5.6.7); recipients must accept all three formats.
_IMF_FIXDATE = re.compile(
    rf"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), (\d\d) {_MONTH} (\d{{4}}) {_TIME} GMT", re.ASCII
)
_RFC850_DATE = re.compile(
    rf"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday), "
    rf"(\d\d)-{_MONTH}-(\d\d) {_TIME} GMT",
    re.ASCII,
)
_ASCTIME_DATE = re.compile(
    rf"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) {_MONTH} (\d\d| \d) {_TIME} (\d{{4}})", re.ASCII
)


@dataclass(frozen=True, slots=True)
class ByteRange:
    """A satisfiable byte range of a representation; both ends inclusive, as on the wire."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.end:
            raise ValueError(f"invalid byte range {self.start}-{self.end}")

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        """The Content-Range field value for this range of a representation of `size` bytes."""
        if self.end >= size:
            raise ValueError(f"byte range {self.start}-{self.end} outside a {size}-byte body")
        return f"bytes {self.start}-{self.end}/{size}"


@dataclass(frozen=True, slots=True)
class RangeDecision:
    """What to answer: 200 (whole body), 206 (`ranges`) or 416.

    `content_range` is the response's Content-Range field: `bytes */{size}` for 416, the range
    for a single-part 206, None for 200 and for a multipart 206 (each part carries its own).
    """

    status: int
    ranges: tuple[ByteRange, ...] = ()
    content_range: str | None = None

    @property
    def is_multipart(self) -> bool:
        return self.status == 206 and len(self.ranges) > 1


def parse_range_header(value: str) -> list[tuple[int | None, int | None]] | None:
    """Parse a Range header value (RFC 9110 §14.1.1).

    Returns None when the header must be ignored: a unit other than `bytes`, or syntactically
    invalid (a server MAY ignore an invalid Range, §14.2, and we do: 200). Otherwise the
    range-specs in order: (a, b) for `a-b`, (a, None) for `a-`, (None, n) for the suffix `-n`.
    Positions with more than 64 significant digits come back as 10**64.
    """
    unit, sep, range_set = value.strip(_OWS).partition("=")
    if not sep or not _TOKEN.fullmatch(unit) or unit.lower() != "bytes":
        return None
    specs: list[tuple[int | None, int | None]] = []
    # 1#range-spec: recipients accept empty list elements and OWS around the commas (§5.6.1.2).
    for raw in range_set.split(","):
        element = raw.strip(_OWS)
        if not element:
            continue
        if match := _INT_RANGE.fullmatch(element):
            first_digits, last_digits = match.groups()
            if last_digits and _digits_less(last_digits, first_digits):
                return None  # §14.1.1: last-pos < first-pos makes the whole set invalid
            last = _position(last_digits) if last_digits else None
            specs.append((_position(first_digits), last))
        elif match := _SUFFIX_RANGE.fullmatch(element):
            specs.append((None, _position(match.group(1))))
        else:
            # other-range is grammatical but means nothing for bytes: invalid for this unit.
            return None
    return specs or None


def _digits_less(a: str, b: str) -> bool:
    """a < b for ASCII digit strings of any length, without converting them to int."""
    a, b = a.lstrip("0"), b.lstrip("0")
    return (len(a), a) < (len(b), b)


def _position(digits: str) -> int:
    significant = digits.lstrip("0")
    if len(significant) > _MAX_DIGITS:
        return _SATURATED
    return int(significant or "0")


def parse_http_date(value: str, *, now: datetime | None = None) -> datetime | None:
    """Parse an HTTP-date in any of its three forms (RFC 9110 §5.6.7) to an aware UTC datetime.

    Returns None when `value` is not an HTTP-date. `now` (default: the clock) only decides the
    century of an obsolete RFC 850 two-digit year.
    """
    if match := _IMF_FIXDATE.fullmatch(value):
        day, month, year, hour, minute, second = match.groups()
    elif match := _ASCTIME_DATE.fullmatch(value):
        month, day, hour, minute, second, year = match.groups()
    elif match := _RFC850_DATE.fullmatch(value):
        day, month, short_year, hour, minute, second = match.groups()
        current = (now or datetime.now(UTC)).year
        full_year = current - current % 100 + int(short_year)
        # §5.6.7: a year more than 50 years in the future is the same two digits in the past.
        year = str(full_year - 100 if full_year > current + 50 else full_year)
    else:
        return None
    try:
        return datetime(
            int(year), _MONTHS[month], int(day), int(hour), int(minute), int(second), tzinfo=UTC
        )
    except ValueError:  # 31 Feb, hour 24, leap second 60: none of them is a Last-Modified of ours
        return None


def if_range_matches(
    if_range: str | None, etag: str | None, last_modified: datetime | None
) -> bool:
    """Evaluate If-Range (RFC 9110 §13.1.5) against the current representation.

    True when there is no If-Range, or it names the current representation: an entity-tag that
    strongly matches `etag` (weak tags on either side never match), or an HTTP-date equal to
    `last_modified` to the second. Anything unparseable is False. `etag` is the ETag field
    value as sent (`"abc"`); a bare opaque tag (`abc`) is quoted first. A naive
    `last_modified` is taken as UTC.
    """
    if if_range is None:
        return True
    validator = if_range.strip(_OWS)
    if validator.startswith(("W/", '"')):
        if validator.startswith("W/") or etag is None or not _STRONG_ETAG.fullmatch(validator):
            return False
        current = etag.strip(_OWS)
        if current.startswith("W/"):
            return False
        if not current.startswith('"'):
            current = f'"{current}"'
        return validator == current
    if last_modified is None:
        return False
    sent = parse_http_date(validator)
    if sent is None:
        return False
    if last_modified.tzinfo is None:
        last_modified = last_modified.replace(tzinfo=UTC)
    # Last-Modified goes out with whole seconds, so that is what a client can echo back.
    return sent == last_modified.astimezone(UTC).replace(microsecond=0)


def resolve(
    range_header: str | None,
    size: int,
    *,
    if_range: str | None = None,
    etag: str | None = None,
    last_modified: datetime | None = None,
    max_ranges: int = 16,
    coalesce: bool = True,
) -> RangeDecision:
    """Decide the answer to a GET of a `size`-byte representation (RFC 9110 §13.2.2 step 5, §14).

    200 when there is no Range, it is ignored (invalid, unknown unit, more than `max_ranges`
    specs, overlap amplification without `coalesce`), or If-Range does not match (a stale
    validator gets the full representation, never a spliced 206). 206 with the satisfiable
    ranges, clamped to `size - 1`; a suffix longer than the file is the whole file; with
    `coalesce` overlapping and adjacent ranges are merged and sorted, otherwise request order is
    kept. 416 when no range is satisfiable (first-pos >= size, `-0`, any range on an empty file).
    """
    if size < 0:
        raise ValueError(f"negative representation size {size}")
    if max_ranges < 1:
        raise ValueError(f"max_ranges must be at least 1, got {max_ranges}")
    whole = RangeDecision(200)
    if range_header is None:
        return whole  # If-Range without Range is ignored (§13.1.5)
    specs = parse_range_header(range_header)
    if specs is None or len(specs) > max_ranges:
        return whole
    if not if_range_matches(if_range, etag, last_modified):
        return whole
    ranges = [r for r in (_satisfy(first, last, size) for first, last in specs) if r is not None]
    if not ranges:
        return RangeDecision(416, (), f"bytes */{size}")
    if coalesce:
        ranges = _coalesce(ranges)
    elif sum(r.length for r in ranges) > size:
        # Overlapping ranges would send more than the file itself (§14.2 DoS note): send it once.
        return whole
    if len(ranges) == 1:
        return RangeDecision(206, (ranges[0],), ranges[0].content_range(size))
    return RangeDecision(206, tuple(ranges))


def _satisfy(first: int | None, last: int | None, size: int) -> ByteRange | None:
    """The part of one range-spec that exists in a `size`-byte representation (§14.1.2)."""
    if first is None:
        suffix = last or 0
        if suffix == 0 or size == 0:
            return None
        return ByteRange(max(0, size - suffix), size - 1)
    if first >= size:
        return None
    end = size - 1 if last is None else min(last, size - 1)
    return ByteRange(first, end)


def _coalesce(ranges: Sequence[ByteRange]) -> list[ByteRange]:
    merged: list[ByteRange] = []
    for current in sorted(ranges, key=lambda r: (r.start, r.end)):
        if merged and current.start <= merged[-1].end + 1:
            if current.end > merged[-1].end:
                merged[-1] = ByteRange(merged[-1].start, current.end)
        else:
            merged.append(current)
    return merged


def multipart_boundary() -> str:
    """A fresh, unguessable boundary: it must not occur in the audio bytes it separates."""
    return secrets.token_hex(16)


def multipart_content_type(boundary: str) -> str:
    """The Content-Type field value of a multipart/byteranges response."""
    _check_boundary(boundary)
    return f"multipart/byteranges; boundary={boundary}"


def multipart_parts(
    ranges: Sequence[ByteRange], size: int, content_type: str | None, boundary: str
) -> list[tuple[bytes, ByteRange]]:
    """Each part's header block and its range, in order (RFC 9110 §14.6).

    A header block is CRLF, the boundary line, Content-Type (omitted when `content_type` is
    None), Content-Range and the blank line; the range's bytes follow it, then the next block,
    then `multipart_trailer()`.
    """
    _check_boundary(boundary)
    if not ranges:
        raise ValueError("a multipart/byteranges body needs at least one range")
    type_line = ""
    if content_type is not None:
        if any(c in content_type for c in "\r\n\0"):
            raise ValueError("content type must not contain CR, LF or NUL")
        type_line = f"Content-Type: {content_type}\r\n"
    # The leading CRLF belongs to the delimiter (RFC 2046 §5.1.1), so every part looks the same
    # and the bytes before the first one are an empty preamble.
    parts = []
    for r in ranges:
        header = f"\r\n--{boundary}\r\n{type_line}Content-Range: {r.content_range(size)}\r\n\r\n"
        parts.append((header.encode("latin-1"), r))
    return parts


def multipart_trailer(boundary: str) -> bytes:
    """The close delimiter that ends a multipart/byteranges body."""
    _check_boundary(boundary)
    return f"\r\n--{boundary}--\r\n".encode("latin-1")


def multipart_length(
    ranges: Sequence[ByteRange], size: int, content_type: str | None, boundary: str
) -> int:
    """The exact Content-Length of the multipart/byteranges body for these ranges."""
    parts = multipart_parts(ranges, size, content_type, boundary)
    return sum(len(header) + r.length for header, r in parts) + len(multipart_trailer(boundary))


def _check_boundary(boundary: str) -> None:
    if not _BOUNDARY.fullmatch(boundary):
        raise ValueError(f"invalid multipart boundary {boundary!r}")
