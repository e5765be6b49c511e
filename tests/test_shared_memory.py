"""Tensors by reference: a client on the server's host passes Encode's inputs and
outputs through shared memory (the real server, a real POSIX shared-memory object)."""

from __future__ import annotations

import uuid
from multiprocessing import shared_memory
from pathlib import Path

import grpc
import numpy as np
import pytest
import servers

from vaeserve._proto import vae_pb2, vae_pb2_grpc
from vaeserve.client import ServiceError, VaeClient
from vaeserve.codec import to_tensor
from vaeserve.datasets import model_inputs

D, M = 784, 8
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
def server(serve):
    return serve("--shared-memory")


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield vae_pb2_grpc.VaeServiceStub(channel)


@pytest.fixture
def region(stub):
    """A 64 KiB object registered as 'test-region'; the test's stub may use it."""
    memory = shared_memory.SharedMemory(name=f"vaeserve-test-{uuid.uuid4().hex}", create=True, size=65536)
    stub.RegisterSharedMemory(
        vae_pb2.RegisterSharedMemoryRequest(name="test-region", key=memory.name, byte_size=memory.size)
    )
    yield memory
    stub.UnregisterSharedMemory(vae_pb2.UnregisterSharedMemoryRequest(name="test-region"))
    memory.close()
    memory.unlink()


status = servers.raw_status


def test_encode_through_shared_memory_equals_bytes(server, mnist) -> None:
    pixels = mnist.test_images[:2500]
    options = {"chunk_rows": 300, "max_in_flight": 3}
    shm = VaeClient(server.target, **options, shared_memory=True)
    with VaeClient(server.target, **options) as plain, shm:
        for x in (pixels, model_inputs(pixels, "threshold")):
            by_bytes, by_reference = plain.encode(x, sample=True, seed=5), shm.encode(x, sample=True, seed=5)
            assert by_reference["mean"].shape == (2500, M)
            for name in ("mean", "stddev", "z"):
                assert np.array_equal(by_bytes[name], by_reference[name]), name
        with pytest.raises(ValueError, match="does not fit"):
            shm.encode(np.zeros((300, 2 * D), np.float32))


def test_outputs_land_in_the_range_the_request_names(stub, region) -> None:
    x = np.zeros((2, D), np.uint8)
    x[1, :300] = 255
    np.ndarray(x.shape, np.uint8, buffer=region.buf)[...] = x
    request = vae_pb2.EncodeRequest(
        inputs=vae_pb2.Tensor(
            shape=x.shape,
            dtype=vae_pb2.DATA_TYPE_UINT8,
            shared_memory=vae_pb2.SharedMemoryRef(region="test-region", offset=0, byte_size=x.nbytes),
        ),
        output_shared_memory=vae_pb2.SharedMemoryRef(region="test-region", offset=4096, byte_size=1024),
    )
    response = stub.Encode(request)
    expected = stub.Encode(vae_pb2.EncodeRequest(inputs=to_tensor(x)))
    assert response.mean.data == b"" and response.mean.shared_memory.offset == 4096
    assert response.stddev.shared_memory.offset == 4096 + 2 * M * 4
    for name in ("mean", "stddev"):
        ref = getattr(response, name).shared_memory
        written = np.frombuffer(region.buf, np.float32, 2 * M, ref.offset).reshape(2, M)
        assert np.array_equal(written, np.frombuffer(getattr(expected, name).data, np.float32).reshape(2, M))
        del written


def ref(offset: int = 0, size: int = D * 4, region: str = "test-region") -> vae_pb2.SharedMemoryRef:
    return vae_pb2.SharedMemoryRef(region=region, offset=offset, byte_size=size)


def shared_input(where: vae_pb2.SharedMemoryRef, data: bytes = b"") -> vae_pb2.Tensor:
    return vae_pb2.Tensor(shape=[1, D], dtype=vae_pb2.DATA_TYPE_FLOAT32, data=data, shared_memory=where)


