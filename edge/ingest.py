"""Audio in, rendition ladder out.

Owns the audio side of ingest: the rendition ladder (which formats and bitrates
exist, their file names and content types), synthesizing the demo catalog's
music, encoding PCM into every rung with PyAV, writing the files atomically
under the media root, and probing audio files with mutagen (duration, bitrate,
tags). Storage upload and catalog rows belong to the callers.

Every function here blocks (CPU-bound encoding, file I/O, hashing): call them
from async code through ``asyncio.to_thread``. PyAV releases the GIL while it
encodes, so several tracks can be encoded in parallel threads.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path, PurePosixPath
from typing import Any, Final

import av
import mutagen
import numpy as np
import numpy.typing as npt
from av.audio.stream import AudioStream
from mutagen.flac import FLAC
from mutagen.mp3 import MP3
from mutagen.mp4 import MP4

__all__ = [
    "LADDER",
    "OUTPUT_SAMPLE_RATE",
    "BrokenAudioError",
    "ProbeResult",
    "RenditionFile",
    "RenditionSpec",
    "Tags",
    "decode_audio",
    "encode_renditions",
    "object_key",
    "probe",
    "synthesize",
]

OUTPUT_SAMPLE_RATE: Final = 44100

# Input is fed to the resampler in slices so memory stays bounded for long
# tracks instead of holding a second full copy of the PCM as encoder frames.
_CHUNK_SAMPLES: Final = 1 << 16


@dataclass(frozen=True, slots=True)
class RenditionSpec:
    format: str  # "mp3" | "aac" | "flac"
    codec: str  # codec name stored in the catalog
    bitrate_kbps: int  # nominal; 0 for flac (the measured average is in RenditionFile)
    ext: str  # "mp3" | "m4a" | "flac"
    content_type: str


LADDER: Final[tuple[RenditionSpec, ...]] = (
    RenditionSpec("mp3", "mp3", 128, "mp3", "audio/mpeg"),
    RenditionSpec("mp3", "mp3", 192, "mp3", "audio/mpeg"),
    RenditionSpec("mp3", "mp3", 320, "mp3", "audio/mpeg"),
    RenditionSpec("aac", "aac", 96, "m4a", "audio/mp4"),
    RenditionSpec("aac", "aac", 160, "m4a", "audio/mp4"),
    RenditionSpec("aac", "aac", 256, "m4a", "audio/mp4"),
    RenditionSpec("flac", "flac", 0, "flac", "audio/flac"),
)


@dataclass(frozen=True, slots=True)
class RenditionFile:
    spec: RenditionSpec
    object_key: str  # relative to the media root, "/"-separated
    path: Path
    bytes: int
    bitrate_kbps: int  # nominal for lossy, measured average (file size / duration) for flac
    sample_rate: int
    channels: int
    duration_ms: int
    etag: str  # hex md5 of the content, what S3 reports for a single-part upload


@dataclass(frozen=True, slots=True)
class Tags:
    title: str
    artist: str
    album: str
    genre: str
    track_number: int


@dataclass(frozen=True, slots=True)
class ProbeResult:
    codec: str  # "mp3" | "aac" | "flac" | another lower-case name mutagen knows
    duration_ms: int
    bitrate_kbps: int
    sample_rate: int
    channels: int
    tags: Tags  # missing text tags are "", a missing track number is 0


class BrokenAudioError(ValueError):
    """The file is not audio that mutagen can parse (or it has no audio stream)."""


@dataclass(frozen=True, slots=True)
class _Encoder:
    container_format: str
    codec: str
    sample_format: str
    container_options: dict[str, str]


_ENCODERS: Final[dict[str, _Encoder]] = {
    # CBR is libmp3lame's mode whenever only a bitrate is given. ID3v2.3
    # because older players and tag editors still choke on v2.4 frames.
    "mp3": _Encoder("mp3", "libmp3lame", "fltp", {"id3v2_version": "3"}),
    # "ipod" is FFmpeg's M4A flavour of the MP4 muxer (M4A brand, iTunes tags).
    # faststart moves moov before mdat so a player can start from the first
    # range request instead of seeking to the end of the file.
    "aac": _Encoder("ipod", "aac", "fltp", {"movflags": "+faststart"}),
    "flac": _Encoder("flac", "flac", "s16", {}),
}


def object_key(key_prefix: str, spec: RenditionSpec) -> str:
    """Where a rung lives under the media root, e.g. ``tracks/000042/mp3-128.mp3``."""
    prefix = PurePosixPath(key_prefix.strip("/"))
    if not key_prefix.strip("/") or prefix.is_absolute() or ".." in prefix.parts:
        raise ValueError(f"unsafe key prefix {key_prefix!r}")
    stem = f"{spec.format}-{spec.bitrate_kbps}" if spec.bitrate_kbps else spec.format
    return f"{prefix}/{stem}.{spec.ext}"


def synthesize(
    seed: int, duration_s: float, sample_rate: int = OUTPUT_SAMPLE_RATE
) -> npt.NDArray[np.float32]:
    """Deterministic short piece of music, stereo float32 of shape (2, n).

    A melody over a chord pad, a bass line and light drums; tempo, key, mode,
    progression and timbre come from `seed`, so demo tracks sound different.
    The peak is normalized below full scale and the ends fade in and out.
    """
    if not math.isfinite(duration_s) or duration_s <= 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    n = max(1, round(duration_s * sample_rate))
    # SeedSequence rejects negative ints; folding keeps distinct seeds distinct.
    rng = np.random.default_rng(seed % 2**64)
    out = np.zeros((2, n), dtype=np.float64)

    beat = 60.0 / float(rng.uniform(84.0, 132.0))
    key_root = 45 + int(rng.integers(0, 12))  # A2..G#3, the bass register
    scale = _SCALES[int(rng.integers(0, len(_SCALES)))]
    progression = _PROGRESSIONS[int(rng.integers(0, len(_PROGRESSIONS)))]
    lead_harmonics = _harmonics(rng, 6)
    pad_harmonics = _harmonics(rng, 3)
    lead_pan = float(rng.uniform(-0.35, 0.35))
    swing = float(rng.uniform(0.0, 0.12))

    bar = 4 * beat
    degree = 7 + int(rng.integers(0, 5))  # melody starts an octave above the chord root
    t_bar = 0.0
    bar_index = 0
    while t_bar < n / sample_rate:
        chord_degree = progression[bar_index % len(progression)]
        for d in (chord_degree, chord_degree + 2, chord_degree + 4):
            freq = _hz(key_root + 12 + _pitch(scale, d))
            # Two slightly detuned voices panned apart: a cheap chorus that widens the pad.
            for pan, detune in ((-0.8, 1.0), (0.8, 1.003)):
                _add_note(
                    out,
                    sample_rate,
                    t_bar,
                    bar * 1.02,
                    freq * detune,
                    pad_harmonics,
                    0.045,
                    attack=0.25,
                    decay=1.2,
                    pan=pan,
                )
        for b in range(4):
            t = t_bar + b * beat
            bass_freq = _hz(key_root + _pitch(scale, chord_degree + (4 if b == 2 else 0)))
            _add_note(
                out,
                sample_rate,
                t,
                beat * 0.9,
                bass_freq,
                (1.0, 0.35, 0.1),
                0.30,
                attack=0.008,
                decay=0.5 * beat,
                pan=0.0,
            )
            if b in (0, 2):
                _add_kick(out, sample_rate, t, 0.35)
            _add_hat(out, sample_rate, rng, t + beat / 2 + swing * beat, 0.05)
            # Melody: mostly eighth notes walking the scale, leaning on chord tones.
            for half in (0, 1):
                if rng.random() < 0.18:
                    continue
                step = int(rng.choice((-2, -1, -1, 1, 1, 2, 0, 3, -3)))
                degree = int(np.clip(degree + step, 4, 16))
                if half == 0 and b % 2 == 0 and (degree - chord_degree) % 7 not in (0, 2, 4):
                    degree += 1  # strong beats snap to a neighbouring chord tone
                length = beat / 2 if rng.random() < 0.75 else beat
                start = t + half * (beat / 2) + (swing * beat if half else 0.0)
                _add_note(
                    out,
                    sample_rate,
                    start,
                    length * 0.95,
                    _hz(key_root + 12 + _pitch(scale, degree)),
                    lead_harmonics,
                    0.16,
                    attack=0.012,
                    decay=0.6 * length,
                    pan=lead_pan,
                )
        t_bar += bar
        bar_index += 1

    peak = float(np.max(np.abs(out)))
    if peak > 0:
        out *= 0.89 / peak
    fade_in = min(n, int(0.03 * sample_rate))
    fade_out = min(n, int(min(1.5, duration_s / 4) * sample_rate))
    if fade_in:
        out[:, :fade_in] *= np.linspace(0.0, 1.0, fade_in)
    if fade_out:
        out[:, n - fade_out :] *= np.linspace(1.0, 0.0, fade_out) ** 2
    return out.astype(np.float32)


_SCALES: Final = (
    (0, 2, 4, 5, 7, 9, 11),  # major
    (0, 2, 3, 5, 7, 8, 10),  # natural minor
    (0, 2, 3, 5, 7, 9, 10),  # dorian
    (0, 2, 4, 5, 7, 9, 10),  # mixolydian
)
_PROGRESSIONS: Final = ((0, 4, 5, 3), (0, 5, 3, 4), (5, 3, 0, 4), (0, 3, 4, 3), (0, 3, 5, 4))


def _pitch(scale: tuple[int, ...], degree: int) -> int:
    octave, index = divmod(degree, len(scale))
    return 12 * octave + scale[index]


def _hz(midi: int) -> float:
    return 440.0 * math.pow(2.0, (midi - 69) / 12)


def _harmonics(rng: np.random.Generator, count: int) -> tuple[float, ...]:
    # A random spectral tilt gives each track its own timbre (flute-ish to reedy).
    tilt = float(rng.uniform(0.8, 2.2))
    return tuple(float(rng.uniform(0.6, 1.0)) / (h**tilt) for h in range(1, count + 1))


_TABLE_SIZE: Final = 4096  # a power of two, so the phase wraps with a bit mask


@functools.lru_cache(maxsize=64)
def _wavetable(harmonics: tuple[float, ...]) -> npt.NDArray[np.float64]:
    # One period looked up by phase costs a fraction of a sin() per harmonic
    # per sample; synthesizing the demo catalog is on the first-start path.
    phase = np.arange(_TABLE_SIZE) * (2 * np.pi / _TABLE_SIZE)
    table = np.zeros(_TABLE_SIZE)
    for h, amp in enumerate(harmonics, start=1):
        table += amp * np.sin(h * phase)
    table.flags.writeable = False  # shared by every caller through the cache
    return table


def _span(n: int, sample_rate: int, start_s: float, length_s: float) -> tuple[int, int]:
    start = int(start_s * sample_rate)
    return min(start, n), min(start + max(1, int(length_s * sample_rate)), n)


def _add_note(
    out: npt.NDArray[np.float64],
    sample_rate: int,
    start_s: float,
    length_s: float,
    freq: float,
    harmonics: Sequence[float],
    gain: float,
    *,
    attack: float,
    decay: float,
    pan: float,
) -> None:
    a, b = _span(out.shape[1], sample_rate, start_s, length_s)
    if b <= a:
        return
    # Harmonics at or above Nyquist would alias into off-key tones.
    audible = sum(1 for h in range(1, len(harmonics) + 1) if freq * h < sample_rate / 2)
    table = _wavetable(tuple(harmonics[:audible]))
    step = freq * _TABLE_SIZE / sample_rate
    wave = table[(np.arange(b - a) * step).astype(np.int64) & (_TABLE_SIZE - 1)]
    t = np.arange(b - a) / sample_rate
    env = np.minimum(t / attack, 1.0) * np.exp(-t / decay)
    release = min(len(t), int(0.02 * sample_rate))  # no click when the note is cut
    env[len(t) - release :] *= np.linspace(1.0, 0.0, release)
    signal = gain * wave * env
    angle = (pan + 1) * np.pi / 4  # constant-power panning
    out[0, a:b] += math.cos(angle) * signal
    out[1, a:b] += math.sin(angle) * signal


def _add_kick(out: npt.NDArray[np.float64], sample_rate: int, start_s: float, gain: float) -> None:
    a, b = _span(out.shape[1], sample_rate, start_s, 0.25)
    if b <= a:
        return
    t = np.arange(b - a) / sample_rate
    # A falling pitch sweep is what makes a sine read as a drum.
    phase = 2 * np.pi * (50 * t + 60 * (1 - np.exp(-t * 30)) / 30)
    signal = gain * np.sin(phase) * np.exp(-t * 14) * np.minimum(t / 0.002, 1.0)
    out[:, a:b] += signal * math.sqrt(0.5)


def _add_hat(
    out: npt.NDArray[np.float64],
    sample_rate: int,
    rng: np.random.Generator,
    start_s: float,
    gain: float,
) -> None:
    a, b = _span(out.shape[1], sample_rate, start_s, 0.06)
    if b <= a:
        return
    noise = rng.standard_normal(b - a)
    noise[1:] -= noise[:-1].copy()  # first difference: a crude high-pass, brighter hat
    t = np.arange(b - a) / sample_rate
    signal = gain * noise * np.exp(-t * 60)
    out[0, a:b] += 0.6 * signal
    out[1, a:b] += 0.8 * signal


def encode_renditions(
    samples: npt.NDArray[np.floating[Any]],
    sample_rate: int,
    tags: Tags,
    media_root: Path,
    key_prefix: str,
    ladder: Sequence[RenditionSpec] = LADDER,
) -> list[RenditionFile]:
    """Encode planar PCM (shape (channels, n), floats in [-1, 1]) into every rung.

    Output is always 44.1 kHz stereo, whatever the input rate and channel
    count. Files land in ``media_root/key_prefix/`` under their final names only
    once complete (temp file, fsync, ``os.replace``), tagged with `tags`;
    returns them in ladder order. Rungs are encoded on up to one thread per
    CPU. If a rung fails the error is raised after the other rungs finish;
    their files stay (each is complete), and re-running overwrites them.
    """
    pcm = _planar_float32(samples)
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if pcm.shape[1] == 0:
        raise ValueError("no samples to encode")
    keys = [object_key(key_prefix, spec) for spec in ladder]
    if len(set(keys)) != len(keys):
        raise ValueError("the ladder names the same rendition twice")
    paths = [media_root.joinpath(*key.split("/")) for key in keys]
    for directory in {path.parent for path in paths}:
        directory.mkdir(parents=True, exist_ok=True)
    # PyAV drops the GIL inside the encoders, so rungs really run in parallel
    # (about 1.8x on 2 cores); the first start encodes the whole demo catalog.
    workers = max(1, min(len(keys), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers, thread_name_prefix="edge-encode") as pool:
        futures = [
            pool.submit(_write_rendition, pcm, sample_rate, tags, spec, key, path)
            for spec, key, path in zip(ladder, keys, paths, strict=True)
        ]
    written = [future.result() for future in futures]
    for directory in {path.parent for path in paths}:
        _fsync_directory(directory)
    return written


def _planar_float32(samples: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float32]:
    pcm = np.asarray(samples)
    if pcm.ndim == 1:
        pcm = pcm[np.newaxis, :]
    if pcm.ndim != 2 or pcm.shape[0] not in (1, 2):
        raise ValueError(f"expected PCM shaped (channels, n) with 1 or 2 channels, got {pcm.shape}")
    if not np.issubdtype(pcm.dtype, np.floating):
        raise ValueError(f"expected float PCM in [-1, 1], got dtype {pcm.dtype}")
    return np.ascontiguousarray(pcm, dtype=np.float32)


def _write_rendition(
    pcm: npt.NDArray[np.float32],
    sample_rate: int,
    tags: Tags,
    spec: RenditionSpec,
    key: str,
    path: Path,
) -> RenditionFile:
    # The temp file sits next to the target so os.replace is an atomic rename,
    # and starts with a dot so directory listings and the origin ignore it.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        # mkstemp creates 0600; media must stay readable by an origin or web
        # server running as another user.
        os.chmod(tmp, 0o644)
        _encode(pcm, sample_rate, tags, spec, tmp)
        # Also proves the file parses before it is published under its name.
        info = probe(tmp)
        with tmp.open("rb") as f:
            # Not a security use; the flag keeps md5 available on FIPS hosts.
            digest = hashlib.file_digest(f, lambda: hashlib.md5(usedforsecurity=False))
            size = os.fstat(f.fileno()).st_size
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # The source length, not mutagen's: mutagen counts the encoder delay and
    # padding of MP3 and AAC (+20..50 ms) that decoders trim, so every rung of
    # a track would otherwise report a slightly different duration.
    duration_ms = max(1, round(pcm.shape[1] * 1000 / sample_rate))
    if spec.bitrate_kbps:
        bitrate = spec.bitrate_kbps
    else:
        bitrate = round(size * 8 / duration_ms)  # bits per ms == kbit/s
    return RenditionFile(
        spec=spec,
        object_key=key,
        path=path,
        bytes=size,
        bitrate_kbps=bitrate,
        sample_rate=info.sample_rate,
        channels=info.channels,
        duration_ms=duration_ms,
        etag=digest.hexdigest(),
    )


def _encode(
    pcm: npt.NDArray[np.float32], sample_rate: int, tags: Tags, spec: RenditionSpec, path: Path
) -> None:
    encoder = _ENCODERS.get(spec.format)
    if encoder is None:
        raise ValueError(f"no encoder for rendition format {spec.format!r}")
    layout = "stereo" if pcm.shape[0] == 2 else "mono"
    # Passing the path (not a file object) matters: faststart re-reads the
    # finished file by name to move moov to the front.
    with av.open(
        str(path),
        "w",
        format=encoder.container_format,
        container_options=encoder.container_options,
    ) as container:
        container.metadata.update(
            title=tags.title,
            artist=tags.artist,
            album=tags.album,
            genre=tags.genre,
            track=str(tags.track_number),
        )
        stream = container.add_stream(encoder.codec, rate=OUTPUT_SAMPLE_RATE)
        if not isinstance(stream, AudioStream):
            raise TypeError(f"{encoder.codec} is not an audio encoder")
        stream.layout = "stereo"
        stream.format = encoder.sample_format
        if spec.bitrate_kbps:
            stream.bit_rate = spec.bitrate_kbps * 1000
        # Opening now reveals the encoder's fixed frame size (1152 for MP3,
        # 1024 for AAC); the resampler then hands it exactly that many samples
        # per frame. Only the last frame may be short, which encoders accept.
        stream.codec_context.open()
        resampler = av.AudioResampler(
            format=encoder.sample_format,
            layout="stereo",
            rate=OUTPUT_SAMPLE_RATE,
            frame_size=stream.codec_context.frame_size or None,
        )
        for frame in _frames(pcm, sample_rate, layout):
            for out in resampler.resample(frame):
                container.mux(stream.encode(out))
        for out in resampler.resample(None):
            container.mux(stream.encode(out))
        container.mux(stream.encode(None))


def _frames(pcm: npt.NDArray[np.float32], sample_rate: int, layout: str) -> Iterator[av.AudioFrame]:
    time_base = Fraction(1, sample_rate)
    for start in range(0, pcm.shape[1], _CHUNK_SAMPLES):
        chunk = np.ascontiguousarray(pcm[:, start : start + _CHUNK_SAMPLES])
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
        frame.sample_rate = sample_rate
        frame.time_base = time_base
        frame.pts = start
        yield frame


def _fsync_directory(directory: Path) -> None:
    # Makes the renames durable; Windows cannot open a directory for this.
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def probe(path: Path) -> ProbeResult:
    """Duration, bitrate, format and tags of an audio file, read with mutagen.

    Raises BrokenAudioError if mutagen cannot parse the file; OSError (e.g. a
    missing file) propagates unchanged.
    """
    with path.open("rb") as f:
        try:
            audio = mutagen.File(f, easy=True)
        except mutagen.MutagenError as exc:
            raise BrokenAudioError(f"{path}: not parseable audio ({exc})") from exc
    if audio is None or audio.info is None:
        raise BrokenAudioError(f"{path}: not a recognized audio format")
    info = audio.info
    length = float(getattr(info, "length", 0.0) or 0.0)
    sample_rate = int(getattr(info, "sample_rate", 0) or 0)
    if length <= 0 or sample_rate <= 0:
        raise BrokenAudioError(f"{path}: no audio stream (length {length}, rate {sample_rate})")
    easy = audio.tags or {}
    return ProbeResult(
        codec=_codec_name(audio),
        duration_ms=round(length * 1000),
        bitrate_kbps=round(int(getattr(info, "bitrate", 0) or 0) / 1000),
        sample_rate=sample_rate,
        channels=int(getattr(info, "channels", 0) or 0),
        tags=Tags(
            title=_first(easy, "title"),
            artist=_first(easy, "artist"),
            album=_first(easy, "album"),
            genre=_first(easy, "genre"),
            track_number=_track_number(_first(easy, "tracknumber")),
        ),
    )


def _codec_name(audio: Any) -> str:
    if isinstance(audio, MP3):
        return "mp3"
    if isinstance(audio, FLAC):
        return "flac"
    if isinstance(audio, MP4):
        codec = str(getattr(audio.info, "codec", "") or "")
        # mutagen reports the RFC 6381 codec string; every mp4a.40.x is AAC.
        return "aac" if codec.startswith("mp4a.40") else codec.lower() or "mp4"
    return type(audio).__name__.lower().removeprefix("easy")


def _first(tags: Any, key: str) -> str:
    try:
        values = tags[key]
    except (KeyError, ValueError):
        return ""
    return str(values[0]).strip() if values else ""


def _track_number(value: str) -> int:
    # "7", "7/12" and "07" all occur in the wild, and so does junk.
    try:
        return max(0, int(value.split("/", 1)[0]))
    except ValueError:
        return 0


def decode_audio(path: Path) -> npt.NDArray[np.float32]:
    """Decode any audio file FFmpeg reads into 44.1 kHz stereo float32 PCM, shape (2, n).

    The input side of ``edge ingest``: its output feeds `encode_renditions`.
    Raises BrokenAudioError if the file has no decodable audio stream.
    """
    resampler = av.AudioResampler(format="fltp", layout="stereo", rate=OUTPUT_SAMPLE_RATE)
    chunks: list[npt.NDArray[Any]] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise BrokenAudioError(f"{path}: no audio stream")
            for frame in container.decode(container.streams.audio[0]):
                # Drop pts so gaps or jumps in the source cannot make the
                # resampler insert silence or trim audio.
                frame.pts = None
                chunks.extend(f.to_ndarray() for f in resampler.resample(frame))
            chunks.extend(f.to_ndarray() for f in resampler.resample(None))
    except av.error.FFmpegError as exc:
        if isinstance(exc, OSError):
            raise  # a missing or unreadable file is not broken audio
        raise BrokenAudioError(f"{path}: not decodable audio ({exc})") from exc
    if not chunks:
        raise BrokenAudioError(f"{path}: the audio stream is empty")
    return np.concatenate(chunks, axis=1).astype(np.float32, copy=False)
