"""Attacks from a stranger, each against a real server (issue 37): what it tried, and that the
callers with the token are served all the same."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from multiprocessing import shared_memory
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vaeserve._proto import vae_pb2, vae_pb2_grpc
from vaeserve.client import VaeClient
from vaeserve.codec import to_tensor

TOKEN = "hardening-s3cret"
HELD = 512  # as many as --max-concurrent-rpcs' default


@pytest.fixture(scope="module")
def guarded(serve):
    return serve("--workers", "1", token=TOKEN)


def authenticated_calls_answer(target: str, seconds: float) -> tuple[float, float]:
    """Seconds an authenticated Encode and a Health/Check take, each within ``seconds``."""
    with grpc.insecure_channel(target) as channel:
        started = time.monotonic()
        encoded = vae_pb2_grpc.VaeServiceStub(channel).Encode(
            vae_pb2.EncodeRequest(inputs=to_tensor(np.zeros((2, 784), np.uint8))),
            timeout=seconds,
            metadata=(("authorization", f"Bearer {TOKEN}"),),
        )
        encode_s = time.monotonic() - started
        started = time.monotonic()
        checked = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=seconds)
        check_s = time.monotonic() - started
    assert encoded.mean.shape == [2, 8] and checked.status == health_pb2.HealthCheckResponse.SERVING
    return encode_s, check_s


def test_token_less_held_calls_and_watch_streams_starve_no_one(guarded) -> None:
    """512 token-less Encode calls that send their headers and never their message, and 512
    health Watch streams, all open at once: an authenticated Encode and a Health/Check answer
    within 3 s; the held calls are refused on their headers, Watch streams past the bound at once."""
    never = threading.Event()

    def no_message():
        never.wait()  # a request iterator that never yields
        yield vae_pb2.EncodeRequest()

    channel = grpc.insecure_channel(guarded.target)
    held = channel.stream_unary(
        "/vae.v1.VaeService/Encode",
        request_serializer=vae_pb2.EncodeRequest.SerializeToString,
        response_deserializer=vae_pb2.EncodeResponse.FromString,
    )
    watch = health_pb2_grpc.HealthStub(channel).Watch
    try:
        calls = [held.future(no_message(), timeout=60) for _ in range(HELD)]
        watches = [watch(health_pb2.HealthCheckRequest(), timeout=60) for _ in range(HELD)]
        encode_s, check_s = authenticated_calls_answer(guarded.target, 3.0)
        assert encode_s < 3 and check_s < 3
        refused = [call.exception(timeout=30) for call in calls]
        # Each is refused: on its headers (UNAUTHENTICATED), or, sent before the client learnt the
        # connection's stream limit (a quarter of --max-concurrent-rpcs), refused by HTTP/2 as the
        # Watch streams below can be (UNAVAILABLE, REFUSED_STREAM): a race of the client's.
        codes = [None if e is None else e.code() for e in refused]
        assert set(codes) <= {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE}, set(codes)
        assert codes.count(grpc.StatusCode.UNAUTHENTICATED) >= HELD // 4
        first = []
        for stream in watches:
            try:
                first.append(next(stream).status)
            except grpc.RpcError as exc:
                first.append(exc.code())
        served = sum(status == health_pb2.HealthCheckResponse.SERVING for status in first)
        assert served == HELD // 16  # the bound: a sixteenth of --max-concurrent-rpcs
        # The rest are refused: by the Watch bound, or (UNAVAILABLE) by the connection's stream
        # limit, a quarter of --max-concurrent-rpcs, before the client learnt it.
        refused_codes = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
        assert sum(status in refused_codes for status in first) == HELD - served
    finally:
        never.set()
        channel.close()
    assert "Traceback" not in guarded.output() and " ERROR " not in guarded.output()


def raw_http(server, method: str, path: str, headers: dict[str, bytes | str]) -> tuple[int, str]:
    """One request with headers sent as given (bytes that are not UTF-8 included)."""
    connection = http.client.HTTPConnection(server.http, timeout=30)
    connection.putrequest(method, path)
    for name, value in headers.items():
        connection.putheader(name, value)
    connection.endheaders()
    answer = connection.getresponse()
    status, body = answer.status, answer.read().decode()
    connection.close()
    return status, body


def test_a_bearer_that_is_not_utf8_and_a_version_of_5000_digits_are_4xx(guarded) -> None:
    status, body = raw_http(guarded, "GET", "/v2/models/tiny-encoder", {"Authorization": b"Bearer \xff\xfe"})
    assert status == 401 and "missing or invalid" in body
    long_version = "9" * 5000
    authorized = {"Authorization": f"Bearer {TOKEN}"}
    for path in (
        f"/v2/models/tiny-encoder/versions/{long_version}",
        f"/v2/models/tiny-encoder/versions/{long_version}/ready",
    ):
        status, body = raw_http(guarded, "GET", path, authorized)
        assert status == 404 and "5000 digits" in body and len(body) < 300, (status, body[:200])
    with grpc.insecure_channel(guarded.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        request = vae_pb2.EncodeRequest(version=long_version, inputs=to_tensor(np.zeros((1, 784), np.uint8)))
        with pytest.raises(grpc.RpcError) as refused:
            stub.Encode(request, timeout=30, metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND and "5000 digits" in refused.value.details()
    assert "Traceback" not in guarded.output() and " ERROR " not in guarded.output()


def test_shared_memory_keys_that_are_links_write_nothing_outside_dev_shm(serve, tmp_path) -> None:
    server = serve("--workers", "1", "--shared-memory", token=TOKEN)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious" * 1024)
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    link = Path(f"/dev/shm/vaeserve-link-{tag}")
    original = Path(f"/dev/shm/vaeserve-object-{tag}")
    second_name = Path(f"/dev/shm/vaeserve-second-{tag}")
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    try:
        link.symlink_to(victim)
        original.write_bytes(bytes(8192))
        os.link(original, second_name)
        with grpc.insecure_channel(server.target) as channel:
            stub = vae_pb2_grpc.VaeServiceStub(channel)
            for key, said in ((link.name, "is a symbolic link"), (second_name.name, "with one name")):
                request = vae_pb2.RegisterSharedMemoryRequest(name=key, key=key, byte_size=4096)
                with pytest.raises(grpc.RpcError) as refused:
                    stub.RegisterSharedMemory(request, timeout=30, metadata=metadata)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert said in refused.value.details()
    finally:
        for path in (link, original, second_name):
            path.unlink(missing_ok=True)
    assert victim.read_bytes() == b"precious" * 1024


def test_regions_past_the_limit_are_resource_exhausted(serve) -> None:
    server = serve("--workers", "1", "--shared-memory", token=TOKEN)
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    objects = [shared_memory.SharedMemory(name=f"vaeserve-fill-{os.getpid()}-{i}", create=True, size=64)
               for i in range(257)]  # fmt: skip
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = vae_pb2_grpc.VaeServiceStub(channel)
            codes = []
            for i, region in enumerate(objects):
                request = vae_pb2.RegisterSharedMemoryRequest(name=f"fill-{i}", key=region.name, byte_size=64)
                try:
                    stub.RegisterSharedMemory(request, timeout=30, metadata=metadata)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
            for i in range(256):
                unregister = vae_pb2.UnregisterSharedMemoryRequest(name=f"fill-{i}")
                stub.UnregisterSharedMemory(unregister, timeout=30, metadata=metadata)
    finally:
        for region in objects:
            region.close()
            region.unlink()
    assert codes == [grpc.StatusCode.OK] * 256 + [grpc.StatusCode.RESOURCE_EXHAUSTED]


def test_a_label_command_during_another_update_takes_effect_after_it(repo: Path, tmp_path: Path) -> None:
    """One update holds the labels (it has read them and not yet written) while `vae label`
    sets another: the command waits for it, and both labels are there (before: the holder's
    write, from what it had read, dropped the command's label)."""
    from vaeserve.remote_repository import update_model_labels

    models = tmp_path / "models"
    shutil.copytree(repo, models)
    command = [sys.executable, "-m", "vaeserve.cli", "label", "--repo", str(models), "--name", "tiny", "b=1"]
    other: list[subprocess.Popen] = []

    def slow(labels: dict[str, int]) -> dict[str, int]:
        other.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        with contextlib.suppress(subprocess.TimeoutExpired):
            other[0].wait(5)  # it finishes only if nothing holds it back
        return {**labels, "a": 1}

    update_model_labels(models, "tiny", slow)
    assert other[0].wait(60) == 0, other[0].stderr.read()
    assert json.loads((models / "tiny" / "labels.json").read_text()) == {"a": 1, "b": 1}


def test_rest_bodies_that_trickle_hold_no_slot_and_are_cut_off(serve) -> None:
    """600 connections send an infer's head and then its body a byte at a time: another client's
    infer answers 200 meanwhile, and each trickler gets a 408 once --http-idle-s (2 s) and the
    body's length at 64 KiB/s have passed. A Content-Length over the limit is a 413 at once."""
    server = serve("--workers", "1", "--http-idle-s", "2")
    host, port = server.http.rsplit(":", 1)
    body = json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 784], "datatype": "UINT8", "data": [0] * 784}]}
    ).encode()
    head = (
        f"POST /v2/models/tiny-encoder/infer HTTP/1.1\r\nHost: {server.http}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    tricklers = []
    try:
        for _ in range(600):
            trickler = socket.create_connection((host, int(port)), timeout=30)
            trickler.sendall(head + body[:1])
            tricklers.append(trickler)
        started = time.monotonic()
        status, answer = raw_post(server, "/v2/models/tiny-encoder/infer", body)
        assert status == 200 and json.loads(answer)["outputs"][0]["name"] == "mean", answer[:200]
        assert time.monotonic() - started < 3
        tricklers[0].sendall(body[1:2])  # still trickling
        cut = tricklers[0].recv(4096).decode()
        assert cut.startswith("HTTP/1.1 408") and "did not arrive within 2 s" in cut, cut[:300]
        status, answer = raw_post(server, "/v2/models/tiny-encoder/infer", b"", length=10**12)
        assert status == 413, answer
    finally:
        for trickler in tricklers:
            trickler.close()
    assert "Traceback" not in server.output()


def raw_post(server, path: str, body: bytes, length: int | None = None) -> tuple[int, str]:
    """A POST whose Content-Length may promise more than it sends."""
    connection = http.client.HTTPConnection(server.http, timeout=30)
    connection.putrequest("POST", path)
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(len(body) if length is None else length))
    connection.endheaders(body)
    answer = connection.getresponse()
    status, text = answer.status, answer.read().decode()
    connection.close()
    return status, text


