// The live operations dashboard: metrics.tick frames over the same socket as the
// chat, drawn as SVG line charts and tables. At most one DOM update per animation
// frame, and each update rewrites a few `d` attributes and text nodes in boxes of
// fixed size, so ticks cause no layout storms however busy the cluster is. Text
// only ever goes in through textContent; nothing here is a live region, so a
// screen reader reads the figures when asked instead of every second.
import { bindBadge } from "./badge.js";
import { RealtimeClient, State } from "./client.js";

const config = JSON.parse(document.getElementById("realtime-config").textContent);
const POINTS = 120; // two minutes at one tick a second

const scheme = location.protocol === "https:" ? "wss:" : "ws:";
const client = new RealtimeClient({ url: `${scheme}//${location.host}${config.wsPath}`, user: config.user });
bindBadge(client, document.getElementById("status"), config);

// Ring buffers of the cluster's totals, one point per tick.
const series = { connections: [], in: [], out: [], p50: [], p99: [], errors: [], limited: [] };
let latest = null;
let frameRequested = false;

function push(name, value) {
  const list = series[name];
  list.push(value);
  if (list.length > POINTS) list.shift();
}

function sum(workers, key) {
  return workers.reduce((total, w) => total + (w[key] || 0), 0);
}

function worst(workers, key) {
  const values = workers.map((w) => w[key]).filter((v) => typeof v === "number");
  return values.length ? Math.max(...values) : null;
}

client.on("ephemeral", (frame) => {
  if (frame.type !== "metrics.tick") return;
  const workers = frame.workers || [];
  const errors = {};
  for (const w of workers) for (const [code, n] of Object.entries(w.errors || {})) errors[code] = (errors[code] || 0) + n;
  const rooms = {};
  for (const w of workers) for (const [room, n] of Object.entries(w.rooms || {})) rooms[room] = (rooms[room] || 0) + n;
  // Latency across workers: the slowest worker's figure (a conservative view).
  latest = {
    t: frame.t,
    workers,
    errors,
    rooms,
    connections: sum(workers, "connections"),
    in: sum(workers, "messages_in"),
    out: sum(workers, "delivered"),
    p50: worst(workers, "p50_ms"),
    p99: worst(workers, "p99_ms"),
    errorRate: Object.values(errors).reduce((a, b) => a + b, 0),
    limited: sum(workers, "rate_limited"),
  };
  push("connections", latest.connections);
  push("in", latest.in);
  push("out", latest.out);
  push("p50", latest.p50);
  push("p99", latest.p99);
  push("errors", latest.errorRate);
  push("limited", latest.limited);
  if (!frameRequested) {
    frameRequested = true;
    requestAnimationFrame(render);
  }
});

// Subscribe on every (re)connection: the subscription lives with the socket.
client.on("state", ({ state }) => {
  if (state !== State.OPEN) return;
  const problem = document.getElementById("metrics-error");
  client.request({ type: "metrics.subscribe" }).then(() => {
    problem.hidden = true;
  }, (err) => {
    problem.textContent = `Metrics unavailable: ${err.message}`;
    problem.hidden = false;
  });
});

// -- drawing ------------------------------------------------------------------------
const fmt = (value, digits = 1) => (value === null || value === undefined ? "–" : Number(value).toFixed(digits).replace(/\.0+$/, ""));

function setText(id, text) {
  const el = document.getElementById(id);
  if (el.textContent !== text) el.textContent = text;
}

function path(values, max) {
  if (!values.length) return "";
  const step = 300 / (POINTS - 1);
  const offset = POINTS - values.length;
  let d = "";
  let pen = "M";
  values.forEach((v, i) => {
    if (v === null || v === undefined) {
      pen = "M";
      return;
    }
    const x = (offset + i) * step;
    const y = 78 - (v / max) * 74;
    d += `${pen}${x.toFixed(1)},${y.toFixed(1)}`;
    pen = "L";
  });
  return d;
}

