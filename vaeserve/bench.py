"""`vae bench`: a closed-loop load generator for operators, and the benchmarks' load.

``concurrency`` callers, each on a connection of its own, send the same Encode call back to
back over vae.v1, the Open Inference Protocol's gRPC (ModelInfer on ``NAME-encoder`` with the
tensor in ``raw_input_contents``, as tritonclient sends it) or its REST API with the binary
tensor data extension. The load runs in a process of its own (on uvloop when installed) so it
does not share the caller's interpreter, and reports the CPU it used itself: a load generator
that saturates a core measures itself, not the server.

With ``distinct=N`` the callers cycle through N requests that differ in a few input values each,
so a server's response cache (`vae serve --cache-mb`) misses on each the first time (on every call
of a run shorter than N calls), and hits on every call after the first with the default of one.

With ``shared=True`` (vae.v1) each caller owns a slot of one shared-memory object, as
`VaeClient(shared_memory=True)` does: per call it copies the rows into its slot, sends
references, and copies the outputs out, so the copies a real client makes are counted.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import numpy as np

from vaeserve._proto import vae_pb2, vae_pb2_grpc
from vaeserve.codec import from_tensor, to_tensor
from vaeserve.errors import ConfigError, VaeError, first_line
from vaeserve.rows import Rows
from vaeserve.shared_slots import SharedSlots
from vaeserve.tracecontext import trace_metadata

Call = Callable[[], Awaitable[object]]

PROTOCOLS = ("v1", "oip-grpc", "oip-http")
GRPC_PATHS = {"v1": "/vae.v1.VaeService/Encode", "oip-grpc": "/inference.GRPCInferenceService/ModelInfer"}
HEADER_LENGTH = "Inference-Header-Content-Length"
DATATYPES = {vae_pb2.DATA_TYPE_UINT8: "UINT8", vae_pb2.DATA_TYPE_FLOAT32: "FP32"}


def oip_request(message: vae_pb2.EncodeRequest):
    """The ModelInferRequest. Its stubs are imported here, not at the top: a process that has
    imported tritonclient's (the test suite) cannot load ours too (same package, inference)."""
    from vaeserve._proto import grpc_predict_v2_pb2 as oip

    request = oip.ModelInferRequest(
        model_name=f"{message.model}-encoder", raw_input_contents=[message.inputs.data]
    )
    request.inputs.add(name="x", datatype=DATATYPES[message.inputs.dtype], shape=message.inputs.shape)
    return request


def rest_request(message: vae_pb2.EncodeRequest) -> tuple[str, bytes, dict[str, str]]:
    """(path, body, headers) of the same call over HTTP, outputs asked for as binary."""
    header = {
        "inputs": [
            {
                "name": "x",
                "datatype": DATATYPES[message.inputs.dtype],
                "shape": list(message.inputs.shape),
                "parameters": {"binary_data_size": len(message.inputs.data)},
            }
        ],
        "parameters": {"binary_data_output": True},
    }
    encoded = json.dumps(header).encode()
    headers = {HEADER_LENGTH: str(len(encoded)), "Content-Type": "application/octet-stream"}
    return f"/v2/models/{message.model}-encoder/infer", encoded + message.inputs.data, headers


def grpc_body(protocol: str, message: vae_pb2.EncodeRequest) -> bytes:
    """The serialized request a gRPC call of ``protocol`` sends."""
    return (oip_request(message) if protocol == "oip-grpc" else message).SerializeToString()


class LoadError(VaeError):
    """The load generator could not run (a target it cannot reach, a refused warm-up call)."""


class CallFailedError(Exception):
    """A REST call answered with something other than 200; ``code`` is the HTTP status."""

    def __init__(self, code: str, body: str) -> None:
        super().__init__(f"HTTP {code}: {body}")
        self.code = code


# One connection per caller, as a pool of clients would open (a channel of its own subchannel
# pool; else channels with equal options share one connection): the kernel spreads
# connections, not calls, over `vae serve --workers`.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 1 << 27),
    ("grpc.max_send_message_length", 1 << 27),
    ("grpc.use_local_subchannel_pool", 1),
]
Close = Callable[[], Awaitable[None]]


MAX_DISTINCT = 1_000_000  # requests a load generator builds up front (batch 1 of MNIST: 0.8 GB)