def test_latents_that_overflow_the_decoder_are_refused_not_answered_nan(guarded) -> None:
    with grpc.insecure_channel(guarded.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        huge = np.full((2, 8), 3e38, np.float32)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Decode(
                vae_pb2.DecodeRequest(latents=to_tensor(huge)),
                timeout=30,
                metadata=(("authorization", f"Bearer {TOKEN}"),),
            )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "NaN or infinite" in refused.value.details()


def test_a_manifest_naming_a_file_outside_its_version_is_refused(repo: Path, tmp_path: Path) -> None:
    from vaeserve.errors import RepositoryError
    from vaeserve.repository import load_version

    models = tmp_path / "models"
    shutil.copytree(repo, models)
    second = models / "tiny" / "2"
    shutil.copytree(models / "tiny" / "1", second)
    manifest = json.loads((second / "manifest.json").read_text())
    manifest["version"] = 2
    manifest["graphs"]["encoder"]["file"] = "../1/encoder.onnx"
    (second / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        RepositoryError, match=r"file '../1/encoder.onnx' is not a file name in the version's folder"
    ):
        load_version(second)


def test_model_ready_names_only_what_was_asked(guarded) -> None:
    """ModelReady is open without a token (probes): its 404 must not list what the server holds."""
    for path, asked in (
        ("/v2/models/nothing-encoder/ready", "model 'nothing-encoder' is not served here"),
        ("/v2/models/tiny-encoder/versions/7/ready", "model 'tiny-encoder' version '7' is not served here"),
    ):
        status, body = raw_http(guarded, "GET", path, {})
        assert status == 404 and json.loads(body)["error"] == asked, body
        assert "tiny-decoder" not in body and "loaded" not in body


def server_cpu_s(server) -> float:
    """CPU seconds the server's processes (the supervisor and every descendant) have used."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
                stats[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    tree, ticks = {server.process.pid}, 0
    for _ in range(8):  # the tree is a few levels deep at most
        tree |= {pid for pid, (parent, _) in stats.items() if parent in tree}
    ticks = sum(stats[pid][1] for pid in tree if pid in stats)
    return ticks / os.sysconf("SC_CLK_TCK")


def cpu_until_idle(server, before: float) -> float:
    """The server's CPU seconds since ``before``, read once it has been idle for half a second."""
    last = server_cpu_s(server)
    for _ in range(60):
        time.sleep(0.5)
        now = server_cpu_s(server)
        if now - last < 0.05:
            return now - before
        last = now
    raise AssertionError("the server was still busy 30 s later")


def test_abandoned_scores_stop_and_their_work_is_weighed(serve) -> None:
    """A Score of 512 rows × k = 1,000 whose deadline passes, whose caller cancels it, or whose
    REST client closes the socket stops burning CPU (before: as much as running it through); once
    the scorer's rate is known, such a call with a 0.5 s deadline is refused up front; a call
    whose rows × k is over the scorer's whole budget is refused naming what would be taken."""
    server = serve("--workers", "1", "--max-queue-rows", "65000", token=TOKEN)
    rows = np.random.default_rng(0).integers(0, 2, (512, 784), dtype=np.uint8) * np.uint8(255)
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    request = vae_pb2.ScoreRequest(inputs=to_tensor(rows), iw_samples=1000, seed=1)
    spent = {}
    with grpc.insecure_channel(server.target) as channel:
        score = vae_pb2_grpc.VaeServiceStub(channel).Score
        before = server_cpu_s(server)
        with pytest.raises(grpc.RpcError) as late:
            score(request, timeout=0.3, metadata=metadata)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        spent["deadline"] = cpu_until_idle(server, before)

        before = server_cpu_s(server)
        call = score.future(request, timeout=60, metadata=metadata)
        time.sleep(0.3)
        call.cancel()
        spent["cancelled"] = cpu_until_idle(server, before)

        before = server_cpu_s(server)
        body = json.dumps(
            {
                "inputs": [
                    {"name": "x", "shape": [512, 784], "datatype": "UINT8", "data": rows.ravel().tolist()}
                ],
                "parameters": {"iw_samples": 1000},
            }
        ).encode()
        with socket.create_connection(server.http.split(":"), timeout=30) as sock:
            head = (
                f"POST /v2/models/tiny-score/infer HTTP/1.1\r\nHost: {server.http}\r\n"
                f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            sock.sendall(head.encode() + body)
            time.sleep(0.5)
        spent["socket closed"] = cpu_until_idle(server, before)

        before = server_cpu_s(server)
        whole = score(request, timeout=120, metadata=metadata)
        spent["run through"] = cpu_until_idle(server, before)
        assert list(whole.log_px.shape) == [512]

        before = server_cpu_s(server)
        with pytest.raises(grpc.RpcError) as refused:
            score(request, timeout=0.5, metadata=metadata)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "decoder rows (rows × k) ahead of this call" in refused.value.details()
        spent["refused"] = cpu_until_idle(server, before)

        too_much = vae_pb2.ScoreRequest(inputs=to_tensor(np.tile(rows, (2, 1))), iw_samples=1000)
        with pytest.raises(grpc.RpcError) as over:
            score(too_much, timeout=30, metadata=metadata)
        assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "1024 rows × k = 1000: 1024000 decoder rows" in over.value.details()
        assert "at most 650 rows per call" in over.value.details()
        one_call = score(
            vae_pb2.ScoreRequest(inputs=to_tensor(rows[:100]), iw_samples=1000, seed=5),
            timeout=60,
            metadata=metadata,
        )
    # The client sends a large k's rows in calls of 65,536 decoder rows (here 65 rows), the same
    # scores as one call.
    with VaeClient(server.target, token=TOKEN, timeout=60) as client:
        split = client.score(rows[:100], iw_samples=1000, seed=5)
    np.testing.assert_array_equal(split["log_px"], np.frombuffer(one_call.log_px.data, np.float32))
    print(spent)
    for how in ("deadline", "cancelled", "socket closed", "refused"):
        assert spent[how] < 0.5 * spent["run through"], spent
    assert "Traceback" not in server.output()


def browser_post(server, host: str, **headers: str) -> tuple[int, str]:
    """A text/plain POST to infer, as a page's form or fetch sends it without a preflight."""
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 784], "datatype": "UINT8", "data": [0] * 784}]})
    connection = http.client.HTTPConnection(server.http, timeout=30)
    connection.putrequest("POST", "/v2/models/tiny-encoder/infer", skip_host=True)
    for name, value in {"Host": host, "Content-Type": "text/plain", **headers}.items():
        connection.putheader(name, value)
    connection.putheader("Content-Length", str(len(body)))
    connection.endheaders(body.encode())
    answer = connection.getresponse()
    status, text = answer.status, answer.read().decode()
    connection.close()
    return status, text


