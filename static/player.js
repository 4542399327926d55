// Edge's player bar: HTML5 <audio> over /play in proxy mode (seeks are Range requests to Edge),
// the page's track list as the queue, the next track preloaded from the Link hint on a second
// <audio>, player events reported to /api/v1/events in sendBeacon batches. No libraries.
"use strict";

(() => {
  const $ = (sel, root = document) => root.querySelector(sel);
  const bar = $("#player");

  // -- search as you type: the server renders the results; this swaps them in --------------
  // #results is looked up when the answer arrives: in-page navigation (below) may have
  // replaced the page since, or brought a search page in.
  const searchBox = $("#q");
  let searchSeq = 0; // a navigation bumps it too, so a late answer never lands on a new page
  let shown = location.pathname + location.search; // the address of what <main> shows
  if (searchBox) {
    let timer = 0;
    searchBox.addEventListener("input", () => {
      clearTimeout(timer);
      if (!document.getElementById("results")) return;
      timer = setTimeout(async () => {
        const q = searchBox.value.trim();
        if (!/[\p{L}\p{N}]/u.test(q)) return;
        const mine = ++searchSeq;
        const url = new URL(searchBox.form.action, location.href);
        url.searchParams.set("q", q);
        try {
          const r = await fetch(url, { headers: { Accept: "text/html" } });
          if (!r.ok || mine !== searchSeq) return;
          const doc = new DOMParser().parseFromString(await r.text(), "text/html");
          const fresh = doc.getElementById("results");
          const results = document.getElementById("results");
          if (fresh && results && mine === searchSeq) {
            results.replaceChildren(...fresh.childNodes);
            history.replaceState(history.state, "", url);
            if (doc.title) document.title = doc.title;
            shown = url.pathname + url.search;
            const back = $("form.tier input[name=back]");
            if (back) back.value = shown;
          }
        } catch (e) { /* keep the current results */ }
      }, 250);
    });
  }

  // -- demo tier: submit on change (the button is there for no-JS) ---------------------------
  for (const select of document.querySelectorAll("select[data-autosubmit]")) {
    select.addEventListener("change", () => select.form.requestSubmit());
  }

  if (!bar) return;

  const decks = [$("#deck-a"), $("#deck-b")];
  const ui = {
    toggle: $("#toggle"), prev: $("#prev"), next: $("#next"), seek: $("#seek"),
    volume: $("#volume"), elapsed: $("#elapsed"), total: $("#total"), title: $("#now-title"),
    artist: $("#now-artist"), quality: $("#quality"), where: $("#position-in-queue"),
    status: $("#player-status"),
  };
  const playBase = bar.dataset.playUrl.replace(/0$/, "");
  const eventsUrl = bar.dataset.eventsUrl;
  const PRELOAD_AHEAD_S = 15; // start loading the next track this long before the end
  const FLUSH_MS = 3000;

  let active = 0; // which deck plays
  let queue = [];
  let index = -1;
  let sid = null;
  let quality = null; // {format, bitrate}
  let hint = null; // {id, url}: where the next track preloads from
  let preloaded = null; // {id, ready, rendition}: what the standby deck holds
  let dragging = false;

  const audio = () => decks[active];
  const standby = () => decks[1 - active];

  function formats() {
    const probe = document.createElement("audio");
    const out = [];
    if (probe.canPlayType("audio/flac")) out.push("flac");
    if (probe.canPlayType('audio/mp4; codecs="mp4a.40.2"')) out.push("aac");
    if (probe.canPlayType("audio/mpeg")) out.push("mp3");
    return out.length ? out.join(",") : "mp3";
  }
  const FORMATS = formats();

  function clock(s) {
    if (!Number.isFinite(s) || s < 0) s = 0;
    s = Math.floor(s);
    return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
  }

  function playUrl(id, extra) {
    const params = new URLSearchParams({ mode: "proxy", format: FORMATS, ...extra });
    if (sid) params.set("sid", sid);
    return `${playBase}${encodeURIComponent(id)}?${params}`;
  }

  function preloadLink(header) {
    // Link: <url>; rel=preload; as=audio
    const m = /<([^>]+)>\s*;[^,]*rel="?preload/.exec(header || "");
    return m ? new URL(m[1], location.href).href : null;
  }

  // -- events, batched ------------------------------------------------------------------------
  let pending = [];
  function report(type, extra) {
    if (!sid) return;
    const position = audio().currentTime;
    pending.push({ sid, type, at: Date.now() / 1000,
                   position: Number.isFinite(position) && position >= 0 ? position : 0, ...extra });
    if (pending.length >= 50) flush();
  }
  function flush() {
    while (pending.length) {
      const batch = pending.splice(0, 50);
      navigator.sendBeacon(eventsUrl, JSON.stringify(batch));
    }
  }
  setInterval(flush, FLUSH_MS);
  addEventListener("pagehide", flush);
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "hidden") flush();
  });

  // -- the queue: the page's track list -------------------------------------------------------
  function readQueue(button) {
    const list = button.closest("[data-queue]");
    const buttons = list ? [...list.querySelectorAll("button.play")] : [button];
    return buttons.map((b) => ({ id: b.dataset.trackId, title: b.dataset.title,
                                  artist: b.dataset.artist, row: b.closest(".track") }));
  }

  document.addEventListener("click", (e) => {
    const button = e.target.closest("button.play");
    if (!button) return;
    queue = readQueue(button);
    start(queue.findIndex((t) => t.id === button.dataset.trackId));
  });

  function showTrack(t) {
    bar.hidden = false;
    document.body.classList.add("has-player");
    ui.title.textContent = t.title;
    ui.artist.textContent = t.artist ? `— ${t.artist}` : "";
    ui.where.textContent = queue.length > 1 ? `Track ${index + 1} of ${queue.length}` : "";
    markCurrent();
    ui.prev.disabled = index <= 0;
    ui.next.disabled = index >= queue.length - 1;
    ui.toggle.disabled = false;
    ui.status.textContent = "";
  }

  // The row of the playing track, where the page shows it (another page may be shown by now).
  function markCurrent() {
    for (const row of document.querySelectorAll("li.track[aria-current]")) {
      row.removeAttribute("aria-current");
    }
    const t = index >= 0 ? queue[index] : null;
    if (t && t.row && t.row.isConnected) t.row.setAttribute("aria-current", "true");
  }

  // After in-page navigation: when the new content shows the very list that is playing (back
  // to the album), the queue's rows become the new ones. The queue itself does not change.
  function relink(root) {
    if (!queue.length) return;
    const ids = queue.map((t) => t.id).join(",");
    for (const list of root.querySelectorAll("[data-queue]")) {
      const buttons = [...list.querySelectorAll("button.play")];
      if (buttons.map((b) => b.dataset.trackId).join(",") === ids) {
        buttons.forEach((b, i) => { queue[i].row = b.closest(".track"); });
        break;
      }
    }
    markCurrent();
  }

  function showQuality(r) {
    const format = r.headers.get("X-Stream-Format");
    const bitrate = Number(r.headers.get("X-Stream-Bitrate"));
    const downgraded = r.headers.get("X-Stream-Downgraded");
    if (!format) return;
    ui.quality.textContent = `${format.toUpperCase()} ${bitrate} kbit/s` +
      (downgraded ? ` (limited by ${downgraded})` : "");
    if (quality && (quality.format !== format || quality.bitrate !== bitrate)) {
      report("quality_change", { format, bitrate_kbps: bitrate });
    }
    quality = { format, bitrate };
  }

  // HEAD first: the session, the chosen rendition and the preload hint, before any audio byte.
  // The audio src then names that rendition (format and bitrate), so every Range request of the
  // track reads the same file even if Edge would choose differently for a later request.
  async function ask(t, next, pinned) {
    const extra = { ...(pinned || {}), ...(next ? { next: next.id } : {}) };
    const r = await fetch(playUrl(t.id, extra), { method: "HEAD", credentials: "same-origin" });
    if (!r.ok) throw new Error(r.status === 429 ? "too many streams for this tier"
                                                : `cannot play (HTTP ${r.status})`);
    sid = r.headers.get("X-Stream-Session") || sid;
    showQuality(r);
    const link = preloadLink(r.headers.get("Link"));
    hint = next ? { id: next.id, url: link || playUrl(next.id, { preload: "1" }) } : null;
    return pin(r);
  }

  function pin(r) {
    const format = r.headers.get("X-Stream-Format");
    const bitrate = r.headers.get("X-Stream-Bitrate");
    return format && bitrate ? { format, bitrate } : {};
  }

  function pinned(url, rendition) {
    const u = new URL(url, location.href);
    for (const [k, v] of Object.entries(rendition)) u.searchParams.set(k, v);
    return u.href;
  }

  async function start(i) {
    if (i < 0 || i >= queue.length) return;
    index = i;
    const t = queue[i];
    showTrack(t);
    // The standby deck already holds this track: switch decks now, ask Edge alongside.
    const warm = preloaded && preloaded.id === t.id && preloaded.ready ? preloaded : null;
    audio().pause();
    if (warm) {
      active = 1 - active;
      play();
    }
    preloaded = null;
    hint = null;
    let rendition;
    try {
      rendition = await ask(t, queue[i + 1], warm ? warm.rendition : null);
    } catch (err) {
      ui.status.textContent = String(err.message || err);
      return;
    }
    if (index !== i) return; // another track was chosen meanwhile
    if (!warm) {
      audio().src = playUrl(t.id, rendition);
      play();
    }
    const idle = standby();
    idle.removeAttribute("src");
    idle.load();
  }

  function play() {
    audio().play().catch((err) => {
      if (err.name !== "AbortError") ui.status.textContent = `Press play to start (${err.name})`;
    });
  }

  // Shortly before the end: ask for the hinted URL (a preload never counts as a play), then
  // let the standby deck buffer that rendition.
  async function maybePreload(a) {
    if (!hint || (preloaded && preloaded.id === hint.id) || !Number.isFinite(a.duration)) return;
    if (a.duration - a.currentTime > PRELOAD_AHEAD_S) return;
    const target = { id: hint.id, ready: false, rendition: {} };
    preloaded = target;
    try {
      const r = await fetch(hint.url, { method: "HEAD", credentials: "same-origin" });
      if (!r.ok || preloaded !== target) return;
      target.rendition = pin(r);
    } catch (e) {
      return;
    }
    const idle = standby();
    idle.preload = "auto";
    idle.src = pinned(hint.url, target.rendition);
    idle.load();
    target.ready = true;
  }

  // -- audio events: only the active deck speaks ----------------------------------------------
  function on(type, fn) {
    for (const d of decks) d.addEventListener(type, (e) => { if (e.target === audio()) fn(e); });
  }
  on("playing", () => {
    ui.toggle.textContent = "\u2016";
    ui.toggle.setAttribute("aria-label", "Pause");
    ui.status.textContent = "";
    report("playing");
  });
  on("pause", () => {
    ui.toggle.textContent = "\u25B6";
    ui.toggle.setAttribute("aria-label", "Play");
    if (!audio().ended) report("paused");
  });
  on("waiting", () => { ui.status.textContent = "Buffering…"; report("waiting"); });
  on("stalled", () => report("stalled"));
  on("seeking", () => report("seek"));
  on("error", () => {
    const code = audio().error ? audio().error.code : 0;
    ui.status.textContent = `Playback error (${code})`;
    report("error", { code });
  });
  on("ended", () => {
    report("ended");
    if (index + 1 < queue.length) start(index + 1);
  });
  on("durationchange", () => {
    const a = audio();
    ui.seek.max = Number.isFinite(a.duration) ? a.duration : 0;
    ui.total.textContent = clock(a.duration);
  });
  on("timeupdate", () => {
    const a = audio();
    if (!dragging) ui.seek.value = a.currentTime;
    ui.elapsed.textContent = clock(a.currentTime);
    ui.seek.setAttribute("aria-valuetext", `${clock(a.currentTime)} of ${clock(a.duration)}`);
    maybePreload(a);
  });

  // -- controls ------------------------------------------------------------------------------
  ui.toggle.addEventListener("click", () => {
    if (audio().paused) play(); else audio().pause();
  });
  ui.prev.addEventListener("click", () => {
    if (audio().currentTime > 3 || index <= 0) audio().currentTime = 0; else start(index - 1);
  });
  ui.next.addEventListener("click", () => start(index + 1));
  ui.seek.addEventListener("pointerdown", () => { dragging = true; });
  ui.seek.addEventListener("pointerup", () => { dragging = false; });
  ui.seek.addEventListener("change", () => {
    dragging = false;
    audio().currentTime = Number(ui.seek.value);
  });
  ui.volume.addEventListener("input", () => {
    for (const d of decks) d.volume = Number(ui.volume.value);
  });

  // -- in-page navigation: the music goes on while browsing ---------------------------------
  // Links and the search form that lead to a page are fetched and their <main> swapped in, with
  // history.pushState; back/forward does the same. Anything unexpected (a network error, a
  // response that is not one of our pages) falls back to a normal page load. Without
  // JavaScript, links and forms work as they always did.
  const main = $("#content");
  const PAGE = /^\/(?:|search|(?:artists|albums|genres|playlists)\/[^/]+)$/;
  let navSeq = 0;
  let navAbort = null;
  // Scroll positions by history entry, kept here: no replaceState of the entry being left.
  const scrolls = new Map();
  let entry = (history.state && history.state.edge) || "start";
  if ("scrollRestoration" in history) history.scrollRestoration = "manual";

  function routable(href) {
    let url;
    try { url = new URL(href, location.href); } catch (e) { return null; }
    return url.origin === location.origin && PAGE.test(url.pathname) ? url : null;
  }

  async function navigate(url, how) {
    const mine = ++navSeq;
    searchSeq++; // a late as-you-type answer must not land on the new page
    if (navAbort) navAbort.abort();
    const ctrl = new AbortController();
    navAbort = ctrl;
    const fallback = () => {
      if (how === "pop") location.reload(); else location.assign(url.href);
    };
    main.setAttribute("aria-busy", "true");
    let doc;
    let target = url;
    try {
      const r = await fetch(url, { headers: { Accept: "text/html" }, signal: ctrl.signal,
                                   credentials: "same-origin" });
      const type = (r.headers.get("Content-Type") || "").split(";")[0].trim();
      if (type !== "text/html") throw new Error(`not a page: ${type || "no type"}`);
      if (r.redirected) {
        target = routable(r.url);
        if (!target) throw new Error("redirected away from the pages");
        target.hash = url.hash;
      }
      doc = new DOMParser().parseFromString(await r.text(), "text/html");
    } catch (err) {
      if (mine === navSeq) { main.removeAttribute("aria-busy"); fallback(); }
      return;
    }
    if (mine !== navSeq) return; // another navigation was started meanwhile
    main.removeAttribute("aria-busy");
    const fresh = doc.getElementById("content");
    if (!fresh) { fallback(); return; }

    if (how === "push") {
      scrolls.set(entry, scrollY);
      entry = `${Date.now().toString(36)}.${navSeq}`;
      if (target.href === location.href) history.replaceState({ edge: entry }, "", target.href);
      else history.pushState({ edge: entry }, "", target.href);
    }
    shown = target.pathname + target.search;
    main.replaceChildren(...fresh.childNodes);
    document.title = doc.title;
    // The header's bits that depend on the page: the query shown, where the tier form returns.
    const q = doc.getElementById("q");
    if (searchBox && q && document.activeElement !== searchBox) searchBox.value = q.value;
    const back = $("form.tier input[name=back]");
    const freshBack = doc.querySelector("form.tier input[name=back]");
    if (back && freshBack) back.value = freshBack.value;
    relink(main);

    // Screen readers: focus the new page's heading (the whole <main> where it has none).
    const heading = main.querySelector("h1") || main;
    if (heading !== main) heading.tabIndex = -1;
    heading.focus({ preventScroll: true });
    const anchor = target.hash && document.getElementById(decodeURIComponent(target.hash.slice(1)));
    const scroll = how === "pop" ? scrolls.get(entry) : undefined;
    if (scroll !== undefined) scrollTo(0, scroll);
    else if (anchor) anchor.scrollIntoView();
    else scrollTo(0, 0);
  }

  function followable(e) {
    return !e.defaultPrevented && e.button === 0 &&
      !(e.metaKey || e.ctrlKey || e.shiftKey || e.altKey);
  }

  document.addEventListener("click", (e) => {
    if (!followable(e) || !(e.target instanceof Element)) return;
    const a = e.target.closest("a[href]");
    if (!a || a.hasAttribute("download") || (a.target && a.target !== "_self")) return;
    const url = routable(a.href);
    if (!url) return;
    // An anchor on this very page (the skip link): the browser does that best.
    if (url.hash && url.pathname + url.search === shown) return;
    e.preventDefault();
    navigate(url, "push");
  });

  // Only the search form: the demo tier form posts, and is left to the browser.
  document.addEventListener("submit", (e) => {
    const form = e.target;
    if (e.defaultPrevented || !form.matches("form.search") ||
        form.method.toLowerCase() !== "get") return;
    const url = routable(form.action);
    if (!url) return;
    const data = new FormData(form, e.submitter);
    url.search = new URLSearchParams([...data].filter(([, v]) => typeof v === "string"));
    e.preventDefault();
    navigate(url, "push");
  });

  addEventListener("popstate", (e) => {
    if (location.pathname + location.search === shown) return; // only the #anchor changed
    scrolls.set(entry, scrollY);
    entry = (e.state && e.state.edge) || "start";
    navigate(new URL(location.href), "pop");
  });

  // A reload or a later visit restores the scroll position as browsers do.
  addEventListener("pagehide", () => {
    if ("scrollRestoration" in history) history.scrollRestoration = "auto";
  });
  addEventListener("pageshow", (e) => {
    if (e.persisted && "scrollRestoration" in history) history.scrollRestoration = "manual";
  });

  // For tests and the curious: what the player is doing.
  window.edgePlayer = {
    get audio() { return audio(); },
    get track() { return index >= 0 ? queue[index].id : null; },
    get sid() { return sid; },
    get quality() { return quality; },
    get preloaded() { return preloaded && preloaded.id; },
    seek(seconds) { audio().currentTime = seconds; },
    flush,
  };
})();