def variants(message: vae_pb2.EncodeRequest, distinct: int) -> list[vae_pb2.EncodeRequest]:
    """``distinct`` requests: ``message``, then for k = 1, 2, … a copy with the values at the
    positions of k's set bits flipped (a uint8 pixel v to 255 - v, a float x in [0, 1] to 1 - x):
    each a valid input, each one different."""
    dtype = np.uint8 if message.inputs.dtype == vae_pb2.DATA_TYPE_UINT8 else np.float32
    values = np.frombuffer(message.inputs.data, dtype)
    most = min(MAX_DISTINCT, 2 ** min(values.size, 63))
    if not 1 <= distinct <= most:
        raise ConfigError(f"--distinct {distinct}: expected 1 to {most:,} ({values.size} input values)")
    flip = (lambda v: 255 - v) if dtype == np.uint8 else (lambda v: 1 - v)
    found = [message]
    for k in range(1, distinct):
        positions = [bit for bit in range(k.bit_length()) if k >> bit & 1]
        flipped = values.copy()
        flipped[positions] = flip(flipped[positions])
        variant = vae_pb2.EncodeRequest()
        variant.CopyFrom(message)
        variant.inputs.data = flipped.tobytes()
        found.append(variant)
    return found


def _turns(messages: list, concurrency: int) -> list[Iterator]:
    """Each caller's endless round of the requests, callers starting spread over it."""
    count = len(messages)
    return [
        itertools.cycle(messages[i * count // concurrency :] + messages[: i * count // concurrency])
        for i in range(concurrency)
    ]


async def _drive(
    protocol: str, target: str, request: bytes, concurrency: int, seconds: float, shared: bool, distinct: int
) -> dict:
    messages = variants(vae_pb2.EncodeRequest.FromString(request), distinct)
    if protocol == "oip-http":
        calls, close = await _http_callers(target, messages, concurrency)
    else:
        calls, close = await _grpc_callers(protocol, target, messages, concurrency, shared)
    for call in calls:
        await call()  # warm-up: connection, first batch; a failure here ends the run
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    deadline = time.perf_counter() + seconds

    async def caller(call: Call) -> None:
        while (start := time.perf_counter()) < deadline:
            try:
                await call()
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] += 1
            except CallFailedError as exc:
                errors[exc.code] += 1
            else:
                latencies.append(time.perf_counter() - start)

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(caller(call) for call in calls))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    await close()
    return {"latencies": latencies, "errors": dict(errors), "elapsed": elapsed, "cpu": cpu}


def _sender(method: Callable, turn: Iterator, metadata: tuple) -> Call:
    """A caller sending the next request of its turn on each call."""
    return lambda: method(next(turn), metadata=metadata)


async def _grpc_callers(
    protocol: str, target: str, messages: list[vae_pb2.EncodeRequest], concurrency: int, shared: bool
) -> tuple[list[Call], Close]:
    channels = [grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(concurrency)]
    traced = trace_metadata()  # the run's trace context, if it has one: every call joins it
    slots = None
    if protocol == "oip-grpc":
        from vaeserve._proto.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub  # see oip_request

        turns = _turns([oip_request(m) for m in messages], concurrency)
        calls = [_sender(GRPCInferenceServiceStub(c).ModelInfer, t, traced) for c, t in zip(channels, turns)]
    elif shared:
        if len(messages) > 1:
            raise ConfigError("--distinct goes without --shared-memory (each caller's slot holds one input)")
        slots, calls = await _shared_callers([vae_pb2_grpc.VaeServiceStub(c) for c in channels], messages[0])
    else:
        turns = _turns(messages, concurrency)
        calls = [_sender(vae_pb2_grpc.VaeServiceStub(c).Encode, t, traced) for c, t in zip(channels, turns)]

    async def close() -> None:
        if slots is not None:
            stub = vae_pb2_grpc.VaeServiceStub(channels[0])
            await stub.UnregisterSharedMemory(vae_pb2.UnregisterSharedMemoryRequest(name=slots.name))
            slots.close()
        for channel in channels:
            await channel.close()

    return calls, close


async def _http_callers(
    target: str, messages: list[vae_pb2.EncodeRequest], concurrency: int
) -> tuple[list[Call], Close]:
    """A session of one connection per caller, the binary tensor data extension both ways."""
    import aiohttp

    path, _, headers = rest_request(messages[0])
    headers.update(trace_metadata())
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) for _ in range(concurrency)]
    turns = _turns([rest_request(m)[1] for m in messages], concurrency)

    def caller(session: aiohttp.ClientSession, turn: Iterator[bytes]) -> Call:
        async def call() -> bytes:
            async with session.post(f"http://{target}{path}", data=next(turn), headers=headers) as response:
                answer = await response.read()
                if response.status != 200:
                    raise CallFailedError(str(response.status), answer[:300].decode(errors="replace"))
                return answer

        return call

    async def close() -> None:
        for session in sessions:
            await session.close()

    return [caller(s, t) for s, t in zip(sessions, turns)], close


