"""A closed-loop load generator, run in its own process so it does not share the server's
interpreter: ``concurrency`` callers each send the same Encode call back to back, over
vae.v1, the Open Inference Protocol's gRPC, or its REST API with binary tensors (wire.py).
It runs on the event loop `vae serve` uses (uvloop when installed), as does the no-op
server that shows what Python gRPC alone allows.

With ``shared=True`` each caller owns a slot of one shared-memory object, as
`VaeClient(shared_memory=True)` does: per call it copies the rows into its slot, sends
references, and copies the outputs out, so the copies a real client makes are counted."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import multiprocessing
import time
from collections.abc import Awaitable, Callable, Iterator

import grpc
import numpy as np

from benchmarks.wire import oip_request, rest_request
from vaeserve._proto import vae_pb2, vae_pb2_grpc
from vaeserve.client import SharedSlots
from vaeserve.codec import Rows, from_tensor
from vaeserve.service.cli import run_on_event_loop
from vaeserve.service.heap import keep_freed_heap
from vaeserve.service.settings import ServeSettings

Call = Callable[[], Awaitable[object]]


# One connection per caller, as a pool of clients would open (a channel of its own subchannel
# pool; else channels with equal options share one connection): the kernel spreads
# connections, not calls, over `vae serve --workers`.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 1 << 27),
    ("grpc.max_send_message_length", 1 << 27),
    ("grpc.use_local_subchannel_pool", 1),
]
Close = Callable[[], Awaitable[None]]


async def _drive(
    protocol: str, target: str, request: bytes, concurrency: int, seconds: float, shared: bool
) -> tuple[int, list[float]]:
    message = vae_pb2.EncodeRequest.FromString(request)
    if protocol == "oip-http":
        calls, close = await _http_callers(target, message, concurrency)
    else:
        calls, close = await _grpc_callers(protocol, target, message, concurrency, shared)
    for call in calls:
        await call()  # warm-up: connection, first batch
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def caller(call: Call) -> None:
        while (start := time.perf_counter()) < deadline:
            await call()
            latencies.append(time.perf_counter() - start)

    started = time.perf_counter()
    await asyncio.gather(*(caller(call) for call in calls))
    elapsed = time.perf_counter() - started
    await close()
    return len(latencies), [*latencies, elapsed]


async def _grpc_callers(
    protocol: str, target: str, message: vae_pb2.EncodeRequest, concurrency: int, shared: bool
) -> tuple[list[Call], Close]:
    channels = [grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(concurrency)]
    slots = None
    if protocol == "oip-grpc":
        from vaeserve._proto.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub  # see oip_request

        request = oip_request(message)
        calls = [functools.partial(GRPCInferenceServiceStub(c).ModelInfer, request) for c in channels]
    elif shared:
        slots, calls = await _shared_callers([vae_pb2_grpc.VaeServiceStub(c) for c in channels], message)
    else:
        calls = [functools.partial(vae_pb2_grpc.VaeServiceStub(c).Encode, message) for c in channels]

    async def close() -> None:
        if slots is not None:
            stub = vae_pb2_grpc.VaeServiceStub(channels[0])
            await stub.UnregisterSharedMemory(vae_pb2.UnregisterSharedMemoryRequest(name=slots.name))
            slots.close()
        for channel in channels:
            await channel.close()

    return calls, close


async def _http_callers(
    target: str, message: vae_pb2.EncodeRequest, concurrency: int
) -> tuple[list[Call], Close]:
    """A session of one connection per caller, the binary tensor data extension both ways."""
    import aiohttp

    path, body, headers = rest_request(message)
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) for _ in range(concurrency)]

    def caller(session: aiohttp.ClientSession) -> Call:
        async def call() -> bytes:
            async with session.post(f"http://{target}{path}", data=body, headers=headers) as response:
                answer = await response.read()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {answer[:300]!r}")
                return answer

        return call

    async def close() -> None:
        for session in sessions:
            await session.close()

    return [caller(s) for s in sessions], close


async def _shared_callers(
    stubs: list[vae_pb2_grpc.VaeServiceStub], message: vae_pb2.EncodeRequest
) -> tuple[SharedSlots, list[Call]]:
    rows = from_tensor(message.inputs, "inputs", Rows(int(message.inputs.shape[1])))
    out_bytes = len(rows) * 2 * 4 * 512  # room for mean and stddev of up to 512 latents
    slots = SharedSlots(len(stubs), rows.nbytes + out_bytes, rows.nbytes)
    await stubs[0].RegisterSharedMemory(slots.registration())

    def caller(index: int, stub: vae_pb2_grpc.VaeServiceStub) -> Call:
        async def call() -> object:
            inputs, outputs = slots.put(index, rows)
            request = vae_pb2.EncodeRequest(
                model=message.model, version=message.version, inputs=inputs, output_shared_memory=outputs
            )
            response = await stub.Encode(request)
            return [
                from_tensor(t, n, Rows(int(t.shape[1])), slots.read).copy()
                for n, t in (("mean", response.mean), ("stddev", response.stddev))
            ]

        return call

    return slots, [caller(i, stub) for i, stub in enumerate(stubs)]


def _worker(
    protocol: str, target: str, request: bytes, concurrency: int, seconds: float, shared: bool, out
) -> None:
    out.put(run_on_event_loop(_drive(protocol, target, request, concurrency, seconds, shared), "auto"))


def run_load(
    target: str,
    request: vae_pb2.EncodeRequest,
    concurrency: int,
    seconds: float,
    shared: bool = False,
    protocol: str = "v1",
) -> dict[str, float]:
    """Calls/s, rows/s and latency percentiles (ms) measured by a separate process; ``protocol``
    is one of wire.PROTOCOLS (``target`` the HTTP port's for oip-http)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    args = (protocol, target, request.SerializeToString(), concurrency, seconds, shared, queue)
    process = context.Process(target=_worker, args=args)
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
