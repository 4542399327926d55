// Live dashboard: polls the JSON endpoint and draws line charts on canvases (no libraries).
"use strict";

const COLORS = ["#3366cc", "#dc3912", "#ff9900", "#109618", "#990099", "#0099c6", "#dd4477", "#66aa00"];

// Each chart's series come from a path into a point: "a.b" or "a.*" (every key of a map).
function seriesOf(points, spec) {
  const out = new Map();
  for (const part of spec.split(",")) {
    const [head, tail] = part.split(".");
    points.forEach((p, i) => {
      let value = p[head];
      if (tail === "*") {
        for (const [k, v] of Object.entries(value || {})) {
          const v2 = typeof v === "object" && v !== null ? v.p95_ms : v;
          if (!out.has(k)) out.set(k, new Array(points.length).fill(null));
          out.get(k)[i] = v2;
        }
        return;
      }
      if (tail) value = value ? value[tail] : null;
      const name = tail || head;
      if (!out.has(name)) out.set(name, new Array(points.length).fill(null));
      out.get(name)[i] = typeof value === "number" ? value : null;
    });
  }
  return out;
}

function draw(canvas, points) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 28;
  ctx.clearRect(0, 0, w, h);
  const series = seriesOf(points, canvas.dataset.series);
  let max = 0;
  for (const values of series.values()) for (const v of values) if (v !== null && v > max) max = v;
  max = max > 0 ? max * 1.1 : 1;
  ctx.strokeStyle = "#d0d4dc"; ctx.fillStyle = "#555"; ctx.font = "10px system-ui";
  ctx.beginPath(); ctx.moveTo(pad, 4); ctx.lineTo(pad, h - pad); ctx.lineTo(w - 4, h - pad); ctx.stroke();
  ctx.fillText(max.toPrecision(3) + " " + (canvas.dataset.unit || ""), pad + 4, 12);
  ctx.fillText("0", 4, h - pad);
  const legend = document.getElementById("legend-" + canvas.id.slice(6));
  legend.textContent = "";
  let c = 0;
  for (const [name, values] of series) {
    const color = COLORS[c++ % COLORS.length];
    ctx.strokeStyle = color; ctx.lineWidth = 1.5; ctx.beginPath();
    let started = false;
    values.forEach((v, i) => {
      if (v === null) { started = false; return; }
      const x = pad + (w - pad - 6) * (values.length > 1 ? i / (values.length - 1) : 1);
      const y = h - pad - (h - pad - 6) * (v / max);
      if (started) ctx.lineTo(x, y); else { ctx.moveTo(x, y); started = true; }
    });
    ctx.stroke();
    // Dots as well: a series seen in one interval only is a point, not a line.
    ctx.fillStyle = color;
    values.forEach((v, i) => {
      if (v === null) return;
      const x = pad + (w - pad - 6) * (values.length > 1 ? i / (values.length - 1) : 1);
      const y = h - pad - (h - pad - 6) * (v / max);
      ctx.fillRect(x - 2, y - 2, 4, 4);
    });
    const li = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.style.background = color;
    li.append(swatch, document.createTextNode(name));
    legend.append(li);
  }
  canvas.dataset.drawn = String(points.length);
}

function fillTable(id, rows) {
  const body = document.querySelector("#" + id + " tbody");
  body.textContent = "";
  for (const cells of rows) {
    const tr = document.createElement("tr");
    for (const cell of cells) { const td = document.createElement("td"); td.textContent = cell; tr.append(td); }
    body.append(tr);
  }
}

async function refresh() {
  const source = document.querySelector("main").dataset.source;
  const status = document.getElementById("status");
  try {
    const resp = await fetch(source, { cache: "no-store" });
    const data = await resp.json();
    for (const canvas of document.querySelectorAll("canvas")) draw(canvas, data.points);
    const alerts = document.getElementById("alerts");
    alerts.textContent = "";
    for (const a of data.alerts) {
      const li = document.createElement("li");
      li.className = a.firing ? "firing" : "ok";
      li.textContent = `${a.firing ? "FIRING" : "ok"} · ${a.name}: ${a.value ?? "–"} (threshold ${a.threshold} ${a.unit})`;
      alerts.append(li);
    }
    const last = data.points[data.points.length - 1] || {};
    fillTable("quality", Object.entries(last.quality || {}).map(([k, v]) => [k, String(v)]));
    const note = document.getElementById("stmts-note");
    if (typeof data.statements === "string") { note.textContent = data.statements; fillTable("stmts", []); }
    else { note.textContent = ""; fillTable("stmts", data.statements.map(s => [String(s.mean_ms), String(s.calls), s.query])); }
    status.textContent = `updated ${new Date().toLocaleTimeString()} · ${data.points.length} points`;
  } catch (err) {
    status.textContent = "cannot reach Edge: " + err;
  }
}

refresh();
setInterval(refresh, 3000);
