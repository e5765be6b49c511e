"""Triton Inference Server 2.51 as the benchmarks' peer, serving the same encoder.onnx.

The `nvidia-pytriton` 0.7.0 wheel ships the real `tritonserver` binary (its C++ gRPC front end and
dynamic batcher) and its python backend, but not Triton's onnxruntime backend. So the model here
is a python-backend model that runs onnxruntime itself: Triton's front end and batcher, the same
onnxruntime as vaeserve. It is named ``NAME-encoder`` with input ``x`` and outputs ``mean`` and
``stddev``, so `vae bench --protocol oip-grpc --model NAME` loads Triton and vaeserve alike.

The backend's stub links Debian's libpython3.11, so the peer's venv is built with
/usr/bin/python3.11 (once, in the temp folder, from PyPI). Where that cannot be done, the peer
is skipped with a message, as h2load is.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

PYTHON = Path("/usr/bin/python3.11")
HOME = Path(tempfile.gettempdir()) / "vaeserve-triton-peer"
PACKAGES = ("nvidia-pytriton==0.7.0", "onnxruntime", "numpy")
MODEL = '''"""Triton python-backend model: encoder.onnx beside this file, on onnxruntime."""
import os
import sys

HERE = os.path.dirname(__file__)
sys.path.insert(0, open(os.path.join(HERE, "site.txt")).read().strip())

import onnxruntime  # noqa: E402
import triton_python_backend_utils as triton  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get("PEER_THREADS", "2"))
        self.session = onnxruntime.InferenceSession(os.path.join(HERE, "encoder.onnx"), options)

    def execute(self, requests):
        answers = []
        for request in requests:
            x = triton.get_input_tensor_by_name(request, "x").as_numpy()
            mean, stddev = self.session.run(["mean", "stddev"], {"x": x})
            tensors = [triton.Tensor("mean", mean), triton.Tensor("stddev", stddev)]
            answers.append(triton.InferenceResponse(tensors))
        return answers
'''


def config(name: str, input_size: int) -> str:
    return (
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: 4096\n'
        f'input [ {{ name: "x", data_type: TYPE_FP32, dims: [ {input_size} ] }} ]\n'
        'output [ { name: "mean", data_type: TYPE_FP32, dims: [ -1 ] }, '
        '{ name: "stddev", data_type: TYPE_FP32, dims: [ -1 ] } ]\n'
        "dynamic_batching { }\ninstance_group [ { kind: KIND_CPU, count: 1 } ]\n"
    )


def prepare() -> tuple[Path, Path] | str:
    """(the tritonserver folder, the venv's site-packages), or why the peer cannot run here."""
    if not PYTHON.exists():
        return f"Triton peer skipped: {PYTHON} (Debian's, whose libpython the backend stub links) is missing"
    venv = HOME / "venv"
    python = venv / "bin" / "python"
    ready = [str(python), "-c", "import pytriton, onnxruntime"]
    if not python.exists() or subprocess.run(ready, capture_output=True).returncode != 0:
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([str(PYTHON), "-m", "venv", str(venv)], check=True)
        install = subprocess.run([str(python), "-m", "pip", "install", "-q", *PACKAGES], capture_output=True)
        if install.returncode != 0:
            return f"Triton peer skipped: pip could not install {' '.join(PACKAGES)}"
    site = Path(
        subprocess.check_output(
            [str(python), "-c", "import site; print(site.getsitepackages()[0])"], text=True
        ).strip()
    )
    server = HOME / "tritonserver"
    if not (server / "bin" / "tritonserver").exists():
        shutil.rmtree(server, ignore_errors=True)
        shutil.copytree(site / "pytriton" / "tritonserver", server)
        stub = server / "python_backend_stubs" / "3.11" / "triton_python_backend_stub"
        shutil.copy(stub, server / "backends" / "python")
    return server, site


@contextlib.contextmanager
def triton(
    server: Path, site: Path, encoder: Path, name: str, input_size: int, port: int, threads: int
) -> Iterator[str]:
    """Triton serving ``encoder`` as ``NAME-encoder`` on 127.0.0.1:``port`` (gRPC only)."""
    with tempfile.TemporaryDirectory(prefix="vaeserve-triton-repo-") as repo:
        model = Path(repo) / f"{name}-encoder"
        (model / "1").mkdir(parents=True)
        (model / "config.pbtxt").write_text(config(f"{name}-encoder", input_size))
        (model / "1" / "model.py").write_text(MODEL)
        (model / "1" / "site.txt").write_text(str(site))
        shutil.copy(encoder, model / "1" / "encoder.onnx")
        command = [
            str(server / "bin" / "tritonserver"),
            f"--model-repository={repo}",
            f"--backend-directory={server / 'backends'}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={port}",
            "--allow-http=false",
            "--allow-metrics=false",
        ]
        env = {
            **os.environ,
            "LD_LIBRARY_PATH": str(site / "nvidia_pytriton.libs"),
            "PEER_THREADS": str(threads),
        }
        with tempfile.TemporaryFile("w+") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                _wait_ready(f"127.0.0.1:{port}", f"{name}-encoder", process, log)
                yield f"127.0.0.1:{port}"
            finally:
                process.terminate()
                process.wait(60)


def _wait_ready(target: str, model: str, process: subprocess.Popen, log) -> None:
    from vaeserve._proto import grpc_predict_v2_pb2 as pb  # see vaeserve.bench.oip_request
    from vaeserve._proto import grpc_predict_v2_pb2_grpc as pb_grpc

    deadline = time.monotonic() + 120
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline and process.poll() is None:
            with contextlib.suppress(grpc.RpcError):
                if stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=2).ready:
                    return
            time.sleep(0.5)
    log.seek(0)
    raise RuntimeError(f"Triton did not serve {model}:\n{log.read()[-3000:]}")
