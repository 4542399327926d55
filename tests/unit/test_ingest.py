"""Rendition ladder encoding, probing and the demo music synthesizer.

One short clip is encoded into the whole ladder once per module (about a
second of CPU) and every rung is checked by two independent readers: mutagen
(through `probe`) and FFmpeg's decoders (through PyAV).
"""

from __future__ import annotations

import hashlib
import random
import struct
from pathlib import Path

import av
import numpy as np
import numpy.typing as npt
import pytest

from edge.ingest import (
    LADDER,
    BrokenAudioError,
    RenditionFile,
    RenditionSpec,
    Tags,
    decode_audio,
    encode_renditions,
    object_key,
    probe,
    synthesize,
)

CLIP_SECONDS = 4.0
RATE = 44100
TAGS = Tags(
    title="Déjà Vu (Demo)",
    artist="The Testers",
    album="Unit Sessions",
    genre="Jazz",
    track_number=7,
)
# FFmpeg names decoders, not codecs: its MP3 decoder is "mp3float".
DECODERS = {"mp3": {"mp3", "mp3float"}, "aac": {"aac", "aac_fixed"}, "flac": {"flac"}}
CONTAINERS = {"mp3": "mp3", "m4a": "mov,mp4,m4a,3gp,3g2,mj2", "flac": "flac"}


@pytest.fixture(scope="module")
def clip() -> npt.NDArray[np.float32]:
    return synthesize(seed=11, duration_s=CLIP_SECONDS)


@pytest.fixture(scope="module")
def ladder(
    tmp_path_factory: pytest.TempPathFactory, clip: npt.NDArray[np.float32]
) -> list[RenditionFile]:
    root = tmp_path_factory.mktemp("media")
    return encode_renditions(clip, RATE, TAGS, root, "tracks/000042")


def by_spec(ladder: list[RenditionFile], spec: RenditionSpec) -> RenditionFile:
    return next(f for f in ladder if f.spec == spec)


def spec_id(spec: RenditionSpec) -> str:
    return f"{spec.format}-{spec.bitrate_kbps}"


def top_level_boxes(data: bytes) -> list[str]:
    boxes = []
    offset = 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if size == 1:  # 64-bit "largesize" follows the type
            size = struct.unpack(">Q", data[offset + 8 : offset + 16])[0]
        elif size == 0:  # box runs to the end of the file
            size = len(data) - offset
        assert size >= 8, f"corrupt box {kind!r} at {offset}"
        boxes.append(kind.decode("latin-1"))
        offset += size
    assert offset == len(data), "boxes do not tile the file"
    return boxes


def test_ladder_is_the_contract() -> None:
    assert [(s.format, s.bitrate_kbps) for s in LADDER] == [
        ("mp3", 128),
        ("mp3", 192),
        ("mp3", 320),
        ("aac", 96),
        ("aac", 160),
        ("aac", 256),
        ("flac", 0),
    ]
    types = {s.format: (s.codec, s.ext, s.content_type) for s in LADDER}
    assert types == {
        "mp3": ("mp3", "mp3", "audio/mpeg"),
        "aac": ("aac", "m4a", "audio/mp4"),
        "flac": ("flac", "flac", "audio/flac"),
    }


def test_object_keys() -> None:
    assert object_key("tracks/000042", LADDER[0]) == "tracks/000042/mp3-128.mp3"
    assert object_key("/tracks/000042/", LADDER[3]) == "tracks/000042/aac-96.m4a"
    assert object_key("tracks/000042", LADDER[-1]) == "tracks/000042/flac.flac"
    assert len({object_key("t", s) for s in LADDER}) == len(LADDER)
    for unsafe in ("", "/", "../etc", "tracks/../../x"):
        with pytest.raises(ValueError):
            object_key(unsafe, LADDER[0])


def test_writes_every_rung_in_ladder_order(
    ladder: list[RenditionFile], clip: npt.NDArray[np.float32]
) -> None:
    assert [f.spec for f in ladder] == list(LADDER)
    directory = ladder[0].path.parent
    assert sorted(p.name for p in directory.iterdir()) == sorted(f.path.name for f in ladder)
    for f in ladder:
        assert f.path.parts[-3:] == tuple(f.object_key.split("/"))
        assert f.bytes == f.path.stat().st_size > 0
        assert f.path.stat().st_mode & 0o044 == 0o044, "media must be readable by the origin"
        assert (f.sample_rate, f.channels) == (RATE, 2)
        assert f.duration_ms == round(clip.shape[1] * 1000 / RATE)


@pytest.mark.parametrize("spec", LADDER, ids=spec_id)
def test_etag_is_md5_of_the_file(ladder: list[RenditionFile], spec: RenditionSpec) -> None:
    f = by_spec(ladder, spec)
    assert f.etag == hashlib.md5(f.path.read_bytes()).hexdigest()


@pytest.mark.parametrize("spec", LADDER, ids=spec_id)
def test_rung_decodes_fully_with_ffmpeg(ladder: list[RenditionFile], spec: RenditionSpec) -> None:
    f = by_spec(ladder, spec)
    with av.open(str(f.path)) as container:
        assert container.format.name == CONTAINERS[spec.ext]
        stream = container.streams.audio[0]
        assert stream.codec_context.name in DECODERS[spec.codec]
        samples = 0
        for frame in container.decode(stream):
            assert (frame.sample_rate, frame.layout.nb_channels) == (RATE, 2)
            samples += frame.samples
    assert samples / RATE == pytest.approx(CLIP_SECONDS, abs=0.2)