async def _shared_callers(
    stubs: list[vae_pb2_grpc.VaeServiceStub], message: vae_pb2.EncodeRequest
) -> tuple[SharedSlots, list[Call]]:
    rows = from_tensor(message.inputs, "inputs", Rows(int(message.inputs.shape[1])))
    out_bytes = len(rows) * 2 * 4 * 512  # room for mean and stddev of up to 512 latents
    slots = SharedSlots(len(stubs), rows.nbytes + out_bytes, rows.nbytes)
    traced = trace_metadata()
    await stubs[0].RegisterSharedMemory(slots.registration())

    def caller(index: int, stub: vae_pb2_grpc.VaeServiceStub) -> Call:
        async def call() -> object:
            inputs, outputs = slots.put(index, rows)
            request = vae_pb2.EncodeRequest(
                model=message.model, version=message.version, inputs=inputs, output_shared_memory=outputs
            )
            response = await stub.Encode(request, metadata=traced)
            return [
                from_tensor(t, n, Rows(int(t.shape[1])), slots.read).copy()
                for n, t in (("mean", response.mean), ("stddev", response.stddev))
            ]

        return call

    return slots, [caller(i, stub) for i, stub in enumerate(stubs)]


def _worker(
    protocol: str,
    target: str,
    request: bytes,
    concurrency: int,
    seconds: float,
    shared: bool,
    distinct: int,
    out,
) -> None:
    drive = _drive(protocol, target, request, concurrency, seconds, shared, distinct)
    try:
        out.put(_run(drive))
    except grpc.aio.AioRpcError as exc:
        out.put({"failed": f"{exc.code().name}: {exc.details()}"})
    except Exception as exc:  # reported to the parent, which raises it as one line
        out.put({"failed": first_line(exc)})


