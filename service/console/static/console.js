// The vaeserve console's panels: models, samples, your input, latent space, compare (live.js has
// the live view). Every call is the server's public REST API (the Open Inference Protocol's
// /v2/models/NAME-KIND/infer) or one of its two read-only console endpoints (/v2/console/models,
// /v2/console/live), through api.js. Nothing here changes the server. Strings from the server
// go into the page as text (textContent), never as markup.

import {
  api, ApiError, countTensor, infer as inferModel, latentTensor, onUnauthorized, pixelsTensor, TOKEN_KEY,
} from "./api.js";
import { LIVE_WINDOW_S, startLive } from "./live.js";
import { drawRows, shapeOf, toPixels } from "./pictures.js";

const SCORES = ["elbo", "log_px", "ood_score", "complexity_bits"];
const SCORE_NAMES = {
  elbo: "ELBO (nats)",
  log_px: "log p(x) (nats)",
  ood_score: "OOD score S(x)",
  complexity_bits: "complexity L(x) (bits)",
};
// The test set's tails beyond which an input is unusual (vaeserve.ood.outside's 0.5 %).
const TAIL = 0.5;

const state = { models: [], model: null, input: null };
const $ = (id) => document.getElementById(id);

// NAME-KIND of the chosen model.
const infer = (kind, version, inputs, parameters) => inferModel(state.model.name, kind, version, inputs, parameters);

// -- the token -----------------------------------------------------------------------------------
function askForToken(message) {
  $("token-panel").hidden = false;
  $("token-error").textContent = message || "";
  $("status").textContent = "needs a token";
}

function wireToken() {
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    start();
  });
  $("token-forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    location.reload();
  });
}

// -- models ---------------------------------------------------------------------------------------
function brief(version) {
  const model = state.model;
  const number = resolveVersion(version);
  const found = model.versions.find((v) => v.version === number);
  return found && found.manifest;
}

function resolveVersion(version) {
  const model = state.model;
  if (!version || version === "latest") return model.latest;
  if (/^\d+$/.test(version)) return Number(version);
  return model.labels[version];
}

function versionChoices(model) {
  const loaded = model.versions.filter((v) => v.state === "READY").map((v) => String(v.version));
  const labels = Object.keys(model.labels).sort();
  return [
    ["latest", `latest (${model.latest})`],
    ...labels.map((label) => [label, `${label} → ${model.labels[label]}`]),
    ...loaded.map((v) => [v, `version ${v}`]),
  ];
}

function fill(select, choices, chosen) {
  select.replaceChildren(...choices.map(([value, text]) => new Option(text, value)));
  if (chosen !== undefined && choices.some(([value]) => value === chosen)) select.value = chosen;
}

function renderModels() {
  const rows = [];
  for (const model of state.models) {
    for (const version of model.versions) {
      const m = version.manifest || {};
      const test = m.test || {};
      const labels = Object.entries(model.labels).filter(([, v]) => v === version.version).map(([l]) => l);
      if (version.version === model.latest) labels.push("latest");
      const cells = [
        model.name, version.version, version.state + (version.reason ? ` (${version.reason})` : ""),
        labels.join(", "), m.dataset, m.preset || "—", m.likelihood,
        m.image_shape ? m.image_shape.join("×") : "", m.latent_size, m.prior || "standard-normal",
        fixed(test.elbo, 2, test.elbo_stderr), fixed(test.nll, 2, test.nll_stderr),
        test.active_units !== undefined ? `${test.active_units}/${m.latent_size}` : "",
        m.parity_max_abs_diff !== undefined && m.parity_max_abs_diff !== null ? m.parity_max_abs_diff.toExponential(1) : "",
        (m.created || "").replace("T", " ").slice(0, 16), m.sha256 ? `enc ${m.sha256.encoder} dec ${m.sha256.decoder}` : version.manifest_error || "",
      ];
      const tr = document.createElement("tr");
      tr.dataset.model = model.name;
      tr.dataset.version = version.version;
      for (const cell of cells) {
        const td = document.createElement("td");
        td.textContent = cell === undefined || cell === null ? "" : String(cell);
        tr.append(td);
      }
      rows.push(tr);
    }
  }
  $("model-table").tBodies[0].replaceChildren(...rows);
  const names = state.models.map((m) => [m.name, m.name]);
  const chosen = state.model ? state.model.name : (state.models.find((m) => m.default) || state.models[0] || {}).name;
  fill($("model"), names, chosen);
  chooseModel($("model").value);
}

