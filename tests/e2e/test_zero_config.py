"""The zero-config default, end to end: `python -m edge serve` with no database and no Redis
configured starts its own PostgreSQL and Redis, seeds the demo catalog with real audio, serves it,
and never leaves a server behind: not on SIGTERM, not on SIGKILL, not when a start fails.

Real processes only. The first start (the demo seed: one to three minutes of encoding) is paid once
per module: one data dir is shared by the tests, and `Demo.running()` hands out the Edge that owns
it, starting a new one (about a second on a seeded dir) when a test has stopped the previous one.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import psutil
import pytest

import edge
from edge.cli import LISTEN_BACKLOG
from edge.embedded import free_port
from edge.ingest import LADDER, RenditionSpec, object_key
from edge.seed import DEMO_PLAYLIST, demo_tracks

# The first start encodes 40 tracks into 7 renditions each; on a shared 2-core runner that has
# taken about two minutes, so the deadlines are generous. They bound a hang; they measure nothing.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

log = logging.getLogger(__name__)

REPO = Path(edge.__file__).resolve().parent.parent
FIRST_START_DEADLINE = 420.0
START_DEADLINE = 120.0
STOP_DEADLINE = 60.0
CHILDREN_DEADLINE = 30.0
HTTP_TIMEOUT = 10.0
# FFmpeg names decoders, not codecs: its MP3 decoder is "mp3float".
DECODERS = {"mp3": {"mp3", "mp3float"}, "aac": {"aac", "aac_fixed"}, "flac": {"flac"}}
# Encoder priming and padding; far below the demo tracks' 10-14 s, far above rounding.
DURATION_TOLERANCE_S = 0.1
REQUIRED_RUNGS = {("mp3", 128), ("mp3", 320), ("aac", 96), ("aac", 256)}


# -- one Edge process ---------------------------------------------------------------------------


def zero_config_env(data_dir: Path) -> dict[str, str]:
    """This machine's environment with nothing that points Edge at a server or tunes it."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DATABASE_URL", "REDIS_URL"} and not k.startswith(("DB_", "REDIS_", "EDGE_"))
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["EDGE_LOG_FORMAT"] = "json"
    env["EDGE_DATA_DIR"] = str(data_dir)
    return env


@dataclass
class EdgeRun:
    """A `python -m edge serve` child; its output goes to files (a pipe could fill up)."""

    proc: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    stdout: Path
    stderr: Path
    started: float = field(default_factory=time.monotonic)
    ready_s: float | None = None
    signalled: bool = False  # a test stopped it on purpose

    @classmethod
    def start(
        cls, workdir: Path, data_dir: Path, name: str, env: dict[str, str] | None = None
    ) -> EdgeRun:
        workdir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        stdout, stderr = workdir / f"{name}.stdout", workdir / f"{name}.stderr"
        with stdout.open("wb") as out, stderr.open("wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "edge", "serve", "--port", str(port)],
                cwd=workdir,
                env=env if env is not None else zero_config_env(data_dir),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        return cls(proc, port, data_dir, stdout, stderr)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def events(self) -> list[dict[str, Any]]:
        """The structured log so far (JSON lines on stderr; tracebacks are skipped)."""
        found = []
        for line in self.stderr.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    found.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line still being written
        return found

    def event_names(self) -> list[str]:
        return [str(e.get("event")) for e in self.events()]

    def tail(self, lines: int = 40) -> str:
        out = []
        for path in (self.stdout, self.stderr):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name} (last {len(text)} lines) ---\n" + "\n".join(text))
        return "\n".join(out)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        self.signalled = True
        self.proc.send_signal(sig)

    def children(self) -> list[psutil.Process]:
        found: list[psutil.Process] = psutil.Process(self.proc.pid).children(recursive=True)
        return found

    def wait_exit(self, deadline: float) -> int:
        try:
            return self.proc.wait(timeout=deadline)
        except subprocess.TimeoutExpired:
            pytest.fail(f"edge did not exit within {deadline} s\n{self.tail()}")

    def wait_until(self, what: str, condition: Callable[[], bool], deadline: float) -> None:
        """Poll `condition()` until true; fail if the process exits or the deadline passes.

        Waiting on the process itself paces the loop: it returns at once if Edge dies.
        """
        end = time.monotonic() + deadline
        while not condition():
            if time.monotonic() > end:
                pytest.fail(f"{what}: not within {deadline} s\n{self.tail()}")
            try:
                code = self.proc.wait(timeout=0.25)
            except subprocess.TimeoutExpired:
                continue
            pytest.fail(f"{what}: edge exited with code {code}\n{self.tail()}")

    def wait_healthy(self, deadline: float) -> float:
        """Wait until /healthz answers 200; returns the seconds since the start."""
        self.wait_until("/healthz", lambda: self.status("/healthz") == 200, deadline)
        self.ready_s = time.monotonic() - self.started
        return self.ready_s

    def status(self, path: str) -> int | None:
        try:
            with urllib.request.urlopen(self.url(path), timeout=HTTP_TIMEOUT) as response:
                response.read()
                return int(response.status)
        except urllib.error.HTTPError as exc:
            exc.close()
            return int(exc.code)
        except OSError:
            return None

    def get(self, path: str) -> Any:
        try:
            with urllib.request.urlopen(self.url(path), timeout=HTTP_TIMEOUT) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            body = exc.read().decode(errors="replace")
            exc.close()
            pytest.fail(f"GET {path}: {exc.code} {body}\n{self.tail()}")

    def stop(self) -> None:
        """Teardown: stop Edge and whatever it started, whatever state a failed test left."""
        children = []
        if self.alive():
            try:
                children = self.children()
            except psutil.NoSuchProcess:
                pass
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        else:
            self.proc.wait()
        for p in [*children, *servers_of(self.data_dir)]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


