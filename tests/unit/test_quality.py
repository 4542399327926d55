"""Rendition choice (tier, formats, bandwidth, buffering) and the parsing of its inputs."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge import quality
from edge.quality import (
    BUFFER_WINDOW_S,
    DEFAULT_FORMATS,
    FORMATS,
    MAX_BUFFER_STEP,
    Choice,
    NoPlayableRendition,
    Rendition,
    Tier,
    buffer_step,
    choose,
    parse_bandwidth,
    parse_formats,
    tier_allows,
)

# The examples that matter are in the tables; no example database left behind in the repo.
quick = settings(database=None, max_examples=300, deadline=None)

MP3_128, MP3_192, MP3_320 = Rendition("mp3", 128), Rendition("mp3", 192), Rendition("mp3", 320)
AAC_96, AAC_160, AAC_256 = Rendition("aac", 96), Rendition("aac", 160), Rendition("aac", 256)
FLAC = Rendition("flac", 900)
MP3_96 = Rendition("mp3", 96)  # not in the catalog ladder; for tie-breaking cases
FULL = (MP3_128, MP3_192, MP3_320, AAC_96, AAC_160, AAC_256, FLAC)

TIERS: tuple[Tier, ...] = ("free", "premium", "hifi")
ACCEPTED = [("mp3",), ("aac",), ("flac",), ("mp3", "aac"), ("flac", "mp3"), ("aac", "flac")]
BANDWIDTHS = [None, 50.0, 130.0, 200.0, 400.0, 1500.0]

# Short names for the table below; "!x" means downgraded x, a bare name means no downgrade.
R = {
    "a96": AAC_96,
    "m128": MP3_128,
    "a160": AAC_160,
    "m192": MP3_192,
    "a256": AAC_256,
    "m320": MP3_320,
    "flac": FLAC,
}
BW, TIER = "!bandwidth", "!tier"

# Worked out by hand over the full ladder. A rung fits when bitrate * 1.25 <= bandwidth:
# 50 fits nothing, 130 fits 96, 200 fits up to 160, 400 up to 320, 1500 fits flac (900).
# One row per (tier, accepted): the results for bandwidth None, 50, 130, 200, 400, 1500. A
# listener who asked for what the tier refuses is told "tier", whatever the bandwidth then took.
GRID: dict[tuple[Tier, tuple[str, ...]], list[str]] = {
    ("free", ("mp3",)): ["m128", "m128" + BW, "m128" + BW, "m128", "m128", "m128"],
    ("free", ("aac",)): ["a96", "a96" + BW, "a96", "a96", "a96", "a96"],
    ("free", ("flac",)): ["m128" + TIER, "a96" + TIER, "a96" + TIER, "m128" + TIER,
                          "m128" + TIER, "m128" + TIER],
    ("free", ("mp3", "aac")): ["m128", "a96" + BW, "a96" + BW, "m128", "m128", "m128"],
    ("free", ("flac", "mp3")): ["m128", "m128" + BW, "m128" + BW, "m128", "m128", "m128"],
    ("free", ("aac", "flac")): ["a96", "a96" + BW, "a96", "a96", "a96", "a96"],
    ("premium", ("mp3",)): ["m320", "m128" + BW, "m128" + BW, "m128" + BW, "m320", "m320"],
    ("premium", ("aac",)): ["a256", "a96" + BW, "a96" + BW, "a160" + BW, "a256", "a256"],
    ("premium", ("flac",)): ["m320" + TIER, "a96" + TIER, "a96" + TIER, "a160" + TIER,
                             "m320" + TIER, "m320" + TIER],
    ("premium", ("mp3", "aac")): ["m320", "a96" + BW, "a96" + BW, "a160" + BW, "m320", "m320"],
    ("premium", ("flac", "mp3")): ["m320", "m128" + BW, "m128" + BW, "m128" + BW, "m320", "m320"],
    ("premium", ("aac", "flac")): ["a256", "a96" + BW, "a96" + BW, "a160" + BW, "a256", "a256"],
    ("hifi", ("mp3",)): ["m320", "m128" + BW, "m128" + BW, "m128" + BW, "m320", "m320"],
    ("hifi", ("aac",)): ["a256", "a96" + BW, "a96" + BW, "a160" + BW, "a256", "a256"],
    ("hifi", ("flac",)): ["flac", "flac" + BW, "flac" + BW, "flac" + BW, "flac" + BW, "flac"],
    ("hifi", ("mp3", "aac")): ["m320", "a96" + BW, "a96" + BW, "a160" + BW, "m320", "m320"],
    ("hifi", ("flac", "mp3")): ["flac", "m128" + BW, "m128" + BW, "m128" + BW, "m320" + BW,
                                "flac"],
    ("hifi", ("aac", "flac")): ["flac", "a96" + BW, "a96" + BW, "a160" + BW, "a256" + BW, "flac"],
}  # fmt: skip


def expected(cell: str) -> tuple[Rendition, str | None]:
    name, _, flag = cell.partition("!")
    return R[name], flag or None


GRID_CASES = [
    (tier, accepted, bandwidth, GRID[tier, accepted][column])
    for tier in TIERS
    for accepted in ACCEPTED
    for column, bandwidth in enumerate(BANDWIDTHS)
]


def test_grid_covers_every_corner() -> None:
    assert set(GRID) == {(tier, accepted) for tier in TIERS for accepted in ACCEPTED}
    assert all(len(row) == len(BANDWIDTHS) for row in GRID.values())


@pytest.mark.parametrize(("tier", "accepted", "bandwidth", "cell"), GRID_CASES)
def test_full_ladder_grid(
    tier: Tier, accepted: tuple[str, ...], bandwidth: float | None, cell: str
) -> None:
    choice = choose(tier, FULL, accepted, bandwidth)
    assert (choice.rendition, choice.downgraded) == expected(cell)
    assert choice.reason


# --- tier_allows -------------------------------------------------------------------------------

TIER_ALLOWS = [
    ("free", AAC_96, True),
    ("free", MP3_128, True),
    ("free", Rendition("aac", 128), True),
    ("free", Rendition("mp3", 129), False),
    ("free", AAC_160, False),
    ("free", MP3_320, False),
    ("free", FLAC, False),
    ("free", Rendition("flac", 100), False),
    ("premium", MP3_320, True),
    ("premium", AAC_256, True),
    ("premium", Rendition("aac", 320), True),
    ("premium", Rendition("mp3", 321), False),
    ("premium", FLAC, False),
    ("hifi", MP3_320, True),
    ("hifi", Rendition("mp3", 512), True),
    ("hifi", FLAC, True),
    ("hifi", Rendition("flac", 1411), True),
    ("hifi", Rendition("opus", 160), False),
    ("premium", Rendition("MP3", 128), False),
]


@pytest.mark.parametrize(("tier", "rendition", "allowed"), TIER_ALLOWS)
def test_tier_allows(tier: Tier, rendition: Rendition, allowed: bool) -> None:
    assert tier_allows(tier, rendition) is allowed


def test_unknown_tier_is_a_caller_bug() -> None:
    with pytest.raises(ValueError, match="unknown tier"):
        tier_allows("gold", MP3_128)  # type: ignore[arg-type]


# --- choose: tier, explicit bitrate, formats, partial ladders ----------------------------------


@pytest.mark.parametrize("tier", ["free", "premium"])
@pytest.mark.parametrize("bitrate", [None, 900, 128])
def test_flac_only_client_below_hifi_gets_lossy_and_tier(tier: Tier, bitrate: int | None) -> None:
    choice = choose(tier, FULL, ("flac",), requested_bitrate=bitrate)
    assert choice.rendition.format != "flac"
    assert choice.downgraded == "tier"
    assert tier_allows(tier, choice.rendition)
    if tier == "free":
        assert choice.rendition.bitrate_kbps <= 128


# (tier, accepted, requested bitrate, bandwidth, step_down) -> (rendition, downgraded)
REQUESTED: list[tuple[Tier, tuple[str, ...], int, float | None, int, Rendition, str | None]] = [
    ("premium", ("mp3", "aac"), 320, None, 0, MP3_320, None),
    ("premium", ("mp3", "aac"), 1000, None, 0, MP3_320, "tier"),
    ("premium", ("aac",), 1000, None, 0, AAC_256, "tier"),
    ("premium", ("aac",), 320, None, 0, AAC_256, None),  # within the cap: nearest below
    ("premium", ("mp3", "aac"), 321, None, 0, MP3_320, "tier"),
    ("premium", ("mp3", "aac"), 200, None, 0, MP3_192, None),
    ("premium", ("mp3", "aac"), 160, None, 0, AAC_160, None),
    ("premium", ("mp3",), 160, None, 0, MP3_128, None),
    ("premium", ("mp3", "aac"), 50, None, 0, AAC_96, None),  # none below: the lowest
    ("premium", ("mp3",), 96, None, 0, MP3_128, None),
    ("free", ("mp3", "aac"), 320, None, 0, MP3_128, "tier"),
    ("free", ("mp3", "aac"), 129, None, 0, MP3_128, "tier"),
    ("free", ("mp3", "aac"), 160, None, 0, MP3_128, "tier"),  # aac 160 exists, not for free
    ("free", ("aac",), 128, None, 0, AAC_96, None),
    ("free", ("mp3", "aac"), 96, None, 0, AAC_96, None),
    ("hifi", ("flac", "mp3"), 900, None, 0, FLAC, None),
    ("hifi", ("flac", "mp3"), 5000, None, 0, FLAC, None),  # hifi has no cap
    ("hifi", ("flac", "mp3"), 899, None, 0, MP3_320, None),
    ("hifi", ("mp3",), 900, None, 0, MP3_320, None),
    # the user asked: bandwidth and buffering do not apply
    ("premium", ("mp3", "aac"), 320, 50.0, 2, MP3_320, None),
    ("premium", ("mp3", "aac"), 1000, 50.0, 5, MP3_320, "tier"),
    ("hifi", ("flac",), 900, 100.0, 2, FLAC, None),
    # a format fallback keeps its flag unless the tier cap also bites
    ("premium", ("flac",), 320, None, 0, MP3_320, "tier"),
    ("premium", ("flac",), 192, None, 0, MP3_192, "tier"),
    ("premium", ("opus",), 192, None, 0, MP3_192, "format"),
    ("premium", ("opus",), 1000, None, 0, MP3_320, "tier"),
]


@pytest.mark.parametrize(
    ("tier", "accepted", "bitrate", "bandwidth", "step", "rendition", "downgraded"), REQUESTED
)
def test_requested_bitrate(
    tier: Tier,
    accepted: tuple[str, ...],
    bitrate: int,
    bandwidth: float | None,
    step: int,
    rendition: Rendition,
    downgraded: str | None,
) -> None:
    choice = choose(tier, FULL, accepted, bandwidth, step, requested_bitrate=bitrate)
    assert (choice.rendition, choice.downgraded) == (rendition, downgraded)
    assert str(bitrate) in choice.reason


def test_requested_bitrate_tie_prefers_earlier_accepted_format() -> None:
    available = [Rendition("mp3", 160), AAC_160]
    assert choose("premium", available, ("aac", "mp3"), requested_bitrate=160).rendition == AAC_160
    assert choose("premium", available, ("mp3", "aac"), requested_bitrate=160).rendition == (
        Rendition("mp3", 160)
    )


@pytest.mark.parametrize(
    ("accepted", "bandwidth", "rendition"),
    [
        (("mp3", "aac"), None, Rendition("mp3", 160)),
        (("aac", "mp3"), None, AAC_160),
        (("mp3", "aac"), 200.0, Rendition("mp3", 160)),
        (("aac", "mp3"), 200.0, AAC_160),
        (("aac", "mp3"), 150.0, MP3_96),
        (("mp3", "aac"), 150.0, MP3_96),  # the only 96 is mp3: preference only breaks ties
    ],
)
def test_equal_bitrates_keep_the_preferred_format(
    accepted: tuple[str, ...], bandwidth: float | None, rendition: Rendition
) -> None:
    available = [AAC_160, Rendition("mp3", 160), MP3_96]
    assert choose("premium", available, accepted, bandwidth).rendition == rendition
    # and the order of the catalog rows does not matter
    assert choose("premium", available[::-1], accepted, bandwidth).rendition == rendition


def test_duplicate_renditions_count_as_one_rung() -> None:
    available = [MP3_128, MP3_128, MP3_320, MP3_320]
    choice = choose("premium", available, ("mp3",), step_down=1)
    assert (choice.rendition, choice.downgraded) == (MP3_128, "buffering")


# (tier, available, accepted, bandwidth) -> (rendition, downgraded)
PARTIAL: list[
    tuple[Tier, tuple[Rendition, ...], tuple[str, ...], float | None, Rendition, str | None]
] = [
    ("premium", (AAC_96, AAC_160), ("mp3",), None, AAC_160, "format"),
    ("premium", (AAC_96, AAC_160), ("mp3",), 150.0, AAC_96, "bandwidth"),
    ("premium", (MP3_128, MP3_320), ("mp3",), 300.0, MP3_128, "bandwidth"),
    ("premium", (MP3_128, MP3_320), ("mp3",), 400.0, MP3_320, None),
    ("premium", (MP3_128, MP3_320), ("aac", "mp3"), None, MP3_320, None),
    ("premium", (MP3_320, FLAC), ("flac",), None, MP3_320, "tier"),
    ("premium", (MP3_192,), ("aac",), None, MP3_192, "format"),
    ("free", (MP3_128, MP3_320, FLAC), ("aac",), None, MP3_128, "format"),
    ("free", (AAC_160, MP3_128), ("aac",), None, MP3_128, "tier"),  # aac exists, above free cap
    ("free", (MP3_128, MP3_192), ("flac",), None, MP3_128, "format"),  # no flac at all
    ("free", (AAC_96, AAC_160, AAC_256), ("mp3", "aac"), 1500.0, AAC_96, None),
    ("hifi", (FLAC,), ("mp3", "aac"), None, FLAC, "format"),
    ("hifi", (MP3_320, FLAC), ("flac",), 100.0, FLAC, "bandwidth"),
    ("hifi", (MP3_320, FLAC), ("mp3",), None, MP3_320, None),
    ("hifi", (MP3_128, Rendition("flac", 600)), ("mp3", "flac"), 750.0, Rendition("flac", 600),
     None),
    ("hifi", (MP3_128, Rendition("flac", 600)), ("mp3", "flac"), 749.0, MP3_128, "bandwidth"),
    ("hifi", (Rendition("opus", 160), AAC_96), ("opus",), None, AAC_96, "format"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("tier", "available", "accepted", "bandwidth", "rendition", "downgraded"), PARTIAL
)
def test_partial_ladders(
    tier: Tier,
    available: tuple[Rendition, ...],
    accepted: tuple[str, ...],
    bandwidth: float | None,
    rendition: Rendition,
    downgraded: str | None,
) -> None:
    choice = choose(tier, available, accepted, bandwidth)
    assert (choice.rendition, choice.downgraded) == (rendition, downgraded)


@pytest.mark.parametrize(
    ("tier", "available"),
    [
        ("free", (FLAC,)),
        ("premium", (FLAC,)),
        ("free", (MP3_192, MP3_320, AAC_160)),
        ("free", ()),
        ("hifi", ()),
        ("hifi", (Rendition("opus", 160),)),
    ],
)
@pytest.mark.parametrize("accepted", [("flac",), ("mp3", "aac")])
def test_no_playable_rendition(
    tier: Tier, available: tuple[Rendition, ...], accepted: tuple[str, ...]
) -> None:
    with pytest.raises(NoPlayableRendition):
        choose(tier, available, accepted)
    with pytest.raises(ValueError):  # handlers may catch it as a ValueError
        choose(tier, available, accepted, requested_bitrate=128)


@pytest.mark.parametrize("bandwidth", [math.nan, math.inf, -math.inf, -100.0, 0.0])
def test_unusable_bandwidth_counts_as_unknown(bandwidth: float) -> None:
    choice = choose("premium", FULL, ("mp3", "aac"), bandwidth)
    assert (choice.rendition, choice.downgraded) == (MP3_320, None)


def test_empty_accepted_falls_back_to_any_allowed_format() -> None:
    choice = choose("premium", FULL, ())
    assert (choice.rendition, choice.downgraded) == (MP3_320, "format")


# --- step_down -----------------------------------------------------------------------------------

# premium, (mp3, aac), full ladder: 96a 128m 160a 192m 256a 320m
STEPS: list[tuple[float | None, int, Rendition, str | None]] = [
    (None, 0, MP3_320, None),
    (None, 1, AAC_256, "buffering"),
    (None, 2, MP3_192, "buffering"),
    (None, 5, AAC_96, "buffering"),  # not below the lowest
    (None, -1, MP3_320, None),
    (200.0, 0, AAC_160, "bandwidth"),
    (200.0, 1, MP3_128, "buffering"),
    (200.0, 2, AAC_96, "buffering"),
    (200.0, 5, AAC_96, "buffering"),
    (130.0, 1, AAC_96, "bandwidth"),  # already lowest: the step changes nothing
    (50.0, 2, AAC_96, "bandwidth"),
    (400.0, 1, AAC_256, "buffering"),
    (1500.0, 5, AAC_96, "buffering"),
]


@pytest.mark.parametrize(("bandwidth", "step", "rendition", "downgraded"), STEPS)
def test_step_down(
    bandwidth: float | None, step: int, rendition: Rendition, downgraded: str | None
) -> None:
    choice = choose("premium", FULL, ("mp3", "aac"), bandwidth, step)
    assert (choice.rendition, choice.downgraded) == (rendition, downgraded)
    if downgraded == "buffering":
        assert "buffering" in choice.reason


@pytest.mark.parametrize(
    ("tier", "accepted", "step", "rendition", "downgraded"),
    [
        ("free", ("mp3", "aac"), 1, AAC_96, "buffering"),
        ("free", ("mp3", "aac"), 2, AAC_96, "buffering"),
        ("free", ("mp3",), 2, MP3_128, None),
        ("free", ("flac",), 1, AAC_96, "tier"),  # refused by the tier: that is named first
        ("free", ("flac",), 0, MP3_128, "tier"),
        ("hifi", ("flac",), 2, FLAC, None),
        ("hifi", ("aac", "flac"), 1, AAC_256, "buffering"),
        ("hifi", ("aac", "flac"), 2, AAC_160, "buffering"),
    ],
)
def test_step_down_per_tier(
    tier: Tier, accepted: tuple[str, ...], step: int, rendition: Rendition, downgraded: str | None
) -> None:
    choice = choose(tier, FULL, accepted, step_down=step)
    assert (choice.rendition, choice.downgraded) == (rendition, downgraded)


def test_choice_is_a_frozen_value() -> None:
    choice = choose("premium", FULL, ("mp3",))
    assert choice == Choice(MP3_320, None, choice.reason)
    with pytest.raises(AttributeError):
        choice.downgraded = "tier"  # type: ignore[misc]


def test_a_remembered_choice_is_the_one_made_afresh() -> None:
    # Tuples are remembered (the /play path), lists are not: every corner of the grid, asked
    # twice, with and without a buffering step, gives what a fresh choice gives.
    for tier, accepted, bandwidth, _ in GRID_CASES:
        for step in (0, 1, 2):
            fresh = choose(tier, list(FULL), list(accepted), bandwidth, step)
            assert choose(tier, FULL, accepted, bandwidth, step) == fresh
            assert choose(tier, FULL, accepted, bandwidth, step) == fresh
    assert choose("free", FULL, ("mp3",), requested_bitrate=320).downgraded == "tier"
    assert choose("hifi", FULL, ("mp3",), requested_bitrate=320).downgraded is None


def test_remembered_choices_are_bounded() -> None:
    for n in range(quality.CHOSEN_SIZE + 500):
        choose("premium", FULL, ("mp3", "aac"), 100.0 + n)
    assert len(quality._CHOSEN) == quality.CHOSEN_SIZE
    # The newest are kept, and still right.
    assert choose("premium", FULL, ("mp3", "aac"), 100.0 + quality.CHOSEN_SIZE + 499).rendition == (
        MP3_320
    )


# --- buffer_step ---------------------------------------------------------------------------------

BUFFER_STEPS: list[tuple[int, float | None, float, int]] = [
    (0, None, 1000.0, 0),
    (3, None, 1000.0, 0),  # events but no timestamp: nothing recent to go by
    (1, 990.0, 1000.0, 1),
    (2, 990.0, 1000.0, 2),
    (7, 990.0, 1000.0, 2),
    (0, 990.0, 1000.0, 0),
    (-3, 990.0, 1000.0, 0),
    (2, 1000.0, 1000.0, 2),
    (2, 940.0, 1000.0, 2),  # exactly 60 s ago is still within the window
    (2, 939.9, 1000.0, 1),  # a clean minute steps back up a rung
    (2, 880.0, 1000.0, 1),
    (2, 879.9, 1000.0, 0),  # and a second one, the next
    (7, 879.9, 1000.0, 0),  # (events beyond the cap do not keep it down for longer)
    (100, 939.9, 1000.0, 1),
    (9, 700.0, 1000.0, 0),
    (9, 0.0, 1000.0, 0),
    (1, 0.0, math.inf, 0),
    (1, -math.inf, 1000.0, 0),
    (5, 0.0, 1000.0, 0),
    (1, 1004.0, 1000.0, 1),  # a little in the future: clock skew, counts as now
    (1, 1100.0, 1000.0, 0),  # far in the future: not trusted
    (1, math.nan, 1000.0, 0),
    (1, 990.0, math.nan, 0),
]


@pytest.mark.parametrize(("events", "last_at", "now", "step"), BUFFER_STEPS)
def test_buffer_step(events: int, last_at: float | None, now: float, step: int) -> None:
    assert buffer_step(events, last_at, now) == step


# --- parse_formats -------------------------------------------------------------------------------

FORMAT_CASES: list[tuple[str | None, str | None, tuple[str, ...]]] = [
    # nothing said
    (None, None, DEFAULT_FORMATS),
    ("", None, DEFAULT_FORMATS),
    (",, ,", "", DEFAULT_FORMATS),
    # the query: order is preference, case-insensitive, aliases, unknown names ignored
    ("aac,mp3", None, ("aac", "mp3")),
    ("mp3,aac", None, ("mp3", "aac")),
    ("MP3, FLAC", None, ("mp3", "flac")),
    (" flac ,\taac ", None, ("flac", "aac")),
    ("m4a", None, ("aac",)),
    ("mp4,mpeg", None, ("aac", "mp3")),
    ("aac,m4a,mp4,AAC", None, ("aac",)),
    ("ogg,flac,wav", None, ("flac",)),
    ("flac", "audio/mpeg", ("flac",)),  # the query wins over Accept
    ("ogg,wav", "audio/flac", ("flac",)),  # nothing usable in the query: Accept decides
    ("ogg", None, DEFAULT_FORMATS),
    ("aac;q=1", None, DEFAULT_FORMATS),
    # Accept
    (None, "audio/flac", ("flac",)),
    (None, "AUDIO/FLAC", ("flac",)),
    (None, "audio/x-flac", ("flac",)),
    (None, "audio/mpeg", ("mp3",)),
    (None, "audio/aac", ("aac",)),
    (None, "audio/x-m4a", ("aac",)),
    (None, "audio/mp4", ("aac",)),
    (None, "audio/mpeg, audio/flac", ("mp3", "flac")),  # equal q: header order
    (None, "audio/mpeg;q=0.5, audio/flac", ("flac", "mp3")),
    (None, "audio/flac ; q=0.5 , audio/mpeg", ("mp3", "flac")),
    (None, "audio/flac;Q=0.5, audio/mpeg", ("mp3", "flac")),
    (None, "audio/mp4;q=0.9, audio/mpeg;q=0.9", ("aac", "mp3")),
    (None, "audio/x-flac, audio/aac;q=0.2, audio/mpeg;q=0.5, audio/x-m4a;q=0.8",
     ("flac", "aac", "mp3")),  # the highest q among aac's media types
    (None, "audio/aac;q=0, audio/mp4;q=0.3, audio/mpeg", ("mp3", "aac")),
    # q=0 excludes
    (None, "audio/flac;q=0, audio/mpeg", ("mp3",)),
    (None, "audio/mpeg;q=0.000, audio/aac", ("aac",)),
    (None, "audio/mpeg;q=0", DEFAULT_FORMATS),  # everything excluded: still never empty
    # wildcards stand for the default formats, never for flac
    (None, "*/*", DEFAULT_FORMATS),
    (None, "audio/*", DEFAULT_FORMATS),
    (None, "audio/*;q=0.1, audio/flac", ("flac", "mp3", "aac")),
    (None, "audio/flac, */*;q=0.1", ("flac", "mp3", "aac")),
    (None, "audio/flac;q=0, audio/*", ("mp3", "aac")),
    (None, "audio/mpeg;q=0, */*", ("aac",)),
    (None, "audio/mpeg;q=0.3, audio/*;q=0.8", ("aac", "mp3")),
    (None, "audio/*;q=0.5, */*;q=0.9, audio/flac;q=0.7", ("flac", "mp3", "aac")),
    (None, "audio/*;q=0, */*", DEFAULT_FORMATS),  # audio/* is more specific than */*
    (None, "text/html,application/xhtml+xml,*/*;q=0.8", DEFAULT_FORMATS),
    # garbage
    (None, "text/html, application/json", DEFAULT_FORMATS),
    (None, "audio/ogg, audio/webm, audio/wav", DEFAULT_FORMATS),
    (None, "audio/flac;q=abc", DEFAULT_FORMATS),
    (None, "audio/flac;q=1.5", DEFAULT_FORMATS),
    (None, "audio/flac;q=0.0001", DEFAULT_FORMATS),
    (None, "audio/flac;q=-1", DEFAULT_FORMATS),
    (None, 'audio/flac;q="0.5"', DEFAULT_FORMATS),
    (None, "audio/flac;q=bad, audio/aac", ("aac",)),  # only the bad element is dropped
    (None, ",,, ;;", DEFAULT_FORMATS),
    (None, "audio", DEFAULT_FORMATS),
    (None, "audio/flac/x", DEFAULT_FORMATS),
    # quoted parameter values may contain commas and semicolons
    (None, 'audio/mp4; codecs="mp4a.40.2, q=0; x"; q=0.5, audio/mpeg;q=0.4', ("aac", "mp3")),
    (None, 'audio/mp4; x="a\\"b, audio/flac"', ("aac",)),
    (None, "audio/mp4; codecs=mp4a.40.2, audio/flac;level=1;q=1.0", ("aac", "flac")),
]  # fmt: skip


@pytest.mark.parametrize(("query", "accept", "formats"), FORMAT_CASES)
def test_parse_formats(query: str | None, accept: str | None, formats: tuple[str, ...]) -> None:
    assert parse_formats(query, accept) == formats


def test_parse_formats_of_a_long_header_is_not_remembered_but_still_parsed() -> None:
    long_accept = "audio/flac;q=0.9, " + ", ".join(f"x/y{n};q=0.1" for n in range(100))
    assert len(long_accept) > 256
    assert parse_formats(None, long_accept) == ("flac",)
    assert parse_formats("flac,aac" + "," * 300, None) == ("flac", "aac")


# --- parse_bandwidth -----------------------------------------------------------------------------

NOW = 10_000.0
FRESH = NOW - 10

# (bw=, Downlink, measured kbit/s, measured at) -> kbit/s
BANDWIDTH_CASES: list[tuple[str | None, str | None, float | None, float | None, float | None]] = [
    (None, None, None, None, None),
    # precedence
    ("500", "1.5", 800.0, FRESH, 500.0),
    (None, "1.5", 800.0, FRESH, 1500.0),
    (None, None, 800.0, FRESH, 800.0),
    ("250.5", None, None, None, 250.5),
    (" 250 ", None, None, None, 250.0),
    (".5", None, None, None, 0.5),
    ("7.", None, None, None, 7.0),
    # Downlink: Mbit/s with Chrome's 25 kbit/s steps and 10 Mbit/s cap
    (None, "10", None, None, 10_000.0),
    (None, "0.025", None, None, 25.0),
    (None, "0.175", None, None, 175.0),
    (None, " 2.25 ", None, None, 2250.0),
    # garbage is skipped, the next source is used
    ("abc", "1.5", None, None, 1500.0),
    ("-5", "1.5", None, None, 1500.0),
    ("nan", "1.5", None, None, 1500.0),
    ("inf", "1.5", None, None, 1500.0),
    ("Infinity", "1.5", None, None, 1500.0),
    ("1e3", "1.5", None, None, 1500.0),
    ("1_000", "1.5", None, None, 1500.0),
    ("\u0661\u0662", "1.5", None, None, 1500.0),  # Arabic-Indic digits
    ("", "1.5", None, None, 1500.0),
    ("0", "1.5", None, None, 1500.0),  # zero says nothing usable about the link
    ("0.0", None, 800.0, FRESH, 800.0),
    ("9" * 5000, "1.5", None, None, 1500.0),  # overflows to inf
    ("1.2.3", None, 800.0, FRESH, 800.0),
    (None, "fast", 800.0, FRESH, 800.0),
    (None, "-1.5", 800.0, FRESH, 800.0),
    (None, "0", 800.0, FRESH, 800.0),
    (None, "1.5;q=1", 800.0, FRESH, 800.0),
    ("junk", "junk", None, None, None),
    # measured throughput: only while fresh, only if sane
    (None, None, 800.0, NOW, 800.0),
    (None, None, 800.0, NOW - 120, 800.0),
    (None, None, 800.0, NOW - 120.001, None),
    (None, None, 800.0, NOW - 3600, None),
    (None, None, 800.0, NOW + 3, 800.0),  # clock skew between edge nodes
    (None, None, 800.0, NOW + 600, None),
    (None, None, 800.0, None, None),
    (None, None, None, FRESH, None),
    (None, None, math.nan, FRESH, None),
    (None, None, math.inf, FRESH, None),
    (None, None, -800.0, FRESH, None),
    (None, None, 0.0, FRESH, None),
    (None, None, 800.0, math.nan, None),
]


@pytest.mark.parametrize(("bw", "downlink", "measured", "measured_at", "kbps"), BANDWIDTH_CASES)
def test_parse_bandwidth(
    bw: str | None,
    downlink: str | None,
    measured: float | None,
    measured_at: float | None,
    kbps: float | None,
) -> None:
    assert parse_bandwidth(bw, downlink, measured, measured_at, NOW) == kbps


def test_parse_bandwidth_with_a_nan_clock_ignores_the_measurement() -> None:
    assert parse_bandwidth(None, None, 800.0, FRESH, math.nan) is None


# --- properties ----------------------------------------------------------------------------------

CATALOG = [MP3_128, MP3_192, MP3_320, AAC_96, AAC_160, AAC_256]
renditions = st.one_of(
    st.sampled_from(CATALOG),
    st.builds(Rendition, st.just("flac"), st.integers(600, 1000)),
    st.builds(Rendition, st.sampled_from(FORMATS), st.integers(32, 1500)),
)
tiers = st.sampled_from(TIERS)
availables = st.lists(renditions, min_size=0, max_size=8)
accepteds = st.lists(st.sampled_from(FORMATS), unique=True, max_size=3).map(tuple)
bandwidths = st.none() | st.floats(1, 5000)


def candidates(tier: Tier, available: list[Rendition], accepted: tuple[str, ...]) -> set[int]:
    """Bitrates rule 1 leaves to choose from, written out independently of the module."""
    allowed = [r for r in available if tier_allows(tier, r)]
    in_accepted = [r for r in allowed if r.format in accepted]
    return {r.bitrate_kbps for r in (in_accepted or allowed)}


def tier_refused(tier: Tier, available: list[Rendition], accepted: tuple[str, ...]) -> bool:
    """Nothing allowed in the accepted formats, though the track has one the tier forbids."""
    allowed = [r for r in available if tier_allows(tier, r)]
    if any(r.format in accepted for r in allowed):
        return False
    return any(r.format in accepted and r.format in FORMATS for r in available)


@quick
@given(
    tiers,
    availables,
    accepteds,
    bandwidths,
    st.integers(-1, 5),
    st.none() | st.integers(1, 2000),
)
def test_choice_is_available_and_allowed(
    tier: Tier,
    available: list[Rendition],
    accepted: tuple[str, ...],
    bandwidth: float | None,
    step: int,
    requested: int | None,
) -> None:
    if not any(tier_allows(tier, r) for r in available):
        with pytest.raises(NoPlayableRendition):
            choose(tier, available, accepted, bandwidth, step, requested)
        return
    choice = choose(tier, available, accepted, bandwidth, step, requested)
    assert choice.rendition in available
    assert tier_allows(tier, choice.rendition)
    assert choice.rendition.format != "flac" or tier == "hifi"
    assert choice.downgraded in (None, "tier", "bandwidth", "buffering", "format")
    assert choice.reason
    # deterministic, whatever the order of the catalog rows
    assert choose(tier, available[::-1], accepted, bandwidth, step, requested) == choice
    assert choose(tier, sorted(available, key=repr), accepted, bandwidth, step, requested) == (
        choice
    )


@quick
@given(tiers, availables, accepteds, st.floats(1, 5000))
def test_choice_fits_the_bandwidth_unless_it_is_the_lowest(
    tier: Tier, available: list[Rendition], accepted: tuple[str, ...], bandwidth: float
) -> None:
    bitrates = candidates(tier, available, accepted)
    if not bitrates:
        return
    choice = choose(tier, available, accepted, bandwidth)
    chosen = choice.rendition.bitrate_kbps
    assert chosen * 1.25 <= bandwidth or chosen == min(bitrates)
    # and it is the best that fits: no higher candidate would have fitted
    assert all(b * 1.25 > bandwidth for b in bitrates if b > chosen)
    if chosen < max(bitrates):
        # (unless the tier refused what was asked: that is named first)
        assert choice.downgraded == (
            "tier" if tier_refused(tier, available, accepted) else "bandwidth"
        )


@quick
@given(tiers, availables, accepteds)
def test_without_bandwidth_the_best_candidate(
    tier: Tier, available: list[Rendition], accepted: tuple[str, ...]
) -> None:
    bitrates = candidates(tier, available, accepted)
    if bitrates:
        assert choose(tier, available, accepted).rendition.bitrate_kbps == max(bitrates)


@quick
@given(tiers, availables, accepteds, bandwidths, st.integers(0, 5))
def test_stepping_down_never_increases_bitrate(
    tier: Tier,
    available: list[Rendition],
    accepted: tuple[str, ...],
    bandwidth: float | None,
    step: int,
) -> None:
    if not candidates(tier, available, accepted):
        return
    here = choose(tier, available, accepted, bandwidth, step)
    lower = choose(tier, available, accepted, bandwidth, step + 1)
    assert lower.rendition.bitrate_kbps <= here.rendition.bitrate_kbps
    if lower.rendition != here.rendition:
        # (unless the tier refused what was asked: that is named first)
        refused = tier_refused(tier, available, accepted)
        assert lower.downgraded == ("tier" if refused else "buffering")


@quick
@given(tiers, availables, accepteds, st.floats(1, 5000), st.floats(1, 5000))
def test_more_bandwidth_never_lowers_bitrate(
    tier: Tier, available: list[Rendition], accepted: tuple[str, ...], b1: float, b2: float
) -> None:
    if not candidates(tier, available, accepted):
        return
    low, high = sorted((b1, b2))
    assert (
        choose(tier, available, accepted, low).rendition.bitrate_kbps
        <= choose(tier, available, accepted, high).rendition.bitrate_kbps
    )


@quick
@given(tiers, availables, accepteds, bandwidths, st.integers(0, 5), st.integers(1, 2000))
def test_an_explicit_bitrate_ignores_bandwidth_and_buffering(
    tier: Tier,
    available: list[Rendition],
    accepted: tuple[str, ...],
    bandwidth: float | None,
    step: int,
    requested: int,
) -> None:
    if not candidates(tier, available, accepted):
        return
    plain = choose(tier, available, accepted, requested_bitrate=requested)
    assert choose(tier, available, accepted, bandwidth, step, requested) == plain
    if requested in candidates(tier, available, accepted):
        assert plain.rendition.bitrate_kbps == requested


@quick
@given(st.none() | st.text(max_size=60), st.none() | st.text(max_size=120))
def test_parse_formats_is_never_empty(query: str | None, accept: str | None) -> None:
    formats = parse_formats(query, accept)
    assert formats
    assert set(formats) <= set(FORMATS)
    assert len(set(formats)) == len(formats)


@quick
@given(
    st.none() | st.text(max_size=20),
    st.none() | st.text(max_size=20),
    st.none() | st.floats(allow_nan=True, allow_infinity=True),
    st.none() | st.floats(allow_nan=True, allow_infinity=True),
    st.floats(allow_nan=True, allow_infinity=True),
)
def test_parse_bandwidth_is_none_or_a_positive_finite_rate(
    bw: str | None,
    downlink: str | None,
    measured: float | None,
    measured_at: float | None,
    now: float,
) -> None:
    kbps = parse_bandwidth(bw, downlink, measured, measured_at, now)
    assert kbps is None or (math.isfinite(kbps) and kbps > 0)


@quick
@given(
    st.integers(-10, 100),
    st.none() | st.floats(allow_nan=True, allow_infinity=True),
    st.floats(allow_nan=True, allow_infinity=True),
)
def test_buffer_step_is_bounded(events: int, last_at: float | None, now: float) -> None:
    assert 0 <= buffer_step(events, last_at, now) <= 2


@quick
@given(st.integers(0, 10), st.floats(-5.0, 1e6), st.floats(0.0, 1e6))
def test_quality_comes_back_a_rung_per_clean_window_at_most(
    events: int, age: float, later: float
) -> None:
    """The longer the stretch without buffering, the fewer events count, and each further
    window takes off one at most."""
    now = 1_000_000.0
    before = buffer_step(events, now - age, now)
    after = buffer_step(events, now - age, now + later)
    assert 0 <= after <= before <= min(events, MAX_BUFFER_STEP)
    assert before - after <= math.ceil(later / BUFFER_WINDOW_S)
    # Back at the top within MAX_BUFFER_STEP clean windows after the last, however many.
    last = now - age
    assert buffer_step(events, last, last + (MAX_BUFFER_STEP + 1) * BUFFER_WINDOW_S) == 0
