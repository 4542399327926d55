"""Range / If-Range resolution (RFC 9110 §13.1.5, §14) and multipart/byteranges framing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.ranges import (
    ByteRange,
    RangeDecision,
    if_range_matches,
    multipart_boundary,
    multipart_content_type,
    multipart_length,
    multipart_parts,
    multipart_trailer,
    parse_http_date,
    parse_range_header,
    resolve,
)

# The examples that matter are in the tables; no example database left behind in the repo.
quick = settings(database=None, max_examples=300, deadline=None)

Spans = list[tuple[int, int]]
HUGE = "9" * 5000  # more digits than int() converts by default (sys.get_int_max_str_digits)


def spans(decision: RangeDecision) -> Spans:
    return [(r.start, r.end) for r in decision.ranges]


# (Range header, size, status, ranges) with the default coalesce=True and max_ranges=16.
RESOLVE_CASES: list[tuple[str | None, int, int, Spans]] = [
    # no Range
    (None, 1000, 200, []),
    # single ranges, clamping, suffixes
    ("bytes=0-99", 1000, 206, [(0, 99)]),
    ("bytes=0-", 1000, 206, [(0, 999)]),
    ("bytes=500-", 1000, 206, [(500, 999)]),
    ("bytes=999-999", 1000, 206, [(999, 999)]),
    ("bytes=999-", 1000, 206, [(999, 999)]),
    ("bytes=0-5000", 1000, 206, [(0, 999)]),
    ("bytes=-100", 1000, 206, [(900, 999)]),
    ("bytes=-1000", 1000, 206, [(0, 999)]),
    ("bytes=-5000", 1000, 206, [(0, 999)]),
    ("bytes=0-0", 1, 206, [(0, 0)]),
    ("bytes=-1", 1, 206, [(0, 0)]),
    ("bytes=00010-00019", 1000, 206, [(10, 19)]),
    # unit is a case-insensitive token
    ("Bytes=0-1", 1000, 206, [(0, 1)]),
    ("BYTES=0-1", 1000, 206, [(0, 1)]),
    ("items=0-1", 1000, 200, []),
    ("none", 1000, 200, []),
    ("bytes 0-1", 1000, 200, []),
    ("bytes =0-1", 1000, 200, []),
    ("=0-1", 1000, 200, []),
    # OWS and empty list elements
    ("bytes=0-1,,4-5", 1000, 206, [(0, 1), (4, 5)]),
    ("bytes= 0-1 , 4-5", 1000, 206, [(0, 1), (4, 5)]),
    ("bytes=\t0-1\t,\t4-5\t", 1000, 206, [(0, 1), (4, 5)]),
    ("bytes=,0-1,", 1000, 206, [(0, 1)]),
    ("  bytes=0-1  ", 1000, 206, [(0, 1)]),
    ("bytes=,,", 1000, 200, []),
    ("bytes= , ", 1000, 200, []),
    ("bytes=", 1000, 200, []),
    # syntactically invalid: the whole header is ignored
    ("bytes=5-4", 1000, 200, []),
    ("bytes=0-1,5-4", 1000, 200, []),
    ("bytes=+1-2", 1000, 200, []),
    ("bytes=-1-2", 1000, 200, []),
    ("bytes=1 -2", 1000, 200, []),
    ("bytes=1- 2", 1000, 200, []),
    ("bytes=0x10-0x20", 1000, 200, []),
    ("bytes=1e3-", 1000, 200, []),
    ("bytes=1_0-20", 1000, 200, []),
    ("bytes=\uff11-2", 1000, 200, []),  # fullwidth digit one
    ("bytes=\u0661-2", 1000, 200, []),  # Arabic-Indic digit one
    ("bytes=-", 1000, 200, []),
    ("bytes=--1", 1000, 200, []),
    ("bytes=abc", 1000, 200, []),
    ("bytes=0-1;2-3", 1000, 200, []),
    ("bytes=0-1\n", 1000, 200, []),
    ("bytes=0-1=2", 1000, 200, []),
    # huge numbers are plain integers
    ("bytes=0-99999999999999999999999999", 1000, 206, [(0, 999)]),
    ("bytes=99999999999999999999999999-", 1000, 416, []),
    ("bytes=-99999999999999999999999999", 1000, 206, [(0, 999)]),
    (f"bytes=0-{HUGE}", 1000, 206, [(0, 999)]),
    (f"bytes=-{HUGE}", 1000, 206, [(0, 999)]),
    (f"bytes={HUGE}-", 1000, 416, []),
    (f"bytes={HUGE}-{HUGE[:-1]}", 1000, 200, []),  # last < first, even past int() limits
    # unsatisfiable
    ("bytes=1000-", 1000, 416, []),
    ("bytes=1000-2000", 1000, 416, []),
    ("bytes=-0", 1000, 416, []),
    ("bytes=1000-,2000-,-0", 1000, 416, []),
    ("bytes=0-0", 0, 416, []),
    ("bytes=0-", 0, 416, []),
    ("bytes=-1", 0, 416, []),
    # some unsatisfiable: keep the others
    ("bytes=0-99,1000-1100", 1000, 206, [(0, 99)]),
    ("bytes=2000-,-0,0-9", 1000, 206, [(0, 9)]),
    ("bytes=-0,-10", 1000, 206, [(990, 999)]),
    # coalescing: overlapping and adjacent merge, sorted; a gap keeps two parts
    ("bytes=0-1,,2-3", 1000, 206, [(0, 3)]),
    ("bytes=0-99,50-149", 1000, 206, [(0, 149)]),
    ("bytes=0-99,100-199", 1000, 206, [(0, 199)]),
    ("bytes=0-99,101-199", 1000, 206, [(0, 99), (101, 199)]),
    ("bytes=500-599,0-99", 1000, 206, [(0, 99), (500, 599)]),
    ("bytes=-100,0-99", 1000, 206, [(0, 99), (900, 999)]),
    ("bytes=0-499,400-", 1000, 206, [(0, 999)]),
    ("bytes=10-20,0-100,50-60", 1000, 206, [(0, 100)]),
    ("bytes=" + ",".join(["0-0"] * 16), 1000, 206, [(0, 0)]),
    ("bytes=" + ",".join(f"{i}-{i}" for i in range(16)), 1000, 206, [(0, 15)]),
    # more than max_ranges specs: a DoS shape, ignored
    ("bytes=" + ",".join(["0-0"] * 17), 1000, 200, []),
    ("bytes=" + ",".join(["5000-"] * 17), 1000, 200, []),
]


@pytest.mark.parametrize(("header", "size", "status", "expected"), RESOLVE_CASES)
def test_resolve(header: str | None, size: int, status: int, expected: Spans) -> None:
    decision = resolve(header, size)
    assert decision.status == status
    assert spans(decision) == expected


# The same headers without coalescing: request order, adjacency and small overlaps kept.
UNCOALESCED_CASES: list[tuple[str, int, int, Spans]] = [
    ("bytes=500-599,0-99", 1000, 206, [(500, 599), (0, 99)]),
    ("bytes=0-1,2-3", 1000, 206, [(0, 1), (2, 3)]),
    ("bytes=0-99,50-149", 1000, 206, [(0, 99), (50, 149)]),
    ("bytes=-100,0-99", 1000, 206, [(900, 999), (0, 99)]),
    ("bytes=0-99,5000-", 1000, 206, [(0, 99)]),
    ("bytes=5000-,-0", 1000, 416, []),
    # overlaps that would send more bytes than the whole file: send the file once instead
    ("bytes=0-,0-", 1000, 200, []),
    ("bytes=0-599,500-999", 1000, 200, []),
    ("bytes=0-499,500-999", 1000, 206, [(0, 499), (500, 999)]),
]


@pytest.mark.parametrize(("header", "size", "status", "expected"), UNCOALESCED_CASES)
def test_resolve_without_coalescing(header: str, size: int, status: int, expected: Spans) -> None:
    decision = resolve(header, size, coalesce=False)
    assert decision.status == status
    assert spans(decision) == expected


@pytest.mark.parametrize(
    ("header", "max_ranges", "status"),
    [
        ("bytes=0-1,3-4,6-7", 3, 206),
        ("bytes=0-1,3-4,6-7", 2, 200),
        ("bytes=0-1,,,,3-4", 2, 206),  # empty elements are not ranges
        ("bytes=0-1,5000-,6000-", 2, 200),  # unsatisfiable specs count too
        ("bytes=0-1", 1, 206),
    ],
)
def test_max_ranges(header: str, max_ranges: int, status: int) -> None:
    assert resolve(header, 1000, max_ranges=max_ranges).status == status


def test_decision_content_range() -> None:
    assert resolve("bytes=5000-", 1000).content_range == "bytes */1000"
    assert resolve("bytes=0-", 0).content_range == "bytes */0"
    single = resolve("bytes=0-99", 1000)
    assert single.content_range == "bytes 0-99/1000"
    assert not single.is_multipart
    # two requested ranges that coalesce into one are a single-part 206
    merged = resolve("bytes=0-99,100-199", 1000)
    assert merged.content_range == "bytes 0-199/1000"
    assert not merged.is_multipart
    multi = resolve("bytes=0-9,20-29", 1000)
    assert multi.content_range is None
    assert multi.is_multipart
    assert resolve(None, 1000) == RangeDecision(200)


def test_resolve_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        resolve("bytes=0-1", -1)
    with pytest.raises(ValueError):
        resolve("bytes=0-1", 10, max_ranges=0)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("bytes=0-1,-5,7-", [(0, 1), (None, 5), (7, None)]),
        ("bytes=7-,0-1", [(7, None), (0, 1)]),
        ("bytes=-0", [(None, 0)]),
        ("bYtEs= 3-3 ,, ", [(3, 3)]),
        ("bytes=0-" + "9" * 100, [(0, 10**64)]),
        ("bytes=12345678901234567890-", [(12345678901234567890, None)]),
        ("bytes=5-4", None),
        ("bytes=", None),
        ("items=0-1", None),
        ("", None),
    ],
)
def test_parse_range_header(
    value: str, expected: list[tuple[int | None, int | None]] | None
) -> None:
    assert parse_range_header(value) == expected


# --- If-Range ---------------------------------------------------------------------------------

LAST_MODIFIED = datetime(1994, 11, 6, 8, 49, 37, tzinfo=UTC)
IMF = "Sun, 06 Nov 1994 08:49:37 GMT"


@pytest.mark.parametrize(
    ("if_range", "etag", "last_modified", "expected"),
    [
        (None, None, None, True),
        (None, '"abc"', LAST_MODIFIED, True),
        # entity tags: strong comparison only
        ('"abc"', '"abc"', None, True),
        (' "abc"\t', '"abc"', None, True),
        ('"abc"', "abc", None, True),  # bare opaque-tag from the caller is quoted first
        ('"abc"', '"abd"', None, False),
        ('"abc"', '"ABC"', None, False),
        ('"abc"', None, LAST_MODIFIED, False),
        ('W/"abc"', '"abc"', None, False),
        ('"abc"', 'W/"abc"', None, False),
        ('W/"abc"', 'W/"abc"', None, False),
        ('"abc', '"abc', None, False),
        ('"a"b"', '"a"b"', None, False),
        ('"abc", "def"', '"abc"', None, False),
        ("*", '"abc"', None, False),
        ('""', '""', None, True),
        # HTTP-dates: exact second of Last-Modified
        (IMF, None, LAST_MODIFIED, True),
        (IMF, '"abc"', LAST_MODIFIED, True),
        (IMF, None, LAST_MODIFIED + timedelta(seconds=1), False),
        (IMF, None, LAST_MODIFIED - timedelta(seconds=1), False),
        (IMF, None, LAST_MODIFIED + timedelta(microseconds=999_999), True),
        (IMF, None, LAST_MODIFIED.replace(tzinfo=None), True),  # naive means UTC
        (IMF, None, LAST_MODIFIED.astimezone(timezone(timedelta(hours=2))), True),
        (IMF, '"abc"', None, False),
        ("Sunday, 06-Nov-94 08:49:37 GMT", None, LAST_MODIFIED, True),
        ("Sun Nov  6 08:49:37 1994", None, LAST_MODIFIED, True),
        ("sun, 06 nov 1994 08:49:37 gmt", None, LAST_MODIFIED, False),
        ("Sun, 06 Nov 1994 08:49:37 UTC", None, LAST_MODIFIED, False),
        ("Sun, 6 Nov 1994 08:49:37 GMT", None, LAST_MODIFIED, False),
        ("Sun, 06 Nov 1994 08:49:37 +0000", None, LAST_MODIFIED, False),
        ("784111777", None, LAST_MODIFIED, False),
        # garbage
        ("", '"abc"', LAST_MODIFIED, False),
        ("garbage", '"abc"', LAST_MODIFIED, False),
        ("Sun, 31 Feb 1994 08:49:37 GMT", None, LAST_MODIFIED, False),
        ("Sun, 06 Nov 1994 24:00:00 GMT", None, LAST_MODIFIED, False),
    ],
)
def test_if_range_matches(
    if_range: str | None, etag: str | None, last_modified: datetime | None, expected: bool
) -> None:
    assert if_range_matches(if_range, etag, last_modified) is expected


@pytest.mark.parametrize(
    ("header", "if_range", "status", "expected"),
    [
        ("bytes=0-99", '"v1"', 206, [(0, 99)]),
        ("bytes=0-99", IMF, 206, [(0, 99)]),
        ("bytes=0-99", '"v0"', 200, []),  # stale validator: whole file, never a spliced 206
        ("bytes=0-99", "Sun, 06 Nov 1994 08:49:38 GMT", 200, []),
        ("bytes=0-99", 'W/"v1"', 200, []),
        ("bytes=0-99", "garbage", 200, []),
        ("bytes=5000-", '"v0"', 200, []),  # If-Range false ignores Range before it can 416
        ("bytes=5000-", '"v1"', 416, []),
        (None, '"v1"', 200, []),  # If-Range only applies with a Range
        (None, '"v0"', 200, []),
        ("bytes=9-1", '"v1"', 200, []),
    ],
)
def test_resolve_with_if_range(
    header: str | None, if_range: str, status: int, expected: Spans
) -> None:
    decision = resolve(header, 1000, if_range=if_range, etag='"v1"', last_modified=LAST_MODIFIED)
    assert decision.status == status
    assert spans(decision) == expected


@pytest.mark.parametrize(
    ("value", "year"),
    [("Thursday, 01-Jan-70 00:00:00 GMT", 2070), ("Monday, 01-Jan-76 00:00:00 GMT", 1976)],
)
def test_rfc850_two_digit_year_is_never_over_50_years_ahead(value: str, year: int) -> None:
    parsed = parse_http_date(value, now=datetime(2025, 6, 1, tzinfo=UTC))
    assert parsed is not None
    assert parsed.year == year


# --- ByteRange and multipart/byteranges -------------------------------------------------------


def test_byte_range() -> None:
    r = ByteRange(0, 99)
    assert r.length == 100
    assert r.content_range(1000) == "bytes 0-99/1000"
    assert ByteRange(5, 5).length == 1
    with pytest.raises(ValueError):
        ByteRange(5, 4)
    with pytest.raises(ValueError):
        ByteRange(-1, 4)
    with pytest.raises(ValueError):
        r.content_range(99)


def assemble(
    body: bytes, ranges: list[ByteRange], content_type: str | None, boundary: str
) -> bytes:
    out = bytearray()
    for header, r in multipart_parts(ranges, len(body), content_type, boundary):
        out += header + body[r.start : r.end + 1]
    return bytes(out + multipart_trailer(boundary))


def test_multipart_body_is_exact() -> None:
    body = bytes(range(256)) * 4
    ranges = [ByteRange(0, 3), ByteRange(1020, 1023)]
    assembled = assemble(body, ranges, "audio/mpeg", "SEP")
    assert assembled == (
        b"\r\n--SEP\r\nContent-Type: audio/mpeg\r\nContent-Range: bytes 0-3/1024\r\n\r\n"
        b"\x00\x01\x02\x03"
        b"\r\n--SEP\r\nContent-Type: audio/mpeg\r\nContent-Range: bytes 1020-1023/1024\r\n\r\n"
        b"\xfc\xfd\xfe\xff"
        b"\r\n--SEP--\r\n"
    )
    assert multipart_length(ranges, len(body), "audio/mpeg", "SEP") == len(assembled)
    assert multipart_content_type("SEP") == "multipart/byteranges; boundary=SEP"


def test_multipart_without_content_type() -> None:
    (header, _), *_ = multipart_parts([ByteRange(0, 0)], 1, None, "SEP")
    assert header == b"\r\n--SEP\r\nContent-Range: bytes 0-0/1\r\n\r\n"


def test_multipart_boundary_is_random_and_valid() -> None:
    boundaries = {multipart_boundary() for _ in range(50)}
    assert len(boundaries) == 50
    for boundary in boundaries:
        assert len(boundary) >= 32
        multipart_content_type(boundary)  # accepted as a boundary


@pytest.mark.parametrize(
    ("ranges", "content_type", "boundary"),
    [
        ([], "audio/mpeg", "SEP"),
        ([ByteRange(0, 1)], "audio/mpeg", ""),
        ([ByteRange(0, 1)], "audio/mpeg", "a b"),
        ([ByteRange(0, 1)], "audio/mpeg", "x" * 71),
        ([ByteRange(0, 1)], "audio/mpeg", "SEP\r\nX-Evil: 1"),
        ([ByteRange(0, 1)], "audio/mpeg\r\nX-Evil: 1", "SEP"),
        ([ByteRange(0, 10)], "audio/mpeg", "SEP"),  # beyond the 10-byte body
    ],
)
def test_multipart_rejects_bad_input(
    ranges: list[ByteRange], content_type: str, boundary: str
) -> None:
    with pytest.raises(ValueError):
        multipart_parts(ranges, 10, content_type, boundary)


# --- properties -------------------------------------------------------------------------------

positions = st.integers(min_value=0, max_value=3000)
spec = st.one_of(
    st.tuples(positions, positions).map(lambda t: f"{min(t)}-{max(t)}"),
    positions.map(lambda a: f"{a}-"),
    positions.map(lambda n: f"-{n}"),
)
headers = st.lists(spec, min_size=1, max_size=20).map(lambda specs: "bytes=" + ",".join(specs))
sizes = st.integers(min_value=0, max_value=2000)


@quick
@given(header=headers, size=sizes, coalesce=st.booleans())
def test_every_206_range_lies_within_the_representation(
    header: str, size: int, coalesce: bool
) -> None:
    decision = resolve(header, size, coalesce=coalesce)
    assert decision.status in (200, 206, 416)
    if decision.status == 206:
        assert decision.ranges
        assert all(0 <= r.start <= r.end <= size - 1 for r in decision.ranges)
        # never more bytes than the whole file, with or without coalescing
        assert sum(r.length for r in decision.ranges) <= size
    else:
        assert decision.ranges == ()


@quick
@given(header=st.one_of(headers, st.text(max_size=60)), size=sizes, coalesce=st.booleans())
def test_resolving_is_deterministic_and_never_raises(
    header: str, size: int, coalesce: bool
) -> None:
    first = resolve(header, size, coalesce=coalesce)
    assert first == resolve(header, size, coalesce=coalesce)
    assert first.status in (200, 206, 416)


@quick
@given(header=headers, size=sizes)
def test_coalesced_ranges_are_sorted_and_disjoint(header: str, size: int) -> None:
    ranges = resolve(header, size, max_ranges=20).ranges
    for before, after in pairwise(ranges):
        assert before.end + 1 < after.start  # sorted, not overlapping, not even adjacent


@quick
@given(header=headers, size=sizes)
def test_coalescing_covers_exactly_the_requested_bytes(header: str, size: int) -> None:
    plain = resolve(header, size, max_ranges=20, coalesce=False)
    merged = resolve(header, size, max_ranges=20)
    if plain.status == 206:
        covered = {i for r in plain.ranges for i in range(r.start, r.end + 1)}
        assert covered == {i for r in merged.ranges for i in range(r.start, r.end + 1)}


@quick
@given(data=st.data(), size=st.integers(min_value=1, max_value=10**12))
def test_valid_single_range_starting_inside_gives_206_at_its_start(
    data: st.DataObject, size: int
) -> None:
    a = data.draw(st.integers(min_value=0, max_value=size - 1))
    b = data.draw(st.integers(min_value=a, max_value=10**15))
    decision = resolve(f"bytes={a}-{b}", size)
    assert decision.status == 206
    assert decision.ranges == (ByteRange(a, min(b, size - 1)),)


@quick
@given(
    spans=st.lists(st.tuples(positions, positions), min_size=1, max_size=10),
    content_type=st.one_of(st.none(), st.sampled_from(["audio/mpeg", "audio/ogg; codecs=opus"])),
)
def test_multipart_length_equals_assembled_length(
    spans: list[tuple[int, int]], content_type: str | None
) -> None:
    body = bytes(i % 251 for i in range(3001))
    ranges = [ByteRange(min(s), max(s)) for s in spans]
    boundary = multipart_boundary()
    assembled = assemble(body, ranges, content_type, boundary)
    assert multipart_length(ranges, len(body), content_type, boundary) == len(assembled)
    assert assembled.count(b"--" + boundary.encode()) == len(ranges) + 1
