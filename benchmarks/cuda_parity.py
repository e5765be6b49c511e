"""The CUDA path on a machine with a GPU: `vae serve --device cuda`, called over vae.v1, OIP gRPC and
OIP REST, against in-process CPU onnxruntime on the same graphs; then batch-1,024 Encode rows/s
from one client, a CUDA server beside a CPU one.

    python -m benchmarks.cuda_parity --repo models --name mnist --data-dir ../shared/data/mnist

Needs onnxruntime-gpu (CI has no GPU; the suite's CUDA test skips there). Prints the largest
difference from the CPU per protocol and whether OIP's seeded sample-prior equals vae.v1's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from benchmarks.service_throughput import free_port
from vaeserve.client import VaeClient
from vaeserve.datasets import load_dataset, model_inputs
from vaeserve.repository import resolve
from vaeserve.runtime import OnnxPair


@contextlib.contextmanager
def serving(repo: Path, device: str) -> Iterator[tuple[str, str]]:
    port, http = free_port(), free_port()
    command = [sys.executable, "-m", "vaeserve.cli", "serve", "--repo", str(repo), "--device", device]
    command += ["--host", "127.0.0.1", "--port", str(port), "--http-port", str(http), "--metrics-port", "0"]
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            with VaeClient(f"127.0.0.1:{port}", timeout=60) as client:
                if not client.wait_until_serving(180):
                    log.seek(0)
                    raise RuntimeError(f"vae serve --device {device} did not start:\n{log.read()}")
            yield f"127.0.0.1:{port}", f"127.0.0.1:{http}"
        finally:
            process.terminate()
            process.wait(60)


def oip_grpc(target: str, model: str, name: str, array: np.ndarray, seed: int | None = None):
    """Raw outputs of one ModelInfer (our stubs: this script never imports tritonclient)."""
    import grpc

    from vaeserve._proto import grpc_predict_v2_pb2 as pb
    from vaeserve._proto import grpc_predict_v2_pb2_grpc as pb_grpc

    datatype = {np.dtype("float32"): "FP32", np.dtype("uint8"): "UINT8", np.dtype("int64"): "INT64"}[
        array.dtype
    ]
    request = pb.ModelInferRequest(model_name=model, raw_input_contents=[array.tobytes()])
    request.inputs.add(name=name, datatype=datatype, shape=array.shape)
    if seed is not None:
        request.parameters["seed"].int64_param = seed
    with grpc.insecure_channel(target, [("grpc.max_receive_message_length", 1 << 27)]) as channel:
        return pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60).raw_output_contents


def oip_rest_mean(http: str, model: str, pixels: np.ndarray) -> np.ndarray:
    tensor = {"name": "x", "datatype": "UINT8", "shape": list(pixels.shape)}
    tensor["parameters"] = {"binary_data_size": pixels.nbytes}
    header = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}}).encode()
    request = urllib.request.Request(
        f"http://{http}/v2/models/{model}/infer",
        header + pixels.tobytes(),
        {"Inference-Header-Content-Length": str(len(header))},
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        body, length = answer.read(), int(answer.headers["Inference-Header-Content-Length"])
    size = json.loads(body[:length])["outputs"][0]["parameters"]["binary_data_size"]
    return np.frombuffer(body[length : length + size], np.float32).reshape(len(pixels), -1)


def parity(repo: Path, name: str, pixels: np.ndarray, binarization: str) -> None:
    x = model_inputs(pixels, binarization)
    mean, _ = OnnxPair.load(resolve(repo, name), device="cpu").encode(x)
    with serving(repo, "cuda") as (target, http), VaeClient(target, timeout=60) as client:
        print("provider:", client.model_info(name)[0]["execution_provider"])
        largest = abs(client.encode(pixels)["mean"] - mean).max()
        print(f"vae.v1 Encode, largest |CUDA - CPU| of the means: {largest:.2e}")
        raw = oip_grpc(target, f"{name}-encoder", "x", x)[0]
        oip_mean = np.frombuffer(raw, np.float32).reshape(len(x), -1)
        print(f"OIP gRPC: {abs(oip_mean - mean).max():.2e}")
        print(f"OIP REST (binary): {abs(oip_rest_mean(http, f'{name}-encoder', pixels) - mean).max():.2e}")
        seeded = client.sample_prior(16, seed=5)
        latents, _, samples = oip_grpc(
            target, f"{name}-sample-prior", "count", np.array([16], np.int64), seed=5
        )
        same = np.array_equal(np.frombuffer(latents, np.float32).reshape(16, -1), seeded["latents"])
        same &= np.array_equal(np.frombuffer(samples, np.uint8).reshape(16, -1), seeded["samples"])
        print(f"OIP sample-prior with seed 5 equals vae.v1's: {same}")


def rows_per_s(repo: Path, device: str, pixels: np.ndarray, seconds: float) -> float:
    with serving(repo, device) as (target, _), VaeClient(target, timeout=60) as client:
        for _ in range(5):
            client.encode(pixels)
        calls, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            client.encode(pixels)
            calls += 1
        return calls * len(pixels) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path("models"), help="model repository")
    parser.add_argument("--name", default="mnist", help="model name in it")
    parser.add_argument("--data-dir", type=Path, help="folder of the MNIST IDX files")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each rows/s measurement")
    args = parser.parse_args()
    version = resolve(args.repo, args.name)
    dataset = load_dataset(version.manifest.dataset, args.data_dir, progress=False)
    pixels = dataset.test_images[:1024].reshape(1024, -1)
    parity(args.repo, args.name, pixels, version.manifest.binarization)
    for device in ("cuda", "cpu"):
        rate = rows_per_s(args.repo, device, pixels, args.seconds)
        print(f"{device}: batch-1,024 uint8 Encode from one client: {rate:,.0f} rows/s")


if __name__ == "__main__":
    main()
