"""Several replicas behind one client: calls spread over them, and replicas killed mid-load, again
and again, cost no failed call: what a dead replica never answered is sent to another."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import signal
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import servers

from vaeserve._proto import vae_pb2, vae_pb2_grpc
from vaeserve.client import ServiceError, VaeClient, channel_target
from vaeserve.codec import to_tensor
from vaeserve.datasets import model_inputs
from vaeserve.errors import VaeError
from vaeserve.repository import resolve
from vaeserve.runtime import OnnxPair

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


def ok_calls(server: servers.Server) -> float:
    labels = r'code="OK",method="Encode",model="tiny",protocol="v1"'
    found = re.search(rf"vaeserve_requests_total\{{{labels}\}} (\S+)", server.metrics())
    return float(found.group(1)) if found else 0.0


def kill_replica(server: servers.Server, whole: bool) -> None:
    """SIGKILL a replica under load: its supervisor alone (its worker is then told to stop by the
    kernel and drains, cancelling what it cannot finish) or, as a container or a node dies, every
    process of it at once (connections reset mid-call)."""
    pid = server.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split() if whole else []
    server.process.send_signal(signal.SIGKILL)
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(child), signal.SIGKILL)
    server.process.wait(30)


@pytest.mark.slow
def test_three_replicas_killed_in_turn_under_load_lose_no_call(repo: Path, tmp_path: Path, mnist) -> None:
    """Four callers over three replicas; six times a replica is SIGKILLed mid-load (its supervisor,
    or all its processes) and started again. Every call answers, and answers right."""
    port = servers.free_port()  # the same port on three loopback addresses
    replicas = [
        servers.start(repo, tmp_path / f"{host}-0.log", "--workers", "1", host=host, port=port)
        for host in HOSTS
    ]
    pixels = mnist.test_images[:64]
    expected = OnnxPair.load(resolve(repo, "tiny")).encode(model_inputs(pixels, "threshold"))[0]
    failures: list[BaseException] = []
    answered = [0]
    stop = threading.Event()

    def caller(client: VaeClient, index: int) -> None:
        drawn = client.sample_prior(16, seed=index)["samples"]  # seeded: the same from any replica
        while not stop.is_set():
            try:
                mean = client.encode(pixels)["mean"]
                np.testing.assert_allclose(mean, expected, atol=1e-6, rtol=0)  # every result correct
                np.testing.assert_array_equal(client.sample_prior(16, seed=index)["samples"], drawn)
                answered[0] += 1
            except BaseException as exc:
                failures.append(exc)
                return

    def answers(more: int) -> None:
        goal = answered[0] + more
        servers.until(lambda: answered[0] >= goal or failures, 120, f"{more} more answers")

    target = ",".join(f"{host}:{port}" for host in HOSTS)
    try:
        with VaeClient(target, timeout=20) as client:
            threads = [threading.Thread(target=caller, args=(client, i)) for i in range(4)]
            for thread in threads:
                thread.start()
            answers(60)
            assert all(ok_calls(r) > 0 for r in replicas)  # round robin reaches every replica
            for round_ in range(6):
                index = round_ % len(HOSTS)
                kill_replica(replicas[index], whole=round_ % 2 == 1)  # calls in flight on it
                answers(40)  # served by the other two
                host = HOSTS[index]
                log = tmp_path / f"{host}-{round_ + 1}.log"
                replicas[index] = servers.start(repo, log, "--workers", "1", host=host, port=port)
                # The client reconnects to it: it answers calls again before the next kill.
                servers.until(lambda r=replicas[index]: ok_calls(r) > 0 or failures, 90, f"{host} back")
                assert not failures, failures[0]
            stop.set()
            for thread in threads:
                thread.join(60)
        assert not failures, failures[0]
        assert answered[0] >= 60 + 6 * 40
    finally:
        stop.set()
        for replica in replicas:
            replica.stop()


@pytest.mark.parametrize(
    ("given", "target"),
    [
        ("127.0.0.1:50051", "127.0.0.1:50051"),
        ("10.0.0.1:50051,10.0.0.2:50051", "ipv4:10.0.0.1:50051,10.0.0.2:50051"),
        ("[::1]:50051,[::2]:50051", "ipv6:[::1]:50051,[::2]:50051"),
        ("ipv4:10.0.0.1:1,10.0.0.2:2", "ipv4:10.0.0.1:1,10.0.0.2:2"),
        ("dns:///vaeserve.default.svc:50051", "dns:///vaeserve.default.svc:50051"),
    ],
)
def test_targets(given: str, target: str) -> None:
    assert channel_target(given) == target


def test_a_list_of_host_names_is_refused_with_the_way_out() -> None:
    with pytest.raises(VaeError, match="dns:///NAME:PORT"):
        channel_target("a.example:50051,b.example:50051")


class Stopping(vae_pb2_grpc.VaeServiceServicer):
    """A real server whose first Encode ends as a server stopped mid-call ends it (``ending``:
    CANCELLED, or the stream reset), then answers; or whose handler fails (INTERNAL)."""

    def __init__(self, ending: str) -> None:
        self.ending, self.attempts = ending, 0

    def Encode(self, request, context):  # noqa: N802
        self.attempts += 1
        if self.ending == "failing":
            context.abort(grpc.StatusCode.INTERNAL, "the handler failed")
        if self.attempts == 1:
            if self.ending == "cancelled":
                context.cancel()  # what a draining server does to a call past its grace
                return vae_pb2.EncodeResponse()
            context.abort(grpc.StatusCode.INTERNAL, "Received RST_STREAM with error code 2")
        rows = request.inputs.shape[0]
        mean = np.zeros((rows, 8), np.float32)
        return vae_pb2.EncodeResponse(mean=to_tensor(mean), stddev=to_tensor(mean + 1))


@pytest.mark.parametrize(("ending", "attempts"), [("cancelled", 2), ("reset", 2), ("failing", 1)])
def test_a_call_the_server_never_answered_is_sent_again_and_an_answer_never(
    ending: str, attempts: int
) -> None:
    servicer = Stopping(ending)
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(2))
    vae_pb2_grpc.add_VaeServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with VaeClient(f"127.0.0.1:{port}", timeout=10) as client:
            if ending == "failing":
                with pytest.raises(ServiceError, match="INTERNAL: the handler failed"):
                    client.encode(np.zeros((2, 784), np.float32))
            else:
                assert client.encode(np.zeros((2, 784), np.float32))["stddev"].shape == (2, 8)
        assert servicer.attempts == attempts
    finally:
        server.stop(None)