function fixed(value, digits, stderr) {
  if (value === undefined || value === null) return "";
  return value.toFixed(digits) + (stderr !== undefined ? ` ± ${stderr.toFixed(digits)}` : "");
}

function chooseModel(name) {
  state.model = state.models.find((m) => m.name === name) || null;
  if (!state.model) return;
  const choices = versionChoices(state.model);
  for (const select of document.querySelectorAll("select.version")) fill(select, choices, select.value || "latest");
  // B defaults to something other than A: a canary label, or the version before the latest.
  const other = choices.find(([value]) => value !== "latest" && resolveVersion(value) !== state.model.latest);
  if (other && $("compare-b").value === "latest") $("compare-b").value = other[0];
  const m = brief("latest") || {};
  const reference = m.score_reference || {};
  if (reference.iw_samples) $("input-k").value = reference.iw_samples;
  const small = shapeOf(m).kind === "grey" && shapeOf(m).height <= 64 && shapeOf(m).width <= 64;
  $("pad-box").hidden = !small;
  fillDimensions(m);
}

function fillDimensions(m) {
  const activity = m.unit_activity || [];
  const order = [...Array(m.latent_size || 0).keys()];
  if (activity.length === order.length) order.sort((a, b) => activity[b] - activity[a]);
  const choices = order.map((d) => [String(d), activity.length ? `z${d} (activity ${activity[d].toFixed(3)})` : `z${d}`]);
  fill($("latent-dim"), choices);
}

// -- samples ---------------------------------------------------------------------------------------
async function drawSamples(container, version, seed, count, show) {
  const out = await infer("sample-prior", version, [countTensor(count)], { seed });
  const values = show === "samples" ? out.samples.data.map(Number) : out.probs.data;
  drawRows(container, values, count, brief(version), "sample");
  container.dataset.seed = seed;
  return out;
}

async function onSamples(event) {
  event.preventDefault();
  const count = Number($("sample-count").value);
  await run("samples", () =>
    drawSamples($("sample-grid"), $("sample-version").value, Number($("sample-seed").value), count, $("sample-show").value),
  );
}

