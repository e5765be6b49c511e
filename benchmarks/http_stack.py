"""Which HTTP stack and JSON library the OIP REST front end runs on: the candidates measured.

    python -m benchmarks.http_stack --seconds 3

1. A no-op OIP infer endpoint (read the body, parse its JSON, answer a small JSON body) on
   each stack, in its own process on uvloop, loaded by h2load over HTTP/1.1 from another
   process: aiohttp (what vaeserve uses), and uvicorn (httptools parser) with a Starlette app
   and with a bare ASGI app, where those are installed (`pip install uvicorn starlette
   httptools`; they are not vaeserve dependencies, so their rows are skipped without them).
2. JSON: orjson beside the standard library on a batch-1 request (784 values) and a batch-64
   response (64 × 784 float32 values), in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import multiprocessing
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson

from benchmarks.timing import rows_per_second

ANSWER = b'{"model_name":"m-encoder","outputs":[]}'
PATH = "/v2/models/m-encoder/infer"


def request_body(rows: int) -> bytes:
    x = (np.random.default_rng(0).random((rows, 784)) > 0.5).astype(np.float32)
    tensor = {"name": "x", "datatype": "FP32", "shape": [rows, 784], "data": x.ravel().tolist()}
    return json.dumps({"inputs": [tensor]}).encode()


def _aiohttp(port: int, ready) -> None:
    from aiohttp import web

    async def infer(request: web.Request) -> web.Response:
        orjson.loads(await request.read())
        return web.Response(body=ANSWER, content_type="application/json")

    async def main() -> None:
        app = web.Application()
        app.router.add_post(PATH, infer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ready.set()
        await asyncio.Event().wait()  # until killed

    _run(main())


def _starlette(port: int, ready) -> None:
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    async def infer(request) -> Response:
        orjson.loads(await request.body())
        return Response(ANSWER, media_type="application/json")

    _uvicorn(Starlette(routes=[Route(PATH, infer, methods=["POST"])]), port, ready)


def _bare_asgi(port: int, ready) -> None:
    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        orjson.loads(body)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": ANSWER})

    _uvicorn(app, port, ready)


def _uvicorn(app, port: int, ready) -> None:
    import uvicorn

    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )
    server = uvicorn.Server(config)

    async def main() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        ready.set()
        await task

    _run(main())


def _run(main) -> None:
    import uvloop

    uvloop.run(main)


STACKS = {
    "aiohttp (vaeserve)": (_aiohttp, "aiohttp"),
    "uvicorn + Starlette": (_starlette, "starlette"),
    "uvicorn, bare ASGI app": (_bare_asgi, "uvicorn"),
}


@contextlib.contextmanager
def serving(target, port: int) -> Iterator[None]:
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    process = context.Process(target=target, args=(port, ready))
    process.start()
    if not ready.wait(60):
        process.kill()
        raise RuntimeError("the server did not start")
    try:
        yield
    finally:
        process.kill()
        process.join()


def h2load_calls_per_s(port: int, body: bytes, concurrency: int, seconds: float) -> float:
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "body.json"
        data.write_bytes(body)
        command = [
            "h2load",
            "--h1",
            f"--duration={round(seconds * 1000)}ms",
            "--warm-up-time=500ms",
            f"--clients={concurrency}",
            "--header=content-type: application/json",
            f"--data={data}",
            f"http://127.0.0.1:{port}{PATH}",
        ]
        out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    done = [line for line in out.splitlines() if line.startswith("finished in")]
    failed = [line for line in out.splitlines() if line.startswith("status codes:")]
    if not done or " 0 2xx" in failed[0]:
        raise RuntimeError(out)
    return float(done[0].split(", ")[1].split()[0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stack_table(seconds: float) -> None:
    print("\n1. No-op OIP infer endpoint, batch-1 JSON body (784 values), h2load over HTTP/1.1 (calls/s)")
    if shutil.which("h2load") is None:
        print("h2load not installed (apt-get install nghttp2-client): skipped")
        return
    body = request_body(1)
    print(f"{'stack':<26}{'conc 1':>10}{'conc 8':>10}")
    for label, (target, module) in STACKS.items():
        if importlib.util.find_spec(module) is None:
            print(f"{label:<26}{'not installed: skipped':>20}")
            continue
        with serving(target, port := free_port()):
            rates = [h2load_calls_per_s(port, body, c, seconds) for c in (1, 8)]
        print(f"{label:<26}" + "".join(f"{r:>10,.0f}" for r in rates), flush=True)


def json_table() -> None:
    print("\n2. JSON (microseconds per operation, median of 5 timed windows)")
    request = request_body(1)
    response = {
        "outputs": [{"name": "probs", "data": np.random.default_rng(0).random((64, 784), np.float32).ravel()}]
    }
    listed = {"outputs": [{"name": "probs", "data": response["outputs"][0]["data"].tolist()}]}
    cases = {
        "parse a batch-1 request": (lambda: json.loads(request), lambda: orjson.loads(request)),
        "write a batch-64 response": (
            lambda: json.dumps(listed).encode(),
            lambda: orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY),
        ),
    }
    print(f"{'operation':<28}{'json':>10}{'orjson':>10}{'speed-up':>10}")
    for label, (standard, fast) in cases.items():
        times = [1e6 / rows_per_second(f, 1) for f in (standard, fast)]
        print(f"{label:<28}{times[0]:>10,.1f}{times[1]:>10,.1f}{times[0] / times[1]:>10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each load measurement")
    args = parser.parse_args()
    started = time.perf_counter()
    stack_table(args.seconds)
    json_table()
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