def encode(inputs: vae_pb2.Tensor, **fields) -> vae_pb2.EncodeRequest:
    return vae_pb2.EncodeRequest(inputs=inputs, **fields)


def register(name: str, key: str, byte_size: int) -> vae_pb2.RegisterSharedMemoryRequest:
    return vae_pb2.RegisterSharedMemoryRequest(name=name, key=key, byte_size=byte_size)


@pytest.mark.parametrize(
    ("request_", "code", "fragment"),
    [
        (encode(shared_input(ref(region="nope"))), NOT_FOUND, "no region named 'nope'"),
        (encode(shared_input(ref(offset=65000))), INVALID, "outside region"),
        (encode(shared_input(ref(size=100))), INVALID, "the shape and dtype take 3,136"),
        (encode(shared_input(ref(), b"\0" * D * 4)), INVALID, "both data and shared_memory"),
        (
            encode(shared_input(ref()), output_shared_memory=ref(8192, 10)),
            INVALID,
            "mean and stddev need 64 bytes; the range holds 10",
        ),
    ],
)
def test_bad_references_get_a_precise_status(stub, region, request_, code, fragment: str) -> None:
    got, details = status(stub.Encode, request_)
    assert got == code and fragment in details, (got, details)


def test_bad_registrations_get_a_precise_status(stub, region) -> None:
    cases = [
        (register("a", "vaeserve-missing", 8), NOT_FOUND, "no shared-memory object"),
        (register("a", "../etc/passwd", 8), INVALID, "no '/'"),
        (register("a", "psm_someone_elses", 8), INVALID, "only objects named vaeserve-"),
        (register("a", region.name, 10**6), INVALID, "holds 65,536 bytes"),
        (register("test-region", region.name, 8), grpc.StatusCode.ALREADY_EXISTS, "already registered"),
    ]
    for request, code, fragment in cases:
        got, details = status(stub.RegisterSharedMemory, request)
        assert got == code and fragment in details, (got, details)
    got, details = status(stub.UnregisterSharedMemory, vae_pb2.UnregisterSharedMemoryRequest(name="never"))
    assert got == NOT_FOUND and "'never'" in details


def test_a_server_without_shared_memory_refuses_it(repo: Path, tmp_path: Path) -> None:
    with servers.running(repo, tmp_path / "serve.log") as plain:
        with pytest.raises(ServiceError) as info:
            VaeClient(plain.target, shared_memory=True).encode(np.zeros((1, D), np.uint8))
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "--shared-memory" in info.value.details


def test_client_registers_again_with_a_restarted_server(repo: Path, tmp_path: Path, mnist) -> None:
    """A restarted server (or another of its --workers) holds no region: the client
    registers its own again and the call goes through."""
    port = servers.free_port()
    pixels = mnist.test_images[:300]
    first = servers.start(repo, tmp_path / "first.log", "--shared-memory", port=port)
    with VaeClient(first.target, shared_memory=True, chunk_rows=128) as client:
        before = client.encode(pixels)
        assert first.stop() == 0
        with servers.running(repo, tmp_path / "second.log", "--shared-memory", port=port):
            after = client.encode(pixels)
    np.testing.assert_array_equal(after["mean"], before["mean"])
    np.testing.assert_array_equal(after["stddev"], before["stddev"])


def test_regions_of_deleted_objects_are_forgotten(stub, region) -> None:
    doomed = shared_memory.SharedMemory(name=f"vaeserve-test-{uuid.uuid4().hex}", create=True, size=4096)
    stub.RegisterSharedMemory(register("doomed", doomed.name, 4096))
    doomed.close()
    doomed.unlink()  # its client is gone without unregistering
    stub.RegisterSharedMemory(register("next", region.name, 8))  # a registration sweeps
    stub.UnregisterSharedMemory(vae_pb2.UnregisterSharedMemoryRequest(name="next"))
    got, details = status(stub.UnregisterSharedMemory, vae_pb2.UnregisterSharedMemoryRequest(name="doomed"))
    assert got == NOT_FOUND and "'doomed'" in details