# -- processes ----------------------------------------------------------------------------------


def servers_of(data_dir: Path) -> list[psutil.Process]:
    """Live processes whose command line names the data dir (postgres's `-D <dir>/pg`)."""
    needle = str(data_dir.resolve())
    found = []
    for p in psutil.process_iter():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and needle in " ".join(p.cmdline()):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def still_running(procs: list[psutil.Process], deadline: float) -> list[psutil.Process]:
    """Wait up to `deadline` s for `procs` to end; returns those still running after it.

    A zombie has exited: only its (new) parent has not reaped it yet, so it counts as gone.
    """
    end = time.monotonic() + deadline
    alive = list(procs)
    while alive:
        _, alive = psutil.wait_procs(alive, timeout=min(0.5, max(0.0, end - time.monotonic())))
        alive = [p for p in alive if _running(p)]
        if time.monotonic() >= end:
            break
    return alive


def _running(p: psutil.Process) -> bool:
    try:
        return bool(p.is_running() and p.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def names(procs: list[psutil.Process]) -> set[str]:
    found = set()
    for p in procs:
        try:
            found.add(p.name())
        except psutil.NoSuchProcess:
            continue  # a short-lived postgres worker
    return found


def describe(procs: list[psutil.Process]) -> str:
    lines = []
    for p in procs:
        try:
            lines.append(f"{p.pid} {p.name()} {' '.join(p.cmdline())[:160]}")
        except psutil.Error:
            lines.append(f"{p.pid} (gone)")
    return "\n".join(lines)


def server_pids(run: EdgeRun) -> dict[str, int]:
    """The pids Edge reported for its embedded servers, from its log."""
    names = {"embedded_postgres_ready": "postgres", "embedded_redis_ready": "redis"}
    return {names[e["event"]]: int(e["pid"]) for e in run.events() if e.get("event") in names}


def assert_stopped_by_edge(pids: dict[str, int], run: EdgeRun) -> None:
    """Edge stopped each server itself (its log says so), and each is gone right after Edge
    exited: the parent-death signal would also end them, but only a moment later."""
    stopped = {int(e["pid"]) for e in run.events() if e.get("event") == "embedded_stopped"}
    for name, pid in pids.items():
        assert pid in stopped, f"edge exited without stopping {name} (pid {pid})\n{run.tail()}"
        try:
            p = psutil.Process(pid)
            running = p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            running = False
        assert not running, f"{name} (pid {pid}) still runs after edge exited\n{run.tail()}"


# -- the shared, seeded data dir ----------------------------------------------------------------


@dataclass
class Demo:
    workdir: Path
    data_dir: Path
    first: EdgeRun
    current: EdgeRun
    runs: list[EdgeRun]
    first_catalog: dict[int, str] = field(default_factory=dict)

    def running(self) -> EdgeRun:
        """The Edge that owns the data dir, started anew if a test stopped the last one."""
        if not self.current.alive():
            code = self.current.proc.wait()
            assert self.current.signalled, (
                f"edge exited by itself with code {code}\n{self.current.tail()}"
            )
            run = EdgeRun.start(self.workdir, self.data_dir, f"edge-{len(self.runs)}")
            self.runs.append(run)
            self.current = run
            ready = run.wait_healthy(START_DEADLINE)
            log.info("start %d on the seeded data dir: healthy after %.2f s", len(self.runs), ready)
        return self.current


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    workdir = tmp_path_factory.mktemp("zero-config")
    data_dir = workdir / "data"
    first = EdgeRun.start(workdir, data_dir, "edge-0")
    d = Demo(workdir, data_dir, first, first, [first])
    try:
        ready = first.wait_healthy(FIRST_START_DEADLINE)
        log.info("first start (demo seed) healthy after %.1f s", ready)
        d.first_catalog = catalog_of(first)
        yield d
    finally:
        for run in d.runs:
            run.stop()


def walk(run: EdgeRun, path: str, limit: int) -> list[dict[str, Any]]:
    """Every item of a list endpoint, following next_cursor."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(1000):
        query = {"limit": str(limit)} | ({"cursor": cursor} if cursor else {})
        page = run.get(f"{path}?{urllib.parse.urlencode(query)}")
        assert "items" in page and "next_cursor" in page, page
        assert len(page["items"]) <= limit
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items
        assert page["items"], f"empty page with a next_cursor at {path}"
    pytest.fail(f"{path}: more than 1000 pages")


def catalog_of(run: EdgeRun) -> dict[int, str]:
    return {t["id"]: t["title"] for t in walk(run, "/api/v1/tracks/popular", 7)}


# -- a running Edge serves the demo catalog -----------------------------------------------------


def test_healthy_and_ready(demo: Demo) -> None:
    run = demo.running()
    assert run.status("/healthz") == 200
    ready = run.get("/readyz")
    assert ready == {"status": "ready", "checks": {"postgres": "ok", "redis": "ok"}}, run.tail()
    events = run.event_names()
    assert "embedded_postgres_ready" in events and "embedded_redis_ready" in events, run.tail()


def listen_backlogs(port: int) -> list[int]:
    """The accept-queue size of each socket listening on the port (`ss`: a listener's Send-Q)."""
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    return [int(line.split()[2]) for line in out.splitlines() if line.strip()]


def test_the_listen_queue_holds_a_burst_of_players(demo: Demo) -> None:
    """A thousand players starting at once overflowed aiohttp's default queue of 128: the
    kernel dropped their connections for a second or for good."""
    run = demo.running()
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    expected = min(LISTEN_BACKLOG, somaxconn)
    assert expected > 128, f"net.core.somaxconn is {somaxconn}: the kernel caps every queue"
    assert listen_backlogs(run.port) == [expected]


def test_demo_catalog(demo: Demo) -> None:
    run = demo.running()
    tracks = walk(run, "/api/v1/tracks/popular", 7)
    ids = [t["id"] for t in tracks]
    assert len(ids) == len(set(ids)), f"duplicates while paging: {ids}"
    assert len(ids) >= 40

    artists = {t["artist"]["id"] for t in tracks}
    assert len(artists) >= 5
    for artist_id in artists:
        artist = run.get(f"/api/v1/artists/{artist_id}")
        assert artist["track_count"] >= 1 and artist["albums"], artist

    genres = sorted({t["genre"] for t in tracks})
    assert len(genres) >= 2, genres
    for genre in genres:
        listed = walk(run, f"/api/v1/genres/{urllib.parse.quote(genre, safe='')}/tracks", 7)
        assert listed, genre
        assert {t["genre"] for t in listed} == {genre}
        assert {t["id"] for t in listed} == {t["id"] for t in tracks if t["genre"] == genre}

    playlist = run.get("/api/v1/playlists/1?limit=100")
    assert playlist["name"] == DEMO_PLAYLIST
    entries = playlist["items"]
    assert entries and len(entries) == playlist["track_count"]
    assert [e["position"] for e in entries] == sorted(e["position"] for e in entries)
    assert {e["track"]["id"] for e in entries} <= set(ids)


def rendition_path(demo: Demo, track: dict[str, Any], rendition: dict[str, Any]) -> Path:
    """Where the seed put a rendition: `demo/NNNN/<format>-<bitrate>.<ext>` under the media root,
    NNNN being the track's position in the demo catalog (edge.seed, edge.ingest.object_key)."""
    identity = (track["title"], track["artist"]["name"], track["album"]["title"])
    (index,) = [t.index for t in demo_tracks() if (t.title, t.artist, t.album) == identity]
    spec: RenditionSpec
    if rendition["format"] == "flac":  # flac's catalog bitrate is measured, its rung has none
        (spec,) = [s for s in LADDER if s.format == "flac"]
    else:
        (spec,) = [
            s
            for s in LADDER
            if (s.format, s.bitrate_kbps) == (rendition["format"], rendition["bitrate_kbps"])
        ]
    return demo.data_dir / "media" / object_key(f"demo/{index + 1:04d}", spec)


def top_level_boxes(data: bytes) -> list[str]:
    boxes, offset = [], 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if size == 1:  # a 64-bit size follows the type
            size = struct.unpack(">Q", data[offset + 8 : offset + 16])[0]
        elif size == 0:  # the box runs to the end of the file
            size = len(data) - offset
        assert size >= 8, f"corrupt box {kind!r} at {offset}"
        boxes.append(kind.decode("latin-1"))
        offset += size
    assert offset == len(data), "boxes do not tile the file"
    return boxes


def decoded_seconds(path: Path, rendition: dict[str, Any]) -> float:
    """Decode every frame; the audio's length is what the decoder produced, not a header."""
    with av.open(str(path)) as container:
        (stream,) = container.streams.audio
        assert stream.codec_context.name in DECODERS[rendition["format"]], stream.codec_context
        assert stream.rate == rendition["sample_rate"]
        assert stream.channels == rendition["channels"]
        samples = sum(frame.samples for frame in container.decode(stream))
    return float(samples / rendition["sample_rate"])


def test_renditions_are_real_audio(demo: Demo) -> None:
    run = demo.running()
    tracks = walk(run, "/api/v1/tracks/popular", 50)
    assert len(tracks) >= 40
    for listed in tracks:
        track = run.get(f"/api/v1/tracks/{listed['id']}")
        renditions = track["renditions"]
        rungs = {(r["format"], r["bitrate_kbps"]) for r in renditions}
        assert rungs >= REQUIRED_RUNGS, f"track {track['id']}: {sorted(rungs)}"
        assert [r["format"] for r in renditions].count("flac") == 1
        for r in renditions:
            path = rendition_path(demo, track, r)
            where = f"track {track['id']} {r['format']} {r['bitrate_kbps']}: {path}"
            assert path.is_file(), where
            assert path.stat().st_size == r["bytes"], where
            seconds = decoded_seconds(path, r)
            assert abs(seconds - track["duration_ms"] / 1000) < DURATION_TOLERANCE_S, (
                f"{where}: decoded {seconds:.3f} s, catalog says {track['duration_ms']} ms"
            )
            if r["format"] == "aac":
                boxes = top_level_boxes(path.read_bytes())
                assert boxes.index("moov") < boxes.index("mdat"), f"{where}: {boxes}"


def decode_url(url: str) -> tuple[str, int, int]:
    """A real player: PyAV (FFmpeg) opens the URL over HTTP and decodes every frame."""
    with av.open(url) as container:
        (stream,) = container.streams.audio
        samples = sum(frame.samples for frame in container.decode(stream))
        return stream.codec_context.name, stream.rate, samples


@pytest.mark.parametrize("mode", ["redirect", "proxy"])
def test_plays_a_demo_track_over_http(demo: Demo, mode: str) -> None:
    """No configuration at all, no token: /play answers, and a player decodes the whole track
    (in redirect mode FFmpeg follows the 302 to the signed local-origin URL)."""
    run = demo.running()
    track = walk(run, "/api/v1/tracks/popular", 5)[0]
    detail = run.get(f"/api/v1/tracks/{track['id']}")
    mp3_128 = next(
        r for r in detail["renditions"] if (r["format"], r["bitrate_kbps"]) == ("mp3", 128)
    )
    codec, rate, samples = decode_url(run.url(f"/play/{track['id']}?mode={mode}&format=mp3"))
    assert codec in DECODERS["mp3"]
    assert rate == mp3_128["sample_rate"]
    expected = decoded_seconds(rendition_path(demo, detail, mp3_128), mp3_128)
    assert abs(samples / rate - expected) < 0.05, (samples / rate, expected, run.tail())


# -- stopping and starting again ----------------------------------------------------------------


def test_sigterm_stops_edge_and_its_servers(demo: Demo) -> None:
    run = demo.running()
    children = run.children()
    assert {"postgres", "redis-server"} <= names(children), describe(children)
    run.signal(signal.SIGTERM)
    assert run.wait_exit(STOP_DEADLINE) == 0, run.tail()
    left = still_running(children, CHILDREN_DEADLINE)
    assert not left, f"left behind after SIGTERM:\n{describe(left)}\n{run.tail()}"
    assert not servers_of(demo.data_dir), describe(servers_of(demo.data_dir))
    stopped = [e["server"] for e in run.events() if e.get("event") == "embedded_stopped"]
    assert sorted(stopped) == ["postgres", "redis"], run.tail()
    assert "embedded_kill" not in run.event_names(), run.tail()


def test_second_start_reuses_the_data_dir(demo: Demo) -> None:
    if demo.current.alive():
        demo.current.signal(signal.SIGTERM)
        assert demo.current.wait_exit(STOP_DEADLINE) == 0, demo.current.tail()
    run = demo.running()
    assert run is not demo.first
    # Logged, never asserted: how fast a start on a seeded data dir is.
    log.info("healthy after %.1f s (first start), %.2f s (now)", demo.first.ready_s, run.ready_s)
    assert "demo_seed_done" in demo.first.event_names(), demo.first.tail()
    events = run.event_names()
    assert "demo_seed_started" not in events, run.tail()
    assert "migration_applied" not in events, run.tail()
    assert run.get("/readyz")["status"] == "ready"
    assert len(demo.first_catalog) >= 40
    assert catalog_of(run) == demo.first_catalog


def test_sigkill_leaves_no_servers_and_the_next_start_works(demo: Demo) -> None:
    run = demo.running()
    children = run.children()
    assert {"postgres", "redis-server"} <= names(children), describe(children)
    run.signal(signal.SIGKILL)
    assert run.wait_exit(STOP_DEADLINE) == -signal.SIGKILL
    # Nobody stops them now: the parent-death signal must.
    left = still_running(children, CHILDREN_DEADLINE)
    assert not left, f"left behind after SIGKILL:\n{describe(left)}\n{run.tail()}"
    assert not servers_of(demo.data_dir), describe(servers_of(demo.data_dir))
    # The killed run's stale postmaster.pid and unsaved Redis state must not block the next one.
    after = demo.running()
    assert after.get("/readyz")["status"] == "ready", after.tail()
    assert len(catalog_of(after)) >= 40


def test_workers_on_the_zero_config_default(demo: Demo) -> None:
    """`EDGE_WORKERS=2` with no configuration: the supervisor starts the embedded servers once,
    both workers serve the demo catalog as the zero-config default (anonymous /play), one
    scrape sums them, and SIGTERM stops workers and servers alike."""
    if demo.current.alive():
        demo.current.signal(signal.SIGTERM)
        assert demo.current.wait_exit(STOP_DEADLINE) == 0, demo.current.tail()
    env = zero_config_env(demo.data_dir) | {"EDGE_WORKERS": "2"}
    run = EdgeRun.start(demo.workdir, demo.data_dir, f"edge-{len(demo.runs)}", env)
    demo.runs.append(run)
    demo.current = run
    run.wait_healthy(START_DEADLINE)

    def workers_counted() -> bool:
        with urllib.request.urlopen(run.url("/metrics"), timeout=HTTP_TIMEOUT) as response:
            return b"\nedge_workers 2.0\n" in response.read()

    run.wait_until("/metrics", workers_counted, START_DEADLINE)
    children = run.children()
    assert {"postgres", "redis-server"} <= names(children), describe(children)
    workers = [c for c in children if "--worker-dir" in c.cmdline()]
    assert len(workers) == 2, describe(children)
    assert run.get("/readyz")["status"] == "ready"
    assert catalog_of(run) == demo.first_catalog
    track = next(iter(demo.first_catalog))
    request = urllib.request.Request(run.url(f"/play/{track}?format=mp3"), method="HEAD")
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
        assert response.status == 200  # followed the 302 to the signed local-origin URL
        assert response.headers["Content-Type"] == "audio/mpeg"
    assert "demo_seed_started" not in run.event_names(), run.tail()
    run.signal(signal.SIGTERM)
    assert run.wait_exit(STOP_DEADLINE) == 0, run.tail()
    left = still_running(children, CHILDREN_DEADLINE)
    assert not left, f"left behind after SIGTERM:\n{describe(left)}\n{run.tail()}"
    assert not servers_of(demo.data_dir), describe(servers_of(demo.data_dir))


# -- a start that fails or is interrupted leaves nothing behind ---------------------------------


def break_redis_dir(data_dir: Path, env: dict[str, str]) -> None:
    """`<data>/redis` is a file: postgres starts, then the embedded Redis cannot."""
    data_dir.mkdir(parents=True)
    (data_dir / "redis").write_text("not a directory")


def break_media_dir(data_dir: Path, env: dict[str, str]) -> None:
    """The media dir is a file: both servers start and migrate, then the demo seed fails."""
    media = data_dir.parent / "media-is-a-file"
    media.write_text("not a directory")
    env["EDGE_MEDIA_DIR"] = str(media)


@pytest.mark.parametrize("breakage", [break_redis_dir, break_media_dir], ids=["redis", "media"])
def test_failed_start_leaves_nothing_behind(
    tmp_path: Path, breakage: Callable[[Path, dict[str, str]], None]
) -> None:
    data_dir = tmp_path / "data"
    env = zero_config_env(data_dir)
    breakage(data_dir, env)
    run = EdgeRun.start(tmp_path, data_dir, "edge", env=env)
    try:
        code = run.wait_exit(START_DEADLINE)
        assert code != 0, run.tail()
        pids = server_pids(run)
        # It failed half-way: after the embedded PostgreSQL was up.
        assert "postgres" in pids, run.tail()
        assert_stopped_by_edge(pids, run)
        assert not servers_of(data_dir), describe(servers_of(data_dir))
    finally:
        run.stop()


def test_sigterm_during_the_first_start_leaves_nothing_behind(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    run = EdgeRun.start(tmp_path, data_dir, "edge")
    try:
        run.wait_until(
            "demo seed started", lambda: "demo_seed_started" in run.event_names(), START_DEADLINE
        )
        children = run.children()
        assert {"postgres", "redis-server"} <= names(children), describe(children)
        run.signal(signal.SIGTERM)
        run.wait_exit(STOP_DEADLINE)
        pids = server_pids(run)
        assert set(pids) == {"postgres", "redis"}, run.tail()
        assert_stopped_by_edge(pids, run)
        left = still_running(children, CHILDREN_DEADLINE)
        assert not left, f"left behind:\n{describe(left)}\n{run.tail()}"
        assert "demo_seed_done" not in run.event_names()
    finally:
        run.stop()
