// Rows as pictures, and pictures as rows: what the model's inputs and outputs look like on the
// page, and an image (a file, the drawing pad) as the model's 8-bit input.

// How a row is shown: an image (grey or colour, height × width) or a flat feature vector.
export function shapeOf(m) {
  const shape = (m && m.image_shape) || [];
  const [h, w, c] = shape;
  if (shape.length === 2) return { kind: "grey", height: h, width: w };
  if (shape.length === 3 && c === 1) return { kind: "grey", height: h, width: w };
  if (shape.length === 3 && c === 3) return { kind: "rgb", height: h, width: w };
  return { kind: "flat", height: 1, width: (m && m.input_size) || 0 };
}

// Rows of values in [0, 1] (an image's row is channels first, [C, H, W] flattened, as the wire
// carries it: vaeserve/layout.py) as images scaled up without smoothing, or, for flat-feature
// models, as one heat map of rows × features.
export function drawRows(container, values, rows, m, extraClass = "") {
  const shape = shapeOf(m);
  const size = values.length / rows;
  if (shape.kind === "flat") {
    const canvas = heatMap(values, rows, size);
    canvas.className = `heat ${extraClass}`;
    container.replaceChildren(canvas);
    return [canvas];
  }
  const channels = shape.kind === "rgb" ? 3 : 1;
  const canvases = [];
  for (let r = 0; r < rows; r++) {
    canvases.push(imageCanvas(values, r * size, channels, shape.height, shape.width, (v) => v, extraClass));
  }
  container.replaceChildren(...canvases);
  return canvases;
}

// An imported autoencoder's images: a tensor {shape: [N, C, H, W], data} of values in [−1, 1] (as
// diffusers' decoders give them), or of 8-bit pixels with ``range`` 255, one canvas each.
export function drawImages(container, tensor, extraClass = "", range = "signed") {
  const [rows, channels, height, width] = tensor.shape;
  const unit = range === "signed" ? (v) => (v + 1) / 2 : (v) => v / 255;
  const canvases = [];
  for (let r = 0; r < rows; r++) {
    canvases.push(imageCanvas(tensor.data, r * channels * height * width, channels, height, width, unit, `photo ${extraClass}`));
  }
  container.replaceChildren(...canvases);
  return canvases;
}

// One latent [C, h, w] (the first row of ``tensor``) channel by channel, each stretched over the
// latent's own range: latents have no pixel range to show them in.
export function drawChannels(container, tensor, extraClass = "") {
  const [, channels, height, width] = tensor.shape;
  const values = Array.from(tensor.data.slice(0, channels * height * width), Number);
  const low = Math.min(...values);
  const spread = Math.max(...values) - low || 1;
  const canvases = [];
  for (let c = 0; c < channels; c++) {
    const canvas = imageCanvas(values, c * height * width, 1, height, width, (v) => (v - low) / spread, extraClass);
    canvas.title = `channel ${c}`;
    canvases.push(canvas);
  }
  container.replaceChildren(...canvases);
  return canvases;
}

// Values[offset …] as one channels-first image (grey when one channel), ``unit`` mapping each to [0, 1].
function imageCanvas(values, offset, channels, height, width, unit, extraClass) {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  canvas.className = `tile ${extraClass}`;
  const context = canvas.getContext("2d");
  const image = context.createImageData(width, height);
  const plane = width * height;
  for (let p = 0; p < plane; p++) {
    for (let c = 0; c < 3; c++) {
      const v = unit(Number(values[offset + (channels === 3 ? c * plane : 0) + p]));
      image.data[4 * p + c] = Math.round(255 * Math.max(0, Math.min(1, v)));
    }
    image.data[4 * p + 3] = 255;
  }
  context.putImageData(image, 0, 0);
  return canvas;
}

function heatMap(values, rows, size) {
  const canvas = document.createElement("canvas");
  canvas.width = size;
  canvas.height = rows;
  const image = canvas.getContext("2d").createImageData(size, rows);
  for (let i = 0; i < values.length; i++) {
    const v = Math.max(0, Math.min(1, values[i]));
    // A blue → yellow ramp: readable in grey print too.
    image.data.set([Math.round(255 * v), Math.round(64 + 160 * v), Math.round(160 * (1 - v)), 255], 4 * i);
  }
  canvas.getContext("2d").putImageData(image, 0, 0);
  return canvas;
}

// An image → the model's input: drawn at the model's height × width over black, in grey (or
// colour), 8-bit, channels first, as the server's UINT8 input takes it.
export function toPixels(source, m, invert) {
  const shape = shapeOf(m);
  return pixelsAt(source, shape.width, shape.height, shape.kind === "rgb" ? 3 : 1, invert);
}

// An image → an imported autoencoder's input {pixels, shape [1, 3, H, W]}: its own size, scaled down
// to at most ``largest`` pixels a side, each side a multiple of the model's downscale factor.
export function toImage(source, downscale, largest) {
  const shrink = Math.min(1, largest / Math.max(source.width, source.height));
  const side = (n) => Math.max(downscale, Math.floor((n * shrink) / downscale) * downscale);
  const [width, height] = [side(source.width), side(source.height)];
  return { pixels: pixelsAt(source, width, height, 3, false), shape: [1, 3, height, width] };
}

function pixelsAt(source, width, height, channels, invert) {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  context.fillStyle = "#000";
  context.fillRect(0, 0, width, height);
  context.imageSmoothingQuality = "high";
  context.drawImage(source, 0, 0, width, height);
  const rgba = context.getImageData(0, 0, width, height).data;
  const plane = width * height;
  const pixels = new Uint8Array(plane * channels);
  for (let p = 0; p < plane; p++) {
    const [r, g, b] = [rgba[4 * p], rgba[4 * p + 1], rgba[4 * p + 2]];
    const values = channels === 3 ? [r, g, b] : [Math.round(0.299 * r + 0.587 * g + 0.114 * b)];
    values.forEach((v, c) => (pixels[c * plane + p] = invert ? 255 - v : v));
  }
  return pixels;
}
