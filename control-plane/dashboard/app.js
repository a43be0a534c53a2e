// The Trellis dashboard: renders the control plane's snapshot (GET /api/snapshot, then
// one per second over server-sent events on /events) as plain DOM and inline SVG.
"use strict";

const SVG = "http://www.w3.org/2000/svg";

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;",
  })[c]);
}

function fixed(value, digits) {
  return value == null || !isFinite(value) ? "–" : value.toFixed(digits);
}

function ms(value) {
  if (value == null) return "–";
  if (value >= 1000) return (value / 1000).toFixed(2) + " s";
  if (value >= 10) return value.toFixed(0) + " ms";
  return value.toFixed(1) + " ms";
}

function percent(value) {
  return value == null ? "–" : value.toFixed(1) + "%";
}

// A success rate's class: ok, warn, bad, or idle without requests.
function health(rate) {
  if (rate == null) return "idle";
  if (rate >= 99) return "ok";
  if (rate >= 95) return "warn";
  return "bad";
}

const COLORS = { ok: "#1f9d55", warn: "#d98b00", bad: "#d6332f", idle: "#a9b1bd" };

function clock(unixMs) {
  const d = new Date(unixMs);
  return d.toLocaleTimeString([], { hour12: false });
}

function el(tag, attrs, parent) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

// === the service graph: a layered layout, callers left of what they call ===

// Columns of ids, callers left of callees. An edge that skips columns gets an
// invisible slot in each column it crosses (ids starting with "~"), so it is drawn
// around the boxes instead of through them. Also returns each edge's route of ids.
function layout(nodes, edges) {
  const ids = nodes.map((n) => n.id);
  const layer = new Map(ids.map((id) => [id, 0]));
  // Longest path from a caller nobody calls; at most |nodes| rounds, so a cycle ends.
  for (let round = 0; round < ids.length; round++) {
    let moved = false;
    for (const e of edges) {
      if (e.from === e.to || !layer.has(e.from) || !layer.has(e.to)) continue;
      const want = layer.get(e.from) + 1;
      if (layer.get(e.to) < want && want < ids.length) {
        layer.set(e.to, want);
        moved = true;
      }
    }
    if (!moved) break;
  }
  const links = [];
  const routes = new Map();
  edges.forEach((e, i) => {
    if (!layer.has(e.from) || !layer.has(e.to)) return;
    const route = [e.from];
    for (let c = layer.get(e.from) + 1; c < layer.get(e.to); c++) {
      const slot = `~${i}~${c}`;
      layer.set(slot, c);
      route.push(slot);
    }
    route.push(e.to);
    for (let k = 1; k < route.length; k++) links.push([route[k - 1], route[k]]);
    routes.set(e, route);
  });
  const columns = [];
  for (const [id, l] of layer) (columns[l] = columns[l] || []).push(id);
  const filled = columns.filter(Boolean);
  // Order each column by where its callers sit, so fewer edges cross.
  const row = new Map();
  filled.forEach((column, c) => {
    if (c > 0) {
      const weight = (id) => {
        const from = links.filter(([a, b]) => b === id && row.has(a)).map(([a]) => row.get(a));
        return from.length ? from.reduce((x, y) => x + y, 0) / from.length : 1e9;
      };
      const weights = new Map(column.map((id) => [id, weight(id)]));
      column.sort((a, b) => weights.get(a) - weights.get(b) || a.localeCompare(b));
    }
    column.forEach((id, r) => row.set(id, r / Math.max(1, column.length - 1)));
  });
  return { columns: filled, routes };
}

// An SVG path through `points` left to right, leaving and entering each horizontally.
function smooth(points) {
  let d = `M ${points[0][0]} ${points[0][1]}`;
  for (let k = 1; k < points.length; k++) {
    const [x0, y0] = points[k - 1], [x1, y1] = points[k];
    const mid = (x0 + x1) / 2;
    d += ` C ${mid} ${y0}, ${mid} ${y1}, ${x1} ${y1}`;
  }
  return d;
}

