// The vaeserve console's panels: models, samples, your input, latent space, compare (live.js has
// the live view). Every call is the server's public REST API (the Open Inference Protocol's
// /v2/models/NAME-KIND/infer) or one of its two read-only console endpoints (/v2/console/models,
// /v2/console/live), through api.js. Nothing here changes the server. Strings from the server
// go into the page as text (textContent), never as markup.

import {
  api, ApiError, countTensor, infer as inferModel, latentTensor, onUnauthorized, pixelsTensor, TOKEN_KEY,
} from "./api.js";
import { LIVE_WINDOW_S, startLive } from "./live.js";
import { drawChannels, drawImages, drawRows, shapeOf, toImage, toPixels } from "./pictures.js";

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

// An imported autoencoder (`vae import --diffusers`): images of any size in and out, latents
// [C, H/f, W/f], no likelihood to score. Its panels show images, latents and PSNR instead.
const isAutoencoder = (m) => Boolean(m && m.autoencoder);
// Uploads are scaled down to this many pixels a side: a 512² decode takes seconds on a CPU.
const LARGEST_SIDE = 512;

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
      labels.push(...routing(model.traffic, version.version));
      const cells = [
        model.name, version.version, version.state + (version.reason ? ` (${version.reason})` : ""),
        labels.join(", "), ...describe(m),
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

// What a traffic split (vae traffic) gives a version: its share of the calls that name no
// version, or the shadow's mirrored copies.
function routing(traffic, version) {
  if (!traffic) return [];
  const found = traffic.shares.filter((s) => s.version === version).map((s) => `${Math.round(100 * s.share)} % of unversioned calls`);
  if (traffic.shadow && traffic.shadow.version === version) found.push("shadow (mirrored calls)");
  return found;
}

// The data, preset, likelihood, input, latents and prior columns of a version.
function describe(m) {
  if (isAutoencoder(m)) {
    const a = m.autoencoder;
    const f = a.downscale;
    return [
      `imported ${a.diffusers_class}`, "—", a.stochastic ? "— (q(z|x) Gaussian)" : "— (deterministic)",
      `3×H×W (multiples of ${f})`, `${a.latent_channels}×H/${f}×W/${f}`, "N(0, I)",
    ];
  }
  return [
    m.dataset, m.preset || "—", m.likelihood, m.image_shape ? m.image_shape.join("×") : "", m.latent_size,
    m.prior || "standard-normal",
  ];
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
  const autoencoder = isAutoencoder(m);
  for (const element of document.querySelectorAll(".vae-only")) element.hidden = autoencoder;
  for (const element of document.querySelectorAll(".autoencoder-only")) element.hidden = !autoencoder;
  $("input-score").textContent = autoencoder ? "Reconstruct" : "Reconstruct and score";
  if (autoencoder) {
    // A tile's latents, at most 32 a side (256 pixels at f = 8), four of them: seconds on a CPU.
    $("sample-size").value = Math.min(32, m.autoencoder.latent_tile);
    $("sample-count").value = Math.min(Number($("sample-count").value), 4);
  }
  if (state.input && state.input.family !== (autoencoder ? "autoencoder" : "vae")) clearInput();
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
  if (isAutoencoder(brief(version))) {
    const side = Number($("sample-size").value);
    const out = await infer("sample-prior", version, [countTensor(count)], { seed, height: side, width: side });
    drawImages(container, out.images, "sample");
    container.dataset.seed = seed;
    return out;
  }
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
  if (isAutoencoder(m)) {
    const bitmap = await createImageBitmap(file, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
    setInput(toImage(bitmap, m.autoencoder.downscale, LARGEST_SIDE), m);
    return;
  }
  if (shapeOf(m).kind === "flat") {
    note(`${state.model.name} takes ${m.input_size} flat features, not an image`);
    return;
  }
  const bitmap = await createImageBitmap(file, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const pixels = toPixels(bitmap, m, $("input-invert").checked);
  setInput({ pixels, shape: [1, pixels.length] }, m);
}

// The input as the model takes it: {pixels (8-bit, channels first), shape} and the family it is for.
function setInput(input, m) {
  state.input = Object.assign(input, { family: isAutoencoder(m) ? "autoencoder" : "vae" });
  if (isAutoencoder(m)) {
    drawImages($("input-image"), { shape: input.shape, data: input.pixels }, "input", "bytes");
    note(`${input.shape[3]}×${input.shape[2]} pixels, as sent`);
  } else {
    drawRows($("input-image"), Array.from(input.pixels, (v) => v / 255), 1, m, "input");
  }
  $("input-score").disabled = false;
}

// Another family's input means nothing to this model: it is dropped, not sent.
function clearInput() {
  state.input = null;
  for (const id of ["input-image", "input-reconstruction", "input-latents", "input-scores"]) $(id).replaceChildren();
  note("");
}

async function onScore(event) {
  event.preventDefault();
  if (!state.input) {
    note("choose an image, or draw one, first");
    return;
  }
  await run("input", () => scoreInput(
    $("input-version").value, $("input-reconstruction"), $("input-scores"),
    Number($("input-k").value), Number($("input-seed").value), $("input-latents"),
  ));
}

async function scoreInput(version, picture, table, k, seed, latents) {
  const x = [pixelsTensor(state.input)];
  if (isAutoencoder(brief(version))) return reconstructImage(version, x, picture, table, latents);
  const [reconstruction, scores] = await Promise.all([
    infer("reconstruct", version, x, { use_mean: true, seed }),
    infer("score", version, x, { iw_samples: k, seed }),
  ]);
  const m = brief(version);
  drawRows(picture, reconstruction.probs.data, 1, m, "reconstruction");
  renderScores(table, scores, m, k);
}

// An imported autoencoder's Reconstruct (Encode's mean, then Decode): the image, the latent's
// channels, and how close it came (PSNR over 8-bit pixels, as `vae client` reports it).
async function reconstructImage(version, x, picture, table, latents) {
  const started = performance.now();
  const out = await infer("reconstruct", version, x, { use_mean: true });
  const seconds = (performance.now() - started) / 1000;
  drawImages(picture, out.images, "reconstruction");
  if (latents) drawChannels(latents, out.latents, "latent-channel");
  const original = state.input.pixels;
  let squared = 0;
  for (let i = 0; i < original.length; i++) {
    const rebuilt = Math.max(0, Math.min(1, (Number(out.images.data[i]) + 1) / 2));
    squared += (rebuilt - original[i] / 255) ** 2;
  }
  const psnr = 10 * Math.log10(1 / Math.max(squared / original.length, 1e-12));
  const rows = [
    ["reconstruction PSNR (dB)", psnr.toFixed(2)],
    ["latents", out.latents.shape.slice(1).join("×")],
    ["Reconstruct (s)", seconds.toFixed(2)],
  ];
  table.replaceChildren(
    ...rows.map(([name, value]) => {
      const tr = document.createElement("tr");
      const [th, td] = [document.createElement("th"), document.createElement("td")];
      th.textContent = name;
      td.textContent = value;
      td.dataset.name = name;
      tr.append(th, td);
      return tr;
    }),
  );
  table.dataset.psnr = String(psnr);
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
    const pixels = toPixels(pad, m, false);
    setInput({ pixels, shape: [1, pixels.length] }, m);
  });
}

// -- latent space ------------------------------------------------------------------------------------
// One latent, {data, shape [1, …]}: your input's posterior mean or a seeded prior draw. An imported
// autoencoder's prior draw takes your input's latent size, so that the two can be mixed.
async function latentOf(kind, seed, version) {
  const autoencoder = isAutoencoder(brief(version));
  if (kind === "input") {
    if (!state.input) throw new ApiError(0, "choose or draw an input first (Your input)");
    const out = await infer("encoder", version, [pixelsTensor(state.input)]);
    return { data: Float32Array.from(out.mean.data), shape: out.mean.shape };
  }
  let parameters = { seed };
  if (autoencoder) {
    const f = brief(version).autoencoder.downscale;
    const [height, width] = state.input ? state.input.shape.slice(2).map((n) => n / f) : Array(2).fill(Number($("sample-size").value));
    parameters = { seed, height, width };
  }
  const out = await infer("sample-prior", version, [countTensor(1)], parameters);
  return { data: Float32Array.from(out.latents.data), shape: out.latents.shape };
}

async function decodeAll(latents, shape, version, container) {
  const out = await infer("decoder", version, [latentTensor(latents, shape)]);
  if (isAutoencoder(brief(version))) drawImages(container, out.images, "latent");
  else drawRows(container, out.probs.data, shape[0], brief(version), "latent");
}

async function onInterpolate(event) {
  event.preventDefault();
  await run("latent", async () => {
    const version = $("latent-version").value;
    const a = await latentOf($("latent-a").value, Number($("latent-a-seed").value), version);
    const b = await latentOf($("latent-b").value, Number($("latent-b-seed").value), version);
    const steps = Number($("latent-steps").value);
    const size = a.data.length;
    const z = new Float32Array(steps * size);
    for (let s = 0; s < steps; s++) {
      const t = s / (steps - 1);
      for (let d = 0; d < size; d++) z[s * size + d] = (1 - t) * a.data[d] + t * b.data[d];
    }
    await decodeAll(z, [steps, ...a.shape.slice(1)], version, $("latent-strip"));
  });
}

async function onTraverse(event) {
  event.preventDefault();
  await run("latent", async () => {
    const version = $("latent-version").value;
    const base = (await latentOf($("latent-a").value, Number($("latent-a-seed").value), version)).data;
    const dim = Number($("latent-dim").value);
    const range = Number($("latent-range").value);
    const steps = 11;
    const z = new Float32Array(steps * base.length);
    for (let s = 0; s < steps; s++) {
      z.set(base, s * base.length);
      z[s * base.length + dim] = -range + (2 * range * s) / (steps - 1);
    }
    await decodeAll(z, [steps, base.length], version, $("latent-traversal"));
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
    box.append(caption(isAutoencoder(brief(version)) ? "your input, reconstructed" : "your input, reconstructed and scored"), picture, table);
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