@pytest.mark.parametrize("spec", LADDER, ids=spec_id)
def test_probe_reads_back_format_and_tags(ladder: list[RenditionFile], spec: RenditionSpec) -> None:
    f = by_spec(ladder, spec)
    info = probe(f.path)
    assert info.codec == spec.codec
    assert info.duration_ms / 1000 == pytest.approx(CLIP_SECONDS, abs=0.2)
    assert (info.sample_rate, info.channels) == (RATE, 2)
    assert info.tags == TAGS
    if spec.bitrate_kbps:
        assert f.bitrate_kbps == spec.bitrate_kbps
        assert info.bitrate_kbps == pytest.approx(spec.bitrate_kbps, rel=0.10)
    else:
        assert info.bitrate_kbps == pytest.approx(f.bitrate_kbps, rel=0.10)


@pytest.mark.parametrize("spec", [s for s in LADDER if s.bitrate_kbps], ids=spec_id)
def test_lossy_file_size_matches_nominal_bitrate(
    ladder: list[RenditionFile], spec: RenditionSpec
) -> None:
    # What a player really has to download per second, tags and headers included.
    f = by_spec(ladder, spec)
    assert f.bytes * 8 / f.duration_ms == pytest.approx(spec.bitrate_kbps, rel=0.10)


def test_flac_reports_measured_bitrate(ladder: list[RenditionFile]) -> None:
    f = by_spec(ladder, LADDER[-1])
    assert f.bitrate_kbps == round(f.bytes * 8 / f.duration_ms)
    assert 100 < f.bitrate_kbps < 1411  # compressed, below 16-bit stereo PCM


def test_flac_is_lossless_16_bit(
    ladder: list[RenditionFile], clip: npt.NDArray[np.float32]
) -> None:
    decoded = decode_audio(by_spec(ladder, LADDER[-1]).path)
    assert decoded.shape == clip.shape
    assert np.max(np.abs(decoded - clip)) <= 1 / 32768


@pytest.mark.parametrize("spec", [s for s in LADDER if s.ext == "m4a"], ids=spec_id)
def test_m4a_is_faststart(ladder: list[RenditionFile], spec: RenditionSpec) -> None:
    boxes = top_level_boxes(by_spec(ladder, spec).path.read_bytes())
    assert boxes[0] == "ftyp"
    assert boxes.index("moov") < boxes.index("mdat")


def test_resamples_mono_input_to_44k_stereo(tmp_path: Path) -> None:
    mono = synthesize(seed=3, duration_s=1.0, sample_rate=22050)[0]
    [f] = encode_renditions(mono, 22050, TAGS, tmp_path, "mono", ladder=[LADDER[0]])
    decoded = decode_audio(f.path)
    assert decoded.shape[0] == 2
    assert decoded.shape[1] / RATE == pytest.approx(1.0, abs=0.05)
    assert np.array_equal(decoded[0], decoded[1])
    assert f.duration_ms == 1000


def test_rejects_input_it_cannot_encode(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="channels"):
        encode_renditions(np.zeros((3, 100), np.float32), RATE, TAGS, tmp_path, "x")
    with pytest.raises(ValueError, match="float"):
        encode_renditions(np.zeros((2, 100), np.int16), RATE, TAGS, tmp_path, "x")
    with pytest.raises(ValueError, match="unsafe"):
        encode_renditions(np.zeros((2, 100), np.float32), RATE, TAGS, tmp_path, "../x")
    assert list(tmp_path.iterdir()) == []


def test_synthesize_is_deterministic_per_seed() -> None:
    a = synthesize(seed=1, duration_s=2.0)
    assert a.dtype == np.float32
    assert a.shape == (2, 2 * RATE)
    assert np.array_equal(a, synthesize(seed=1, duration_s=2.0))


def test_synthesize_differs_across_seeds() -> None:
    pieces = [synthesize(seed=s, duration_s=2.0) for s in range(5)]
    for i, a in enumerate(pieces):
        for b in pieces[i + 1 :]:
            assert not np.allclose(a, b, atol=1e-3)


@pytest.mark.parametrize("seed", [0, 1, 2, 99, 2**40, -5])
def test_synthesize_never_clips_and_is_not_silent(seed: int) -> None:
    x = synthesize(seed=seed, duration_s=3.0)
    assert np.isfinite(x).all()
    assert np.max(np.abs(x)) <= 1.0
    assert np.sqrt(np.mean(x.astype(np.float64) ** 2)) > 0.05
    # Fades: both ends start from and return to silence.
    assert np.max(np.abs(x[:, :8])) < 0.01
    assert np.max(np.abs(x[:, -8:])) < 0.01


def test_synthesize_rejects_bad_durations() -> None:
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            synthesize(seed=1, duration_s=bad)


@pytest.mark.parametrize("name", ["noise.bin", "noise.mp3", "noise.m4a", "noise.flac"])
def test_probe_rejects_random_bytes(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(random.Random(name).randbytes(64 * 1024))
    with pytest.raises(BrokenAudioError):
        probe(path)


def test_probe_of_a_missing_file_is_not_broken_audio(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        probe(tmp_path / "missing.mp3")


def test_decode_audio_rejects_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.bin"
    path.write_bytes(random.Random(1).randbytes(64 * 1024))
    with pytest.raises(BrokenAudioError):
        decode_audio(path)


def test_decode_audio_of_a_missing_file_is_not_broken_audio(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        decode_audio(tmp_path / "missing.flac")
