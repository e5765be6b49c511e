"""Clients that hold connections without calls, or send oversized headers, do not starve the
others, and get precise refusals."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import servers

from vaeserve._proto import vae_pb2, vae_pb2_grpc
from vaeserve.client import VaeClient
from vaeserve.codec import to_tensor

SLOW = 150  # connections per port, each stopped partway through its first request


def test_slow_clients_do_not_starve_the_others(repo: Path, tmp_path: Path) -> None:
    with servers.running(repo, tmp_path / "serve.log", "--workers", "1") as server:
        host, port = server.target.rsplit(":", 1)
        held = []
        for _ in range(SLOW):
            for target, partial in (
                ((host, int(port)), b"PRI * HTTP/2.0\r\n"),  # half an HTTP/2 preface
                (
                    (host, server.http_port),
                    b"POST /v2/models/tiny-encoder/infer HTTP/1.1\r\nHost: x\r\nX-Slow: ",
                ),
            ):
                connection = socket.create_connection(target, timeout=5)
                connection.sendall(partial)
                held.append(connection)
        try:
            started = time.monotonic()
            with VaeClient(server.target, timeout=5) as client:
                assert client.encode(np.zeros((1, 784), np.uint8))["mean"].shape == (1, 8)
            ready = urllib.request.urlopen(f"http://{server.http}/v2/health/ready", timeout=5)
            assert ready.status == 200
            assert time.monotonic() - started < 3  # served at once, beside 300 stalled connections
        finally:
            for connection in held:
                connection.close()


def test_oversized_headers_are_refused(repo: Path, tmp_path: Path) -> None:
    with servers.running(repo, tmp_path / "serve.log", "--workers", "1") as server:
        request = vae_pb2.EncodeRequest(inputs=to_tensor(np.zeros((1, 784), np.uint8)))
        with grpc.insecure_channel(server.target) as channel:
            try:
                vae_pb2_grpc.VaeServiceStub(channel).Encode(
                    request, timeout=10, metadata=(("x-big", "a" * 40_000),)
                )
                refused = None
            except grpc.RpcError as error:
                refused = error.code()
        assert refused in (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.INTERNAL,
            grpc.StatusCode.UNAVAILABLE,
        )
        big = urllib.request.Request(f"http://{server.http}/v2/health/ready", headers={"X-Big": "a" * 20_000})
        try:
            urllib.request.urlopen(big, timeout=10)
            status = 200
        except urllib.error.HTTPError as error:
            status = error.code
        assert status in (400, 431)
        with VaeClient(server.target) as client:  # and the server goes on
            assert client.health() == "SERVING"


def test_a_client_trickling_its_headers_is_cut_off(repo: Path, tmp_path: Path) -> None:
    """Slowloris: a byte of header every 0.2 s never completes a request; --http-idle-s closes
    the connection anyway, counted from the connection's start, while a normal call is served."""
    with servers.running(repo, tmp_path / "serve.log", "--workers", "1", "--http-idle-s", "2") as server:
        connection = socket.create_connection(("127.0.0.1", server.http_port), timeout=5)
        connection.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n")
        started, closed = time.monotonic(), False
        while time.monotonic() - started < 10 and not closed:
            try:
                connection.sendall(b"X")
                time.sleep(0.2)
            except OSError:  # reset or broken pipe: the server closed it
                closed = True
            connection.setblocking(False)
            try:
                closed = closed or connection.recv(1) == b""
            except BlockingIOError:
                pass
            except OSError:
                closed = True
            connection.setblocking(True)
        elapsed = time.monotonic() - started
        connection.close()
        assert closed and 1.5 < elapsed < 5, elapsed
        ready = urllib.request.urlopen(f"http://{server.http}/v2/health/ready", timeout=5)
        assert ready.status == 200
