// The live view: the server's cumulative counters (GET /v2/console/live, every worker's) polled
// every couple of seconds; rates and latency percentiles are differences between two answers.

import { api } from "./api.js";

const LIVE_EVERY_MS = 2000;
export const LIVE_WINDOW_S = 10;
const LIVE_KEEP_S = 300;
const state = { live: [], chart: null, polling: null };
const $ = (id) => document.getElementById(id);

// Polls until the page closes; ``onError`` hears what failed (a 401 is the token's business).
export function startLive(onError) {
  if (state.polling) return;
  const poll = () => pollLive(onError);
  state.polling = setInterval(poll, LIVE_EVERY_MS);
  poll();
}

async function pollLive(onError) {
  try {
    const snapshot = await api("/v2/console/live");
    state.live.push(snapshot);
    while (state.live.length > 2 && snapshot.time - state.live[0].time > LIVE_KEEP_S) state.live.shift();
    renderLive();
  } catch (error) {
    if (error.status !== 401) onError(`live: ${error.message}`);
  }
}

// The snapshot about LIVE_WINDOW_S before the newest (or the oldest kept).
function windowStart() {
  const newest = state.live[state.live.length - 1];
  for (let i = state.live.length - 2; i >= 0; i--) {
    if (newest.time - state.live[i].time >= LIVE_WINDOW_S) return state.live[i];
  }
  return state.live[0];
}

function renderLive() {
  const newest = state.live[state.live.length - 1];
  const before = windowStart();
  const seconds = Math.max(newest.time - before.time, 1e-9);
  const earlier = new Map(before.series.map((s) => [`${s.model}|${s.protocol}`, s]));
  const rows = newest.series.map((series) => {
    const old = earlier.get(`${series.model}|${series.protocol}`) || { calls: 0, errors: 0, latency: {} };
    const calls = series.calls - old.calls;
    const cells = [
      series.model || "(no model)", series.protocol,
      before === newest ? "" : (calls / seconds).toFixed(1),
      quantile(series.latency, old.latency, 0.5), quantile(series.latency, old.latency, 0.99),
      before === newest ? "" : ((series.errors - old.errors) / seconds).toFixed(2),
      series.calls, series.errors,
    ];
    const tr = document.createElement("tr");
    Object.assign(tr.dataset, { model: series.model, protocol: series.protocol, calls: series.calls, errors: series.errors });
    for (const cell of cells) tr.append(Object.assign(document.createElement("td"), { textContent: String(cell) }));
    return tr;
  });
  $("live-table").tBodies[0].replaceChildren(...rows);
  chartLive();
}

// The q-quantile of the calls between two cumulative latency histograms, in ms, interpolated
// within its bucket as Prometheus's histogram_quantile does.
function quantile(now, then, q) {
  const bounds = Object.keys(now).filter((b) => b !== "+Inf").map(Number).sort((a, b) => a - b);
  const count = (bound) => (now[bound] || 0) - (then[bound] || 0);
  const key = (b) => Object.keys(now).find((k) => Number(k) === b);
  const total = (now["+Inf"] || 0) - (then["+Inf"] || 0);
  if (total <= 0) return "";
  let lower = 0;
  let below = 0;
  for (const bound of bounds) {
    const upto = count(key(bound));
    if (upto >= q * total) {
      const inside = upto - below;
      const fraction = inside > 0 ? (q * total - below) / inside : 1;
      return (1000 * (lower + (bound - lower) * fraction)).toFixed(2);
    }
    [lower, below] = [bound, upto];
  }
  return `> ${(1000 * lower).toFixed(0)}`;
}

// calls/s by protocol, between consecutive snapshots.
function chartLive() {
  if (state.live.length < 2 || !window.Dygraph) return;
  const protocols = [...new Set(state.live.flatMap((s) => s.series.map((x) => x.protocol)))].sort();
  const totals = (snapshot) =>
    protocols.map((p) => snapshot.series.filter((x) => x.protocol === p).reduce((sum, x) => sum + x.calls, 0));
  const data = [];
  for (let i = 1; i < state.live.length; i++) {
    const [a, b] = [state.live[i - 1], state.live[i]];
    const [before, after] = [totals(a), totals(b)];
    data.push([new Date(b.time * 1000), ...after.map((v, j) => (v - before[j]) / (b.time - a.time))]);
  }
  const options = {
    labels: ["time", ...protocols], ylabel: "calls/s", legend: "always", includeZero: true, height: 220,
    axes: { x: { axisLabelWidth: 80 } },
  };
  if (state.chart && state.chart.numColumns() === protocols.length + 1) state.chart.updateOptions({ file: data });
  else {
    if (state.chart) state.chart.destroy();
    state.chart = new window.Dygraph($("live-chart"), data, options);
  }
}