function renderGraph(snapshot) {
  const box = document.getElementById("graph");
  const nodes = snapshot.nodes;
  if (!nodes.length) {
    box.innerHTML = '<p class="empty">No services yet: no sidecar has registered or reported.</p>';
    return;
  }
  const metrics = new Map(snapshot.services.map((s) => [s.id, s]));
  const { columns, routes } = layout(nodes, snapshot.edges);
  const nodeW = 150, nodeH = 44, colGap = 310, rowGap = 66, pad = 16;
  const tallest = Math.max(...columns.map((c) => c.length));
  const width = pad * 2 + nodeW + (columns.length - 1) * colGap;
  const height = pad * 2 + nodeH + (tallest - 1) * rowGap + 24;
  const pos = new Map();
  columns.forEach((column, c) => {
    const offset = ((tallest - column.length) * rowGap) / 2;
    column.forEach((id, r) => pos.set(id, { x: pad + c * colGap, y: pad + 24 + offset + r * rowGap }));
  });

  const svg = el("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "service graph" });
  // Never drawn larger than life: text keeps its size on a wide screen.
  svg.style.maxWidth = `${width}px`;
  const defs = el("defs", {}, svg);
  for (const [name, color] of Object.entries(COLORS)) {
    const marker = el("marker", {
      id: `arrow-${name}`, viewBox: "0 0 10 10", refX: 9, refY: 5,
      markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse",
    }, defs);
    el("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: color }, marker);
  }
  const edgeLayer = el("g", { class: "edges" }, svg);
  const labelLayer = el("g", { class: "labels" }, svg);
  for (const e of snapshot.edges) {
    const route = routes.get(e);
    if (!route) continue;
    const kind = e.requests > 0 ? health(e.successRate) : "idle";
    const g = el("g", {
      class: `edge ${kind}`, "data-from": e.from, "data-to": e.to,
      "data-rps": fixed(e.rps, 2), "data-success": fixed(e.successRate, 2),
    }, edgeLayer);
    const title = el("title", {}, g);
    title.textContent = `${e.from} → ${e.to}: ${fixed(e.rps, 1)} req/s, ${percent(e.successRate)} success, p99 ${ms(e.p99Ms)}`;
    const a = pos.get(e.from), b = pos.get(e.to);
    let d, lx, ly;
    if (b.x > a.x) {
      const points = [[a.x + nodeW, a.y + nodeH / 2]];
      for (const slot of route.slice(1, -1)) {
        const p = pos.get(slot);
        points.push([p.x, p.y + nodeH / 2], [p.x + nodeW, p.y + nodeH / 2]);
      }
      points.push([b.x - 2, b.y + nodeH / 2]);
      d = smooth(points);
      // Mid-way along the last stretch, between the two columns' boxes.
      const [x0, y0] = points[points.length - 2], [x1, y1] = points[points.length - 1];
      lx = (x0 + x1) / 2;
      ly = (y0 + y1) / 2 - 5;
    } else {
      // A call back to the same or an earlier column loops above the boxes.
      const top = Math.min(a.y, b.y) - 22;
      d = `M ${a.x + nodeW / 2} ${a.y} C ${a.x + nodeW / 2} ${top}, ${b.x + nodeW / 2} ${top}, ${b.x + nodeW / 2} ${b.y - 2}`;
      lx = (a.x + b.x + nodeW) / 2;
      ly = top + 2;
    }
    el("path", { d, stroke: COLORS[kind], "marker-end": `url(#arrow-${kind})` }, g);
    const label = el("text", { x: lx.toFixed(1), y: ly.toFixed(1), "text-anchor": "middle" }, labelLayer);
    label.setAttribute("class", "edge-label");
    label.textContent = `${fixed(e.rps, 1)} rps · ${ms(e.p99Ms)}`;
  }
  const nodeLayer = el("g", { class: "nodes" }, svg);
  for (const n of nodes) {
    const p = pos.get(n.id);
    const m = metrics.get(n.id);
    const unhealthy = n.instances > 0 && n.healthyInstances < n.instances;
    const g = el("g", {
      class: "node" + (unhealthy ? " unhealthy" : ""),
      transform: `translate(${p.x},${p.y})`,
      "data-service": n.service, "data-namespace": n.namespace,
      "data-rps": m ? fixed(m.rps, 2) : "0",
    }, nodeLayer);
    const title = el("title", {}, g);
    title.textContent = `${n.id}: ${n.healthyInstances}/${n.instances} instances healthy`;
    el("rect", { class: "box", width: nodeW, height: nodeH, rx: 7, ry: 7 }, g);
    const stripe = m ? health(m.successRate) : "idle";
    el("rect", { x: 1, y: 1, width: 5, height: nodeH - 2, rx: 2, fill: COLORS[stripe] }, g);
    const name = el("text", { x: 14, y: 18, class: "name" }, g);
    name.textContent = n.service;
    const sub = el("text", { x: 14, y: 35, class: "sub" }, g);
    sub.textContent = m
      ? `${fixed(m.rps, 1)} rps · ${percent(m.successRate)}`
      : n.instances ? `${n.instances} instance${n.instances > 1 ? "s" : ""}` : "caller";
  }
  box.replaceChildren(svg);
}

// === tables ===

function renderServices(snapshot) {
  const body = document.querySelector("#services tbody");
  const nodes = new Map(snapshot.nodes.map((n) => [n.id, n]));
  const several = new Set(snapshot.services.map((s) => s.namespace)).size > 1;
  const rows = snapshot.services.map((s) => {
    const n = nodes.get(s.id);
    const instances = n ? `${n.healthyInstances}/${n.instances}` : "–";
    return `<tr data-service="${esc(s.service)}" data-requests="${s.requests}">
      <td>${esc(s.service)}${several ? ` <small>${esc(s.namespace)}</small>` : ""}</td>
      <td class="rps">${fixed(s.rps, 1)}</td>
      <td class="${health(s.successRate)}">${percent(s.successRate)}</td>
      <td>${ms(s.p50Ms)}</td><td>${ms(s.p99Ms)}</td><td>${instances}</td></tr>`;
  });
  body.innerHTML = rows.length ? rows.join("") : '<tr><td colspan="6" class="empty">No requests in the last 10 s.</td></tr>';
}

function renderEndpoints(snapshot) {
  const b = snapshot.breakers;
  const note = document.getElementById("breaker-note");
  note.textContent = b.readUnixMs == null
    ? "sidecars not read yet"
    : `${b.answered}/${b.proxies} sidecars read at ${clock(b.readUnixMs)} · ${fixed(b.ejectionsTotal, 0)} ejections so far`;
  const rows = snapshot.endpoints.map((e) => {
    const breaker = e.ejectedBy.length
      ? `<span class="pill bad" title="${esc(e.ejectedBy.join(", "))}">ejected by ${e.ejectedBy.length}</span>`
      : '<span class="pill ok">closed</span>';
    return `<tr data-endpoint="${esc(e.address)}"><td>${esc(e.service)}</td><td>${esc(e.version ?? "")}</td>
      <td>${esc(e.address)}</td>
      <td>${e.healthy ? '<span class="pill ok">healthy</span>' : '<span class="pill bad">unhealthy</span>'}</td>
      <td>${breaker}</td></tr>`;
  });
  document.querySelector("#endpoints tbody").innerHTML = rows.length
    ? rows.join("") : '<tr><td colspan="5" class="empty">No endpoints registered.</td></tr>';
}

function renderBulkheads(snapshot) {
  const rows = snapshot.breakers.bulkheads.map((p) => {
    const sat = p.saturation == null ? "–"
      : `${bar([[Math.min(100, p.saturation), "fill-accent"]], 100, "sat")}${fixed(p.saturation, 0)}%`;
    const limit = p.maxConcurrent == null ? "" : ` / ${p.maxConcurrent}`;
    return `<tr><td>${esc(p.caller.split("/").pop())} → ${esc(p.service)} / ${esc(p.pool)}</td>
      <td>${fixed(p.inFlight, 0)}${limit}</td><td>${fixed(p.queued, 0)}</td>
      <td class="${p.rejectedTotal > 0 ? "bad" : ""}">${fixed(p.rejectedTotal, 0)}</td><td>${sat}</td></tr>`;
  });
  document.querySelector("#bulkheads tbody").innerHTML = rows.length
    ? rows.join("") : '<tr><td colspan="5" class="empty">No bulkhead pools reported by the sidecars.</td></tr>';
}

// === canaries ===

function canaryChart(c) {
  const w = 520, h = 150, left = 34, right = 8, top = 8, bottom = 20;
  const svg = el("svg", { viewBox: `0 0 ${w} ${h}`, role: "img", "aria-label": `canary ${c.name} over time` });
  const series = c.series;
  const y = (v) => top + (h - top - bottom) * (1 - v / 100);
  for (const v of [0, 50, 100]) {
    el("line", { x1: left, x2: w - right, y1: y(v), y2: y(v), stroke: "#e6e9ef" }, svg);
    const t = el("text", { x: left - 4, y: y(v) + 4, "text-anchor": "end", "font-size": 10, fill: "#6b7485" }, svg);
    t.textContent = `${v}%`;
  }
  if (series.length < 2) return svg;
  const t0 = series[0].unixMs, t1 = series[series.length - 1].unixMs;
  const x = (t) => left + (w - left - right) * ((t - t0) / Math.max(1, t1 - t0));
  // Weight as a step line over a light area.
  let d = `M ${x(t0)} ${y(series[0].weight)}`;
  for (let i = 1; i < series.length; i++) {
    d += ` H ${x(series[i].unixMs)} V ${y(series[i].weight)}`;
  }
  el("path", { d: `${d} V ${y(0)} H ${x(t0)} Z`, fill: "rgba(47,111,222,0.12)", stroke: "none" }, svg);
  el("path", { d, fill: "none", stroke: "#2f6fde", "stroke-width": 2 }, svg);
  const line = (field, color, dash) => {
    let path = "";
    for (const p of series) {
      if (p[field] == null) continue;
      path += `${path ? " L" : "M"} ${x(p.unixMs).toFixed(1)} ${y(p[field]).toFixed(1)}`;
    }
    if (path) el("path", { d: path, fill: "none", stroke: color, "stroke-width": 1.6, "stroke-dasharray": dash }, svg);
  };
  line("stableSuccessRate", "#8c96a8", "4 3");
  line("canarySuccessRate", "#1f9d55", "");
  const span = el("text", { x: w - right, y: h - 5, "text-anchor": "end", "font-size": 10, fill: "#6b7485" }, svg);
  span.textContent = `${clock(t0)} – ${clock(t1)}`;
  const legend = el("text", { x: left, y: h - 5, "font-size": 10, fill: "#6b7485" }, svg);
  legend.innerHTML = '<tspan fill="#2f6fde">■ weight</tspan>  <tspan fill="#1f9d55">■ canary success</tspan>  <tspan fill="#8c96a8">■ stable success</tspan>';
  return svg;
}

function renderCanaries(snapshot) {
  const box = document.getElementById("canaries");
  if (!snapshot.canaries.length) {
    box.innerHTML = '<p class="empty">No Canary resources.</p>';
    return;
  }
  box.replaceChildren(...snapshot.canaries.map((c) => {
    const div = document.createElement("div");
    div.className = "canary";
    div.dataset.canary = c.name;
    div.dataset.weight = c.weight;
    if (c.lastAnalysis) div.dataset.analysed = "true";
    const phaseClass = { Promoted: "ok", RolledBack: "bad", Paused: "warn" }[c.phase] || "";
    const a = c.lastAnalysis;
    const analysis = a
      ? `last analysis at ${esc(a.weight)}%: <b>${esc(a.verdict)}</b> — canary ${percent(a.canary.successRate)}, p99 ${ms(a.canary.p99Ms)} over ${a.canary.requests}; stable ${percent(a.stable.successRate)} over ${a.stable.requests}`
      : "no analysis yet";
    div.innerHTML = `<div class="head"><b>${esc(c.service)}</b>
      <span>${esc(c.stableSubset)} → ${esc(c.canarySubset)}</span>
      <span class="pill ${phaseClass}">${esc(c.phase)} ${c.weight}%</span>
      <span class="msg">steps ${c.steps.map(esc).join(" → ")}</span></div>
      <div class="msg">${analysis}</div><div class="chart"></div><ul class="events"></ul>`;
    div.querySelector(".chart").appendChild(canaryChart(c));
    div.querySelector(".events").innerHTML = c.events.slice(-6).reverse().map((e) =>
      `<li><time>${esc(new Date(e.at).toLocaleTimeString([], { hour12: false }))}</time>${esc(e.phase)} ${e.weight}% — ${esc(e.message)}</li>`).join("");
    return div;
  }));
}

// === shadows ===

// A horizontal stacked bar of [value, class] parts out of `total`, as SVG markup: the
// page's Content-Security-Policy allows no inline styles, and SVG widths are attributes.
function bar(parts, total, cls) {
  let x = 0;
  const rects = parts.map(([value, fill]) => {
    const w = total > 0 ? (100 * value) / total : 0;
    const rect = w > 0 ? `<rect class="${fill}" x="${x.toFixed(2)}" y="0" width="${w.toFixed(2)}" height="10"></rect>` : "";
    x += w;
    return rect;
  }).join("");
  return `<svg class="${cls}" viewBox="0 0 100 10" preserveAspectRatio="none" aria-hidden="true"><rect class="track" x="0" y="0" width="100" height="10"></rect>${rects}</svg>`;
}

function renderShadows(snapshot) {
  const box = document.getElementById("shadows");
  if (!snapshot.shadows.length) {
    box.innerHTML = '<p class="empty">No route mirrors have reported.</p>';
    return;
  }
  box.innerHTML = snapshot.shadows.map((s) => {
    const total = Math.max(1, s.matched + s.statusMismatches + s.bodyMismatches + s.shadowErrors + s.dropped);
    const recent = s.recent.slice(0, 6).map((m) =>
      `<tr><td>${clock(m.unixMs)}</td><td>${esc(m.method)} ${esc(m.path)}</td>
        <td>${m.primaryStatus} → ${m.shadowStatus}${m.primaryStatus === m.shadowStatus ? " (body)" : ""}</td></tr>`).join("");
    return `<div class="shadow" data-shadow="${esc(s.service)}/${esc(s.shadow)}" data-mirrored="${s.mirrored}">
      <b>${esc(s.service)}</b> route ${esc(s.route)} → shadow <b>${esc(s.shadow)}</b>
      ${bar([[s.matched, "fill-ok"], [s.statusMismatches, "fill-bad"], [s.bodyMismatches, "fill-warn"], [s.shadowErrors, "fill-errors"], [s.dropped, "fill-idle"]], total, "bar")}
      <div class="counts"><span>mirrored <b>${s.mirrored}</b></span><span class="ok">match <b>${s.matched}</b></span>
        <span class="bad">status differs <b>${s.statusMismatches}</b></span><span class="warn">body differs <b>${s.bodyMismatches}</b></span>
        <span>errors <b>${s.shadowErrors}</b></span><span>dropped <b>${s.dropped}</b></span><span>too large <b>${s.tooLarge}</b></span></div>
      ${recent ? `<table class="mismatches"><thead><tr><th>Recent mismatch</th><th>Request</th><th>Status primary → shadow</th></tr></thead><tbody>${recent}</tbody></table>` : ""}
    </div>`;
  }).join("");
}

// === wiring ===

function render(snapshot) {
  renderGraph(snapshot);
  renderServices(snapshot);
  renderCanaries(snapshot);
  renderShadows(snapshot);
  renderEndpoints(snapshot);
  renderBulkheads(snapshot);
  const generated = document.getElementById("generated");
  generated.textContent = `Snapshot of ${clock(snapshot.generatedUnixMs)}.`;
  generated.dataset.unixMs = snapshot.generatedUnixMs;
  document.body.dataset.loaded = "true";
}

function setStatus(state, text) {
  const status = document.getElementById("status");
  status.dataset.state = state;
  document.getElementById("status-text").textContent = text;
}

function receive(text) {
  try {
    const snapshot = JSON.parse(text);
    render(snapshot);
    setStatus("live", `live · ${clock(snapshot.generatedUnixMs)}`);
  } catch (error) {
    setStatus("down", `unreadable snapshot: ${error.message}`);
  }
}

function poll() {
  return fetch("/api/snapshot", { cache: "no-store" })
    .then((response) => (response.ok ? response.text() : null))
    .then((text) => { if (text) receive(text); })
    .catch(() => setStatus("down", "the control plane does not answer"));
}

function follow() {
  const events = new EventSource("/events");
  events.onmessage = (event) => receive(event.data);
  events.onerror = () => {
    setStatus("down", "disconnected; reconnecting…");
    // The browser retries a dropped stream itself, but gives up on an answer that is
    // not a stream (e.g. 503 when too many pages follow): poll, then follow anew.
    if (events.readyState === EventSource.CLOSED) {
      setTimeout(() => poll().finally(follow), 5000);
    }
  };
}

poll().finally(follow);