def _run(main: Awaitable) -> dict:
    """On uvloop when installed (as `vae serve` runs), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def run_load(
    target: str,
    request: vae_pb2.EncodeRequest,
    concurrency: int,
    seconds: float,
    shared: bool = False,
    protocol: str = "v1",
    distinct: int = 1,
) -> dict[str, float]:
    """Calls/s, rows/s and latency percentiles (ms) measured by a separate process; ``protocol``
    is one of PROTOCOLS (``target`` the HTTP port's for oip-http); ``distinct`` requests in turn."""
    variants(request, distinct)  # a count it cannot make is refused here, not in the process
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    args = (protocol, target, request.SerializeToString(), concurrency, seconds, shared, distinct, queue)
    process = context.Process(target=_worker, args=args)
    process.start()
    result = queue.get(timeout=seconds + 120)
    process.join()
    if "failed" in result:
        raise LoadError(f"the load generator failed against {target} over {protocol}: {result['failed']}")
    elapsed, latencies = result["elapsed"], np.asarray(result["latencies"]) * 1000
    calls, rows = len(latencies), int(request.inputs.shape[0])
    percentiles = np.percentile(latencies, (50, 90, 99)) if calls else (float("nan"),) * 3
    return {
        "calls_per_s": calls / elapsed,
        "rows_per_s": calls * rows / elapsed,
        "p50_ms": float(percentiles[0]),
        "p90_ms": float(percentiles[1]),
        "p99_ms": float(percentiles[2]),
        "errors": result["errors"],
        "load_cpu_cores": result["cpu"] / elapsed,
    }


# -- `vae bench` ----------------------------------------------------------------------------------
COLUMNS = ("rows/s", "calls/s", "p50 ms", "p90 ms", "p99 ms", "errors", "load CPU")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="load a running server: rows/s, calls/s, latency percentiles and errors per cell",
        description="Closed-loop Encode load on a running `vae serve` (or any OIP server with a "
        "NAME-encoder model), from a separate process that reports the CPU it used itself. "
        "Each cell: a warm-up call per caller, then SECONDS of calls.",
    )
    parser.add_argument("--target", required=True, help="HOST:PORT (the HTTP port for --protocol oip-http)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="v1", help="what to speak (default v1)")
    parser.add_argument(
        "--model", default="", help="model NAME (default: the server's default; required for oip-http)"
    )
    parser.add_argument("--batch", default="1,64,256,1024", help="rows per call, comma-separated")
    parser.add_argument("--concurrency", default="1,4,8", help="callers in flight, comma-separated")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each cell (default 3)")
    parser.add_argument("--dtype", choices=("uint8", "float32"), default="uint8", help="input dtype")
    parser.add_argument(
        "--shared-memory", action="store_true", help="vae.v1 only: tensors through shared memory"
    )
    parser.add_argument(
        "--distinct",
        type=int,
        default=1,
        help="requests the callers cycle through, each differing in a few input values (default 1: "
        "the same call; more than the run makes: every call a --cache-mb server's miss)",
    )
    parser.add_argument("--json", action="store_true", help="print the cells as JSON instead of a table")
    parser.set_defaults(handler=bench_command)


def bench_command(args: argparse.Namespace) -> int:
    batches, concurrencies = _counts(args.batch, "--batch"), _counts(args.concurrency, "--concurrency")
    if args.shared_memory and args.protocol != "v1":
        raise ConfigError("--shared-memory goes with --protocol v1")
    if args.shared_memory and args.distinct > 1:
        raise ConfigError("--distinct goes without --shared-memory (each caller's slot holds one input)")
    if args.seconds <= 0:
        raise ConfigError(f"--seconds {args.seconds}: expected a positive duration")
    model, columns = discover(args.protocol, args.target, args.model)
    pixels = np.random.default_rng(0).integers(0, 256, (max(batches), columns), dtype=np.uint8)
    rows = pixels if args.dtype == "uint8" else (pixels > 127).astype(np.float32)
    if not args.json:
        print(
            f"{args.protocol} on {args.target}, model {model}, {args.dtype} inputs, {args.seconds:g} s a cell"
        )
        print(f"{'batch':>6}{'conc':>6}" + "".join(f"{c:>11}" for c in COLUMNS))
    cells = []
    for batch in batches:
        for concurrency in concurrencies:
            message = vae_pb2.EncodeRequest(model=model, inputs=to_tensor(rows[:batch]))
            figures = run_load(
                args.target,
                message,
                concurrency,
                args.seconds,
                args.shared_memory,
                args.protocol,
                args.distinct,
            )
            cells.append({"batch": batch, "concurrency": concurrency, **figures})
            if not args.json:
                print(_row(cells[-1]), flush=True)
    if args.json:
        print(json.dumps({"protocol": args.protocol, "target": args.target, "model": model, "cells": cells}))
    return 1 if any(cell["errors"] for cell in cells) else 0


def discover(protocol: str, target: str, model: str) -> tuple[str, int]:
    """The model's name and input size D, from the server itself; an unreachable target is a
    one-line error."""
    if protocol == "oip-http":
        if not model:
            raise ConfigError("--protocol oip-http needs --model NAME (REST has no list of models)")
        url = f"http://{target}/v2/models/{model}-encoder"
        try:
            with urllib.request.urlopen(url, timeout=10) as answer:
                metadata = json.loads(answer.read())
        except (OSError, ValueError) as exc:
            raise LoadError(f"cannot read {url}: {first_line(exc)}") from None
        return model, int(metadata["inputs"][0]["shape"][1])
    if protocol == "oip-grpc" and model:  # any OIP server (Triton too) answers ModelMetadata
        return model, _oip_input_size(target, f"{model}-encoder")
    from vaeserve.client import VaeClient

    with VaeClient(target, timeout=10) as client:
        try:
            infos = client.model_info(model)
        except VaeError as exc:
            raise LoadError(f"cannot ask {target} for its models: {exc}") from None
    chosen = next((i for i in infos if i["is_default"]), infos[0]) if not model else infos[0]
    return chosen["name"], int(chosen["input_size"])


def _oip_input_size(target: str, name: str) -> int:
    from vaeserve._proto import grpc_predict_v2_pb2 as pb  # see oip_request
    from vaeserve._proto import grpc_predict_v2_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name=name), timeout=10)
        except grpc.RpcError as exc:
            raise LoadError(
                f"cannot ask {target} for {name}'s metadata: {exc.code().name}: {exc.details()}"
            ) from None
    return int(metadata.inputs[0].shape[-1])


def _counts(text: str, flag: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ConfigError(f"{flag} {text!r}: expected positive integers separated by commas")
    return counts


def _row(cell: dict) -> str:
    errors = sum(cell["errors"].values())
    return (
        f"{cell['batch']:>6}{cell['concurrency']:>6}{cell['rows_per_s']:>11,.0f}{cell['calls_per_s']:>11,.0f}"
        f"{cell['p50_ms']:>11.2f}{cell['p90_ms']:>11.2f}{cell['p99_ms']:>11.2f}{errors:>11,}"
        f"{cell['load_cpu_cores']:>10.2f}c"
    )


def rss_mb(pid: int) -> float:
    """A process's resident memory in MiB (Linux), as the benchmarks and tests read a server's."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")
