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
  const canvases = [];
  for (let r = 0; r < rows; r++) {
    const canvas = document.createElement("canvas");
    canvas.width = shape.width;
    canvas.height = shape.height;
    canvas.className = `tile ${extraClass}`;
    const image = canvas.getContext("2d").createImageData(shape.width, shape.height);
    const plane = shape.width * shape.height;
    const colour = shape.kind === "rgb";
    for (let p = 0; p < plane; p++) {
      for (let c = 0; c < 3; c++) {
        image.data[4 * p + c] = Math.round(255 * values[r * size + (colour ? c * plane : 0) + p]);
      }
      image.data[4 * p + 3] = 255;
    }
    canvas.getContext("2d").putImageData(image, 0, 0);
    canvases.push(canvas);
  }
  container.replaceChildren(...canvases);
  return canvases;
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
  const canvas = document.createElement("canvas");
  canvas.width = shape.width;
  canvas.height = shape.height;
  const context = canvas.getContext("2d");
  context.fillStyle = "#000";
  context.fillRect(0, 0, shape.width, shape.height);
  context.imageSmoothingQuality = "high";
  context.drawImage(source, 0, 0, shape.width, shape.height);
  const rgba = context.getImageData(0, 0, shape.width, shape.height).data;
  const channels = shape.kind === "rgb" ? 3 : 1;
  const plane = shape.width * shape.height;
  const pixels = new Uint8Array(plane * channels);
  for (let p = 0; p < plane; p++) {
    const [r, g, b] = [rgba[4 * p], rgba[4 * p + 1], rgba[4 * p + 2]];
    const values = channels === 3 ? [r, g, b] : [Math.round(0.299 * r + 0.587 * g + 0.114 * b)];
    values.forEach((v, c) => (pixels[c * plane + p] = invert ? 255 - v : v));
  }
  return pixels;
}
