"""A closed-loop gRPC load generator, run in its own process so it does not share the
server's interpreter: ``concurrency`` callers each send the same request back to back."""

from __future__ import annotations

import asyncio
import multiprocessing
import time

import grpc
import numpy as np

from vaeserve._proto import vae_pb2, vae_pb2_grpc


async def _drive(target: str, request: bytes, concurrency: int, seconds: float) -> tuple[int, list[float]]:
    message = vae_pb2.EncodeRequest.FromString(request)
    options = [("grpc.max_receive_message_length", 1 << 27), ("grpc.max_send_message_length", 1 << 27)]
    # One connection per caller, as a pool of clients would open: the kernel spreads
    # connections (not calls) over the server's worker processes.
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(concurrency)]
    stubs = [vae_pb2_grpc.VaeServiceStub(channel) for channel in channels]
    for stub in stubs:
        await stub.Encode(message)  # warm-up: connection, first batch
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def caller(stub: vae_pb2_grpc.VaeServiceStub) -> None:
        while (start := time.perf_counter()) < deadline:
            await stub.Encode(message)
            latencies.append(time.perf_counter() - start)

    started = time.perf_counter()
    await asyncio.gather(*(caller(stub) for stub in stubs))
    elapsed = time.perf_counter() - started
    for channel in channels:
        await channel.close()
    return len(latencies), [*latencies, elapsed]


def _worker(
    target: str, request: bytes, concurrency: int, seconds: float, out: multiprocessing.Queue
) -> None:
    out.put(asyncio.run(_drive(target, request, concurrency, seconds)))


def run_load(
    target: str, request: vae_pb2.EncodeRequest, concurrency: int, seconds: float
) -> dict[str, float]:
    """Calls/s, rows/s and latency percentiles (ms) measured by a separate process."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(
        target=_worker, args=(target, request.SerializeToString(), concurrency, seconds, queue)
    )
    process.start()
    calls, timings = queue.get(timeout=seconds + 120)
    process.join()
    elapsed, latencies = timings[-1], np.asarray(timings[:-1]) * 1000
    rows = int(request.inputs.shape[0])
    return {
        "calls_per_s": calls / elapsed,
        "rows_per_s": calls * rows / elapsed,
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
    }


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
    asyncio.run(_serve_noop(port, response, ready))


def noop_ceiling(
    port: int,
    request: vae_pb2.EncodeRequest,
    response: vae_pb2.EncodeResponse,
    concurrency: int,
    seconds: float,
) -> dict[str, float]:
    """The same load against a no-op grpc.aio server in its own process."""
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    process = context.Process(target=_noop_worker, args=(port, response.SerializeToString(), ready))
    process.start()
    ready.wait(60)
    try:
        return run_load(f"127.0.0.1:{port}", request, concurrency, seconds)
    finally:
        process.kill()
        process.join()
