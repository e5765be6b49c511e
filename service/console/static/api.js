// Calling the server: the clients' bearer token from this tab's session storage on every call,
// OIP's REST inference, and the tensors the console sends. A 401 is handed to whoever asked.

export const TOKEN_KEY = "vaeserve-token";
let unauthorized = () => {};

// What to do when the server answers 401 (the console asks for the token).
export function onUnauthorized(handler) {
  unauthorized = handler;
}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export async function api(path, init = {}) {
  const headers = Object.assign({}, init.headers || {});
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(path, Object.assign({}, init, { headers }));
  const text = await response.text();
  let body;
  try {
    body = JSON.parse(text);
  } catch {
    body = { error: text };
  }
  if (response.status === 401) {
    unauthorized(token ? "That token was refused: " + body.error : body.error);
    throw new ApiError(401, body.error);
  }
  if (!response.ok) throw new ApiError(response.status, body.error || response.statusText);
  return body;
}

function modelPath(model, kind, version) {
  const name = encodeURIComponent(`${model}-${kind}`);
  const which = version && version !== "latest" ? `/versions/${encodeURIComponent(version)}` : "";
  return `/v2/models/${name}${which}/infer`;
}

// Runs MODEL-KIND (a version, label or "latest") on OIP tensors; {output name: {shape, data}}.
export async function infer(model, kind, version, inputs, parameters = {}) {
  const body = JSON.stringify({ inputs, parameters });
  const answer = await api(modelPath(model, kind, version), {
    method: "POST",
    body,
    headers: { "Content-Type": "application/json" },
  });
  const outputs = {};
  for (const output of answer.outputs) outputs[output.name] = output;
  return outputs;
}

// Tensors carry their shapes: [1, D] rows for a VAE, [1, 3, H, W] images and [N, C, h, w] latents
// for an imported autoencoder.
export const pixelsTensor = (input) => ({
  name: "x", datatype: "UINT8", shape: input.shape, data: Array.from(input.pixels),
});
export const latentTensor = (latents, shape) => ({
  name: "z", datatype: "FP32", shape, data: Array.from(latents),
});
export const countTensor = (count) => ({ name: "count", datatype: "INT64", shape: [1], data: [count] });