def test_pages_of_other_sites_and_rebound_host_names_are_refused(serve) -> None:
    """A token-less server on 127.0.0.1: a cross-site text/plain POST (Origin, Sec-Fetch-Site)
    and a Host name it does not answer to (DNS rebinding) get 403; its own origin, localhost, IP
    addresses and clients that are not browsers are answered."""
    server = serve("--workers", "1")
    port = server.http_port
    own = f"127.0.0.1:{port}"
    for host, headers in (
        (own, {}),
        (f"localhost:{port}", {}),
        (own, {"Origin": f"http://{own}", "Sec-Fetch-Site": "same-origin"}),
        (f"[::1]:{port}", {}),
    ):
        status, text = browser_post(server, host, **headers)
        assert status == 200, (host, headers, text)
    for host, headers, says in (
        (own, {"Origin": "http://evil.example"}, "another origin (http://evil.example)"),
        (own, {"Origin": f"http://localhost:{port + 1}"}, "another origin"),
        (own, {"Sec-Fetch-Site": "cross-site"}, "another origin (cross-site)"),
        (own, {"Origin": "null"}, "another origin"),
        (f"rebound.evil.example:{port}", {}, "Host 'rebound.evil.example' is not a name"),
    ):
        status, text = browser_post(server, host, **headers)
        assert status == 403 and says in text, (host, headers, status, text)


def test_one_connection_cannot_take_every_call_slot(serve) -> None:
    """--max-concurrent-rpcs 8: one connection holding 8 authenticated calls whose message never
    comes gets 2 of them to the server (a quarter; the rest wait in its own HTTP/2 flow), and
    another connection's Encode is answered."""
    server = serve("--workers", "1", "--max-concurrent-rpcs", "8", token=TOKEN)
    never = threading.Event()

    def no_message():
        never.wait()
        yield vae_pb2.EncodeRequest()

    # A connection of its own (channels to one target otherwise share one).
    channel = grpc.insecure_channel(server.target, options=[("grpc.use_local_subchannel_pool", 1)])
    held = channel.stream_unary(
        "/vae.v1.VaeService/Encode",
        request_serializer=vae_pb2.EncodeRequest.SerializeToString,
        response_deserializer=vae_pb2.EncodeResponse.FromString,
    )
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    try:
        calls = [held.future(no_message(), timeout=60, metadata=metadata) for _ in range(8)]
        time.sleep(1)  # the streams the server accepts reach their handlers
        encode_s, _ = authenticated_calls_answer(server.target, 3.0)
        assert encode_s < 3
    finally:
        never.set()
        channel.close()
    assert all(call.done() for call in calls)
