"""service.wire: tensor bytes read in place and written once mean exactly what protobuf means."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from vaeserve._proto import vae_pb2
from vaeserve.codec import to_tensor
from vaeserve.service import wire

INPUTS = wire.field_number(vae_pb2.EncodeRequest, "inputs")
parse_encode = wire.tensor_request(vae_pb2.EncodeRequest, INPUTS)
X = np.arange(12, dtype=np.float32).reshape(3, 4) / 12


def rebuilt(received: wire.Received) -> vae_pb2.EncodeRequest:
    """The message with its tensor bytes put back, to compare with protobuf's own parse."""
    message = vae_pb2.EncodeRequest()
    message.CopyFrom(received.message)
    if received.tensors is not None:
        assert not message.inputs.data  # the bytes were really left out of the parse
        message.inputs.data = bytes(received.tensors[0])
    return message


@pytest.mark.parametrize(
    "request_",
    [
        vae_pb2.EncodeRequest(inputs=to_tensor(X)),
        vae_pb2.EncodeRequest(model="m", version="7", inputs=to_tensor(X), sample=True, seed=2**40),
        vae_pb2.EncodeRequest(inputs=to_tensor((X * 255).astype(np.uint8)), model="ü-name"),
        vae_pb2.EncodeRequest(inputs=vae_pb2.Tensor(shape=[3, 4], data=b"")),
        vae_pb2.EncodeRequest(
            inputs=vae_pb2.Tensor(
                shape=[3, 4], shared_memory=vae_pb2.SharedMemoryRef(region="r", byte_size=48)
            ),
            output_shared_memory=vae_pb2.SharedMemoryRef(region="r", offset=48, byte_size=24),
        ),
        vae_pb2.EncodeRequest(model="no inputs"),
    ],
)
def test_encode_request_reads_the_same_message(request_: vae_pb2.EncodeRequest) -> None:
    raw = request_.SerializeToString()
    received = parse_encode(raw)
    assert rebuilt(received) == vae_pb2.EncodeRequest.FromString(raw) == request_
    if request_.inputs.data:
        assert received.tensors is not None and received.tensors[0].obj is raw  # a view, no copy


def test_merged_or_repeated_fields_are_parsed_the_ordinary_way() -> None:
    first = vae_pb2.EncodeRequest(inputs=to_tensor(X)).SerializeToString()
    second = vae_pb2.EncodeRequest(inputs=vae_pb2.Tensor(data=b"\1\2"), model="m").SerializeToString()
    raw = first + second  # protobuf merges: inputs twice, its data twice (the last wins)
    received = parse_encode(raw)
    assert received.tensors is None
    assert received.message == vae_pb2.EncodeRequest.FromString(raw)
    assert received.message.inputs.data == b"\1\2" and list(received.message.inputs.shape) == [3, 4]


@pytest.mark.parametrize("cut", [1, 5, 20, -3])
def test_malformed_bytes_fail_as_protobuf_fails(cut: int) -> None:
    raw = vae_pb2.EncodeRequest(model="m", inputs=to_tensor(X)).SerializeToString()[:cut]
    with pytest.raises(DecodeError):
        vae_pb2.EncodeRequest.FromString(raw)
    with pytest.raises(DecodeError):
        parse_encode(raw)


def test_a_reply_serializes_to_the_ordinary_message() -> None:
    mean, stddev = X.astype(">f4"), X[:, :2].copy()  # a big-endian array goes out little-endian
    samples = (X > 0.5).astype(np.uint8)
    ref = vae_pb2.ModelRef(name="m", version=3)
    fields = {name: wire.field_number(vae_pb2.EncodeResponse, name) for name in ("mean", "stddev", "z")}
    reply = wire.Reply(
        vae_pb2.EncodeResponse(model=ref), ((fields["mean"], mean), (fields["stddev"], stddev[::-1]))
    )
    expected = vae_pb2.EncodeResponse(mean=to_tensor(mean), stddev=to_tensor(stddev[::-1]), model=ref)
    assert vae_pb2.EncodeResponse.FromString(wire.serialize(reply)) == expected
    assert reply.rows == 3
    decoded = vae_pb2.DecodeResponse.FromString(
        wire.serialize(wire.Reply(vae_pb2.DecodeResponse(), ((2, samples),)))
    )
    assert decoded.samples == to_tensor(samples)  # uint8 stays uint8
    assert wire.serialize(expected) == expected.SerializeToString()  # plain messages pass through


def oip_like():
    """A message shaped like OIP's ModelInferRequest/Response, in a pool of its own (the test
    process must not load vaeserve's OIP stubs beside tritonclient's)."""
    file = descriptor_pb2.FileDescriptorProto(name="wire_test.proto", package="wire_test", syntax="proto3")
    message = file.message_type.add(name="Infer")
    message.field.add(name="model_name", number=1, type=9, label=1)
    message.field.add(name="shape", number=3, type=3, label=3)
    message.field.add(name="raw", number=7, type=12, label=3)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("wire_test.Infer"))


def test_repeated_bytes_are_read_in_order_and_written_after_the_message() -> None:
    infer = oip_like()
    request = infer(model_name="m-encoder", shape=[2, 3], raw=[b"abc", b"", b"\0" * 1000])
    raw = request.SerializeToString()
    received = wire.repeated_bytes_request(infer, 7)(raw)
    assert [bytes(v) for v in received.tensors] == list(request.raw)
    assert received.message == infer(model_name="m-encoder", shape=[2, 3])
    assert wire.repeated_bytes_request(infer, 7)(infer(model_name="x").SerializeToString()).tensors is None
    arrays = (X, (X > 0.5).astype(np.uint8), np.arange(4, dtype=np.int64))
    reply = wire.Reply(infer(model_name="m"), raw_field=7, raw_outputs=arrays)
    assert infer.FromString(wire.serialize(reply)) == infer(model_name="m", raw=[a.tobytes() for a in arrays])