// -- your input --------------------------------------------------------------------------------------
async function onFile() {
  const file = $("input-file").files[0];
  if (!file) return;
  const m = brief($("input-version").value);
  if (shapeOf(m).kind === "flat") {
    note(`${state.model.name} takes ${m.input_size} flat features, not an image`);
    return;
  }
  const bitmap = await createImageBitmap(file, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  setInput(toPixels(bitmap, m, $("input-invert").checked), m);
}

function setInput(pixels, m) {
  state.input = pixels;
  drawRows($("input-image"), Array.from(pixels, (v) => v / 255), 1, m, "input");
  $("input-score").disabled = false;
}

async function onScore(event) {
  event.preventDefault();
  if (!state.input) {
    note("choose an image, or draw one, first");
    return;
  }
  await run("input", () => scoreInput(
    $("input-version").value, $("input-reconstruction"), $("input-scores"),
    Number($("input-k").value), Number($("input-seed").value),
  ));
}

async function scoreInput(version, picture, table, k, seed) {
  const x = [pixelsTensor(state.input, 1)];
  const [reconstruction, scores] = await Promise.all([
    infer("reconstruct", version, x, { use_mean: true, seed }),
    infer("score", version, x, { iw_samples: k, seed }),
  ]);
  const m = brief(version);
  drawRows(picture, reconstruction.probs.data, 1, m, "reconstruction");
  renderScores(table, scores, m, k);
}

function renderScores(table, scores, m, k) {
  const reference = (m && m.score_reference) || {};
  const rows = [["score", "value", "test-set percentile", ""]];
  for (const name of SCORES) {
    const value = scores[name].data[0];
    const percentiles = (reference.percentiles || {})[name];
    const [where, verdict] = percentiles ? place(value, percentiles) : ["", ""];
    rows.push([SCORE_NAMES[name], value, where, verdict]);
  }
  table.replaceChildren(
    ...rows.map((cells, i) => {
      const tr = document.createElement("tr");
      cells.forEach((cell, c) => {
        const td = document.createElement(i === 0 ? "th" : "td");
        td.textContent = typeof cell === "number" ? cell.toFixed(2) : cell;
        if (typeof cell === "number") {
          td.dataset.value = String(cell);
          td.dataset.score = SCORES[i - 1];
        }
        if (c === 3 && cell) td.className = cell === "typical" ? "typical" : "unusual";
        tr.append(td);
      });
      return tr;
    }),
  );
  const sameK = reference.iw_samples === undefined || reference.iw_samples === k;
  table.dataset.k = k;
  table.title = sameK ? "" : `the test set was scored with k = ${reference.iw_samples}; log p(x) shifts with k`;
}

// Where ``value`` falls among the test set's recorded percentiles (linear between them), and
// whether that is typical: within the central 99 %, as `vae score` and the OOD table judge.
function place(value, percentiles) {
  const points = Object.entries(percentiles).map(([p, v]) => [Number(p), v]).sort((a, b) => a[0] - b[0]);
  const [first, last] = [points[0], points[points.length - 1]];
  let percentile;
  if (value <= first[1]) percentile = first[0];
  else if (value >= last[1]) percentile = last[0];
  else {
    const i = points.findIndex(([, v]) => v >= value);
    const [[p0, v0], [p1, v1]] = [points[i - 1], points[i]];
    percentile = p0 + ((p1 - p0) * (value - v0)) / (v1 - v0 || 1);
  }
  const where = value < first[1] ? `below ${first[0]} %` : value > last[1] ? `above ${last[0]} %` : `${percentile.toFixed(1)} %`;
  return [where, percentile < TAIL || percentile > 100 - TAIL ? "unusual" : "typical"];
}

// -- the drawing pad ---------------------------------------------------------------------------------
function wirePad() {
  const pad = $("input-pad");
  const context = pad.getContext("2d");
  const clear = () => {
    context.fillStyle = "#000";
    context.fillRect(0, 0, pad.width, pad.height);
  };
  clear();
  let drawing = false;
  const at = (event) => {
    const box = pad.getBoundingClientRect();
    return [((event.clientX - box.left) * pad.width) / box.width, ((event.clientY - box.top) * pad.height) / box.height];
  };
  pad.addEventListener("pointerdown", (event) => {
    drawing = true;
    context.beginPath();
    context.moveTo(...at(event));
  });
  pad.addEventListener("pointermove", (event) => {
    if (!drawing) return;
    Object.assign(context, { strokeStyle: "#fff", lineWidth: pad.width / 12, lineCap: "round", lineJoin: "round" });
    context.lineTo(...at(event));
    context.stroke();
  });
  for (const end of ["pointerup", "pointerleave"]) pad.addEventListener(end, () => (drawing = false));
  $("pad-clear").addEventListener("click", clear);
  $("pad-use").addEventListener("click", () => {
    const m = brief($("input-version").value);
    setInput(toPixels(pad, m, false), m);
  });
}

// -- latent space ------------------------------------------------------------------------------------
async function latentOf(kind, seed, version) {
  if (kind === "input") {
    if (!state.input) throw new ApiError(0, "choose or draw an input first (Your input)");
    const out = await infer("encoder", version, [pixelsTensor(state.input, 1)]);
    return Float32Array.from(out.mean.data);
  }
  const out = await infer("sample-prior", version, [countTensor(1)], { seed });
  return Float32Array.from(out.latents.data);
}

async function decodeAll(latents, rows, version, container) {
  const out = await infer("decoder", version, [latentTensor(latents, rows)]);
  drawRows(container, out.probs.data, rows, brief(version), "latent");
}

async function onInterpolate(event) {
  event.preventDefault();
  await run("latent", async () => {
    const version = $("latent-version").value;
    const a = await latentOf($("latent-a").value, Number($("latent-a-seed").value), version);
    const b = await latentOf($("latent-b").value, Number($("latent-b-seed").value), version);
    const steps = Number($("latent-steps").value);
    const z = new Float32Array(steps * a.length);
    for (let s = 0; s < steps; s++) {
      const t = s / (steps - 1);
      for (let d = 0; d < a.length; d++) z[s * a.length + d] = (1 - t) * a[d] + t * b[d];
    }
    await decodeAll(z, steps, version, $("latent-strip"));
  });
}

async function onTraverse(event) {
  event.preventDefault();
  await run("latent", async () => {
    const version = $("latent-version").value;
    const base = await latentOf($("latent-a").value, Number($("latent-a-seed").value), version);
    const dim = Number($("latent-dim").value);
    const range = Number($("latent-range").value);
    const steps = 11;
    const z = new Float32Array(steps * base.length);
    for (let s = 0; s < steps; s++) {
      z.set(base, s * base.length);
      z[s * base.length + dim] = -range + (2 * range * s) / (steps - 1);
    }
    await decodeAll(z, steps, version, $("latent-traversal"));
  });
}

// -- compare -----------------------------------------------------------------------------------------
async function onCompare(event) {
  event.preventDefault();
  const seed = Number($("compare-seed").value);
  const count = Number($("compare-count").value);
  await run("compare", () =>
    Promise.all(["a", "b"].map((side) => compareSide($(`compare-${side}-side`), $(`compare-${side}`).value, seed, count))),
  );
}

async function compareSide(box, version, seed, count) {
  const title = document.createElement("h3");
  const number = resolveVersion(version);
  title.textContent = version === String(number) ? `version ${number}` : `${version} (version ${number})`;
  const grid = Object.assign(document.createElement("div"), { className: "grid samples" });
  box.replaceChildren(title, caption(`samples, seed ${seed}`), grid);
  await drawSamples(grid, version, seed, count, "probs");
  if (state.input) {
    const picture = Object.assign(document.createElement("div"), { className: "grid reconstruction" });
    const table = Object.assign(document.createElement("table"), { className: "scores" });
    box.append(caption("your input, reconstructed and scored"), picture, table);
    await scoreInput(version, picture, table, Number($("input-k").value), Number($("input-seed").value));
  }
}

function caption(text) {
  return Object.assign(document.createElement("p"), { className: "quiet", textContent: text });
}

// -- the page ----------------------------------------------------------------------------------------
function note(message) {
  $("input-note").textContent = message;
}

// Runs one panel's work, saying in the status line what failed (a 401 asks for the token).
async function run(panel, work) {
  $("status").textContent = `${panel}: working…`;
  try {
    await work();
    $("status").textContent = "ready";
  } catch (error) {
    $("status").textContent = `${panel}: ${error.message}`;
    if (!(error instanceof ApiError)) throw error;
  }
}

async function start() {
  try {
    const server = await api("/v2");
    $("server-version").textContent = `${server.version}`;
    state.models = (await api("/v2/console/models")).models;
  } catch (error) {
    if (error.status !== 401) $("status").textContent = error.message;
    return;
  }
  $("token-panel").hidden = true;
  $("console").hidden = false;
  renderModels();
  $("status").textContent = "ready";
  if (state.model && state.model.latest !== null) {
    await run("samples", () => drawSamples($("sample-grid"), "latest", 0, Number($("sample-count").value), "probs"));
    performance.mark("vaeserve:first-samples"); // what benchmarks/console.py times
  }
  startLive((message) => ($("status").textContent = message));
}

function wire() {
  onUnauthorized(askForToken);
  wireToken();
  wirePad();
  $("live-window").textContent = LIVE_WINDOW_S;
  $("model").addEventListener("change", (event) => chooseModel(event.target.value));
  $("latent-version").addEventListener("change", (event) => fillDimensions(brief(event.target.value) || {}));
  $("sample-form").addEventListener("submit", onSamples);
  $("input-file").addEventListener("change", () => run("input", onFile));
  $("input-invert").addEventListener("change", () => run("input", onFile));
  $("input-form").addEventListener("submit", onScore);
  $("latent-form").addEventListener("submit", onInterpolate);
  $("traverse-form").addEventListener("submit", onTraverse);
  $("compare-form").addEventListener("submit", onCompare);
}

wire();
start();
