"""The benchmarks' load: `vae bench`'s generator (vaeserve.bench), and a no-op server in its own
process that answers Encode with a fixed response, to show what Python gRPC alone allows. Both
run on the event loop `vae serve` uses (uvloop when installed)."""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Iterator

import grpc

from vaeserve import bench
from vaeserve._proto import vae_pb2, vae_pb2_grpc
from vaeserve.service.cli import run_on_event_loop
from vaeserve.service.heap import keep_freed_heap
from vaeserve.service.settings import ServeSettings


def run_load(target: str, request: vae_pb2.EncodeRequest, *args, **kwargs) -> dict:
    """`vae bench`'s figures, strict: a benchmark figure with a failed call in it is refused."""
    figures = bench.run_load(target, request, *args, **kwargs)
    if figures["errors"]:
        raise RuntimeError(f"calls to {target} failed: {figures['errors']}")
    return figures


class _NoOp(vae_pb2_grpc.VaeServiceServicer):
    """Answers Encode with a fixed response: what the Python gRPC stack alone costs."""

    def __init__(self, response: vae_pb2.EncodeResponse) -> None:
        self.response = response

    async def Encode(self, request, context):  # noqa: N802
        return self.response


async def _serve_noop(port: int, response: bytes, ready: multiprocessing.Event) -> None:
    server = grpc.aio.server()
    vae_pb2_grpc.add_VaeServiceServicer_to_server(_NoOp(vae_pb2.EncodeResponse.FromString(response)), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    ready.set()
    await server.wait_for_termination()


def _noop_worker(port: int, response: bytes, ready: multiprocessing.Event) -> None:
    keep_freed_heap(ServeSettings.heap_keep_mb)  # the heap `vae serve` runs with
    run_on_event_loop(_serve_noop(port, response, ready), "auto")


@contextlib.contextmanager
def noop_server(port: int, response: vae_pb2.EncodeResponse) -> Iterator[str]:
    """A no-op grpc.aio server in its own process, answering Encode with ``response``."""
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    process = context.Process(target=_noop_worker, args=(port, response.SerializeToString(), ready))
    process.start()
    ready.wait(60)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        process.kill()
        process.join()