// The y axis's top: the first of 1, 2, 4, 10 times a power of ten at or above the
// peak, so the three tick labels (top, half, 0) are round numbers.
function niceTop(peak) {
  if (!(peak > 0)) return 1;
  const magnitude = 10 ** Math.floor(Math.log10(peak));
  for (const m of [1, 2, 4, 10]) if (m * magnitude >= peak * (1 - 1e-9)) return m * magnitude;
  return 10 * magnitude;
}

function tickLabel(value) {
  if (value >= 1e6) return `${+(value / 1e6).toFixed(1)}M`;
  if (value >= 1e3) return `${+(value / 1e3).toFixed(1)}k`;
  return String(+value.toFixed(3));
}

function chart(name, ...lists) {
  const figure = document.querySelector(`.chart[data-series="${name}"]`);
  const top = niceTop(Math.max(0, ...lists.flat().filter((v) => typeof v === "number")));
  figure.querySelectorAll("path.line").forEach((el, i) => el.setAttribute("d", path(lists[i] || [], top)));
  // The tick labels sit at fixed heights (CSS) matching the grid lines at 4 and 41 of 80.
  const ticks = figure.querySelector(".y-ticks");
  const topLabel = tickLabel(top);
  if (ticks.querySelector(".top").textContent !== topLabel) {
    ticks.querySelector(".top").textContent = topLabel;
    ticks.querySelector(".mid").textContent = tickLabel(top / 2);
  }
  figure.dataset.max = String(top);
}

function rows(id, cells, empty) {
  const body = document.getElementById(id);
  if (!cells.length) {
    const td = Object.assign(document.createElement("td"), { textContent: empty });
    td.colSpan = body.closest("table").querySelectorAll("thead th").length;
    const tr = document.createElement("tr");
    tr.className = "empty";
    tr.append(td);
    body.replaceChildren(tr);
    return;
  }
  body.replaceChildren(
    ...cells.map((values) => {
      const tr = document.createElement("tr");
      for (const value of values) tr.append(Object.assign(document.createElement("td"), { textContent: value }));
      return tr;
    }),
  );
}

function uptime(seconds) {
  if (seconds < 120) return `${Math.round(seconds)} s`;
  if (seconds < 7200) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

function render() {
  frameRequested = false;
  if (!latest) return;
  setText("stat-connections", String(latest.connections));
  setText("stat-in", fmt(latest.in));
  setText("stat-out", fmt(latest.out));
  setText("stat-p50", latest.p50 === null ? "–" : `${fmt(latest.p50)} ms`);
  setText("stat-p99", latest.p99 === null ? "–" : `${fmt(latest.p99)} ms`);
  setText("stat-errors", fmt(latest.errorRate));
  setText("stat-limited", fmt(latest.limited));
  setText("updated", `updated ${new Date(latest.t * 1000).toLocaleTimeString()}`);
  chart("connections", series.connections);
  chart("traffic", series.in, series.out);
  chart("latency", series.p50, series.p99);
  chart("errors", series.errors, series.limited);
  rows(
    "workers",
    latest.workers.map((w) => [w.worker, w.draining ? "draining" : "alive", String(w.connections), fmt(w.messages_in),
      fmt(w.delivered), fmt(w.p99_ms), uptime(w.uptime)]),
    "No worker has sent its figures in the last 5 seconds.",
  );
  rows(
    "rooms",
    Object.entries(latest.rooms).sort((a, b) => b[1] - a[1]).slice(0, 10).map(([room, n]) => [`#${room}`, String(n)]),
    "No messages in the last interval.",
  );
  rows(
    "errors",
    Object.entries(latest.errors).sort((a, b) => b[1] - a[1]).map(([code, n]) => [code, String(n)]),
    "No errors in the last interval.",
  );
}

client.connect();
window.realtimeClient = client; // for debugging and the browser tests
